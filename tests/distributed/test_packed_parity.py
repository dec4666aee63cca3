"""Packed documents: one sequence holding three documents gives, per token, the loss (≤ 1e-5
relative) and the gradients (as test_tp_parity) of running each document ALONE through the
transformers reference — at TP=2 (with and without SP) and PP=2, for both ways of packing:
Megatron's dataset convention (position ids restarting per document + block-diagonal causal
mask; sdpa and local attention) and variable-length THD (cu_seqlens; sdpa). A control feeds the
same pack as one plain causal sequence and must NOT match (the check has teeth).

Reference: HF split model in float64; Megatron in float32 via the training runtime and the
training step (pp_worker)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from splitllama.data.packing import pack_sample
from splitllama.hf.build import save_pretrained_with_code, split_from_llamas, tiny_llama_configs, tiny_llama_from_config
from tests.distributed.test_tp_parity import GRAD_TOL, LOGIT_TOL, rel_err
from tests.launch import torchrun

pytestmark = pytest.mark.distributed
WORKER = "tests/distributed/pp_worker.py"
N, M, SEQ = 2, 3, 16
TOKEN_LOSS_TOL = 1e-5
DOC_LENGTHS = (6, 4, 5)  # tokens per document: 5 + 3 + 4 = 12 inputs, then a 4-token pad segment
# name: (tp, pp, layout, sp, mlp, backend, packed)
CASES = {
    "tp2_mask_sdpa": (2, 1, None, False, False, "sdpa", "mask"),
    "tp2_mask_local": (2, 1, None, False, False, "local", "mask"),
    "tp2_thd_sdpa": (2, 1, None, False, False, "sdpa", "thd"),
    "tp2_sp_thd_sdpa": (2, 1, None, True, True, "sdpa", "thd"),
    "tp2_sp_mask_sdpa": (2, 1, None, True, True, "sdpa", "mask"),
    "pp2_mask_sdpa": (1, 2, "L2|A,U3", False, True, "sdpa", "mask"),
    "pp2_mask_local": (1, 2, "L2|A,U3", False, True, "local", "mask"),
    "pp2_thd_sdpa": (1, 2, "L1|L1,A,U3", False, True, "sdpa", "thd"),
    "tp2_plain_sdpa_control": (2, 1, None, False, False, "sdpa", "plain"),
    # reset_position_ids alone: RoPE restarts, attention still crosses documents
    "tp2_sp_positions_sdpa": (2, 1, None, True, False, "sdpa", "positions"),
    "pp2_positions_local": (1, 2, "L2|A,U3", False, False, "local", "positions"),
}
MATCHING = [n for n in CASES if CASES[n][6] in ("mask", "thd")]
POSITIONS = [n for n in CASES if CASES[n][6] == "positions"]


def document_mask(cu_seqlens: torch.Tensor, seq: int) -> torch.Tensor:
    """Megatron's convention, bool [1, 1, s, s], True = masked: causal within each segment."""
    cu = cu_seqlens[cu_seqlens >= 0]
    doc = torch.bucketize(torch.arange(seq), cu[1:], right=True)
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    return ~((doc[:, None] == doc[None, :]) & (j <= i))[None, None]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    lo, up = tiny_llama_configs()
    sources = tiny_llama_from_config(lo, seed=0), tiny_llama_from_config(up, seed=1)
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, lo["vocab_size"], (n,), generator=g) for n in DOC_LENGTHS]
    sample = {k: v[None] for k, v in pack_sample([d.numpy() for d in docs], SEQ).items()}
    sample["attention_mask"] = document_mask(sample["cu_seqlens"][0], SEQ)
    save_file(sample, tmp / "packed.safetensors")
    refs = {}
    for mlp in (False, True):
        hf = split_from_llamas(*sources, N, M, mlp=mlp, seed=3)
        hf.set_attn_implementation("eager")
        save_pretrained_with_code(hf, tmp / f"hf{int(mlp)}")
        hf = hf.double()
        logits, losses = [], []
        for d in docs:  # each document alone, positions from 0
            lg = hf(input_ids=d[None, :-1]).logits[0]
            logits.append(lg)
            losses.append(F.cross_entropy(lg, d[1:], reduction="none"))
        loss = torch.cat(losses)
        loss.mean().backward()  # Megatron: sum over the pack's real tokens / their count
        refs[mlp] = (torch.cat(logits).detach(), loss.detach(), {n: p.grad for n, p in hf.named_parameters()})
        if not mlp:  # the whole pack, positions restarting, plain causal attention (an explicit
            # all-ones mask stops transformers from treating the position resets as packing)
            hf.zero_grad()
            lg = hf(input_ids=sample["tokens"], position_ids=sample["position_ids"],
                    attention_mask=torch.ones(1, SEQ, dtype=torch.long)).logits[0]
            n = sum(DOC_LENGTHS) - len(DOC_LENGTHS)
            loss = F.cross_entropy(lg[:n], sample["labels"][0, :n], reduction="none")
            loss.mean().backward()
            refs["positions"] = (lg[:n].detach(), loss.detach(), {n: p.grad for n, p in hf.named_parameters()})
    cases = [{"name": name, "hf_dir": str(tmp / f"hf{int(mlp)}"), "tokens": str(tmp / "packed.safetensors"),
              "out_dir": str(tmp / name), "tp": tp, "pp": pp, "layout": layout, "sp": sp,
              "backend": backend, "packed": packed}
             for name, (tp, pp, layout, sp, mlp, backend, packed) in CASES.items()]
    (tmp / "spec.json").write_text(json.dumps({"cases": cases}))
    torchrun(2, WORKER, tmp / "spec.json", timeout=900)
    return tmp, refs


def _outputs(tmp, name):
    d = tmp / name
    grads = {}
    for f in sorted(d.glob("grads_stage*.safetensors")):
        grads.update(load_file(f))
    return load_file(d / "outputs.safetensors"), grads


@pytest.mark.parametrize("name", MATCHING)
def test_per_token_loss_and_logits_equal_documents_alone(results, name):
    tmp, refs = results
    ref_logits, ref_loss, _ = refs[CASES[name][4]]
    out, _ = _outputs(tmp, name)
    n = len(ref_loss)
    token_loss = out["token_loss"][0, :n].double()
    assert ((token_loss - ref_loss).abs() / ref_loss.abs()).max() < TOKEN_LOSS_TOL
    assert rel_err(out["logits"][0, :n], ref_logits) < LOGIT_TOL
    assert torch.equal(out["loss_sum_tokens"][0, 1], torch.tensor(float(n)))  # pad tokens carry no loss


@pytest.mark.parametrize("name", MATCHING)
def test_gradients_equal_documents_alone(results, name):
    tmp, refs = results
    _, _, ref_grads = refs[CASES[name][4]]
    _, grads = _outputs(tmp, name)
    assert set(grads) == set(ref_grads)
    for k in sorted(grads):
        assert rel_err(grads[k], ref_grads[k]) < GRAD_TOL, k


@pytest.mark.parametrize("name", POSITIONS)
def test_position_resets_alone_match_reference(results, name):
    """RoPE positions restarting per document in both blocks, attention across documents."""
    tmp, refs = results
    ref_logits, ref_loss, ref_grads = refs["positions"]
    out, grads = _outputs(tmp, name)
    n = len(ref_loss)
    assert ((out["token_loss"][0, :n].double() - ref_loss).abs() / ref_loss.abs()).max() < TOKEN_LOSS_TOL
    assert rel_err(out["logits"][0, :n], ref_logits) < LOGIT_TOL
    for k in sorted(grads):
        assert rel_err(grads[k], ref_grads[k]) < GRAD_TOL, k
    # ... and differs from positions 0..s-1 (the plain control) after the first document
    plain, _ = _outputs(tmp, "tp2_plain_sdpa_control")
    first = DOC_LENGTHS[0] - 1
    assert rel_err(plain["token_loss"][0, first:n], out["token_loss"][0, first:n]) > 1e-4


def test_plain_causal_packing_does_not_match(results):
    """Without document masking and position resets the later documents see the earlier ones."""
    tmp, refs = results
    _, ref_loss, _ = refs[False]
    out, _ = _outputs(tmp, "tp2_plain_sdpa_control")
    first = DOC_LENGTHS[0] - 1
    token_loss = out["token_loss"][0, :len(ref_loss)].double()
    assert rel_err(token_loss[:first], ref_loss[:first]) < TOKEN_LOSS_TOL  # the first document is alone anyway
    assert rel_err(token_loss[first:], ref_loss[first:]) > 1e-3
