"""Runs in the veRL venv (.ci/verl_venv.sh: verl 0.9.1, transformers 5.10) under torchrun; drives veRL's own
FSDP2 ``TrainingWorker`` on a SplitLlama export, unmodified, and writes what it computed for the test to check.

    torchrun --nproc-per-node=P worker.py ACTOR_EXPORT CRITIC_EXPORT OUT_DIR BATCH.safetensors
        actor (language_model): infer_batch log-probs, then one train_mini_batch step with veRL's ppo_loss
        -> OUT_DIR/actor_rank{r}.safetensors {log_probs [b, R], rows (the batch rows of this rank)}
           OUT_DIR/actor_rank{r}.json {loss, grad_norm, changed (parameters the step moved), versions, ...}
           OUT_DIR/actor_stream_names.json (rank 0): {name: shape} of engine.get_per_tensor_param(), the
           tensors veRL streams to its rollout engine
        critic (value_model): infer_batch values, then one train_mini_batch step with veRL's value_loss
        -> OUT_DIR/critic_rank{r}.safetensors {values [b, R], rows}, critic_rank{r}.json, critic_stream_names.json

BATCH holds veRL's padded rollout layout: input_ids / attention_mask / position_ids [B, T] (prompt left-padded,
response right-padded), response_mask [B, R], advantages / returns / values [B, R]. Rank r takes rows r::P.

veRL 0.9.1 knows no CPU platform (it falls back to CUDA / nccl). A minimal one is registered here through veRL's
public ``PlatformRegistry`` and selected with VERL_PLATFORM=cpu (set by the test); VERL_ENGINE_DEVICE=cuda picks
the FSDP engines, which veRL registers for cuda/npu only. Nothing of veRL's model path is patched.
Imports torch / transformers / verl only (not splitllama: the export loads by its remote code).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import psutil
import torch

from verl.plugin.platform import PlatformBase, PlatformRegistry


def _zero(*_a, **_k) -> int:
    return 0


def _nothing(*_a, **_k) -> None:
    return None


# What veRL calls on the device module (get_torch_device()): memory statistics are 0 on CPU.
_CPU_MODULE = SimpleNamespace(
    is_available=lambda: True, device_count=lambda: 1, current_device=lambda: torch.device("cpu"),
    set_device=_nothing, synchronize=_nothing, empty_cache=_nothing, manual_seed=torch.manual_seed,
    manual_seed_all=torch.manual_seed, max_memory_allocated=_zero, max_memory_reserved=_zero,
    memory_allocated=_zero, memory_reserved=_zero, reset_peak_memory_stats=_nothing,
    mem_get_info=lambda *_a: (psutil.virtual_memory().available, psutil.virtual_memory().total),
    get_rng_state=torch.get_rng_state, set_rng_state=torch.set_rng_state, ipc_collect=_nothing,
    get_device_name=lambda *_a: "CPU",
)


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """The smallest platform veRL 0.9.1 runs on: CPU tensors, gloo, no profiler."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self):
        return _CPU_MODULE

    def is_available(self) -> bool:
        return True

    def current_device(self):
        return torch.device("cpu")  # used as `tensor.to(get_device_id())` / `torch.device(...)`

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        return None

    def synchronize(self, device_index=None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CPU_VISIBLE_DEVICES"

    def nvtx_range(self, msg: str):
        return contextlib.nullcontext()

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


def _padded_batch(path: str, rank: int, world: int):
    from safetensors.torch import load_file
    from tensordict import TensorDict

    full = load_file(path)
    rows = torch.arange(full["input_ids"].shape[0])[rank::world].contiguous()
    data = {k: v[rows] for k, v in full.items()}
    n_resp = data["response_mask"].shape[1]
    data["prompts"], data["responses"] = data["input_ids"][:, :-n_resp], data["input_ids"][:, -n_resp:]
    return TensorDict(data, batch_size=[len(rows)]), rows


def _no_padding(td, **meta):
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, **meta)
    return td


def _configs(export: str):
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig

    model = HFModelConfig(path=export, trust_remote_code=True, use_remove_padding=True)  # veRL's default attention
    engine = FSDPEngineConfig(
        strategy="fsdp2", model_dtype="fp32", use_torch_compile=False, use_dynamic_bsz=False,
        micro_batch_size_per_gpu=2, infer_micro_batch_size_per_gpu=2,
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
    )
    optim = FSDPOptimizerConfig(lr=1e-3, total_training_steps=1, clip_grad=1.0)
    return model, engine, optim


def _worker(export: str, model_type: str):
    from verl.trainer.config import CheckpointConfig
    from verl.workers.engine_workers import TrainingWorker, TrainingWorkerConfig

    model, engine, optim = _configs(export)
    assert model.hf_config.num_attention_heads and model.hf_config.max_position_embeddings
    worker = TrainingWorker(TrainingWorkerConfig(model_type=model_type, model_config=model, engine_config=engine,
                                                 optimizer_config=optim, checkpoint_config=CheckpointConfig()))
    worker.reset()
    return worker


def _params(worker) -> dict[str, torch.Tensor]:
    gen, _ = worker.engine.get_per_tensor_param()
    return {name: t.detach().float().clone() for name, t in gen}


def _train_step(worker, td, loss_fn, before: dict[str, torch.Tensor], n_rows: int, world: int):
    from verl.utils import tensordict_utils as tu

    worker.set_loss_fn(loss_fn)
    td = _no_padding(td, calculate_entropy=False, compute_loss=True, temperature=1.0,
                     global_batch_size=n_rows * world, mini_batch_size=n_rows * world, epochs=1, seed=1,
                     dataloader_kwargs={"shuffle": False})
    out = worker.train_mini_batch(td)
    metrics = tu.get(out, "metrics")
    after = _params(worker)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    loss = metrics["loss"]
    grad_norm = metrics["grad_norm"]
    as_float = lambda v: float(v[0] if isinstance(v, list) else v)  # noqa: E731
    return {"loss": as_float(loss), "grad_norm": as_float(grad_norm), "changed": changed}


def run_one(mode: str, export: str, out: Path, batch_path: str, rank: int, world: int) -> None:
    import transformers
    from safetensors.torch import save_file

    import verl
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    meta = {"transformers": transformers.__version__, "verl": verl.__version__, "world_size": world}
    worker = _worker(export, "language_model" if mode == "actor" else "value_model")
    meta["attn_implementation"] = worker.engine.module.config._attn_implementation
    td, rows = _padded_batch(batch_path, rank, world)
    before = _params(worker)
    if rank == 0:
        (out / f"{mode}_stream_names.json").write_text(json.dumps({k: list(v.shape) for k, v in before.items()}))
    key = "log_probs" if mode == "actor" else "values"
    infer = _no_padding(td.clone(), calculate_entropy=False, compute_loss=False, temperature=1.0)
    got = no_padding_2_padding(tu.get(worker.infer_batch(infer), key), infer)
    if mode == "actor":
        from verl.workers.config import FSDPActorConfig
        from verl.workers.utils.losses import ppo_loss

        cfg = FSDPActorConfig(rollout_n=1, ppo_mini_batch_size=len(rows) * world, ppo_micro_batch_size_per_gpu=2,
                              use_torch_compile=False)
        td["old_log_probs"] = got.detach().float()
        loss_fn = partial(ppo_loss, config=cfg)
    else:
        from verl.workers.config import FSDPCriticConfig
        from verl.workers.utils.losses import value_loss

        cfg = FSDPCriticConfig(ppo_mini_batch_size=len(rows) * world, ppo_micro_batch_size_per_gpu=2)
        loss_fn = partial(value_loss, config=cfg)
    meta.update(_train_step(worker, td, loss_fn, before, len(rows), world))
    save_file({key: got.float().contiguous(), "rows": rows}, str(out / f"{mode}_rank{rank}.safetensors"))
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps(meta))


def main(actor: str, critic: str, out: Path, batch_path: str) -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    for mode, export in (("actor", actor), ("critic", critic)):
        run_one(mode, export, out, batch_path, rank, world)
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit("usage: worker.py ACTOR_EXPORT CRITIC_EXPORT OUT_DIR BATCH.safetensors")
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4])
