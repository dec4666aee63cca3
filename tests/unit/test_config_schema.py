"""Issue 20 point 1: every config value is checked by the schema of the config dataclasses
(types from annotations, ranges / choices from field metadata, relations in check_values)
once, when the job config is loaded: before anything is printed, before torch or Megatron are
imported; YAML files refuse duplicate keys and anchors / aliases. Each refusal is one
`error:` line naming the key, the value and what is allowed, exit 2."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Optional
import pytest

from splitllama.config import validate
from splitllama.config.job import JobConfig, load_job_config
from splitllama import entry
from splitllama.training import signals

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config", str(REPO / "configs" / "tiny.yaml")]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SPLITLLAMA_TRACEBACK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(signals, "install", lambda: None)


def _yaml(tmp_path, text: str) -> list[str]:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return ["--config", str(p)]


def _bomb_in_data_path() -> str:
    """The trial's ~600-byte billion laughs: 9 levels of 9 aliases, expanded in data.data_path."""
    out = ['data:', '  mock: false', '  data_path:', '    - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghi"
    for i in range(1, 9):
        out.append(f"    - &{names[i]} [" + ",".join([f"*{names[i - 1]}"] * 9) + "]")
    return "\n".join(out) + "\n"


# name: (overrides of the tiny job, or an argv maker, expected line)
CASES = {
    "unknown_optimizer": (["optimizer.optimizer=adamz"],
                          r"optimizer\.optimizer: 'adamz' is not one of adam \| sgd"),
    "unknown_decay_style": (["optimizer.lr_decay_style=cosin"],
                            r"optimizer\.lr_decay_style: 'cosin' is not one of cosine \| linear \| constant"),
    "min_lr_above_lr": (["optimizer.min_lr=0.1"],
                        r"optimizer\.min_lr=0\.1 is above optimizer\.lr=0\.01"),
    "lr_infinite": (["optimizer.lr=1e999"], r"optimizer\.lr: expected a finite number, got inf"),
    "lr_zero": (["optimizer.lr=0"], r"optimizer\.lr must be > 0, got 0\.0"),
    "clip_negative": (["optimizer.clip_grad=-1"], r"optimizer\.clip_grad must be >= 0, got -1\.0"),
    "warmup_negative": (["optimizer.lr_warmup_iters=-3"],
                        r"optimizer\.lr_warmup_iters must be >= 0, got -3"),
    "beta_one": (["optimizer.adam_beta2=1.0"], r"optimizer\.adam_beta2 must be < 1, got 1\.0"),
    "layers_out_of_range": (["model.num_layers_lower=5"],
                            r"model\.num_layers_lower=5 out of range: the source model has 4 layers"),
    "block_not_a_block": (["model.lower=5"], r"model\.lower: expected a preset name .* got 5"),
    "block_string_hidden_size": (lambda t: _yaml(t, "model:\n  lower: {preset: tiny_lower, hidden_size: wide}\n"),
                                 r"model\.lower\.hidden_size: expected an integer, got 'wide'"),
    "block_misspelled_field": (lambda t: _yaml(t, "model:\n  lower: {preset: tiny_lower, hiden_size: 64}\n"),
                               r"unknown key 'model\.lower\.hiden_size' \(known: \[.*'hidden_size'"),
    "block_mapping_misspelled": (lambda t: _yaml(t, "model:\n  lower: {hidden_size: 64, intermediate_size: 160, "
                                                    "num_attention_heads: 4, num_key_value_heads: 2, "
                                                    "num_hidden_layers: 4, vocab_size: 512, rms_norm_esp: 1.0e-5}\n"),
                                 r"unknown key 'model\.lower\.rms_norm_esp'"),
    "blend_weight_inf": (["data.mock=false", "data.data_path=[inf,a,1,b]"],
                         r"data\.data_path: weight 'inf' for 'a' must be a finite number > 0"),
    "data_path_numbers": (lambda t: _yaml(t, "data:\n  mock: false\n  data_path: [1, 2]\n"),
                          r"data\.data_path\[1\]: '2' is a number where a file prefix was expected"),
    "data_path_nested": (lambda t: _yaml(t, "data:\n  mock: false\n  data_path: [[a], b]\n"),
                         r"data\.data_path\[0\]: expected a string, got \['a'\]"),
    "split_without_training": (["data.split=0,1,0"],
                               r"data\.split='0,1,0' has no training part"),
    "eval_only_without_load": (["train.eval_only=true"],
                               r"train\.eval_only=true needs checkpoint\.load"),
    "finetune_without_load": (["checkpoint.finetune=true"],
                              r"checkpoint\.finetune=true needs checkpoint\.load"),
    "eval_without_valid_split": (["data.split=1,0,0"],  # tiny.yaml sets eval_interval
                                 r"train\.eval_interval=125 asks for evaluation but data\.split='1,0,0' has no validation part"),
    "recompute_method_without_full": (["train.recompute_method=block"],
                                      r"train\.recompute_method='block' needs train\.recompute_granularity=full"),
    "bool_not_bool": (lambda t: _yaml(t, "train:\n  bf16: 3\n"), r"train\.bf16: expected true/false, got 3"),
    "null_not_allowed": (lambda t: _yaml(t, "train:\n  seed: null\n"), r"train\.seed: null is not allowed"),
    "duplicate_key": (lambda t: _yaml(t, "optimizer:\n  lr: 0.1\n  lr: 0.2\n"),
                      r"c\.yaml:3:3: invalid YAML: duplicate key 'lr' \(first at line 2"),
    "duplicate_section": (lambda t: _yaml(t, "optimizer:\n  lr: 0.1\ntrain:\n  seed: 1\noptimizer:\n  min_lr: 0.0\n"),
                          r"c\.yaml:5:1: invalid YAML: duplicate key 'optimizer' \(first at line 1"),
    "yaml_alias": (lambda t: _yaml(t, "optimizer:\n  lr: &x 0.1\n  min_lr: *x\n"),
                   r"c\.yaml:2:7: invalid YAML: YAML anchor '&x' is not allowed"),
    "alias_bomb": (lambda t: _yaml(t, _bomb_in_data_path()), r"invalid YAML: YAML anchor '&a' is not allowed"),
}


def _argv(spec, tmp_path) -> list[str]:
    return TINY + spec if isinstance(spec, list) else spec(tmp_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_value_is_one_line_exit_2(case, tmp_path, capsys):
    spec, pattern = CASES[case]
    rc = entry.main(_argv(spec, tmp_path))
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert rc == 2, (rc, out.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert out.out == ""  # refused before anything is printed


def test_alias_bomb_is_refused_fast_in_small_memory(tmp_path):
    text = _bomb_in_data_path()
    assert len(text.encode()) < 700  # the trial's size
    p = tmp_path / "bomb.yaml"
    p.write_text(text)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="anchor"):
        load_job_config(str(p))
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 2.0 and peak < 5 * 2 ** 20, (elapsed, peak)


def test_refused_before_torch_and_megatron_are_imported(tmp_path):
    """The entry point in a fresh interpreter: bad values exit 2 with torch never imported."""
    bad = ["unknown_optimizer", "lr_infinite", "duplicate_section", "alias_bomb", "block_misspelled_field",
           "split_without_training"]
    for c in bad:
        (tmp_path / c).mkdir()
    argvs = [_argv(CASES[c][0], tmp_path / c) for c in bad]
    code = ("import json, sys\nfrom splitllama import entry\nrcs = [entry.main(a) for a in json.loads(sys.argv[1])]\n"
            "print(json.dumps({'rcs': rcs, 'heavy': sorted(m for m in ('torch', 'megatron') if m in sys.modules)}))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"rcs": [2] * len(bad), "heavy": []}, (out, res.stderr)
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]) == len(bad)


@dataclasses.dataclass
class Extra:
    rate: float = dataclasses.field(default=1.0, metadata={"gt": 0, "le": 2})
    names: list[str] = dataclasses.field(default_factory=list)
    mode: Optional[str] = dataclasses.field(default=None, metadata={"choices": ("a", "b")})


def test_schema_is_read_from_the_dataclasses():
    """A field added to a section is checked by its annotation and metadata, no table edited."""
    validate.check_fields(Extra(), "extra")
    for obj, msg in ((Extra(rate=3.0), r"extra\.rate must be <= 2, got 3\.0"),
                     (Extra(rate=float("nan")), r"extra\.rate: expected a finite number, got nan"),
                     (Extra(names=["a", 3]), r"extra\.names\[1\]: expected a string, got 3"),
                     (Extra(mode="c"), r"extra\.mode: 'c' is not one of a \| b")):
        with pytest.raises(ValueError, match=msg):
            validate.check_fields(obj, "extra")


def test_every_numeric_field_of_the_job_has_its_type_checked():
    """Each int / float field of every section refuses a string (the annotation is the type)."""
    from typing import get_type_hints

    job = JobConfig()
    hints = get_type_hints(JobConfig)
    checked = 0
    for sec in dataclasses.fields(JobConfig):
        if not dataclasses.is_dataclass(hints.get(sec.name)):
            continue
        sec_hints = get_type_hints(hints[sec.name])
        for f in dataclasses.fields(hints[sec.name]):
            target = validate._optional(sec_hints[f.name])[1]
            if target in (int, float):
                with pytest.raises(ValueError, match=rf"{sec.name}\.{f.name}: expected"):
                    validate.check_value(f"{sec.name}.{f.name}", sec_hints[f.name], "x", f.metadata)
                checked += 1
    assert checked >= 30


def test_valid_configs_still_load():
    for cfg in sorted((REPO / "configs").glob("*.yaml")):
        load_job_config(str(cfg))
    job = load_job_config(None, ["data.mock=false", "data.data_path=[0.3,a,0.7,b]"])
    assert job.data.data_path == ["0.3", "a", "0.7", "b"]
