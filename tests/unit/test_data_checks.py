"""Data the model cannot embed is refused with both numbers; a too-small split names one that
works (issue 10, items 6 and 7; the tokenizer.json path of item 9 is in test_data.py)."""
from __future__ import annotations

import json

import pytest
import torch

from splitllama.config.data import DataConfig
from splitllama.data.datasets import build_datasets, check_token_ids
from splitllama.data.preprocess import TokenizerSpec, preprocess_jsonl
from splitllama.data.tokenizers import NullTokenizer
from splitllama.training.step import check_batch_ids

@pytest.fixture(scope="module")
def wide_ids(tmp_path_factory):
    """A prefix tokenized with a 1000-id vocabulary; its largest id is 977."""
    d = tmp_path_factory.mktemp("wide")
    src = d / "in.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(str((i * 37 + j) % 978) for j in range(40))}) + "\n"
                           for i in range(30)))
    return preprocess_jsonl(str(src), str(d / "c"), TokenizerSpec("null", vocab_size=1000),
                            progress=False).output_prefix


def test_ids_beyond_the_vocabulary_are_refused_at_start(wide_ids):
    check_token_ids(wide_ids, 1000)
    with pytest.raises(ValueError, match=r"holds token id 5\d\d .* has vocab_size 512.*vocab_size is > 977"):
        check_token_ids(wide_ids, 512, "data.tokenizer_type='null'")
    cfg = DataConfig(mock=False, data_path=[wide_ids], split="98,2,0", seq_length=16, vocab_size=512)
    with pytest.raises(ValueError, match=r"vocab_size 512"):
        build_datasets(cfg, global_batch_size=2, train_samples=4, eval_samples=2, test_samples=0,
                       seed=1, tokenizer=NullTokenizer(512))


def test_the_scan_is_bounded(wide_ids):
    check_token_ids(wide_ids, 512, max_tokens=10)  # the first 10 ids are all < 512: passes


def test_each_batch_is_checked():
    ok = {"tokens": torch.tensor([[1, 2, 511]]), "labels": torch.tensor([[2, 511, 3]])}
    check_batch_ids(ok, 512)
    with pytest.raises(ValueError, match=r"token id 128000 in 'labels', outside the model's vocabulary \[0, 512\)"):
        check_batch_ids({**ok, "labels": torch.tensor([[2, 128000, 3]])}, 512)


def test_tiny_corpus_split_error_suggests_a_split_that_works(tmp_path):
    """20 documents, data.split=98,2,0: the valid split gets none; the message offers fixes
    that pass (not the split the user already gave)."""
    from splitllama.data.datasets import check_prefix

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(["7"] * 20)}) + "\n" for _ in range(20)))
    prefix = preprocess_jsonl(str(src), str(tmp_path / "c"), TokenizerSpec("null", vocab_size=100),
                              progress=False).output_prefix
    with pytest.raises(ValueError) as err:
        check_prefix(prefix, 16, "98,2,0")
    msg = str(err.value)
    assert "data.split=98,0,0" in msg and "data.split=19,1,0" in msg and "'98,2,0')" not in msg
    check_prefix(prefix, 16, "98,0,0")
    check_prefix(prefix, 16, "19,1,0")
