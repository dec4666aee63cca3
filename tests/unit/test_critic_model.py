"""Critic pieces without processes: the `model.head` field, the seed schema of a critic, the
mapping table's value-head entries, the cost model's critic head, and the HF critic's forward
and loss (checked against the LM body it was made from)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from splitllama.config.job import load_job_config
from splitllama.config.model import ModelConfig
from splitllama.convert.keys import schema
from splitllama.convert.mapping import mappings
from splitllama.hf.build import (critic_from_causal_lm, split_from_llamas, tiny_llama_configs,
                                 tiny_llama_from_config, value_head_weights)
from splitllama.pipeline.cost import units_for


def test_head_field_validated_and_overridable():
    assert ModelConfig().head == "lm"
    assert load_job_config(None, ["model.head=value"]).model.head == "value"
    with pytest.raises(ValueError, match="model.head must be lm | value, got 'critic'"):
        ModelConfig(head="critic").validate()


def test_seed_schema_round_trips_the_head():
    critic = ModelConfig(head="value")
    d = critic.to_seed_dict()
    assert d["architectures"] == ["CustomSplitLLamaForTokenClassification"] and d["num_labels"] == 1
    assert ModelConfig.from_seed_dict(d).head == "value"
    assert ModelConfig.from_seed_dict(ModelConfig().to_seed_dict()).head == "lm"
    with pytest.raises(ValueError, match="num_labels 1, found 3"):
        ModelConfig.from_seed_dict({**d, "num_labels": 3})


def test_mapping_and_schema_of_a_critic():
    lm, critic = ModelConfig(), ModelConfig(head="value")
    lm_e, cr_e = {e.mcore: e for e in mappings(lm)}, {e.mcore: e for e in mappings(critic)}
    assert set(cr_e) == set(lm_e) | {"output_layer.bias"}
    assert cr_e["output_layer.weight"].hf == ("score.weight",) and cr_e["output_layer.bias"].hf == ("score.bias",)
    assert cr_e["output_layer.weight"].tp_axis is None and cr_e["output_layer.bias"].tp_axis is None  # replicated
    assert lm_e["output_layer.weight"].hf == ("lm_head.weight",) and lm_e["output_layer.weight"].tp_axis == 0
    sch = schema(critic)
    assert sch["output_layer.weight"].shape == (1, 128) and sch["output_layer.bias"].shape == (1,)


def test_cost_model_critic_head():
    lm = ModelConfig(lower="llama3_8b", upper="llama3_70b", num_layers_lower=32, num_layers_upper=8)
    critic = replace(lm, head="value")
    seq, b = 4096, 1
    for tp, sp in ((1, False), (4, True)):
        head = {u.name: u for u in units_for(critic, seq, b, tp=tp, sequence_parallel=sp)}["head"]
        assert head.fwd_flops == 2 * seq * b * 8193 / (tp if sp else 1)
        assert head.param_count == 2 * 8192 + 1  # final norm + weight + bias
    lm_head = {u.name: u for u in units_for(lm, seq, b)}["head"]
    assert lm_head.fwd_flops > 10_000 * head.fwd_flops  # why the planner must know the head
    lm_units, cr_units = units_for(lm, seq, b), units_for(critic, seq, b)
    assert [u.name for u in lm_units] == [u.name for u in cr_units]


@pytest.fixture(scope="module")
def lm():
    lo, up = tiny_llama_configs()
    m = split_from_llamas(tiny_llama_from_config(lo, 0), tiny_llama_from_config(up, 1), 2, 3, seed=3)
    m.set_attn_implementation("eager")
    return m


def test_hf_critic_is_the_lm_body_plus_score(lm):
    critic = critic_from_causal_lm(lm, init="normal", seed=5)
    x = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, _, _ = lm.model(input_ids=x)
        head = value_head_weights(128, "normal", seed=5)
        want = hidden @ head["score.weight"].T + head["score.bias"]
        got = critic(input_ids=x).logits
    assert got.shape == (2, 9, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert all(torch.equal(p, lm.state_dict()[k]) for k, p in critic.state_dict().items() if k.startswith("model."))


def test_hf_critic_masked_mse(lm):
    critic = critic_from_causal_lm(lm, init="normal", seed=5)
    x = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    labels[0, :2] = -100
    labels[1, 3] = math.nan
    out = critic(input_ids=x, labels=labels)
    v = out.logits[..., 0]
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, :2] = False
    keep[1, 3] = False
    want = ((v - labels)[keep]).square().mean()
    torch.testing.assert_close(out.loss, want)
    assert torch.isfinite(out.loss)
