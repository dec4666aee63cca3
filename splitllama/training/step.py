"""One micro-batch forward (the `forward_step_func` Megatron's schedules call) and loss."""
from __future__ import annotations

from functools import partial
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state

from splitllama.data.packing import packed_seq_params
from splitllama.model.model import SplitLlamaModel
from splitllama.platform.device import device as local_device


def unwrap(model) -> SplitLlamaModel:
    while not isinstance(model, SplitLlamaModel):
        model = model.module
    return model


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, inject_nan: bool = False):
    """Per-token losses [b, s] -> (sum, tokens, {'lm loss': [sum, tokens]}).
    Megatron divides the sum by the token count (per micro-batch mean) and by the number of
    micro-batches; the reported value is summed over micro-batches and DP by the caller.
    `inject_nan` (fault injection, SPLITLLAMA_FAULT_NAN_ITERS in docs/reliability.md): the
    loss, hence every gradient, becomes NaN."""
    mask = loss_mask.view(-1).float()
    total = torch.sum(output_tensor.view(-1).float() * mask)
    if inject_nan:
        total = total * float("nan")
    tokens = mask.sum().to(torch.int)
    report = torch.stack([total.detach().clone(), mask.sum()])
    return total, tokens, {"lm loss": report}


def get_batch(data_iterator: Optional[Iterator], model: SplitLlamaModel) -> dict:
    """Only the first stage needs tokens and only the last needs labels and the loss mask;
    middle stages get no iterator unless documents are packed (then every stage reads the
    position ids / attention mask / cu_seqlens). Every TP rank of a stage reads the same
    micro-batch (the iterator is deterministic per DP rank)."""
    if data_iterator is None:  # middle stages read no data
        return {}
    batch = next(data_iterator)
    check_batch_ids(batch, model.model_cfg.vocab_size)
    dev = local_device()
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def check_batch_ids(batch: dict, vocab_size: int) -> None:
    """Refuse token ids the embedding / LM head cannot hold, with both numbers (checked on the
    host copy of the batch: no device synchronisation)."""
    for key in ("tokens", "labels"):
        t = batch.get(key)
        if isinstance(t, torch.Tensor) and t.numel():
            top = int(t.max())
            if top >= vocab_size or int(t.min()) < 0:
                bad = top if top >= vocab_size else int(t.min())
                raise ValueError(f"data: a batch holds token id {bad} in '{key}', outside the model's "
                                 f"vocabulary [0, {vocab_size}) (model vocab_size {vocab_size}); "
                                 f"tokenize the data with the model's tokenizer or use a model "
                                 f"whose vocab_size is > {bad}")


def forward_step(data_iterator, model, inject_nan: bool = False):
    """LM: cross-entropy on the next tokens (`labels`). Critic (model.head=value): squared
    error of the per-token values against the data's `value_targets`. Either way the
    per-token losses are masked by `loss_mask` and averaged over its tokens (for the critic:
    the masked MSE). `inject_nan`: see `loss_func` (the loop binds it with functools.partial)."""
    inner = unwrap(model)
    batch = get_batch(data_iterator, inner)
    target = None
    if inner.post_process:
        target = batch["value_targets"] if inner.model_cfg.head == "value" else batch["labels"]
    cu = batch.get("cu_seqlens")
    out = model(batch["tokens"] if inner.pre_process else None,
                position_ids=batch.get("position_ids"),
                attention_mask=batch.get("attention_mask"),
                labels=target,
                packed_seq_params=packed_seq_params(cu) if cu is not None else None)
    return out, partial(loss_func, batch.get("loss_mask"), inject_nan=inject_nan)


def pipeline_shapes_hook(model: SplitLlamaModel, seq_length: int, micro_batch_size: int):
    """`adjust_tensor_shapes_fn` for the 1F1B schedule: Megatron sizes p2p buffers from one
    `config.hidden_size`; a SplitLlama pipeline has 4096-wide boundaries before the adapter
    and 8192-wide after, so each rank states its own receive and send widths. Per-rank
    static shapes: no extra communication at run time."""
    seq = seq_length
    if model.config.sequence_parallel:
        seq //= parallel_state.get_tensor_model_parallel_world_size()
    recv_w = model.input_hidden_size() or model.output_hidden_size()
    send_w = model.output_hidden_size()

    def adjust(recv_shapes, send_shapes):
        return [(seq, micro_batch_size, recv_w)], [(seq, micro_batch_size, send_w)]

    return adjust
