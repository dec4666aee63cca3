"""The floor plan of `splitllama/`, read from the code's own imports (every `import` and
`from ... import` anywhere in a file, function-level ones included) and checked against the
floors WRITTEN in docs/architecture.md (its "Floors" table), so the plan and the code cannot
drift apart:

* every package (and top-level module) of `splitllama/` stands on exactly one floor of the table;
* a package imports only packages on LOWER floors (never one on its own floor or above);
* no import circle between files;
* `pipeline/` (the pure planner) imports no torch / megatron, and of splitllama only `config/`
  types and the stdlib-only error module `errors.py`.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "splitllama"
DOC = ROOT / "docs" / "architecture.md"
HEAVY = ("torch", "megatron", "transformer_engine")
PIPELINE_MAY_IMPORT = ("config", "errors")


# ---- reading -----------------------------------------------------------------------------------
def floors_from_doc(text: str) -> dict[str, int]:
    """{unit: floor} from the markdown table under the heading ``## Floors``: rows
    ``| N | `a`, `b` | ... |``, floor 1 the ground."""
    m = re.search(r"^## Floors\b.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, "docs/architecture.md has no '## Floors' section"
    floors: dict[str, int] = {}
    for n, cell in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", m.group(1), re.M):
        for unit in re.findall(r"`([a-z_]+)/?`", cell):
            assert unit not in floors, f"{unit} stands on two floors of docs/architecture.md"
            floors[unit] = int(n)
    return floors


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth; for
    ``from X import y`` the target is ``X.y`` when that is a module of the tree, else ``X``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (root.parent / Path(*sub.split(".")) / "__init__.py").is_file()
                out.append((node.lineno, sub if is_module else mod))
    return out


def unit_of(module: str) -> str | None:
    """The package (or top-level module) of `splitllama.X...`: X; None for the root package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def graph(root: Path) -> dict[str, list[tuple[str, str]]]:
    """{module: [(imported module, 'file:line'), ...]} over the files of `root`."""
    g = {}
    for path in sorted(root.rglob("*.py")):
        g[module_name(path, root)] = [(mod, f"{path.relative_to(root.parent)}:{line}")
                                      for line, mod in imports(path, root)]
    return g


# ---- checks --------------------------------------------------------------------------------------
def layering_violations(g: dict, floors: dict[str, int], top: str) -> list[str]:
    bad = []
    units = {unit_of(m) for m in g} - {None}
    bad += [f"{u}: on no floor of docs/architecture.md" for u in sorted(units - set(floors))]
    bad += [f"{u}: a floor of docs/architecture.md names it, the tree has no such package"
            for u in sorted(set(floors) - units)]
    for src, targets in g.items():
        su = unit_of(src)
        for dst, where in targets:
            if not (dst == top or dst.startswith(top + ".")):
                continue
            du = unit_of(dst)
            if su is None or du is None or su == du or su not in floors or du not in floors:
                continue
            if floors[du] >= floors[su]:
                bad.append(f"{where}: {su}/ (floor {floors[su]}) imports {dst} ({du}/, floor {floors[du]})")
    return bad


def circles(g: dict) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan)."""
    modules = set(g)

    def resolve(m: str) -> str | None:
        while m and m not in modules:
            m = m.rpartition(".")[0]
        return m or None

    edges = {m: sorted({r for d, _ in t if (r := resolve(d)) and r != m}) for m, t in g.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def pipeline_violations(g: dict, top: str) -> list[str]:
    bad = []
    for src, targets in g.items():
        if unit_of(src) != "pipeline":
            continue
        for dst, where in targets:
            head = dst.split(".")[0]
            if head in HEAVY:
                bad.append(f"{where}: pipeline/ imports {dst}")
            elif head == top and unit_of(dst) not in ("pipeline", *PIPELINE_MAY_IMPORT):
                bad.append(f"{where}: pipeline/ imports {dst}")
    return bad


# ---- the tree ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree():
    return graph(PKG)


@pytest.fixture(scope="module")
def floors():
    return floors_from_doc(DOC.read_text())


def test_doc_names_the_floors(floors):
    assert len(set(floors.values())) >= 5, floors
    assert floors["launch_env"] == 1 and floors["errors"] == 2 and floors["config"] < floors["pipeline"] < floors["preflight"] \
        < floors["training"] < floors["planning"], floors


def test_packages_import_only_downward(tree, floors):
    assert layering_violations(tree, floors, "splitllama") == []


def test_no_import_circle(tree):
    assert circles(tree) == []


def test_pipeline_is_pure(tree):
    assert pipeline_violations(tree, "splitllama") == []


# ---- the checks themselves catch what they are for -------------------------------------------
def _toy(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "toy"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_checks_catch_upward_import_circle_and_torch(tmp_path):
    root = _toy(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from toy.high import b  # function-level, upward\n",
        "high/__init__.py": "",
        "high/b.py": "from ..low import a\n",
        "pipeline/__init__.py": "",
        "pipeline/p.py": "import torch\nfrom toy.high.b import x\n",
    })
    g = graph(root)
    up = layering_violations(g, {"low": 1, "pipeline": 2, "high": 3}, "toy")
    assert up == ["toy/low/a.py:2: low/ (floor 1) imports toy.high.b (high/, floor 3)",
                  "toy/pipeline/p.py:2: pipeline/ (floor 2) imports toy.high.b (high/, floor 3)"], up
    assert circles(g) == [["toy.high.b", "toy.low.a"]]
    assert [v.split(": ", 1)[1] for v in pipeline_violations(g, "toy")] == \
        ["pipeline/ imports torch", "pipeline/ imports toy.high.b"]
    assert layering_violations(g, {"low": 1, "pipeline": 3, "high": 3}, "toy")[-1].startswith(
        "toy/pipeline/p.py:2: pipeline/ (floor 3) imports toy.high.b (high/, floor 3)")  # same floor: refused
    assert layering_violations(g, {"low": 1, "high": 3}, "toy")[0] == "pipeline: on no floor of docs/architecture.md"
    assert "gone: a floor of docs/architecture.md names it" in " ".join(
        layering_violations(g, {"low": 1, "pipeline": 2, "high": 3, "gone": 4}, "toy"))


def test_floors_table_is_parsed():
    text = "# x\n## Floors\n\n| floor | packages |\n|---|---|\n| 2 | `config/` | typed |\n| 1 | `errors`, `logs` | |\n## Next\n| 9 | `no` |\n"
    assert floors_from_doc(text) == {"config": 2, "errors": 1, "logs": 1}
