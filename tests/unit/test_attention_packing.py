"""SDPA core attention against an explicit float64 softmax reference (causal, Megatron-style
document mask, THD cu_seqlens, GQA), backend resolution / refusals, and greedy packing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from splitllama.config.data import DataConfig
from splitllama.data.packing import PackedDocumentDataset, greedy_pack, pack_sample, packed_seq_params
from splitllama.model.attention import SDPAttention, check_packing_support, resolve_backend

S, B, NP, NG, HN = 12, 2, 4, 2, 8


def _core() -> SDPAttention:
    cfg = TransformerConfig(num_layers=1, hidden_size=NP * HN, num_attention_heads=NP, num_query_groups=NG,
                            kv_channels=HN, attention_dropout=0.0, hidden_dropout=0.0)
    return SDPAttention(cfg, 1, AttnMaskType.causal, "self")


def _reference(q, k, v, allowed):
    """q [s, b, np, hn], k/v [s, b, ng, hn], allowed [b, s, s] -> [s, b, np*hn] in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = (t.repeat_interleave(NP // NG, dim=2) for t in (k, v))
    scores = torch.einsum("ibnd,jbnd->bnij", q, k) / math.sqrt(HN)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bnij,jbnd->ibnd", scores.softmax(-1), v)
    return out.reshape(q.size(0), q.size(1), -1)


def _qkv(s=S, b=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, NP, HN, generator=g), torch.randn(s, b, NG, HN, generator=g),
            torch.randn(s, b, NG, HN, generator=g))


def _doc_allowed(cu, s):
    doc = torch.bucketize(torch.arange(s), torch.tensor(cu[1:]), right=True)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    return (doc[:, None] == doc[None, :]) & (j <= i)


def test_causal_matches_reference():
    q, k, v = _qkv()
    out = _core()(q, k, v, None)
    allowed = torch.ones(S, S, dtype=torch.bool).tril().expand(B, S, S)
    torch.testing.assert_close(out.double(), _reference(q, k, v, allowed), rtol=0, atol=1e-5)


def test_megatron_document_mask_matches_reference():
    q, k, v = _qkv()
    allowed = torch.stack([_doc_allowed([0, 5, 9, S], S), _doc_allowed([0, 3, S], S)])
    out = _core()(q, k, v, ~allowed[:, None])  # Megatron: True = masked out
    torch.testing.assert_close(out.double(), _reference(q, k, v, allowed), rtol=0, atol=1e-5)


def test_thd_segments_match_reference_and_skip_empty_segments():
    q, k, v = _qkv(b=1)
    cu = [0, 5, 5, 9, S]  # an empty segment (as padded cu_seqlens may hold)
    params = packed_seq_params(torch.tensor(cu + [-1, -1], dtype=torch.int32))
    assert params.max_seqlen_q == 5 and params.cu_seqlens_q.tolist() == cu
    out = _core()(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=params)
    ref = _reference(q, k, v, _doc_allowed(cu, S)[None])[:, 0]
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cu_seqlens_q spans"):
        _core()(q[:-1, 0], k[:-1, 0], v[:-1, 0], None, packed_seq_params=params)


def test_backend_resolution_and_refusals():
    assert resolve_backend("auto", "local") == "sdpa"
    assert resolve_backend("auto", "transformer_engine") == "transformer_engine"
    with pytest.raises(ValueError, match="attention_backend=transformer_engine needs"):
        resolve_backend("transformer_engine", "local")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_backend("flash", "local")
    with pytest.raises(ValueError, match="transformer_engine cannot honour data.reset_attention_mask"):
        check_packing_support("transformer_engine", reset_attention_mask=True, packed_sequences=False)
    with pytest.raises(ValueError, match="local cannot honour data.packed_sequences"):
        check_packing_support("local", reset_attention_mask=False, packed_sequences=True)
    check_packing_support("local", reset_attention_mask=True, packed_sequences=False)
    check_packing_support("sdpa", reset_attention_mask=True, packed_sequences=True)
    with pytest.raises(ValueError, match="micro_batch_size=1"):
        packed_seq_params(torch.zeros(2, 5, dtype=torch.int32))


def test_greedy_pack_and_sample_layout():
    assert greedy_pack([5, 3, 4, 9, 2], 10) == [[0, 1, 4], [2], [3]]  # first fit
    assert greedy_pack([5, 3, 4, 9, 2], 10, window=1) == [[0, 1], [2], [3], [4]]  # next fit
    assert greedy_pack([12], 10) == [[0]]  # too long: a bin of its own (truncated by pack_sample)
    eod = 99
    docs = [np.array([1, 2, 3, eod]), np.array([4, 5, eod])]
    s = pack_sample(docs, 8, eod=eod)
    assert s["tokens"].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert s["labels"].tolist() == [2, 3, eod, 5, eod, 0, 0, 0]
    assert s["loss_mask"].tolist() == [1, 1, 0, 1, 0, 0, 0, 0]  # eod_mask_loss and padding
    assert s["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert s["cu_seqlens"][:5].tolist() == [0, 3, 5, 8, -1]
    long = pack_sample([np.arange(20)], 8)
    assert long["tokens"].tolist() == list(range(8)) and long["labels"].tolist() == list(range(1, 9))
    assert long["cu_seqlens"][:3].tolist() == [0, 8, -1]


class _Docs:
    def __init__(self, lengths):
        self.sequence_lengths = np.array(lengths)

    def get(self, idx, offset=0, length=None):
        return np.full(self.sequence_lengths[idx], idx, dtype=np.int64)


def test_packed_dataset_covers_each_document_once_per_epoch():
    src = _Docs([3, 7, 1, 5, 4, 6, 2, 8])
    ds = PackedDocumentDataset(src, np.arange(8), seq_length=8, num_samples=3, seed=1)
    again = PackedDocumentDataset(src, np.arange(8), seq_length=8, num_samples=3, seed=1)
    assert [p.tolist() for p in ds.packs] == [p.tolist() for p in again.packs]  # deterministic
    first_epoch = []
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["tokens"].shape == (8,) and sample["cu_seqlens"].shape == (9,)
        assert sample["loss_mask"].sum() <= 8
        first_epoch += ds.packs[i].tolist()
    assert sorted(set(first_epoch)) == [0, 1, 3, 4, 5, 6, 7]  # document 2 (1 token) has no label


def test_config_refuses_blends_when_packing():
    cfg = DataConfig(mock=False, data_path=["a", "b", "c"], packed_sequences=True, vocab_size=16)
    with pytest.raises(ValueError, match="packed_sequences packs the documents of one prefix"):
        cfg.validate()
