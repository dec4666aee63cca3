"""transformers implementation of SplitLlama: the numerical reference and the HF export format.

``embed_tokens (lower) -> layers_first (lower layers 0..N-1) -> adapter -> layers_last (upper layers L-M..L-1)
-> norm (upper) -> lm_head (upper)``. Each block runs with its own LlamaConfig (hidden size, heads, RoPE).

KV cache: one ``DynamicCache`` with N+M layers; lower layers use cache indices 0..N-1 and upper layers N..N+M-1.
The causal/padding mask is built once (``create_causal_mask``) and shared by both blocks: its shape
``[batch, 1, q_len, kv_len]`` depends on neither hidden size nor head count.

Packed sequences follow transformers' convention: with ``position_ids`` restarting at 0 per document, no
``attention_mask`` and no cache (training mode, or ``use_cache=False``), attention stays within each document
and both blocks' RoPE restart — as SplitLlama's Megatron training does with packed documents. This is veRL's
"remove-padding" input. Attention: eager, sdpa, or flash_attention_2 (what veRL requests); with flash-attn
installed the decoder layers call it through transformers' attention interface, which turns restarting
``position_ids`` into varlen ``cu_seqlens``; without it (CPU) the request falls back to sdpa, with one log line.

This file is copied next to exported checkpoints (``trust_remote_code``): it imports only its sibling
configuration module, never ``splitllama``. It runs on transformers 5.5.3 to 5.24 (setup.py's range): 5.24
renamed the KV-cache argument of ``create_causal_mask`` and of the decoder layers, and the output field, from
``past_key_values`` to ``cache``; the names in use are read once from the installed signatures below.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast, TokenClassifierOutput
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.utils import is_flash_attn_2_available, logging

from .configuration_splitllama import CustomSplitLLamaConfig


def _cache_name(parameters: Any) -> str:
    """``"cache"`` (transformers >= 5.24) or ``"past_key_values"`` (5.5.3-5.23), whichever ``parameters`` has."""
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise ImportError(f"unsupported transformers version: no cache/past_key_values in {list(parameters)}")


_MASK_CACHE_ARG = _cache_name(inspect.signature(create_causal_mask).parameters)
_LAYER_CACHE_ARG = _cache_name(inspect.signature(LlamaDecoderLayer.forward).parameters)
_OUTPUT_CACHE_FIELD = _cache_name([f.name for f in dataclasses.fields(CausalLMOutputWithPast)])
logger = logging.get_logger(__name__)


class CustomSplitLLamaModel(nn.Module):
    """The body: embedding, both decoder blocks, adapter and final norm (no lm_head).

    Module names match the seed checkpoint: ``embed_tokens``, ``layers_first.{i}``, ``adapter`` or
    ``adapter_linear_1``/``adapter_linear_2``, ``layers_last.{j}``, ``norm``. The two rotary modules hold only
    non-persistent buffers and do not appear in state dicts.
    """

    def __init__(self, config: CustomSplitLLamaConfig) -> None:
        super().__init__()
        self.config = config
        self.lower_config = config.lower_config()
        self.upper_config = config.upper_config()
        n, m = config.num_layers_8, config.num_layers_70
        h_lo, h_up = self.lower_config.hidden_size, self.upper_config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h_lo, self.lower_config.pad_token_id)
        self.layers_first = nn.ModuleList([LlamaDecoderLayer(self.lower_config, i) for i in range(n)])
        if config.mlp:
            self.adapter_linear_1 = nn.Linear(h_lo, h_up, bias=False)
            self.adapter_linear_2 = nn.Linear(h_up, h_up, bias=False)
        else:
            self.adapter = nn.Linear(h_lo, h_up, bias=False)
        # Cache indices continue after the lower block so the two blocks never share a cache slot.
        self.layers_last = nn.ModuleList([LlamaDecoderLayer(self.upper_config, n + j) for j in range(m)])
        self.norm = LlamaRMSNorm(h_up, eps=config.rms_norm_eps)
        self.rotary_emb_first = LlamaRotaryEmbedding(config=self.lower_config)
        self.rotary_emb_last = LlamaRotaryEmbedding(config=self.upper_config)

    def reset_rotary(self, device: torch.device | str | None = None) -> None:
        """Rebuild both rotary embeddings (their buffers) on ``device`` (default: the embedding's device).

        Needed after building the model on the meta device, since rotary buffers are not in state dicts.
        """
        device = self.embed_tokens.weight.device if device is None else device
        with torch.device(device):
            self.rotary_emb_first = LlamaRotaryEmbedding(config=self.lower_config)
            self.rotary_emb_last = LlamaRotaryEmbedding(config=self.upper_config)

    def apply_adapter(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Map the lower residual stream (width h_lower) to the upper one (width h_upper)."""
        if self.config.mlp:
            return self.adapter_linear_2(torch.relu(self.adapter_linear_1(hidden_states)))
        return self.adapter(hidden_states)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Cache | None, tuple[torch.Tensor, ...] | None]:
        """Returns ``(last_hidden_state after norm, cache, hidden_states)``.

        ``hidden_states`` (when requested) has 1 + N + 1 + M entries: the embeddings, the output of each lower
        layer, the adapter output, the output of each upper layer (the last one before the final norm).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        for sub in (self.lower_config, self.upper_config):  # follow set_attn_implementation on the top config
            sub._attn_implementation = self.config._attn_implementation
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)  # config.num_hidden_layers == N + M full-attention layers
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE_ARG: cache},
        )
        all_hidden: list[torch.Tensor] = []
        hidden_states = inputs_embeds
        for layers, rotary, adapt in (
            (self.layers_first, self.rotary_emb_first, True),
            (self.layers_last, self.rotary_emb_last, False),
        ):
            position_embeddings = rotary(hidden_states, position_ids=position_ids)
            for layer in layers:
                if output_hidden_states:
                    all_hidden.append(hidden_states)
                hidden_states = layer(
                    hidden_states,
                    attention_mask=causal_mask,
                    position_ids=position_ids,
                    use_cache=use_cache,
                    position_embeddings=position_embeddings,
                    **{_LAYER_CACHE_ARG: cache},
                    **kwargs,
                )
            if adapt:
                if output_hidden_states:
                    all_hidden.append(hidden_states)
                hidden_states = self.apply_adapter(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return self.norm(hidden_states), cache, (tuple(all_hidden) if output_hidden_states else None)


class CustomSplitLLamaPreTrainedModel(PreTrainedModel):
    """What the causal LM and the token classifier share: the config class, transformers' model flags and the
    input embedding of :class:`CustomSplitLLamaModel` (held as ``self.model``)."""

    config_class = CustomSplitLLamaConfig
    config: CustomSplitLLamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True  # LlamaAttention dispatches through transformers' attention interface
    _supports_attention_backend = True

    def _check_and_adjust_attn_implementation(self, attn_implementation: Any, *args: Any, **kwargs: Any) -> Any:
        """``flash_attention_2`` (what veRL requests) falls back to SDPA, with one log line, when flash-attn is not
        usable here (not installed, or no CUDA device): same results, packed ``position_ids`` included."""
        if attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
            logger.warning_once(
                f"{type(self).__name__}: flash_attention_2 requested but flash-attn is not available; using sdpa"
            )
            attn_implementation = "sdpa"
        return super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value


class CustomSplitLLamaForCausalLM(CustomSplitLLamaPreTrainedModel, GenerationMixin):
    """SplitLlama causal LM: :class:`CustomSplitLLamaModel` plus the upper model's (untied) ``lm_head``.

    ``forward`` follows ``LlamaForCausalLM`` in transformers 5.x: the cache argument is ``cache`` (the old name
    ``past_key_values`` is accepted too; the output field has the installed version's name), ``labels`` gives
    the shifted cross-entropy loss, ``logits_to_keep`` limits the positions the head is applied to.
    """

    def __init__(self, config: CustomSplitLLamaConfig) -> None:
        super().__init__(config)
        self.model = CustomSplitLLamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size_upper, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and loss when ``labels`` is given) of the split model; see the class docstring."""
        legacy_cache = kwargs.pop("past_key_values", None)
        cache = legacy_cache if cache is None else cache
        kwargs.pop("return_dict", None)
        if kwargs.pop("output_attentions", False):
            raise NotImplementedError("output_attentions is not supported by CustomSplitLLamaForCausalLM")
        if use_cache is None:
            use_cache = bool(getattr(self.config, "use_cache", True)) and not self.training
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        hidden_states, cache, all_hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **{k: v for k, v in kwargs.items() if k != "num_items_in_batch"},
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=all_hidden, **{_OUTPUT_CACHE_FIELD: cache if use_cache else None}
        )


class CustomSplitLLamaForTokenClassification(CustomSplitLLamaPreTrainedModel):
    """SplitLlama critic / token classifier: :class:`CustomSplitLLamaModel` plus ``score``, a
    ``Linear(hidden_size_upper -> num_labels, bias=True)`` (transformers' ``*ForTokenClassification``
    layout). With ``num_labels=1`` it is the value model veRL loads with
    ``AutoModelForTokenClassification``: logits ``[batch, seq, 1]`` are the per-token values.

    ``classifier_dropout`` (default 0.0, unlike transformers' 0.1: the Megatron critic has no dropout) applies
    before ``score``. ``labels``: float targets ``[batch, seq]`` with ``num_labels=1`` (masked MSE; positions
    equal to -100 or NaN are ignored), class ids otherwise (cross-entropy, -100 ignored).
    """

    def __init__(self, config: CustomSplitLLamaConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = CustomSplitLLamaModel(config)
        self.dropout = nn.Dropout(getattr(config, "classifier_dropout", None) or 0.0)
        self.score = nn.Linear(config.hidden_size_upper, config.num_labels, bias=True)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> TokenClassifierOutput:
        """Per-token logits ``[batch, seq, num_labels]`` (and the loss when ``labels`` is given); no KV cache."""
        for key in ("past_key_values", "cache", "return_dict", "use_cache", "num_items_in_batch"):
            kwargs.pop(key, None)
        if kwargs.pop("output_attentions", False):
            raise NotImplementedError("output_attentions is not supported by CustomSplitLLamaForTokenClassification")
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        hidden_states, _, all_hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        logits = self.score(self.dropout(hidden_states))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                target = labels.to(logits.dtype)
                keep = (labels != -100) & torch.isfinite(target)
                err = (logits.squeeze(-1) - torch.where(keep, target, torch.zeros_like(target))).square()
                loss = (err * keep).sum() / keep.sum().clamp_min(1)
            else:
                loss = nn.functional.cross_entropy(
                    logits.reshape(-1, self.num_labels).float(), labels.reshape(-1).long(), ignore_index=-100
                )
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=all_hidden)


__all__ = ["CustomSplitLLamaForCausalLM", "CustomSplitLLamaPreTrainedModel", "CustomSplitLLamaForTokenClassification", "CustomSplitLLamaModel"]
