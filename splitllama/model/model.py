"""SplitLlamaModel: embedding -> lower block -> adapter -> upper block -> norm -> LM head
(or, for a critic, the value head of `value_head.py`).

One instance is one pipeline stage: it builds only the units its stage owns (per the
`PipelineLayout`), receives the previous stage's activation through `set_input_tensor`, and
keeps Megatron's global layer numbering so `sharded_state_dict()` keys do not depend on PP.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.transformer_block import TransformerBlock

from splitllama.config.model import ModelConfig
from splitllama.model.adapter import Adapter
from splitllama.model.norm import RMSNorm
from splitllama.model.rope import build_rotary
from splitllama.model.spec import layer_spec
from splitllama.model.value_head import ValueHead
from splitllama.pipeline.layout import PipelineLayout


class SplitLlamaModel(LanguageModule):
    def __init__(self, model_cfg: ModelConfig, lower_config: TransformerConfig,
                 upper_config: TransformerConfig, layout: PipelineLayout, stage: int,
                 impl: str = "local", attention_backend: str = "local") -> None:
        super().__init__(config=upper_config)
        self.model_cfg = model_cfg
        self.layout = layout
        self.stage = stage
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.pre_process = stage == 0
        self.post_process = stage == layout.pp - 1
        self.input_tensor: Optional[torch.Tensor] = None
        self.no_grad_prefix = False
        own = layout.stages[stage]
        self.attention_backend = attention_backend
        spec = layer_spec(impl, attention_backend)
        cpu_init = upper_config.use_cpu_initialization

        if self.pre_process:
            self.embedding = LanguageModelEmbedding(
                config=lower_config, vocab_size=model_cfg.vocab_size,
                max_sequence_length=model_cfg.lower.max_position_embeddings,
                position_embedding_type="rope")
        if own.lower_layers:
            # pre_process=True: the block takes the hidden states we pass, not its own input tensor.
            self.lower = TransformerBlock(lower_config, spec, post_layer_norm=False,
                                          pre_process=True, post_process=False)
            self.lower_rotary = build_rotary(model_cfg.lower, cpu_init)
        if own.adapter:
            self.adapter = Adapter(upper_config, model_cfg.lower.hidden_size,
                                   model_cfg.upper.hidden_size, model_cfg.mlp)
        if own.upper_layers:
            self.upper = TransformerBlock(upper_config, spec, post_layer_norm=False,
                                          pre_process=True, post_process=False)
            self.upper_rotary = build_rotary(model_cfg.upper, cpu_init)
        if self.post_process:
            self.final_layernorm = RMSNorm(upper_config, model_cfg.upper.hidden_size,
                                           eps=model_cfg.upper.rms_norm_eps)
            if model_cfg.head == "value":  # critic: veRL's replicated Linear(h -> 1, bias)
                self.output_layer = ValueHead(upper_config, model_cfg.upper.hidden_size)
            else:
                self.output_layer = tensor_parallel.ColumnParallelLinear(
                    model_cfg.upper.hidden_size, model_cfg.vocab_size, config=upper_config,
                    init_method=upper_config.init_method, bias=False, skip_bias_add=False,
                    gather_output=False)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """LanguageModule's, except that a critic's head must match the checkpoint's shape:
        LanguageModule lets ``output_layer.*`` load with a shape mismatch (vocab padding),
        which would quietly load an LM head's first row into a value head."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.post_process and self.model_cfg.head == "value":
            for name in ("output_layer.weight", "output_layer.bias"):
                sd[f"{prefix}{name}"].allow_shape_mismatch = False
        return sd

    # ---- pipeline plumbing ------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "SplitLlamaModel takes one input tensor per stage"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def set_no_grad_prefix(self, upstream_frozen: bool) -> None:
        """When nothing up to this stage's adapter trains (adapter-only warmup), run the
        embedding / lower layers without autograd: no stored activations and no backward
        through frozen layers. Stages after the adapter are unaffected."""
        self.no_grad_prefix = upstream_frozen and self.stage <= self.layout.adapter_stage()

    def input_hidden_size(self) -> int:
        """Width of the activation this stage receives (0 for the first stage)."""
        if self.pre_process:
            return 0
        up = self.layout.input_is_upper_width(self.stage)
        return self.model_cfg.upper.hidden_size if up else self.model_cfg.lower.hidden_size

    def output_hidden_size(self) -> int:
        up = self.layout.output_is_upper_width(self.stage)
        return self.model_cfg.upper.hidden_size if up else self.model_cfg.lower.hidden_size

    def _full_seq_len(self, x: torch.Tensor) -> int:
        if self.config.sequence_parallel:
            return x.size(0) * parallel_state.get_tensor_model_parallel_world_size()
        return x.size(0)

    def _rotary(self, rotary, x: torch.Tensor, position_ids: Optional[torch.Tensor],
                packed_seq_params: Optional[PackedSeqParams]) -> torch.Tensor:
        """This block's RoPE table for the batch: [s, 1, 1, d] for positions 0..s-1; with
        `position_ids` [b|1, s] (e.g. restarting at each document) the rows they index,
        [s, b, 1, d]; for THD packing Megatron restarts positions per segment from a table of
        the longest segment's length."""
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return rotary(int(packed_seq_params.max_seqlen_q))
        s = self._full_seq_len(x)
        if position_ids is None:
            return rotary(s)
        table = rotary(max(s, int(position_ids.max()) + 1))  # [n, 1, 1, d]
        return table[position_ids].squeeze(2).transpose(0, 1)  # [b, s, 1, 1, d] -> [s, b, 1, d]

    def _block(self, block, rotary, x, position_ids, attention_mask, packed_seq_params):
        return block(x, attention_mask=attention_mask, packed_seq_params=packed_seq_params,
                     rotary_pos_emb=self._rotary(rotary, x, position_ids, packed_seq_params))

    def run_block(self, which: str, x: torch.Tensor, position_ids=None, attention_mask=None,
                  packed_seq_params=None) -> torch.Tensor:
        """This stage's ``which`` block ('lower' | 'upper') on the activation `x`, with its own
        rotary table, as `forward` runs it (the profiler times a unit through this)."""
        return self._block(getattr(self, which), getattr(self, f"{which}_rotary"), x, position_ids,
                           attention_mask, packed_seq_params)

    def _prefix(self, input_ids, position_ids, attention_mask, packed_seq_params) -> torch.Tensor:
        """Embedding (first stage) or the received activation, then this stage's lower layers."""
        if self.pre_process:
            x = self.embedding(input_ids=input_ids, position_ids=position_ids)
        else:
            x = self.input_tensor
        if hasattr(self, "lower"):
            x = self._block(self.lower, self.lower_rotary, x, position_ids, attention_mask,
                            packed_seq_params)
        return x

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        """Returns this stage's output activation [s, b, h]; on the last stage the per-token
        loss [b, s] when `labels` is given, else the vocab-parallel logits [b, s, V/tp].
        Critic (``head=value``): `labels` are float value targets [b, s] and the per-token
        loss is the squared error (value - target)² [b, s]; without them, the values [b, s].

        Packed documents, two ways (both give causal attention within each document and RoPE
        positions restarting at each document, in both blocks):
        - Megatron's dataset convention: `position_ids` [b, s] restarting per document and
          `attention_mask` bool [b, 1, s, s], True = masked (``sdpa`` and ``local`` backends);
        - variable-length THD: `input_ids` / `labels` [1, t] holding documents back to back and
          `packed_seq_params` = ``PackedSeqParams(qkv_format="thd", cu_seqlens_q=...,
          cu_seqlens_kv=..., max_seqlen_q=..., max_seqlen_kv=...)`` with int32 boundaries
          ``[0, l1, l1+l2, ..., t]`` (``sdpa`` backend; see `splitllama.data.packing`)."""
        if packed_seq_params is not None and self.attention_backend != "sdpa":
            raise ValueError(f"model.attention_backend={self.attention_backend} cannot take "
                             f"packed_seq_params (variable-length packing); use sdpa")
        with torch.no_grad() if self.no_grad_prefix else contextlib.nullcontext():
            x = self._prefix(input_ids, position_ids, attention_mask, packed_seq_params)
        if self.no_grad_prefix:
            # Keep the schedule's autograd contract at no cost: the received activation gets a
            # zero gradient, and an all-frozen stage's output is a leaf that accepts one.
            if self.input_tensor is not None:
                x = x + 0 * self.input_tensor
            elif not hasattr(self, "adapter"):
                x = x.requires_grad_()
        if hasattr(self, "adapter"):
            x = self.adapter(x)
        if hasattr(self, "upper"):
            x = self._block(self.upper, self.upper_rotary, x, position_ids, attention_mask,
                            packed_seq_params)
        if not self.post_process:
            return x
        x = self.final_layernorm(x)
        if self.model_cfg.head == "value":
            values = self.output_layer(x)  # [b, s], float32
            return values if labels is None else (values - labels.to(values.dtype)).square()
        logits, _ = self.output_layer(x)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)
