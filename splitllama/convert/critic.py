"""LM checkpoint -> critic initialisation (``tools/convert_checkpoint.py lm-to-critic``).

Reads the model weights of a torch_dist checkpoint (converted, or saved by training at any
TP/PP; optimizer state is not copied) and writes a new checkpoint with ``model.head=value``:
every trunk tensor copied unchanged, tensor by tensor, and instead of the LM head
(``output_layer.weight`` [V, h]) a new value head ``output_layer.weight`` [1, h] and
``output_layer.bias`` [1] initialised by `splitllama.hf.build.value_head_weights` (zeros, or
normal(0, 0.02) from a seed; bias 0), in the dtype of the embedding. Train it with
``checkpoint.load=CRITIC checkpoint.finetune=true``. Same atomic write as the importer.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional

from splitllama.convert.dist_reader import DistCheckpoint
from splitllama.convert.dist_writer import Piece
from splitllama.convert.export_hf import model_config_of
from splitllama.convert.import_hf import ImportResult, prepare_out, write_checkpoint
from splitllama.convert.keys import schema
from splitllama.convert.sources import ConversionError


def lm_to_critic(ckpt: str, out: str, init: str = "zeros", seed: Optional[int] = None,
                 progress: bool = True) -> ImportResult:
    from splitllama.hf.build import VALUE_HEAD_INITS, value_head_weights

    if init not in VALUE_HEAD_INITS:
        raise ConversionError(f"--value-head-init must be one of {', '.join(VALUE_HEAD_INITS)}, got {init!r}")
    if seed is not None and init != "normal":
        raise ConversionError(f"--seed draws the normal value-head init; --value-head-init {init} has no randomness")
    seed = seed or 0
    out = prepare_out(out)
    t0 = time.perf_counter()
    dist_ckpt = DistCheckpoint(ckpt)
    cfg = model_config_of(dist_ckpt)
    if cfg.head == "value":
        raise ConversionError(f"{dist_ckpt.path} is already a critic (model_config.json head: value)")
    critic = replace(cfg, head="value")
    lm_keys = schema(cfg)
    dtype = dist_ckpt.dtype("embedding.word_embeddings.weight") if "embedding.word_embeddings.weight" in dist_ckpt else None
    pieces, nbytes = [], 0
    for key, m in schema(critic).items():
        shape = m.shape
        if m.mcore.startswith("output_layer."):
            name = m.hf[0]
            pieces.append(Piece(key, shape, (0,) * len(shape), shape, dtype,
                                lambda n=name: value_head_weights(cfg.upper.hidden_size, init, seed=seed,
                                                                  dtype=dtype)[n], (1, len(pieces))))
            continue
        if key not in lm_keys or key not in dist_ckpt:
            raise ConversionError(f"{dist_ckpt.path}: checkpoint lacks tensor {key}")
        if dist_ckpt.shape(key) != shape:
            raise ConversionError(f"{dist_ckpt.path}: tensor {key} has shape {list(dist_ckpt.shape(key))}, "
                                  f"model_config.json implies {list(shape)}")
        pieces.append(Piece(key, shape, (0,) * len(shape), shape, dist_ckpt.dtype(key),
                            lambda k=key: dist_ckpt.read(k), (0, len(pieces))))
        nbytes += dist_ckpt.nbytes(key)
    final, tensors = write_checkpoint(out, pieces, critic, progress)
    return ImportResult(final, critic, {dist_ckpt.path: nbytes}, sum(p.nbytes for p in pieces), tensors,
                        time.perf_counter() - t0)
