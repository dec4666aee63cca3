"""Take a unit profile (torch): time each unit kind of the stitched model at the job's shapes.

The units are the project's own modules: `build_runtime` builds a one-stage model with ONE lower
and ONE upper layer (Megatron TransformerBlock with our layer spec, the job's TP/SP, dtype,
recompute, layer implementation and attention backend), wrapped in Megatron DDP with the job's
Megatron optimizer, exactly as a training run does. Then, after ``warmup`` untimed rounds,
``reps`` rounds run the five units in turn — embedding; one lower layer; adapter; one upper layer;
final norm + LM head + cross-entropy — each forward, then backward (into DDP's grad buffers,
as in training); the median of each is kept. On CUDA every timing is synchronised and the peak
memory of each unit (``max_memory_allocated`` above what was allocated before) is recorded; on
CPU peak memory is null (not measured).

Per-step costs (what does not move with the micro-batches, `measured.StepCosts`):
* optimizer step per local parameter: median ``optimizer.step()`` time / local parameters;
* gradient finalisation per local parameter: ``zero_grad_buffer`` + ``finalize_model_grads`` +
  the finite-gradient check of the training loop, over local parameters;
* p2p: under torchrun (world >= 2) ranks 0 and 1 ping-pong tensors of 4 KiB and of the
  boundary activation's size; alone on CPU the same ping-pong runs in a 2-process gloo spawn;
  alone on one GPU it is not measured and a stated estimate (NVLink-class: 10 us, 100 GB/s) is
  written instead (``p2p_source`` says which). One-way time = round trip / 2, fitted as
  latency + bytes x seconds/byte;
* fixed per stage per step: four scalar all-reduces (loss, finite check, grad norm, signal
  check) estimated as 4 x the p2p latency;
* host contention (CPU, one process, PP > 1): the stage processes of a CPU run share the host's
  cores, and on this 2-vCPU box each runs 22-36 % slower while the other computes. The units are
  timed alone and while ``pp - 1`` other processes (one thread each, `unit_load`) run the same
  units' forward + backward, alternating (CONTENTION_ROUNDS rounds: the box's own
  noise moves single timings by 10-30 %); ``host_contention`` = the median over the rounds of the
  summed unit medians loaded / alone, with ``contention_procs = pp``. On a GPU (one device per stage) and under torchrun it is not
  measured and is 1.0 (``contention_source`` says which).
"""
from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Callable

import torch
import torch.distributed as dist

from splitllama.pipeline.measured import Profile, StepCosts, UnitTiming, job_key, write_profile
from splitllama.platform.device import device as local_device
from splitllama.preflight.profile_source import environment_key, job_yaml, standalone_env
from splitllama.training.runtime import Runtime

GPU_P2P_ESTIMATE = (10e-6, 1.0 / 100e9)  # latency s, s/byte: stated estimate without a second rank
PING_BYTES = 4096


def _profile_job(job):
    """A copy of the job holding one lower and one upper layer on one stage."""
    return replace(job, model=replace(job.model, num_layers_lower=1, num_layers_upper=1, freeze="none"),
                   parallel=replace(job.parallel, pipeline_model_parallel_size=1, pipeline_layout=None,
                                    pipeline_split="uniform", profile_file=None, profile_if_missing=False))


def _timer(on_cuda: bool) -> Callable[[], float]:
    def now() -> float:
        if on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()
    return now


def _median(xs) -> float:
    return float(statistics.median(xs))


def _unit_fns(rt: Runtime, seq: int, b: int):
    """kind -> fn() returning (output, grad-or-None) for one micro-batch, in chain order."""
    from megatron.core import parallel_state as ps

    from splitllama.platform import cpu

    m, inner, dev = rt.job.model, rt.inner, local_device()
    sp = inner.config.sequence_parallel
    s_local = seq // ps.get_tensor_model_parallel_world_size() if sp else seq
    dtype = inner.config.params_dtype
    v = m.vocab_size
    tokens = torch.randint(0, v, (b, seq), device=dev)
    pos = torch.arange(seq, device=dev).unsqueeze(0).expand(b, seq)

    def act(h):
        return torch.randn(s_local, b, h, device=dev, dtype=dtype, requires_grad=True)

    def emb():
        return inner.embedding(input_ids=tokens, position_ids=pos), True

    def block(name: str, h: int):
        return lambda: (inner.run_block(name, act(h)), True)

    def adapter():
        return inner.adapter(act(m.lower.hidden_size)), True

    def head():
        x = inner.final_layernorm(act(m.upper.hidden_size))
        if m.head == "value":
            return (inner.output_layer(x) - 0.5).square().sum(), False
        logits, _ = inner.output_layer(x)
        return inner.compute_language_model_loss(tokens, logits).float().sum(), False

    return {"embedding": emb, "lower": block("lower", m.lower.hidden_size), "adapter": adapter,
            "upper": block("upper", m.upper.hidden_size), "head": head}


def _time_units(rt: Runtime, seq: int, b: int, warmup: int, reps: int, on_cuda: bool) -> dict:
    now = _timer(on_cuda)
    fns = _unit_fns(rt, seq, b)
    fwd = {k: [] for k in fns}
    bwd = {k: [] for k in fns}
    peak = {k: [] for k in fns}
    for rep in range(warmup + reps):
        for kind, fn in fns.items():  # interleaved: drift hits every unit alike
            if on_cuda:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = now()
            y, needs_grad = fn()
            t1 = now()
            y.backward(torch.ones_like(y) if needs_grad else None)
            t2 = now()
            if rep >= warmup:
                fwd[kind].append(t1 - t0)
                bwd[kind].append(t2 - t1)
                if on_cuda:
                    peak[kind].append(torch.cuda.max_memory_allocated() - base)
            del y
    return {k: UnitTiming(_median(fwd[k]), _median(bwd[k]), max(peak[k]) if peak[k] else None,
                          tuple(fwd[k]), tuple(bwd[k])) for k in fns}


def _time_step_costs(rt: Runtime, reps: int, on_cuda: bool) -> tuple[float, float, int]:
    """(optimizer s/param, grad finalisation s/param, local params) — medians over ``reps``."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    now = _timer(on_cuda)
    params = sum(p.numel() for p in rt.inner.parameters() if p.requires_grad)
    opt, fin = [], []
    for _ in range(reps + 1):
        t0 = now()
        rt.ddp.zero_grad_buffer()
        rt.optimizer.zero_grad()
        finalize_model_grads([rt.ddp])
        ok = torch.ones(1, device=rt.ddp.buffers[0].grad_data.device)
        for buf in rt.ddp.buffers:
            ok *= torch.isfinite(buf.grad_data.sum(dtype=torch.float32)).float()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        t1 = now()
        rt.optimizer.step()
        t2 = now()
        fin.append(t1 - t0)
        opt.append(t2 - t1)
    return _median(opt[1:]) / params, _median(fin[1:]) / params, params


def _ping_pong(rank: int, peer: int, sizes: list[int], reps: int, device, group=None) -> dict:
    out = {}
    for n in sizes:
        buf = torch.zeros(max(1, n // 4), dtype=torch.float32, device=device)
        ts = []
        for i in range(reps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, peer, group=group)
                dist.recv(buf, peer, group=group)
            else:
                dist.recv(buf, peer, group=group)
                dist.send(buf, peer, group=group)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                ts.append((time.perf_counter() - t0) / 2)
        out[n] = _median(ts)
    return out


def _fit_p2p(times: dict) -> tuple[float, float]:
    (n0, t0), (n1, t1) = sorted(times.items())[0], sorted(times.items())[-1]
    per_byte = max(0.0, (t1 - t0) / (n1 - n0)) if n1 > n0 else 0.0
    return max(0.0, t0 - n0 * per_byte), per_byte


def _spawn_worker(rank: int, port: int, sizes: list[int], reps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = _ping_pong(rank, 1 - rank, sizes, reps, torch.device("cpu"))
    if rank == 0:
        import json

        with open(out, "w") as f:
            json.dump({str(k): v for k, v in res.items()}, f)
    dist.destroy_process_group()


def _p2p_costs(boundary_bytes: int, on_cuda: bool, reps: int = 20) -> tuple[float, float, str]:
    sizes = [PING_BYTES, max(PING_BYTES * 2, boundary_bytes)]
    if dist.is_initialized() and dist.get_world_size() >= 2:
        rank = dist.get_rank()
        dev = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
        res = _ping_pong(rank, 1 - rank, sizes, reps, dev) if rank in (0, 1) else {}
        dist.barrier()
        lat, per = _fit_p2p(res) if res else (0.0, 0.0)
        t = torch.tensor([lat, per], dtype=torch.float64, device=dev)
        dist.broadcast(t, 0)
        return float(t[0]), float(t[1]), f"measured: ranks 0-1 ping-pong ({dist.get_backend()})"
    if on_cuda:
        return GPU_P2P_ESTIMATE[0], GPU_P2P_ESTIMATE[1], \
            "estimate (one process, no second GPU rank): 10 us latency, 100 GB/s"
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="splitllama_p2p_") as tmp:
        out = os.path.join(tmp, "p2p.json")
        mp.start_processes(_spawn_worker, args=(port, sizes, reps, out), nprocs=2, start_method="spawn")
        with open(out) as f:
            res = {int(k): v for k, v in json.load(f).items()}
    lat, per = _fit_p2p(res)
    return lat, per, "measured: 2-process gloo spawn ping-pong on this host"


CONTENTION_ROUNDS = 4  # alternating alone / loaded timings; the median of the rounds' ratios


def unit_load(job, control_dir: str) -> None:
    """Background stage process for `_contention`: build the profile's one-stage model and run
    its units' forward + backward in a loop while ``control_dir/go`` exists; exit once
    ``control_dir/stop`` exists (``control_dir/ready.<pid>`` says the model is built)."""
    from splitllama.preflight.launch import run_plan
    from splitllama.training.runtime import build_runtime

    rt = build_runtime(run_plan(_profile_job(job)))
    fns = _unit_fns(rt, job.data.seq_length, job.train.micro_batch_size)
    open(os.path.join(control_dir, f"ready.{os.getpid()}"), "w").close()
    go, stop = os.path.join(control_dir, "go"), os.path.join(control_dir, "stop")
    while not os.path.exists(stop):
        if not os.path.exists(go):
            time.sleep(0.01)
            continue
        for fn in fns.values():
            y, needs_grad = fn()
            y.backward(torch.ones_like(y) if needs_grad else None)
            del y


def _contention(rt: Runtime, job, reps: int, timeout_s: float = 300.0) -> tuple[float, int, str]:
    """(host_contention, contention_procs, source): see the module docstring."""
    pp = job.parallel.pipeline_model_parallel_size
    if local_device().type == "cuda":
        return 1.0, max(pp, 2), "1.0: one device per stage (GPU), not measured"
    if dist.is_initialized() and dist.get_world_size() > 1:
        return 1.0, max(pp, 2), "not measured under torchrun (the ranks already ran concurrently)"
    if pp < 2:
        return 1.0, 2, "not measured (pipeline_model_parallel_size=1: one process computes)"
    seq, b = job.data.seq_length, job.train.micro_batch_size
    env = standalone_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def chain_s(timed: dict) -> float:
        return sum(t.fwd_s + t.bwd_s for t in timed.values())

    ratios, per_round = [], max(3, reps // 2)
    with tempfile.TemporaryDirectory(prefix="splitllama_contention_") as ctl:
        cfg = job_yaml(job, ctl)
        procs = [subprocess.Popen([sys.executable, "-m", "splitllama.planning.profile_cli", "--config", cfg,
                                   "--unit-load", ctl], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(pp - 1)]
        try:
            t0 = time.time()
            while sum(n.startswith("ready.") for n in os.listdir(ctl)) < len(procs):
                dead = [p for p in procs if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"contention load process failed (exit {dead[0].returncode}):\n"
                                       f"{dead[0].stderr.read()[-3000:]}")
                if time.time() - t0 > timeout_s:
                    raise TimeoutError(f"contention load processes not ready after {timeout_s:.0f} s")
                time.sleep(0.1)
            go = os.path.join(ctl, "go")
            for _ in range(CONTENTION_ROUNDS):
                if os.path.exists(go):
                    os.remove(go)
                time.sleep(0.1)
                alone = chain_s(_time_units(rt, seq, b, 1, per_round, False))
                open(go, "w").close()
                time.sleep(0.1)
                loaded = chain_s(_time_units(rt, seq, b, 1, per_round, False))
                ratios.append(loaded / alone)
        finally:
            open(os.path.join(ctl, "stop"), "w").close()
            for p in procs:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return _median(ratios), pp, (f"measured: median over {CONTENTION_ROUNDS} rounds of the units timed while "
                                 f"{pp - 1} other process(es) of this host ran the same units (1 thread each) "
                                 f"/ alone; rounds {', '.join(f'{x:.3f}' for x in ratios)}")


def take_profile(job, warmup: int = 3, reps: int = 10, p2p: bool = True, contention: bool = True) -> Profile:
    """Profile the job's units on this device (initialises torch.distributed at the job's TP when
    it is not running yet: under torchrun every rank must call this)."""
    from splitllama.preflight.launch import run_plan
    from splitllama.training.runtime import build_runtime

    t_start = time.perf_counter()
    rt = build_runtime(run_plan(_profile_job(job)))  # one stage: L1,A,U1
    on_cuda = local_device().type == "cuda"
    key = {**job_key(job), **environment_key(job)}
    seq, b = job.data.seq_length, job.train.micro_batch_size
    units = _time_units(rt, seq, b, warmup, reps, on_cuda)
    opt, fin, params = _time_step_costs(rt, max(3, reps // 2), on_cuda)
    tp = job.parallel.tensor_model_parallel_size
    width_bytes = 2 if key["dtype"] == "bf16" else 4
    boundary = seq * b * job.model.upper.hidden_size * width_bytes // (tp if key["sequence_parallel"] else 1)
    lat, per, src = _p2p_costs(boundary, on_cuda) if p2p else (0.0, 0.0, "not measured (p2p=False)")
    hc, hp, hsrc = _contention(rt, job, reps) if contention else (1.0, 2, "not measured (contention=False)")
    costs = StepCosts(opt, fin, 4 * lat, lat, per, src, hc, hp, hsrc)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "warmup": warmup, "reps": reps, "statistic": "median", "profiled_local_params": params,
            "world_size": dist.get_world_size(), "host": os.uname().nodename,
            "seconds": time.perf_counter() - t_start,
            "peak_memory": "CUDA max_memory_allocated per unit" if on_cuda else "null: not measured on CPU"}
    return Profile(key, units, costs, meta)


def save(profile: Profile, path: str) -> None:
    """Write from rank 0 only (atomic)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_profile(profile, path)
