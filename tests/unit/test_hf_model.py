"""Tests of the HF SplitLlama model (splitllama/hf): CPU, float32, tiny LLaMA-3.1-style configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from splitllama.hf.build import (
    adapter_weights,
    save_pretrained_with_code,
    split_from_llamas,
    tiny_llama_configs,
    tiny_llama_from_config,
)
from splitllama.hf.configuration_splitllama import CustomSplitLLamaConfig, llama_config_to_dict
from splitllama.hf.modeling_splitllama import CustomSplitLLamaForCausalLM

LOWER_CFG, UPPER_CFG = tiny_llama_configs()
L_LOWER, L_UPPER = LOWER_CFG["num_hidden_layers"], UPPER_CFG["num_hidden_layers"]
SPLITS = [(L_LOWER, L_UPPER, False), (2, 3, False), (2, 3, True)]
LAYER_PARAMS = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
]


@pytest.fixture(scope="module")
def sources() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    return tiny_llama_from_config(LOWER_CFG, seed=0), tiny_llama_from_config(UPPER_CFG, seed=1)


def _split(sources, n: int, m: int, mlp: bool, attn: str = "sdpa", init: str = "random"):
    model = split_from_llamas(*sources, n, m, mlp=mlp, adapter_init=init, seed=3)
    model.set_attn_implementation(attn)
    return model


def _ids(batch: int = 2, length: int = 12, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, LOWER_CFG["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def _lower_reference(src: LlamaForCausalLM, n: int, attn: str) -> LlamaModel:
    """The lower LlamaModel truncated to n layers, with hidden_states[-1] left before the final norm."""
    cfg = LlamaConfig.from_dict(dict(llama_config_to_dict(src.config), num_hidden_layers=n), attn_implementation=attn)
    cfg.tie_last_hidden_states = False  # transformers 5.x otherwise replaces hidden_states[-1] by the normed one
    ref = LlamaModel(cfg).eval()
    sd = {k[len("model."):]: v for k, v in src.state_dict().items() if k.startswith("model.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("layers.") or int(k.split(".")[1]) < n}
    ref.load_state_dict(sd, strict=True)
    return ref


def _upper_reference(src: LlamaForCausalLM, m: int, attn: str) -> LlamaForCausalLM:
    """An upper LlamaForCausalLM with only the source's last m layers (renumbered 0..m-1)."""
    cfg = LlamaConfig.from_dict(dict(llama_config_to_dict(src.config), num_hidden_layers=m), attn_implementation=attn)
    ref = LlamaForCausalLM(cfg).eval()
    first = src.config.num_hidden_layers - m
    sd = {}
    for k, v in src.state_dict().items():
        parts = k.split(".")
        if k.startswith("model.layers."):
            if int(parts[2]) < first:
                continue
            k = ".".join(parts[:2] + [str(int(parts[2]) - first)] + parts[3:])
        sd[k] = v
    ref.load_state_dict(sd, strict=True)
    return ref


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("n,m,mlp", SPLITS)
@torch.no_grad()
def test_blocks_match_llama_references(sources, n, m, mlp, attn):
    model = _split(sources, n, m, mlp, attn)
    ids = _ids()
    out = model(ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == 1 + n + 1 + m
    # (i) lower block == LlamaModel truncated to n layers, before its norm.
    ref_lo = _lower_reference(sources[0], n, attn)(ids, output_hidden_states=True).hidden_states
    assert len(ref_lo) == n + 1
    for a, b in zip(hs[: n + 1], ref_lo):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the adapter output is the adapter applied to the lower block output
    torch.testing.assert_close(hs[n + 1], model.model.apply_adapter(ref_lo[-1]), rtol=0, atol=0)
    # (ii) adapter output through an upper LlamaForCausalLM holding the last m layers == split logits.
    ref_logits = _upper_reference(sources[1], m, attn)(inputs_embeds=hs[n + 1]).logits
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_each_block_uses_its_own_rope(sources):
    """Upper model with plain RoPE (theta 10000, no scaling): the split model must use it for the upper block."""
    upper = tiny_llama_from_config({k: v for k, v in UPPER_CFG.items() if k != "rope_scaling"} | {"rope_theta": 1e4}, 1)
    mixed = (sources[0], upper)
    model = _split(mixed, 2, 3, False)
    assert model.model.rotary_emb_last.rope_type == "default" and model.model.rotary_emb_first.rope_type == "llama3"
    out = model(_ids(), output_hidden_states=True)
    ref_logits = _upper_reference(upper, 3, "sdpa")(inputs_embeds=out.hidden_states[3]).logits
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_eager_and_sdpa_agree(sources):
    ids = _ids()
    eager = _split(sources, 2, 3, True, "eager")
    a = eager(ids).logits
    assert eager.model.layers_last[0].self_attn.config._attn_implementation == "eager"
    b = _split(sources, 2, 3, True, "sdpa")(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_loss_is_shifted_cross_entropy(sources):
    model = _split(sources, 2, 3, False)
    ids = _ids()
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    vocab = out.logits.shape[-1]
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    assert model.model.adapter.weight.grad is not None
    assert model.model.layers_first[0].mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n,m,mlp", SPLITS)
@torch.no_grad()
def test_incremental_decoding_matches_full_forward(sources, n, m, mlp):
    model = _split(sources, n, m, mlp)
    ids = _ids(length=10)
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :6], use_cache=True)
    cache = out.cache
    steps = [out.logits]
    for t in range(6, 10):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    # one cache slot per layer of both blocks, all of the same length
    assert len(cache.layers) == n + m
    assert all(layer.get_seq_length() == 10 for layer in cache.layers)
    # lower layers hold lower-block keys: the first cache slot equals a cache filled by the lower reference alone
    ref = _lower_reference(sources[0], n, "sdpa")
    ref_cache = ref(ids, use_cache=True).cache
    torch.testing.assert_close(cache.layers[0].keys, ref_cache.layers[0].keys, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_left_padding_mask(sources):
    model = _split(sources, 2, 3, True)
    ids = _ids(batch=1, length=8)
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1).repeat(2, 1)
    padded[1, :pad] = ids[0, :pad]  # row 1: a different, unpadded sequence
    mask = torch.ones_like(padded)
    mask[0, :pad] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(out[0, pad:], model(ids).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], model(padded[1:]).logits[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_generate_greedy_is_deterministic_and_matches_argmax(sources):
    model = _split(sources, 2, 3, False)
    prompt = _ids(batch=2, length=7)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(prompt))
    a, b = model.generate(prompt, **kwargs), model.generate(prompt, **kwargs)
    assert a.shape == (2, 12) and torch.equal(a, b) and torch.equal(a[:, :7], prompt)
    seq = prompt
    for _ in range(5):  # greedy decoding by full forwards, no cache
        logits = model(seq, use_cache=False).logits[:, -1]
        if model.generation_config.eos_token_id is not None:  # min_new_tokens masks eos
            logits[:, model.generation_config.eos_token_id] = -float("inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(a, seq)


@pytest.mark.parametrize("mlp", [False, True])
@torch.no_grad()
def test_save_and_load_with_remote_code(sources, tmp_path: Path, mlp):
    model = _split(sources, 2, 3, mlp)
    out_dir = save_pretrained_with_code(model, tmp_path / f"export_mlp{int(mlp)}")
    cfg = json.loads((out_dir / "config.json").read_text())
    for key in ("path8b", "path70b", "num_layers_8", "num_layers_70", "mlp", "vocab_size", "rms_norm_eps"):
        assert key in cfg
    assert cfg["architectures"] == ["CustomSplitLLamaForCausalLM"]
    assert cfg["model_type"] == "custom_split_llama"
    assert (cfg["num_layers_8"], cfg["num_layers_70"], cfg["mlp"]) == (2, 3, mlp)
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_splitllama.CustomSplitLLamaForCausalLM"
    assert cfg["config8b"]["hidden_size"] == 64 and cfg["config70b"]["hidden_size"] == 128
    code = (out_dir / "modeling_splitllama.py").read_text() + (out_dir / "configuration_splitllama.py").read_text()
    assert "import splitllama" not in code and "from splitllama" not in code
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()
    assert type(loaded) is not CustomSplitLLamaForCausalLM
    assert not type(loaded).__module__.startswith("splitllama")
    assert set(loaded.state_dict()) == set(model.state_dict())
    ids = _ids()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # non-persistent RoPE buffers were rebuilt with llama3 scaling on load
    torch.testing.assert_close(loaded.model.rotary_emb_last.inv_freq, model.model.rotary_emb_last.inv_freq)


@pytest.mark.parametrize("mlp", [False, True])
def test_module_names(sources, mlp):
    model = _split(sources, 2, 3, mlp)
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for block, count in (("layers_first", 2), ("layers_last", 3)):
        expected |= {f"model.{block}.{i}.{p}" for i in range(count) for p in LAYER_PARAMS}
    if mlp:
        expected |= {"model.adapter_linear_1.weight", "model.adapter_linear_2.weight"}
    else:
        expected |= {"model.adapter.weight"}
    assert set(model.state_dict()) == expected
    assert {name for name, _ in model.named_parameters()} == expected
    names = {name for name, _ in model.named_modules()}
    assert ("model.adapter" in names) is (not mlp)
    assert ("model.adapter_linear_1" in names) is mlp and ("model.adapter_linear_2" in names) is mlp
    lo = model.model.layers_first[1].self_attn.q_proj.weight
    up = model.model.layers_last[0].self_attn.q_proj.weight
    assert lo.shape == (64, 64) and up.shape == (128, 128)


def test_weights_are_copies_of_the_right_layers(sources):
    lower, upper = sources
    model = _split(sources, 2, 3, False)
    pairs = [
        (model.model.embed_tokens.weight, lower.model.embed_tokens.weight),
        (model.model.layers_first[1].mlp.down_proj.weight, lower.model.layers[1].mlp.down_proj.weight),
        (model.model.layers_last[0].self_attn.k_proj.weight, upper.model.layers[L_UPPER - 3].self_attn.k_proj.weight),
        (model.model.layers_last[2].input_layernorm.weight, upper.model.layers[L_UPPER - 1].input_layernorm.weight),
        (model.model.norm.weight, upper.model.norm.weight),
        (model.lm_head.weight, upper.lm_head.weight),
    ]
    for ours, theirs in pairs:
        assert torch.equal(ours, theirs) and ours.data_ptr() != theirs.data_ptr()
    assert [layer.self_attn.layer_idx for layer in model.model.layers_first] == [0, 1]
    assert [layer.self_attn.layer_idx for layer in model.model.layers_last] == [2, 3, 4]


@pytest.mark.parametrize("mlp", [False, True])
@torch.no_grad()
def test_identity_adapter(sources, mlp):
    model = _split(sources, 2, 3, mlp, init="identity")
    h = torch.randn(2, 5, 64)
    expected = torch.cat([torch.relu(h) if mlp else h, torch.zeros(2, 5, 64)], dim=-1)
    torch.testing.assert_close(model.model.apply_adapter(h), expected, rtol=0, atol=0)
    a, b = adapter_weights(64, 128, mlp, "random", seed=7), adapter_weights(64, 128, mlp, "random", seed=7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError):
        adapter_weights(128, 64, mlp, "identity")


def test_llama3_rope_scaling_is_on(sources):
    model = _split(sources, 2, 3, False)
    for rotary, cfg in ((model.model.rotary_emb_first, model.model.lower_config),
                        (model.model.rotary_emb_last, model.model.upper_config)):
        assert rotary.rope_type == "llama3"
        unscaled, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
        assert not torch.allclose(rotary.inv_freq, unscaled)
        torch.testing.assert_close(rotary.inv_freq, scaled, rtol=0, atol=0)
        # the low-frequency end is divided by the factor (8), the high-frequency end is untouched
        torch.testing.assert_close(rotary.inv_freq[-1], unscaled[-1] / 8)
        torch.testing.assert_close(rotary.inv_freq[0], unscaled[0])


def test_config_loads_sub_configs_from_paths(tmp_path: Path):
    LlamaConfig.from_dict(LOWER_CFG).save_pretrained(tmp_path / "lower")
    LlamaConfig.from_dict(UPPER_CFG).save_pretrained(tmp_path / "upper")
    cfg = CustomSplitLLamaConfig(path8b=str(tmp_path / "lower"), path70b=str(tmp_path / "upper"),
                                 num_layers_8=3, num_layers_70=2, mlp=True)
    assert cfg.num_hidden_layers == 5 and cfg.upper_first_layer == L_UPPER - 2
    assert cfg.lower_config().hidden_size == 64 and cfg.upper_config().hidden_size == 128
    assert cfg.upper_config().rope_parameters["rope_type"] == "llama3"
    with pytest.raises(ValueError):
        CustomSplitLLamaConfig(num_layers_8=L_LOWER + 1)
    with pytest.raises(ValueError):
        CustomSplitLLamaConfig(vocab_size=1000)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_position_ids_match_documents_alone(sources, attn):
    """transformers' packing convention: position ids restarting at 0 mark document boundaries
    (no attention mask, no cache): each document's logits and loss gradients equal those of the
    document alone (float64); both blocks' RoPE restart. Without the resets they differ."""
    model = _split(sources, 2, 3, True, attn=attn).double()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, LOWER_CFG["vocab_size"], (n,), generator=g) for n in (6, 4, 5)]

    def loss_and_grads(logits, labels):
        model.zero_grad()
        F.cross_entropy(logits, labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    alone = torch.cat([model(input_ids=d[None, :-1]).logits[0] for d in docs])
    labels = torch.cat([d[1:] for d in docs])
    ref_grads = loss_and_grads(alone, labels)
    ids = torch.cat([d[:-1] for d in docs])[None]
    pos = torch.cat([torch.arange(len(d) - 1) for d in docs])[None]
    # transformers' eager attention takes its softmax in float32 even for float64 inputs
    # (llama eager_attention_forward: softmax(..., dtype=torch.float32)), so over rows of other
    # lengths its rounding differs by ~1e-7; sdpa stays in float64. Cross-document attention
    # (below) differs by > 1e-3 either way.
    atol = 1e-6 if attn == "eager" else 1e-10
    model.train()
    packed = model(input_ids=ids, position_ids=pos).logits[0]
    torch.testing.assert_close(packed, alone.detach(), rtol=0, atol=atol)
    for n, g_ in loss_and_grads(packed, labels).items():
        torch.testing.assert_close(g_, ref_grads[n], rtol=0, atol=atol, msg=n)
    model.eval()
    no_cache = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    torch.testing.assert_close(no_cache, alone.detach(), rtol=0, atol=atol)
    plain = model(input_ids=ids, use_cache=False).logits[0]
    assert (plain - alone).abs().max() > 1e-3
