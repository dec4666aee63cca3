"""Analytic cost of each unit of the stitched model's chain (pure Python, no torch).

Units in chain order: ``embedding``, ``lower.0 .. lower.N-1``, ``adapter``, ``upper.0 ..
upper.M-1`` (HF layers L70-M .. L70-1 of the upper model), ``head`` (final RMSNorm + LM head
+ cross-entropy, or a critic's value head + MSE). Every per-unit quantity is **per GPU and per microbatch** (one TP rank of one
data-parallel replica), except ``param_count``, which is the unit's full (unsharded) size.

Assumptions (change them here, in one place):

* FLOPs count multiply-adds as 2. GEMM forward: ``2 * tokens * weight_params``; backward is 2x
  forward (input-grad + weight-grad GEMMs). Norms, RoPE, SwiGLU and residual adds are ignored.
* Attention core (QK^T and softmax.V): ``4 * b * s^2 * heads * head_dim`` forward, times
  ``CAUSAL_ATTENTION_FACTOR = 0.5`` because flash attention skips fully masked causal tiles;
  backward is 2x forward. GQA projections use the real KV head count (q/o: h x heads*hd,
  k/v: h x kv_heads*hd); the gated MLP is 3 GEMMs h x ffn.
* Recomputation (Megatron semantics, transformer layers only): ``full`` re-runs the layer's
  forward during backward (bwd += fwd); ``selective`` re-runs only the attention core.
* Time = FLOPs / (peak * efficiency) + bytes moved / (bandwidth * efficiency); the bandwidth
  term is used only for the embedding lookup and the 128k-wide cross-entropy.
* TP divides GEMM and attention FLOPs, GEMM weights, the vocab-parallel embedding / LM head and
  the logits by ``tp``. Norm weights are replicated. Without sequence parallelism (SP) the
  LayerNorm/dropout-region activations and the p2p tensors stay full size; with SP they are
  divided by ``tp`` too (Korthikanti et al. 2022, Table 2).
* Activations: the tensors autograd keeps from forward to backward, counted per saved tensor
  for SplitLlama's own layer code (local spec, bf16, flash-style attention: no [s, s] scores)
  and checked against the dry run (`splitllama.dryrun`, benchmarks/README.md). Per LLaMA layer
  and token (``a*d`` = query width, ``g*d`` = KV width, ``f`` = FFN width), in bytes:
  ``16h`` for the two RMSNorms (fp32 copy 4h + normalised bf16 2h, each) and the two GEMM
  inputs they feed (2h each) — sequence-sharded with SP, else full —, plus, TP-sharded,
  ``6ad + 6gd`` for attention (q and k after RoPE, the fused QKV output that v views, the
  attention output) and ``10f`` for the gated MLP (fc1 output 4f, the two SwiGLU halves 4f,
  the fc2 input 2f); RoPE's cos/sin tables ``8*s*d`` per layer. ``none`` adds the attention's
  fp32 log-sum-exp ``4a`` (selective recomputation keeps the same q/k/v and output: with flash
  attention it saves only that); ``full`` keeps the layer input ``2h`` and re-creates the layer
  while it is recomputed (``act_working_bytes``). A layer's backward needs ``8f`` of transient
  gradients (``act_working_bytes``). Head: final norm + head input ``8h`` (SP-sharded) and the
  vocab-parallel cross-entropy's fp32 softmax ``4V`` (TP-sharded), with ``8V`` transient while
  the loss and its gradient are computed. Embedding: the token ids and mask, ``9`` bytes/token.
  (Korthikanti et al. 2022's ``34sbh`` is for a GPT layer with a 4h MLP and fused LayerNorm; TE's
  fused RMSNorm and SwiGLU keep less than the local spec counted here.) A critic
  (``model.head=value``) has instead the replicated value head: ``2*s*b*(h+1)`` FLOPs on the
  rank's tokens (over ``tp`` with SP), the norm weight plus ``h + 1`` head parameters, fp32
  values ``4*s*b``.
* Model state per parameter: weights ``dtype_bytes``; gradients ``grad_dtype_bytes`` (fp32 main
  grads, Megatron's default for bf16); Adam state 12 bytes (fp32 master + m + v) with 2-byte
  params, 8 bytes (m + v) with fp32 params; divided by ``dp`` with the distributed optimizer
  (grads are not sharded: its grad buffer stays whole).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from splitllama.config.model import LlamaBlockConfig, ModelConfig

CAUSAL_ATTENTION_FACTOR = 0.5
RECOMPUTE_CHOICES = (None, "none", "selective", "full")
KINDS = ("embedding", "lower", "adapter", "upper", "head")


@dataclass(frozen=True)
class Hardware:
    """Per-GPU throughput used to turn FLOPs and bytes into seconds (defaults: H100 SXM bf16)."""

    peak_flops: float = 989e12
    flops_efficiency: float = 0.45
    mem_bandwidth: float = 3.35e12
    bandwidth_efficiency: float = 0.7

    def seconds(self, flops: float, traffic_bytes: float = 0.0) -> float:
        return flops / (self.peak_flops * self.flops_efficiency) + \
            traffic_bytes / (self.mem_bandwidth * self.bandwidth_efficiency)


@dataclass(frozen=True)
class Unit:
    """Cost of one unit of the chain, per GPU and per microbatch (see module docstring)."""

    name: str
    kind: str  # one of KINDS
    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    param_count: int = 0  # full, unsharded parameter count
    param_bytes: float = 0.0
    grad_bytes: float = 0.0
    optim_bytes: float = 0.0
    act_bytes_per_mb: float = 0.0  # kept from forward to backward, per microbatch in flight
    out_width: int = 0  # hidden width of the unit's output (0 for the head)
    act_working_bytes: float = 0.0  # transient extra during this unit's backward (full recompute)
    p2p_bytes: float = 0.0  # bytes sent to the next stage if a stage boundary follows this unit
    fwd_time: float = 0.0  # seconds
    bwd_time: float = 0.0  # seconds, recomputation included

    @property
    def time(self) -> float:
        return self.fwd_time + self.bwd_time

    @property
    def static_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optim_bytes


def layer_param_counts(blk: LlamaBlockConfig) -> tuple[int, int]:
    """(GEMM weight params, norm params) of one LLaMA decoder layer."""
    h, hd = blk.hidden_size, blk.kv_channels
    attn = h * blk.num_attention_heads * hd * 2 + h * blk.num_key_value_heads * hd * 2
    mlp = 3 * h * blk.intermediate_size
    return attn + mlp, 2 * h


def _state_bytes(sharded: float, replicated: float, dtype_bytes: int, grad_dtype_bytes: int,
                 dp: int, distributed_optimizer: bool) -> tuple[float, float, float]:
    """(param, grad, optimizer) bytes on one GPU for params split into TP-sharded/replicated."""
    n = sharded + replicated
    optim_per_param = 12 if dtype_bytes < 4 else 8
    optim = n * optim_per_param / (dp if distributed_optimizer else 1)
    return n * dtype_bytes, n * grad_dtype_bytes, optim


def _layer_activation_bytes(blk: LlamaBlockConfig, seq: int, b: int, tp: int, sp: bool,
                            recompute: Optional[str]) -> tuple[float, float]:
    """(kept bytes, transient working bytes) of one transformer layer per microbatch (see the
    module docstring for the count)."""
    h, d, f = blk.hidden_size, blk.kv_channels, blk.intermediate_size
    q_width, kv_width = blk.num_attention_heads * d, blk.num_key_value_heads * d
    sb = seq * b
    grads = 8 * f * sb / tp  # transient input gradients of the gated MLP during backward
    kept = (16 * h * sb / (tp if sp else 1) + (6 * q_width + 6 * kv_width + 10 * f) * sb / tp
            + 8 * seq * d)
    lse = 4 * blk.num_attention_heads * sb / tp
    if recompute == "full":
        return 2 * h * sb / (tp if sp else 1), kept + lse + grads
    if recompute == "selective":
        return kept, grads
    return kept + lse, grads


def units_for(model_cfg: ModelConfig, seq: int, micro_batch: int, tp: int = 1, dp: int = 1,
              recompute: Optional[str] = None, dtype_bytes: int = 2,
              distributed_optimizer: bool = True, *, sequence_parallel: Optional[bool] = None,
              grad_dtype_bytes: int = 4, hardware: Optional[Hardware] = None) -> list[Unit]:
    """The chain's units with their per-GPU costs for one microbatch of ``micro_batch x seq``.

    ``recompute``: None/"none", "selective" or "full". ``sequence_parallel`` defaults to
    ``tp > 1`` (what Megatron recommends and the 8B+70B config uses).
    """
    if recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_CHOICES}, got {recompute!r}")
    if min(seq, micro_batch, tp, dp) < 1:
        raise ValueError(f"seq, micro_batch, tp, dp must be >= 1 (got {seq}, {micro_batch}, {tp}, {dp})")
    recompute = None if recompute == "none" else recompute
    hw = hardware or Hardware()
    sp = (tp > 1) if sequence_parallel is None else bool(sequence_parallel and tp > 1)
    tokens, b = seq * micro_batch, micro_batch
    sp_div = tp if sp else 1
    lo, up, vocab = model_cfg.lower, model_cfg.upper, model_cfg.vocab_size
    state = dict(dtype_bytes=dtype_bytes, grad_dtype_bytes=grad_dtype_bytes, dp=dp,
                 distributed_optimizer=distributed_optimizer)

    def p2p(width: int) -> float:
        return tokens * width * dtype_bytes / sp_div

    def unit(name: str, kind: str, fwd: float, bwd: float, sharded: int, replicated: int,
             act: float, width: int, working: float = 0.0, fwd_traffic: float = 0.0,
             bwd_traffic: float = 0.0) -> Unit:
        pb, gb, ob = _state_bytes(sharded / tp, replicated, **state)
        return Unit(name, kind, fwd, bwd, sharded + replicated, pb, gb, ob, act, width, working,
                    p2p(width) if width else 0.0, hw.seconds(fwd, fwd_traffic),
                    hw.seconds(bwd, bwd_traffic))

    def layer(blk: LlamaBlockConfig, kind: str, i: int) -> Unit:
        gemm, norms = layer_param_counts(blk)
        core = 4 * b * seq * seq * blk.num_attention_heads * blk.kv_channels * CAUSAL_ATTENTION_FACTOR / tp
        fwd = 2 * tokens * gemm / tp + core
        extra = fwd if recompute == "full" else core if recompute == "selective" else 0.0
        act, working = _layer_activation_bytes(blk, seq, b, tp, sp, recompute)
        return unit(f"{kind}.{i}", kind, fwd, 2 * fwd + extra, gemm, norms, act, blk.hidden_size, working)

    h_lo, h_up = lo.hidden_size, up.hidden_size
    units = [unit("embedding", "embedding", 0.0, 0.0, vocab * h_lo, 0, 9.0 * tokens, h_lo,
                  fwd_traffic=2 * tokens * h_lo * dtype_bytes / sp_div,
                  bwd_traffic=tokens * h_lo * (dtype_bytes + 2 * grad_dtype_bytes) / sp_div)]
    units += [layer(lo, "lower", i) for i in range(model_cfg.num_layers_lower)]
    ad_params = h_lo * h_up + (h_up * h_up if model_cfg.mlp else 0)
    ad_act = 2 * tokens * h_lo / sp_div + (2 * tokens * h_up / tp if model_cfg.mlp else 0)
    ad_fwd = 2 * tokens * ad_params / tp
    units.append(unit("adapter", "adapter", ad_fwd, 2 * ad_fwd, ad_params, 0, ad_act, h_up))
    units += [layer(up, "upper", i) for i in range(model_cfg.num_layers_upper)]
    if model_cfg.head == "value":  # critic: replicated Linear(h -> 1) on this rank's tokens
        head_fwd = 2 * tokens * (h_up + 1) / sp_div
        units.append(unit("head", "head", head_fwd, 2 * head_fwd, 0, 2 * h_up + 1,
                          2 * 2 * tokens * h_up / sp_div + 4 * tokens, 0))
        return units
    logits = tokens * vocab / tp
    head_fwd = 2 * tokens * h_up * vocab / tp + 5 * logits  # GEMM + softmax/CE elementwise
    units.append(unit("head", "head", head_fwd, 2 * head_fwd, vocab * h_up, h_up,
                      8 * tokens * h_up / sp_div + 4 * logits, 0, 8 * logits,
                      fwd_traffic=logits * (2 + 3 * 4), bwd_traffic=logits * (4 + 4 + 2)))
    return units
