"""Issue 9 (6, 7, 9 and 13's preprocess part) and issue 10's plan_pipeline points: every bad
input to pretrain_splitllama.py and the tools is ONE `error: ...` line on stderr, exit 2, from
rank 0 only, found before torch.distributed starts; unexpected failures keep their traceback.

The training entry point runs in-process here: every case fails before the process group."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from splitllama.checkpoint import dirs
from splitllama.config.model import PRESETS, ModelConfig
from splitllama.data.datasets import check_index_sizes, check_prefix
from splitllama.data.preprocess import TokenizerSpec, preprocess_jsonl
from splitllama.errors import UsageError, cli_main, one_line
from splitllama.training import app, entry, signals

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config", str(REPO / "configs" / "tiny.yaml")]


def _one_error(capsys, rc: int, pattern: str, code: int = 2) -> str:
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.startswith("error")]  # (library warnings: issue 10)
    assert rc == code, (rc, out.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in out.err + out.out
    return lines[0]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SPLITLLAMA_TRACEBACK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(signals, "install", lambda: None)  # keep pytest's own SIGTERM handling


def _bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  train_iters: [1, 2\n")
    return ["--config", str(p)]


def _garbage_spm(tmp_path):
    p = tmp_path / "g.model"
    p.write_bytes(b"garbage" * 10)
    return TINY + ["data.tokenizer_type=sentencepiece", f"data.tokenizer_model={p}"]


TRAIN_CASES = {  # name: (argv maker, env, expected message)
    "bad_yaml": (_bad_yaml, {}, r"bad\.yaml:\d+:\d+: invalid YAML"),
    "missing_config_file": (lambda t: ["--config", str(t / "nope.yaml")], {}, r"nope\.yaml: No such file"),
    "unknown_key": (lambda t: TINY + ["train.trian_iters=5"], {}, r"unknown config key 'train\.trian_iters'"),
    "unknown_section": (lambda t: TINY + ["trian.x=5"], {}, r"unknown config section 'trian'"),
    "micro_batch_size_0": (lambda t: TINY + ["train.micro_batch_size=0"], {}, r"train\.micro_batch_size must be >= 1, got 0"),
    "train_iters_negative": (lambda t: TINY + ["train.train_iters=-5"], {}, r"train\.train_iters must be >= 1, got -5"),
    "divisibility": (lambda t: TINY + ["train.global_batch_size=6"], {},
                     r"global_batch_size 6 is not divisible by micro_batch_size 4"),
    "world_not_divisible": (lambda t: TINY + ["parallel.pipeline_model_parallel_size=2"], {"WORLD_SIZE": "3"},
                            r"world size 3 is not divisible by tp\*pp = 2"),
    "tp_vs_heads": (lambda t: TINY + ["parallel.tensor_model_parallel_size=3"], {"WORLD_SIZE": "3"},
                    r"tensor_model_parallel_size 3 does not divide model\.lower\.num_attention_heads=4"),
    "pp_too_large": (lambda t: TINY + ["parallel.pipeline_model_parallel_size=9"], {"WORLD_SIZE": "9"},
                     r"pipeline_model_parallel_size 9 is more than the 6 pipeline units"),
    "vocab_too_large": (lambda t: TINY + ["data.vocab_size=100000"], {},
                        r"tokenizer vocab size 100000 exceeds the model's vocab size 512"),
    "seq_length_over_positions": (lambda t: TINY + ["data.seq_length=4096"], {},
                                  r"data\.seq_length 4096 is longer than model\.lower\.max_position_embeddings 256"),
    "memory_budget_pp1": (lambda t: TINY + ["parallel.memory_budget_gb=0.001"], {},
                          r"no 1-stage pipeline plan fits the memory budget"),
    "garbage_sentencepiece": (_garbage_spm, {}, r"g\.model: not a sentencepiece model"),
    "missing_checkpoint": (lambda t: TINY + [f"checkpoint.load={t / 'nothing'}"], {},
                           r"checkpoint path .*nothing does not exist"),
    "bad_log_interval": (lambda t: TINY + ["logging.log_interval=0"], {}, r"logging\.log_interval must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_training_bad_input_is_one_line_exit_2(case, tmp_path, monkeypatch, capsys):
    make, env, pattern = TRAIN_CASES[case]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = entry.main(make(tmp_path))
    _one_error(capsys, rc, pattern)


def test_other_ranks_print_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert entry.main(TINY + ["train.micro_batch_size=0"]) == 2
    out = capsys.readouterr()
    assert out.err == "" and "error" not in out.out


def test_unexpected_failure_keeps_its_traceback(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(app, "build_runtime", boom)
    with pytest.raises(RuntimeError, match="a bug, not bad input"):
        entry.main(TINY + ["train.train_iters=1"])


def test_one_line_names_files_and_flattens():
    assert one_line(FileNotFoundError(2, "No such file or directory", "x.yaml")) == "x.yaml: No such file or directory"
    assert one_line(ValueError("two\nlines")) == "two lines"
    assert cli_main(lambda: (_ for _ in ()).throw(UsageError("u"))) == 2
    assert cli_main(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device", "f"))) == 1


def _fake_checkpoint(root: Path, model: ModelConfig) -> Path:
    it = root / dirs.iter_dirname(3)
    it.mkdir(parents=True)
    dirs.write_json(str(it), dirs.MODEL_CONFIG, model.to_dict())
    dirs.mark_complete(str(it))
    (root / dirs.TRACKER).write_text(dirs.iter_dirname(3) + "\n")
    return root


def test_model_conflict_names_each_differing_field(tmp_path, capsys):
    from dataclasses import replace

    other = ModelConfig(lower=replace(PRESETS["tiny_lower"], intermediate_size=176), num_layers_upper=2)
    root = _fake_checkpoint(tmp_path / "ckpt", other)
    rc = entry.main(TINY + [f"checkpoint.load={root}", "train.eval_only=true"])
    line = _one_error(capsys, rc, r"model\.lower\.intermediate_size: config 160, checkpoint 176")
    assert "model.num_layers_upper: config 3, checkpoint 2" in line


def test_corrupt_model_config_json(tmp_path, capsys):
    root = _fake_checkpoint(tmp_path / "ckpt", ModelConfig())
    (root / dirs.iter_dirname(3) / dirs.MODEL_CONFIG).write_text("{not json")
    rc = entry.main(TINY + [f"checkpoint.load={root}", "train.eval_only=true"])
    _one_error(capsys, rc, r"model_config\.json: corrupt JSON")


# ---- tools ------------------------------------------------------------------------------------
PLAN_CASES = {
    "tp3": (["--tp", "3"], r"tensor_model_parallel_size 3 does not divide"),
    "pp9": (["--pp", "9"], r"pipeline_model_parallel_size 9 is more than the 6 pipeline units of this model "
                           r"\(2 lower layers \+ adapter \+ 3 upper layers"),
    "seq4096": (["--seq-length", "4096"], r"data\.seq_length 4096 is longer than model\.lower\.max_position_embeddings 256"),
    "mbs0": (["--micro-batch-size", "0"], r"train\.micro_batch_size must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_plan_pipeline_refuses_with_one_line(case, capsys):
    from tools.plan_pipeline import main

    args, pattern = PLAN_CASES[case]
    _one_error(capsys, main(TINY + args), pattern)


def test_preprocess_refuses_existing_output_without_overwrite(tmp_path, capsys):
    from tools.preprocess_data import main

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "1 2 3"}\n{"text": "4 5"}\n')
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "c"), "--tokenizer-type", "null",
            "--vocab-size", "10", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    out = tmp_path / "c_text_document"
    before = {p: (out.with_suffix(p).read_bytes()) for p in (".bin", ".idx")}
    src.write_text('{"text": "9 9 9 9"}\n')
    _one_error(capsys, main(argv), r"c_text_document\.bin already exists; pass --overwrite")
    assert {p: out.with_suffix(p).read_bytes() for p in (".bin", ".idx")} == before
    assert main(argv + ["--overwrite"]) == 0
    assert out.with_suffix(".bin").read_bytes() != before[".bin"]


def test_truncated_idx_and_bin_are_named(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(["3"] * 50)}) + "\n" for _ in range(20)))
    preprocess_jsonl(str(src), str(tmp_path / "d"), TokenizerSpec("null", vocab_size=10), progress=False)
    prefix = str(tmp_path / "d_text_document")
    check_index_sizes(prefix)
    check_prefix(prefix, 16, "100,0,0")
    os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 10)
    with pytest.raises(ValueError, match=r"d_text_document\.bin is truncated: \d+ bytes, .* needs \d+"):
        check_prefix(prefix, 16, "100,0,0")
    os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 9)
    with pytest.raises(ValueError, match=r"d_text_document\.idx is truncated: \d+ bytes, its header "
                                         r"\(20 sequences, 21 documents\) needs \d+"):
        check_prefix(prefix, 16, "100,0,0")
