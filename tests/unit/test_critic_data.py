"""Critic data: JSONL value targets -> float32 IndexedDataset -> ValueGPTDataset samples whose
targets line up with their tokens; bad inputs refused with the file / line / field named."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from splitllama.config.data import DataConfig
from splitllama.data.datasets import build_datasets
from splitllama.data.preprocess import TokenizerSpec, preprocess_jsonl, values_prefix
from splitllama.data.tokenizers import NullTokenizer

V = 100
EOD = V - 1
SPEC = TokenizerSpec("null", vocab_size=V)


def target_of(tok: int) -> float:
    return tok / 7.0 - 3.0


def write_lines(path, objs):
    with open(path, "w") as f:
        for o in objs:
            f.write(json.dumps(o) + "\n")
    return str(path)


def corpus(n=40, seed=0):
    """Per-token lines (value = target_of(token), every third token null), per-sequence lines
    (value 0.5 at the last token) and token-id lines."""
    r = np.random.default_rng(seed)
    objs = []
    for i in range(n):
        toks = r.integers(0, V - 1, size=int(r.integers(3, 20))).tolist()
        if i % 3 == 0:
            objs.append({"text": " ".join(map(str, toks)), "values": 0.5, "_toks": toks})
        else:
            vals = [None if j % 3 == 2 else target_of(t) for j, t in enumerate(toks)]
            key = {"tokens": toks} if i % 3 == 2 else {"text": " ".join(map(str, toks))}
            objs.append({**key, "values": vals, "_toks": toks})
    return objs


def _build(prefixes, seq=8, train=64):
    cfg = DataConfig(mock=False, data_path=list(prefixes), split="1,0,0", seq_length=seq, vocab_size=V)
    return build_datasets(cfg, global_batch_size=4, train_samples=train, eval_samples=0, test_samples=0,
                          seed=1, tokenizer=NullTokenizer(V), value_targets=True)[0]


def test_preprocess_writes_aligned_float32_targets(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    objs = [o for o in corpus() if "text" in o]
    src = write_lines(tmp_path / "c.jsonl", [{k: v for k, v in o.items() if k != "_toks"} for o in objs])
    stats = preprocess_jsonl(src, str(tmp_path / "c"), SPEC, append_eod=True, values_key="values", progress=False)
    tokens, values = IndexedDataset(stats.output_prefix), IndexedDataset(values_prefix(stats.output_prefix))
    assert values.index.dtype == np.float32 and len(values) == len(tokens) == len(objs)
    n_targets = 0
    for i, o in enumerate(objs):
        t, v = np.array(tokens[i]), np.array(values[i])
        assert t.tolist() == o["_toks"] + [EOD] and len(v) == len(t)
        assert np.isnan(v[-1])  # the EOD added here has no target
        if isinstance(o["values"], float):  # per sequence: only the last text token
            assert np.isnan(v[:-2]).all() and v[-2] == 0.5
        else:
            want = np.array([np.nan if x is None else x for x in o["values"]], dtype=np.float32)
            np.testing.assert_array_equal(v[:-1], want)
        n_targets += int(np.isfinite(v).sum())
    assert stats.value_targets == n_targets and "value targets" in stats.summary()


def test_value_dataset_samples_line_up_with_tokens(tmp_path):
    objs = corpus(60, seed=1)
    # token-id lines use the "tokens" key: preprocess the two kinds as two prefixes of one blend
    text = write_lines(tmp_path / "t.jsonl", [{k: v for k, v in o.items() if k != "_toks"} for o in objs if "text" in o])
    ids = write_lines(tmp_path / "i.jsonl", [{k: v for k, v in o.items() if k != "_toks"} for o in objs if "tokens" in o])
    pt = preprocess_jsonl(text, str(tmp_path / "t"), SPEC, append_eod=True, values_key="values",
                          progress=False).output_prefix
    pi = preprocess_jsonl(ids, str(tmp_path / "i"), SPEC, json_key="tokens", append_eod=True,
                          values_key="values", progress=False).output_prefix
    train = _build(["1", pt, "1", pi])
    seen_seq_target = seen_tok_target = 0
    for k in range(len(train)):
        s = train[k]
        assert set(s) >= {"tokens", "labels", "loss_mask", "position_ids", "value_targets"}
        tok, tgt, mask = s["tokens"], s["value_targets"], s["loss_mask"]
        assert tgt.dtype == torch.float32 and tgt.shape == tok.shape == mask.shape == (8,)
        assert not bool(mask[tok == EOD].any())  # EOD: no target
        on = mask.bool()
        per_tok = torch.tensor([target_of(int(t)) for t in tok], dtype=torch.float32)
        # a target is either the token's own per-token target or a per-sequence 0.5
        assert bool((torch.isclose(tgt[on], per_tok[on]) | (tgt[on] == 0.5)).all()), k
        assert bool((tgt[~on] == 0).all())
        seen_seq_target += int((tgt[on] == 0.5).sum())
        seen_tok_target += int(torch.isclose(tgt[on], per_tok[on]).sum())
    assert seen_seq_target > 0 and seen_tok_target > 0


def test_eod_mask_loss_is_honoured(tmp_path):
    """Token-id documents whose EOD carries a target: counted unless data.eod_mask_loss."""
    src = write_lines(tmp_path / "c.jsonl", [{"tokens": [3, 4, 5, EOD], "values": [1.0, 2.0, 3.0, 4.0]}] * 30)
    prefix = preprocess_jsonl(src, str(tmp_path / "c"), SPEC, json_key="tokens", values_key="values",
                              progress=False).output_prefix
    for eod_mask, want in ((False, 1.0), (True, 0.0)):
        cfg = DataConfig(mock=False, data_path=[prefix], split="1,0,0", seq_length=8, vocab_size=V,
                         eod_mask_loss=eod_mask)
        train = build_datasets(cfg, global_batch_size=4, train_samples=8, eval_samples=0, test_samples=0,
                               seed=1, tokenizer=NullTokenizer(V), value_targets=True)[0]
        s = train[0]
        at_eod = s["tokens"] == EOD
        assert bool(at_eod.any()) and bool((s["loss_mask"][at_eod] == want).all())
        assert bool((s["loss_mask"][~at_eod] == 1).all())


def test_bad_value_lines_name_the_line_and_leave_nothing(tmp_path):
    cases = [({"text": "1 2 3", "values": [0.1, 0.2]}, "'values' has 2 entries but the document has 3 tokens"),
             ({"text": "1 2 3"}, "no key 'values'"),
             ({"text": "1 2 3", "values": "high"}, "must be a number"),
             ({"text": "1 2 3", "values": [0.1, "x", 0.3]}, "numbers or null"),
             ({"tokens": [1, 2, 300], "values": 1.0}, "token id 300 in 'tokens' outside")]
    for obj, msg in cases:
        key = "tokens" if "tokens" in obj else "text"
        src = write_lines(tmp_path / "bad.jsonl", [{"text": "4 5", "values": 1.0} if key == "text" else
                                                   {"tokens": [4, 5], "values": 1.0}, obj])
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{msg}"):
            preprocess_jsonl(src, str(tmp_path / "o"), SPEC, json_key=key, values_key="values", progress=False)
        assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_stale_values_refused_and_missing_values_named(tmp_path):
    src = write_lines(tmp_path / "c.jsonl", [{"text": " ".join(["1"] * 30), "values": 1.0}] * 4)
    prefix = preprocess_jsonl(src, str(tmp_path / "c"), SPEC, values_key="values", progress=False).output_prefix
    with pytest.raises(ValueError, match="_values.idx exists"):  # an LM re-run would pair old targets
        preprocess_jsonl(src, str(tmp_path / "c"), SPEC, progress=False, overwrite=True)
    lm_only = preprocess_jsonl(src, str(tmp_path / "lm"), SPEC, progress=False).output_prefix
    with pytest.raises(ValueError, match=f"{lm_only}_values.bin/.idx not found.*--values-key"):
        _build([lm_only])
    other = preprocess_jsonl(write_lines(tmp_path / "d.jsonl", [{"text": "1 2", "values": 1.0}] * 20),
                             str(tmp_path / "d"), SPEC, values_key="values", progress=False).output_prefix
    for ext in (".bin", ".idx"):  # values of another corpus next to these tokens
        os.replace(values_prefix(other) + ext, values_prefix(prefix) + ext)
    with pytest.raises(ValueError, match="20 documents do not match the 4"):
        _build([prefix])
    with pytest.raises(ValueError, match="data.mock=false"):
        build_datasets(DataConfig(vocab_size=V), global_batch_size=4, train_samples=8, eval_samples=0,
                       test_samples=0, seed=1, tokenizer=NullTokenizer(V), value_targets=True)


def test_preprocess_cli_values_key(tmp_path, capsys):
    from tools.preprocess_data import main

    src = write_lines(tmp_path / "c.jsonl", [{"text": "1 2 3", "values": [1, None, 2]}])
    assert main(["--input", src, "--output-prefix", str(tmp_path / "c"), "--tokenizer-type", "null",
                 "--vocab-size", str(V), "--values-key", "values", "--no-progress"]) == 0
    assert "2 value targets" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "c_text_document_values.idx")
