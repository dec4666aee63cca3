"""Data side: tokenizers, JSONL preprocessing, megatron.core datasets, the micro-batch iterator.

Fast CPU tests; run with ``PYTHONPATH=. python -m pytest tests/unit/test_data.py -q``.
"""
from __future__ import annotations

import base64
import json
import os
import random

import numpy as np
import pytest
import torch

from splitllama.config.data import DataConfig
from splitllama.data.datasets import build_datasets
from splitllama.data.iterator import build_data_iterator
from splitllama.data.preprocess import TokenizerSpec, preprocess_jsonl
from splitllama.data.tokenizers import NullTokenizer, TiktokenTokenizer
from splitllama.data.tokenizers import build_tokenizer, check_vocab, make_tokenizer

WORDS = ("alpha beta gamma delta llama split stage pipeline token model data layer "
         "the a of to and in is it on for with as at by from").split()


def write_jsonl(path, texts, key="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return str(path)


def read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [np.array(ds[i]).tolist() for i in range(len(ds))], ds.index.dtype


def null_texts(n, low=0, high=100, seed=0):
    r = random.Random(seed)
    return [" ".join(str(r.randrange(low, high)) for _ in range(r.randrange(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    r = random.Random(1)
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(" ".join(r.choice(WORDS) for _ in range(12)) for _ in range(400)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "sp"), vocab_size=64, model_type="bpe",
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    return str(d / "sp.model")


@pytest.fixture(scope="module")
def null_data(tmp_path_factory):
    """Two preprocessed null-tokenizer prefixes: ids 0..99 and ids 500..599 (vocab 1000)."""
    d = tmp_path_factory.mktemp("null")
    spec = TokenizerSpec("null", vocab_size=1000)
    a = write_jsonl(d / "a.jsonl", null_texts(60, 0, 100, seed=1))
    b = write_jsonl(d / "b.jsonl", null_texts(60, 500, 600, seed=2))
    pa = preprocess_jsonl(a, str(d / "a"), spec, append_eod=True, progress=False).output_prefix
    pb = preprocess_jsonl(b, str(d / "b"), spec, append_eod=True, progress=False).output_prefix
    return pa, pb, a


# ----------------------------------------------------------------------------- config
def test_config_validate():
    DataConfig(vocab_size=128).validate()
    with pytest.raises(ValueError, match="vocab_size"):
        DataConfig().validate()
    with pytest.raises(ValueError, match="tokenizer_model"):
        DataConfig(tokenizer_type="sentencepiece").validate()
    with pytest.raises(ValueError, match="mock=True"):
        DataConfig(vocab_size=8, data_path=["x"]).validate()
    with pytest.raises(ValueError, match="weight"):
        DataConfig(vocab_size=8, mock=False, data_path=["a", "b"]).validate()
    with pytest.raises(ValueError, match="split"):
        DataConfig(vocab_size=8, split="1,x").validate()
    DataConfig(vocab_size=8, mock=False, data_path=["0.3", "a", "0.7", "b"]).validate()


# ----------------------------------------------------------------------------- preprocess
def test_preprocess_null_roundtrip(tmp_path):
    texts = null_texts(40)
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    stats = preprocess_jsonl(src, str(tmp_path / "out"), TokenizerSpec("null", vocab_size=1000),
                             append_eod=True, progress=False)
    assert stats.output_prefix == str(tmp_path / "out_text_document")
    docs, dtype = read_docs(stats.output_prefix)
    assert dtype == np.uint16
    assert docs == [[int(x) for x in t.split()] + [999] for t in texts]
    assert stats.documents == 40 and stats.tokens == sum(map(len, docs))
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out_text_document.bin", "out_text_document.idx"]


def test_preprocess_sentencepiece_and_workers(tmp_path, sp_model):
    r = random.Random(3)
    texts = [" ".join(r.choice(WORDS) for _ in range(r.randrange(3, 40))) for _ in range(300)]
    src = write_jsonl(tmp_path / "in.jsonl", texts, key="body")
    spec = TokenizerSpec("sentencepiece", sp_model)
    one = preprocess_jsonl(src, str(tmp_path / "w1"), spec, json_key="body", workers=1,
                           append_eod=True, progress=False)
    two = preprocess_jsonl(src, str(tmp_path / "w2"), spec, json_key="body", workers=2,
                           append_eod=True, chunk_size=7, progress=False)
    tok = spec.build()
    docs, dtype = read_docs(one.output_prefix)
    assert dtype == np.uint16 and tok.eod == 2
    assert docs == [tok.tokenize(t) + [tok.eod] for t in texts]
    assert tok.detokenize(docs[5][:-1]) == texts[5]
    for ext in (".bin", ".idx"):
        with open(one.output_prefix + ext, "rb") as f1, open(two.output_prefix + ext, "rb") as f2:
            assert f1.read() == f2.read()


@pytest.mark.parametrize("content", ["", "\n\n  \n", '{"text": ""}\n'])
def test_preprocess_empty_input_leaves_nothing(tmp_path, content):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    with pytest.raises(ValueError, match="empty|no documents"):
        preprocess_jsonl(str(src), str(tmp_path / "out"), TokenizerSpec("null", vocab_size=10),
                         progress=False)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_preprocess_bad_line_and_vocab_leave_nothing(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "1 2"}\n{"txt": "3"}\n')
    with pytest.raises(ValueError, match=r"in.jsonl:2: no key 'text'"):
        preprocess_jsonl(str(src), str(tmp_path / "o"), TokenizerSpec("null", vocab_size=10),
                         workers=2, progress=False)
    with pytest.raises(ValueError, match="100000 exceeds the model's vocab size 32000"):
        preprocess_jsonl(str(src), str(tmp_path / "o"), TokenizerSpec("null", vocab_size=100000),
                         model_vocab_size=32000, progress=False)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_preprocess_cli_int32(tmp_path, capsys):
    from tools.preprocess_data import main

    src = write_jsonl(tmp_path / "in.jsonl", ["70000 1", "5"])
    argv = ["--input", src, "--output-prefix", str(tmp_path / "c"), "--tokenizer-type", "null",
            "--vocab-size", "128256", "--append-eod", "--no-progress"]
    assert main(argv) == 0
    assert "2 documents, 5 tokens (int32)" in capsys.readouterr().out
    docs, dtype = read_docs(str(tmp_path / "c_text_document"))
    assert dtype == np.int32 and docs == [[70000, 1, 128255], [5, 128255]]
    assert main(argv + ["--model-vocab-size", "1000"]) == 2
    assert "128256 exceeds the model's vocab size 1000" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tokenizers
def test_check_vocab_message():
    check_vocab(NullTokenizer(100), 128)
    with pytest.raises(ValueError, match="tokenizer vocab size 128256 exceeds the model's vocab size 32000"):
        check_vocab(NullTokenizer(128256), 32000)


def test_tiktoken_llama3_format(tmp_path):
    ranks = [bytes([i]) for i in range(256)] + [b"ll", b"ama", b"llama", b" s", b"plit"]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(ranks)))
    tok = make_tokenizer("tiktoken", str(path))
    assert isinstance(tok, TiktokenTokenizer)
    assert (tok.vocab_size, tok.bos, tok.eod) == (261 + 256, 261, 262)
    text = "llama split: 3 stages, ünïcode ✓\n<|end_of_text|>"
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text and 258 in ids  # b"llama" merged
    assert max(ids) < 261  # special-token text stays plain text
    assert tok.detokenize([tok.bos]) == "<|begin_of_text|>"


def test_huggingface_directory(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>").save_pretrained(
        str(tmp_path))
    tok = build_tokenizer(DataConfig(tokenizer_type="huggingface", tokenizer_model=str(tmp_path)))
    assert (tok.bos, tok.eod) == (0, 1)
    ids = tok.tokenize("llama pipeline, data!")
    assert 0 not in ids and 1 not in ids and tok.detokenize(ids) == "llama pipeline, data!"
    # the tokenizer.json file works as well as its directory (issue 10): next to its
    # tokenizer_config.json, and bare (eos = the first known end-of-text token it holds)
    from_file = build_tokenizer(DataConfig(tokenizer_type="huggingface",
                                           tokenizer_model=str(tmp_path / "tokenizer.json")))
    assert from_file.tokenize("llama pipeline, data!") == ids and from_file.eod == 1
    (tmp_path / "bare").mkdir()
    raw.save(str(tmp_path / "bare" / "tokenizer.json"))
    bare = build_tokenizer(DataConfig(tokenizer_type="huggingface",
                                      tokenizer_model=str(tmp_path / "bare" / "tokenizer.json")))
    assert bare.tokenize("llama pipeline, data!") == ids and bare.eod == 1  # "</s>"
    with pytest.raises(FileNotFoundError, match="expected a directory or a tokenizer.json file"):
        build_tokenizer(DataConfig(tokenizer_type="huggingface", tokenizer_model=str(tmp_path / "no.json")))


# ----------------------------------------------------------------------------- datasets
def _build(cfg, tok, train=40, valid=8, test=0, seed=1234, gbs=4):
    return build_datasets(cfg, global_batch_size=gbs, train_samples=train, eval_samples=valid,
                          test_samples=test, seed=seed, tokenizer=tok)


def test_gpt_dataset_samples_match_documents(null_data, tmp_path):
    prefix, _, _ = null_data
    cfg = DataConfig(mock=False, data_path=[prefix], split="8,2,0", seq_length=16,
                     vocab_size=1000, cache_dir=str(tmp_path / "cache"))
    tok = build_tokenizer(cfg)
    train, valid, test = _build(cfg, tok)
    assert test is None and len(train) >= 40 and len(valid) >= 8
    docs, _ = read_docs(prefix)
    for ds in (train, valid):
        stream = np.concatenate([docs[d] for d in ds.document_index])
        starts = np.cumsum([0] + [len(docs[d]) for d in ds.document_index])
        for i in range(len(ds)):
            s = ds[i]
            assert s["tokens"].shape == (16,) and torch.equal(s["tokens"][1:], s["labels"][:-1])
            j = ds.shuffle_index[i]
            doc, off = ds.sample_index[j]
            beg = starts[doc] + off
            window = torch.cat([s["tokens"], s["labels"][-1:]])
            assert window.tolist() == stream[beg : beg + 17].tolist()
    # the cache is reused: a second build gives the same order
    again, _, _ = _build(cfg, tok)
    assert all(torch.equal(again[i]["tokens"], train[i]["tokens"]) for i in range(len(train)))


def test_blend_two_prefixes_with_weights(null_data):
    pa, pb, _ = null_data
    cfg = DataConfig(mock=False, data_path=["0.25", pa, "0.75", pb], split="1,0,0",
                     seq_length=8, vocab_size=1000)
    train, valid, _ = _build(cfg, build_tokenizer(cfg), train=200, valid=0)
    assert len(train) == 200 and valid is None
    ids = np.array([int(train[i]["dataset_id"]) for i in range(200)])
    assert abs((ids == 1).mean() - 0.75) < 0.02
    for i in range(200):
        toks = train[i]["tokens"]
        body = toks[toks != 999]
        assert bool(((body < 100) if ids[i] == 0 else (body >= 500)).all())


def test_empty_or_tiny_prefix_errors(null_data, tmp_path):
    prefix, _, _ = null_data
    tiny = preprocess_jsonl(write_jsonl(tmp_path / "t.jsonl", ["1 2 3"]), str(tmp_path / "t"),
                            TokenizerSpec("null", vocab_size=1000), progress=False).output_prefix
    base = dict(mock=False, seq_length=16, vocab_size=1000, split="1,0,0")
    tok = NullTokenizer(1000)
    with pytest.raises(ValueError, match=f"{tiny}.*3 tokens, fewer than one sample"):
        _build(DataConfig(data_path=[tiny], **base), tok)
    with pytest.raises(ValueError, match="nope.bin/.idx not found"):
        _build(DataConfig(data_path=[str(tmp_path / "nope")], **base), tok)
    base["split"] = "969,30,1"  # 60 documents: the test split gets none
    with pytest.raises(ValueError, match=f"{prefix}.*test split documents \\[60, 60\\)"):
        _build(DataConfig(data_path=[prefix], **base), tok)


def test_learnable_mock_is_deterministic_and_learnable():
    from splitllama.data.mock import pattern_pairs

    cfg = DataConfig(mock=True, mock_pattern=True, seq_length=32, vocab_size=512)
    tok = build_tokenizer(cfg)
    (a, _, _), (b, _, _), (c, _, _) = (_build(cfg, tok, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(20))
    assert not all(torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(20))
    pairs = pattern_pairs(7, 256).tolist()
    s = a[0]
    x, y = s["tokens"], s["labels"]
    assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
    plain = DataConfig(mock=True, seq_length=32, vocab_size=512)  # Megatron's MockGPTDataset
    assert _build(plain, tok)[0][0]["tokens"].shape == (32,)
    assert set(x.tolist()) <= set(range(256)) | {tok.eod}
    # every step inside a document follows one of the seed's affine pairs ...
    steps = [(int(u), int(v)) for u, v in zip(x, y) if u != tok.eod and v != tok.eod]
    assert steps and all(any((p * u + q) % 256 == v for p, q in pairs) for u, v in steps)
    # ... and a whole document follows a single pair
    doc = a.dataset[3][:-1].tolist()
    assert any(all((p * u + q) % 256 == v for u, v in zip(doc, doc[1:])) for p, q in pairs)


# ----------------------------------------------------------------------------- iterator
def test_iterator_resume_and_dp_slices():
    cfg = DataConfig(mock=True, mock_pattern=True, seq_length=8, vocab_size=300)
    train, _, _ = _build(cfg, build_tokenizer(cfg), train=64)
    it = build_data_iterator(train, 2, 0, 0, 1)
    batches = [next(it)["tokens"] for _ in range(6)]
    resumed = build_data_iterator(train, 2, 6, 0, 1)  # 3 micro-batches of 2 consumed
    assert torch.equal(next(resumed)["tokens"], batches[3])
    # dp=2: each global block of 4 samples is split into contiguous halves
    r0 = build_data_iterator(train, 2, 0, 0, 2, num_workers=1)
    r1 = build_data_iterator(train, 2, 0, 1, 2)
    for k in range(3):
        assert torch.equal(torch.cat([next(r0)["tokens"], next(r1)["tokens"]]),
                           torch.cat(batches[2 * k : 2 * k + 2]))
    n = len(train)
    tail = list(build_data_iterator(train, 2, n - 5, 0, 1))
    assert len(tail) == 2  # the last partial micro-batch is dropped
    wrapped = build_data_iterator(train, 2, n - 1, 0, 1, cyclic=True)
    assert torch.equal(next(wrapped)["tokens"][1], train[0]["tokens"])
    with pytest.raises(ValueError, match="used up"):
        build_data_iterator(train, 2, n, 0, 1)
