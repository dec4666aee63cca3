"""export-hf carries a tokenizer: `--tokenizer PATH`, else the checkpoint's training job's HF
tokenizer; special ids in generation_config.json; a tokenizer the vocabulary cannot hold, or a
missing one, is one error line and no output. (A real run trained on the LLaMA-3 tokenizer and
exported without the flag: tests/integration/test_first_hour.py.)"""
from __future__ import annotations

import json
import os

import pytest
import yaml

from splitllama.checkpoint import dirs
from splitllama.convert.cli import main as cli_main
from splitllama.convert.export_hf import export_hf
from splitllama.convert.import_hf import import_hf
from tests.distributed.convert_worker import M, N, SEED, make_sources

TEXT = "llama pipeline, data! split llama"


def _bpe(path, vocab_size=300):
    """A small byte-level BPE tokenizer.json with <s> / </s> and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.save(str(path))
    return str(path)


def _wordlevel(path, n):
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({**{f"w{i}": i for i in range(n - 1)}, "</s>": n - 1}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    make_sources(root)
    return import_hf(str(root / "lower"), str(root / "upper"), N, M, str(root / "ckpt"), mlp=False, seed=SEED,
                     dtype="fp32", progress=False).path  # vocab 512, no job_config.yaml


def _with_job(ckpt_dir, tmp_path, data):
    """A copy of the checkpoint whose saved job has this data section (as a training run saves it)."""
    import shutil

    copy = tmp_path / "trained" / "iter_0000000"
    shutil.copytree(ckpt_dir, copy)
    (copy / dirs.JOB_CONFIG).write_text(yaml.safe_dump({"data": data}))
    return str(copy)


def test_flag_writes_the_tokenizer_and_special_ids(ckpt, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok_file = _bpe(tmp_path / "tokenizer.json")
    r = export_hf(ckpt, str(tmp_path / "hf"), progress=False, tokenizer=tok_file)
    loaded = AutoTokenizer.from_pretrained(r.path)  # what vLLM / veRL do with the model path
    src = PreTrainedTokenizerFast(tokenizer_file=tok_file)
    assert loaded(TEXT).input_ids == src(TEXT).input_ids and len(loaded(TEXT).input_ids) > 3
    assert (loaded.eos_token, loaded.pad_token) == ("</s>", "</s>")  # no pad in the source: pad = eos
    gen = json.load(open(os.path.join(r.path, "generation_config.json")))
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (1, 1)
    assert r.tokenizer.startswith(f"tokenizer: {tok_file} (--tokenizer); bos None, eos 1, pad 1 (= eos")


def test_the_checkpoints_job_names_the_tokenizer(ckpt, tmp_path):
    from transformers import AutoTokenizer

    tok_file = _bpe(tmp_path / "tokenizer.json")
    trained = _with_job(ckpt, tmp_path, {"tokenizer_type": "huggingface", "tokenizer_model": tok_file})
    r = export_hf(trained, str(tmp_path / "hf"), progress=False)
    assert "data.tokenizer_model of the checkpoint's job" in r.tokenizer
    assert AutoTokenizer.from_pretrained(r.path).eos_token == "</s>"


def test_no_tokenizer_is_said(ckpt, tmp_path, capsys):
    r = export_hf(ckpt, str(tmp_path / "hf"), progress=False)
    assert r.tokenizer == ("tokenizer: none (the checkpoint saved no training job (job_config.yaml); "
                           "pass --tokenizer PATH to include one)")
    assert not os.path.exists(os.path.join(r.path, "tokenizer.json"))
    sp = _with_job(ckpt, tmp_path, {"tokenizer_type": "sentencepiece", "tokenizer_model": "/x/tokenizer.model"})
    assert cli_main(["export-hf", "--ckpt", sp, "--out", str(tmp_path / "hf2"), "--no-progress"]) == 0
    assert "tokenizer: none (the run trained with data.tokenizer_type=sentencepiece" in capsys.readouterr().out


def test_bad_tokenizers_are_one_line_and_write_nothing(ckpt, tmp_path, capsys):
    too_big = _wordlevel(tmp_path / "big.json", 600)  # ids up to 599 > the model's 512
    cases = [
        (["--tokenizer", too_big], "tokenizer vocab size 600 exceeds the model's vocab size 512"),
        (["--tokenizer", str(tmp_path / "missing.json")], "no such file or directory"),
    ]
    gone = _with_job(ckpt, tmp_path, {"tokenizer_type": "huggingface", "tokenizer_model": str(tmp_path / "gone")})
    for extra, want in cases + [(["--ckpt", gone], "data.tokenizer_model")]:
        args = ["export-hf", "--ckpt", ckpt, "--out", str(tmp_path / "out"), "--no-progress", *extra]
        assert cli_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and want in err[0], err
        assert not os.path.exists(tmp_path / "out")
        assert not [p for p in os.listdir(tmp_path) if p.startswith("out.tmp")]
