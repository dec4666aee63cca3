"""Bad inputs to import-hf each give one clear ConversionError (naming file / tensor / field,
expected vs found) and leave no output directory — also when the failure happens mid-write."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitllama.convert import sources
from splitllama.convert.cli import main as cli_main
from splitllama.convert.import_hf import import_hf
from splitllama.convert.sources import ConversionError
from tests.distributed.convert_worker import make_sources


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convert_src")
    make_sources(root)
    return root


def _shard_of(d: Path, name: str) -> Path:
    return d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


def _rewrite(d: Path, name: str, value) -> None:
    """Rewrite the shard holding `name` with `value` in its place (None: drop it)."""
    path = _shard_of(d, name)
    tensors = load_file(path)
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


def _drop_from_index(d: Path, name: str) -> None:
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    del data["weight_map"][name]
    idx.write_text(json.dumps(data))


def _truncate(d: Path, name: str) -> None:
    p = _shard_of(d, name)
    os.truncate(p, p.stat().st_size - 100)


def _corrupt_header(d: Path, name: str) -> None:
    p = _shard_of(d, name)
    raw = bytearray(p.read_bytes())
    raw[8:24] = b"\x00garbage\xff\xfe{{[[]]"
    p.write_bytes(bytes(raw))


def _edit_header(d: Path, name: str, edit) -> None:
    """Rewrite the safetensors header of the shard holding `name` with `edit(header)` applied."""
    import struct

    p = _shard_of(d, name)
    raw = p.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    edit(header)
    new = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + hlen:])


def _negative_offsets(h: dict) -> None:
    name = next(k for k in h if k != "__metadata__")
    b, e = h[name]["data_offsets"]
    h[name]["data_offsets"] = [b - 2 ** 20, e - 2 ** 20]


def _overlapping_offsets(h: dict) -> None:
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = next((x, y) for x, y in zip(names, names[1:]) if h[x]["dtype"] == h[y]["dtype"]
                and h[x]["shape"] == h[y]["shape"])
    h[b]["data_offsets"] = list(h[a]["data_offsets"])  # b reads a's bytes


def _index_path(d: Path, name: str, target: str) -> None:
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"][name] = target
    idx.write_text(json.dumps(data))


Q4, LM = "model.layers.4.self_attn.q_proj.weight", "lm_head.weight"
CASES = {  # name: (which source to break, mutation, (N, M), expected message)
    "missing_tensor_in_index": ("upper", lambda d: _drop_from_index(d, Q4), (2, 3),
                                r"upper: missing tensor model\.layers\.4\.self_attn\.q_proj\.weight"),
    "missing_tensor_in_shard": ("upper", lambda d: _rewrite(d, Q4, None), (2, 3),
                                r"missing tensor model\.layers\.4\.self_attn\.q_proj\.weight: the index places it in"),
    "missing_shard_file": ("upper", lambda d: os.remove(_shard_of(d, LM)), (2, 3), r"safetensors: file does not exist"),
    "wrong_shape": ("upper", lambda d: _rewrite(d, Q4, torch.zeros(64, 128)), (2, 3),
                    r"q_proj\.weight in .* has shape \[64, 128\], expected \[128, 128\]"),
    "wrong_dtype": ("lower", lambda d: _rewrite(d, "model.layers.1.mlp.up_proj.weight", torch.zeros(160, 64).half()),
                    (2, 3), r"up_proj\.weight in .* has dtype F16, expected F32"),
    "vocab_mismatch": ("upper", lambda d: _edit_json(d / "config.json", vocab_size=520), (2, 3),
                       r"vocab sizes differ: lower 512 vs upper 520"),
    "n_too_large": ("lower", lambda d: None, (5, 3), r"num_layers_lower=5 out of range: the source model has 4 layers"),
    "m_too_large": ("upper", lambda d: None, (2, 7), r"num_layers_upper=7 out of range: the source model has 6 layers"),
    "truncated_safetensors": ("upper", lambda d: _truncate(d, LM), (2, 3),
                              r"truncated safetensors file: tensor lm_head\.weight ends at byte"),
    "corrupt_safetensors": ("lower", lambda d: _corrupt_header(d, "model.embed_tokens.weight"), (2, 3),
                            r"corrupt safetensors header"),
    "non_llama_model_type": ("upper", lambda d: _edit_json(d / "config.json", model_type="mistral"), (2, 3),
                             r"upper: .*config\.json is not a LLaMA config: model_type is 'mistral'"),
    "non_llama_fields": ("lower", lambda d: _edit_json(d / "config.json", hidden_size=None, n_embd=64), (2, 3),
                         r"lower: .*config\.json: not a LLaMA-style config, missing fields \['hidden_size'\]"),
    # issue 20 point 3 (were: read /etc/passwd as a header; accepted overlaps; a traceback)
    "index_path_outside": ("upper", lambda d: _index_path(d, LM, "../../../../etc/passwd"), (2, 3),
                           r"index\.json maps lm_head\.weight to '\.\./\.\./\.\./\.\./etc/passwd', which is not a file name inside"),
    "index_path_absolute": ("upper", lambda d: _index_path(d, LM, "/etc/passwd"), (2, 3),
                            r"maps lm_head\.weight to '/etc/passwd', which is not a file name inside"),
    "negative_offsets": ("upper", lambda d: _edit_header(d, LM, _negative_offsets), (2, 3),
                         r"corrupt safetensors header entry for .*: offsets \[-\d+, -?\d+\]"),
    "overlapping_offsets": ("upper", lambda d: _edit_header(d, Q4, _overlapping_offsets), (2, 3),
                            r"corrupt safetensors header: tensors .* and .* overlap"),
    "nan_weight": ("upper", lambda d: _rewrite(d, Q4, torch.full((128, 128), float("nan"))), (2, 3),
                   r"upper: tensor model\.layers\.4\.self_attn\.q_proj\.weight in .* holds \d+ NaN/Inf values"),
    "no_safetensors": ("lower", lambda d: [os.remove(p) for p in d.glob("model*")], (2, 3),
                       r"has neither model\.safetensors\.index\.json nor model\.safetensors"),
}


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name)], list(out.parent.iterdir())


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_error_and_no_output(src, tmp_path, case):
    which, mutate, (n, m), message = CASES[case]
    dirs = {w: tmp_path / w for w in ("lower", "upper")}
    for w, d in dirs.items():
        shutil.copytree(src / w, d)
    mutate(dirs[which])
    out = tmp_path / "out" / "ckpt"
    out.parent.mkdir()
    with pytest.raises(ConversionError, match=message):
        import_hf(str(dirs["lower"]), str(dirs["upper"]), n, m, str(out), dtype="fp32", progress=False)
    _no_output(out)


def test_failure_while_writing_leaves_nothing(src, tmp_path, monkeypatch):
    real, calls = sources.SafetensorsFile.read, []

    def flaky(self, name, rows=None, out=None):
        calls.append(name)
        if len(calls) == 10:
            raise OSError("disk went away")
        return real(self, name, rows, out)

    monkeypatch.setattr(sources.SafetensorsFile, "read", flaky)
    out = tmp_path / "ckpt"
    with pytest.raises(OSError, match="disk went away"):
        import_hf(str(src / "lower"), str(src / "upper"), 2, 3, str(out), progress=False)
    _no_output(out)


def test_existing_output_is_refused(src, tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ConversionError, match=r"ckpt already exists"):
        import_hf(str(src / "lower"), str(src / "upper"), 2, 3, str(tmp_path / "ckpt"), progress=False)


def test_cli_prints_one_error_line(src, tmp_path, capsys):
    rc = cli_main(["import-hf", "--lower", str(src / "lower"), "--upper", str(src / "upper"),
                   "--num-layers-lower", "9", "--num-layers-upper", "3", "--out", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: model.num_layers_lower=9 out of range")
    _no_output(tmp_path / "ckpt")
