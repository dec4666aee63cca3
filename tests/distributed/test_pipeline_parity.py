"""Pipeline parallelism across the 4096/8192-style width boundary: logits, losses and the
gradients of every stage at PP=2, PP=4 and TP=2×PP=2 equal the transformers reference
(which PP=1 is also checked against), for plans with the adapter inside a stage, ending one
and starting one, and with a head-only (``...|H``) or embedding-only (``E|...``) stage; and no rank builds a parameter its stage does not own.

Megatron fp32 vs HF float64; tolerances as in test_tp_parity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from splitllama.config.model import ModelConfig
from splitllama.convert.mapping import mappings
from splitllama.hf.build import save_pretrained_with_code, split_from_llamas, tiny_llama_configs, tiny_llama_from_config
from splitllama.pipeline.layout import PipelineLayout
from tests.distributed.test_tp_parity import GRAD_TOL, LOGIT_TOL, rel_err
from tests.launch import torchrun

pytestmark = pytest.mark.distributed
WORKER = "tests/distributed/pp_worker.py"
N, M = 2, 3
# name: (world, tp, pp, layout, sp, mlp)
CASES = {
    "pp1": (1, 1, 1, None, False, False),
    "pp2_adapter_ends_stage": (2, 1, 2, "L2,A|U3", False, False),
    "pp2_adapter_starts_stage": (2, 1, 2, "L2|A,U3", False, False),
    "pp2_adapter_inside_mlp": (2, 1, 2, "L1|L1,A,U3", False, True),
    "pp4_adapter_inside": (4, 1, 4, "L1|L1,A,U1|U1|U1", False, False),
    "pp4_adapter_alone": (4, 1, 4, "L2|A|U2|U1", False, True),
    "tp2pp2_adapter_ends_stage": (4, 2, 2, "L2,A|U3", False, False),
    "tp2pp2_sp_adapter_starts_stage": (4, 2, 2, "L2|A,U3", True, True),
    "pp2_sdpa_adapter_inside_mlp": (2, 1, 2, "L1|L1,A,U3", False, True),
    # head / embedding stages of their own (no decoder layers on that stage)
    "pp3_head_stage": (3, 1, 3, "L2,A|U3|H", False, False),
    "pp3_embedding_stage_mlp": (3, 1, 3, "E|L2,A,U1|U2", False, True),
    "tp2pp2_sp_head_stage": (4, 2, 2, "L2,A,U3|H", True, False),
}
BACKEND = {"pp2_sdpa_adapter_inside_mlp": "sdpa"}  # every other case: Megatron's local attention


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp")
    lo, up = tiny_llama_configs()
    sources = tiny_llama_from_config(lo, seed=0), tiny_llama_from_config(up, seed=1)
    tokens = torch.randint(0, lo["vocab_size"], (4, 17), generator=torch.Generator().manual_seed(11))
    save_file({"tokens": tokens}, tmp / "tokens.safetensors")
    refs, specs = {}, {}
    for mlp in (False, True):
        hf = split_from_llamas(*sources, N, M, mlp=mlp, seed=3)
        hf.set_attn_implementation("eager")
        save_pretrained_with_code(hf, tmp / f"hf{int(mlp)}")
        hf = hf.double()
        logits = hf(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none")
        loss.mean().backward()
        refs[mlp] = (logits.detach(), loss.detach().view(4, 16), {n: p.grad for n, p in hf.named_parameters()})
    for name, (world, tp, pp, layout, sp, mlp) in CASES.items():
        specs.setdefault(world, []).append({
            "name": name, "hf_dir": str(tmp / f"hf{int(mlp)}"), "tokens": str(tmp / "tokens.safetensors"),
            "out_dir": str(tmp / name), "tp": tp, "pp": pp, "layout": layout, "sp": sp,
            "backend": BACKEND.get(name, "local")})
    for world, cases in sorted(specs.items()):
        spec = tmp / f"spec{world}.json"
        spec.write_text(json.dumps({"cases": cases}))
        torchrun(world, WORKER, spec, timeout=900)
    return tmp, refs


def _load(tmp: Path, name: str):
    d = tmp / name
    out = load_file(d / "outputs.safetensors")
    grads = {}
    for f in sorted(d.glob("grads_stage*.safetensors")):
        g = load_file(f)
        assert not set(g) & set(grads), f"two stages report gradients for {set(g) & set(grads)}"
        grads.update(g)
    return out, grads


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_loss_match(results, name):
    tmp, refs = results
    ref_logits, ref_loss, _ = refs[CASES[name][5]]
    out, _ = _load(tmp, name)
    assert rel_err(out["logits"], ref_logits) < LOGIT_TOL
    sums = out["loss_sum_tokens"]
    assert torch.equal(sums[:, 1], torch.full((4,), 16.0))
    assert rel_err(sums[:, 0], ref_loss.sum(dim=1)) < LOGIT_TOL


@pytest.mark.parametrize("name", list(CASES))
def test_every_stage_gradients_match(results, name):
    tmp, refs = results
    _, _, ref_grads = refs[CASES[name][5]]
    _, grads = _load(tmp, name)
    assert set(grads) == set(ref_grads)  # the stages together own every parameter exactly once
    for k in sorted(grads):
        assert rel_err(grads[k], ref_grads[k]) < GRAD_TOL, k


@pytest.mark.parametrize("name", list(CASES))
def test_no_rank_builds_what_it_does_not_own(results, name):
    tmp, _ = results
    world, tp, pp, layout, _, mlp = CASES[name]
    lo, up = tiny_llama_configs()
    cfg = ModelConfig(lower=lo, upper=up, num_layers_lower=N, num_layers_upper=M, mlp=mlp)
    plan = PipelineLayout.parse(layout or f"L{N},A,U{M}")
    numel = {e.mcore: _numel(e, cfg) for e in mappings(cfg)}
    for rank in range(world):
        info = json.loads((tmp / name / f"params_rank{rank}.json").read_text())
        s = plan.stages[info["stage"]]
        lo_off, up_off = plan.lower_offset(info["stage"]), plan.upper_offset(info["stage"])
        expect = {n for n in numel if
                  (n.startswith("embedding.") and info["stage"] == 0) or
                  (n.startswith(("final_layernorm.", "output_layer.")) and info["stage"] == pp - 1) or
                  (n.startswith("adapter.") and s.adapter) or
                  (n.startswith("lower.layers.") and lo_off <= int(n.split(".")[2]) < lo_off + s.lower_layers) or
                  (n.startswith("upper.layers.") and up_off <= int(n.split(".")[2]) < up_off + s.upper_layers)}
        assert set(info["params"]) == expect, (rank, info["stage"])
        for n, count in info["params"].items():  # TP shards: 1/tp of each split tensor
            e = next(e for e in mappings(cfg) if e.mcore == n)
            assert count == (numel[n] if e.tp_axis is None else numel[n] // tp), n


def _numel(e, cfg) -> int:
    blk = cfg.upper if e.mcore.startswith(("upper.", "final_", "output_")) else cfg.lower
    h, v = blk.hidden_size, cfg.vocab_size
    kv = blk.num_key_value_heads * blk.kv_channels
    table = {"linear_qkv": (h + 2 * kv) * h, "linear_proj": h * h, "linear_fc1": 2 * blk.intermediate_size * h,
             "linear_fc2": h * blk.intermediate_size, "layernorm": h}
    if e.mcore.startswith("embedding."):
        return v * cfg.lower.hidden_size
    if e.mcore.startswith("output_layer."):
        return v * cfg.upper.hidden_size
    if e.mcore == "final_layernorm.weight":
        return cfg.upper.hidden_size
    if e.mcore == "adapter.linear.weight" or e.mcore == "adapter.linear_fc1.weight":
        return cfg.upper.hidden_size * cfg.lower.hidden_size
    if e.mcore == "adapter.linear_fc2.weight":
        return cfg.upper.hidden_size ** 2
    return next(n for k, n in table.items() if k in e.mcore)
