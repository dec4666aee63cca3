"""Measured unit costs: the profile file, its key, and the unit chain costed from it (pure Python).

A profile (taken by `splitllama.planning.profile`, written by ``tools/plan_pipeline.py --profile``)
holds, for ONE set of shapes on ONE device, the median forward and backward seconds of each unit
kind (embedding, one lower layer, adapter, one upper layer, final norm + head + loss) per
micro-batch, their peak memory (CUDA; null on CPU), and the per-step costs that do not move with
the micro-batches (optimizer step and gradient finalisation per local parameter, a fixed per-stage
cost, p2p latency and seconds per byte). Its ``key`` says what it is valid for: the job part
(shapes, TP/SP, recompute, model widths — not the layer counts N/M: a profile serves any split and
any depth) and the environment part (device, device name, dtype, layer implementation, attention
backend, threads on CPU, torch and megatron-core versions). `load_profile` refuses a profile
whose key differs from the expected one, naming the first key that differs.

`units_from_profile` gives the chain of `splitllama.pipeline.cost.units_for` (memory, parameters,
p2p bytes from the analytic model) with every unit's ``fwd_time`` / ``bwd_time`` replaced by the
measured time of its kind, so the exact planner of `splitllama.pipeline.plan` runs over it
unchanged; `stage_overhead` turns the per-step costs into the planner's `StageOverhead`.
`calibrate` fits the analytic model's `Hardware` (effective FLOP/s and bandwidth) to the measured
unit times.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Optional

from splitllama.config.model import ModelConfig
from splitllama.errors import UsageError
from splitllama.pipeline.cost import KINDS, Hardware, Unit, units_for
from splitllama.pipeline.plan import StageOverhead

PROFILE_FORMAT = "splitllama-unit-profile/1"
JOB_KEYS = ("model", "seq_length", "micro_batch_size", "tensor_model_parallel_size", "sequence_parallel",
            "recompute_granularity", "recompute_method", "recompute_num_layers")
ENV_KEYS = ("device", "device_name", "dtype", "transformer_impl", "attention_backend", "threads", "torch",
            "megatron_core")


@dataclass(frozen=True)
class UnitTiming:
    fwd_s: float
    bwd_s: float
    peak_memory_bytes: Optional[float] = None  # CUDA max_memory_allocated over fwd+bwd; None on CPU
    fwd_samples_s: tuple = ()
    bwd_samples_s: tuple = ()


@dataclass(frozen=True)
class StepCosts:
    """Per-step costs outside the micro-batch loop (see `splitllama.pipeline.plan.StageOverhead`)."""

    optimizer_s_per_param: float
    grad_finalize_s_per_param: float
    fixed_s: float
    p2p_latency_s: float
    p2p_s_per_byte: float
    p2p_source: str = "measured"  # how the p2p numbers were obtained
    # unit time while ``contention_procs`` processes of this host compute at once / alone
    # (`StageOverhead.host_contention`); 1.0 when the stages do not share compute (GPUs)
    host_contention: float = 1.0
    contention_procs: int = 2
    contention_source: str = "not measured"


@dataclass(frozen=True)
class Profile:
    key: dict
    units: dict  # kind -> UnitTiming
    costs: StepCosts
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": PROFILE_FORMAT, "key": self.key,
                "units": {k: {**asdict(v), "fwd_samples_s": list(v.fwd_samples_s),
                              "bwd_samples_s": list(v.bwd_samples_s)} for k, v in self.units.items()},
                "costs": asdict(self.costs), "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "profile") -> "Profile":
        if d.get("format") != PROFILE_FORMAT:
            raise UsageError(f"{source}: not a SplitLlama unit profile (format {d.get('format')!r}, "
                             f"expected {PROFILE_FORMAT!r})")
        try:
            units = {k: UnitTiming(float(v["fwd_s"]), float(v["bwd_s"]), v.get("peak_memory_bytes"),
                                   tuple(v.get("fwd_samples_s", ())), tuple(v.get("bwd_samples_s", ())))
                     for k, v in d["units"].items()}
            costs = StepCosts(**d["costs"])
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{source}: malformed unit profile ({type(e).__name__}: {e})") from None
        missing = [k for k in KINDS if k not in units]
        if missing:
            raise UsageError(f"{source}: unit profile lacks the unit kind(s) {', '.join(missing)}")
        return cls(dict(d["key"]), units, costs, dict(d.get("meta", {})))


def job_key(job) -> dict:
    """The job part of a profile key: what the unit shapes depend on (not N / M)."""
    m, tr, par = job.model, job.train, job.parallel
    tp = par.tensor_model_parallel_size

    def block(b) -> dict:
        return {"hidden_size": b.hidden_size, "intermediate_size": b.intermediate_size,
                "num_attention_heads": b.num_attention_heads, "num_key_value_heads": b.num_key_value_heads,
                "head_dim": b.head_dim}
    return {"model": {"lower": block(m.lower), "upper": block(m.upper), "vocab_size": m.vocab_size,
                      "mlp": bool(m.mlp), "head": m.head},
            "seq_length": job.data.seq_length, "micro_batch_size": tr.micro_batch_size,
            "tensor_model_parallel_size": tp, "sequence_parallel": bool(par.sequence_parallel and tp > 1),
            "recompute_granularity": tr.recompute_granularity,
            "recompute_method": tr.recompute_method if tr.recompute_granularity == "full" else None,
            "recompute_num_layers": tr.recompute_num_layers if tr.recompute_granularity == "full" else None}


def key_difference(found: Mapping, expected: Mapping) -> Optional[tuple[str, Any, Any]]:
    """(dotted key, found value, expected value) of the first expected key that differs."""
    for k, want in expected.items():
        have = found.get(k, "<absent>")
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = key_difference(have, want)
            if sub is not None:
                return (f"{k}.{sub[0]}",) + sub[1:]
        elif have != want:
            return k, have, want
    return None


def load_profile(path: str, expected_key: Mapping) -> Profile:
    """Read the profile at ``path``; UsageError (one line) when it is missing, not a profile, or
    its key differs from ``expected_key`` (only the keys given are compared) — naming the key."""
    if not os.path.isfile(path):
        raise UsageError(f"parallel.profile_file {path}: no such file; take a profile with "
                         f"`tools/plan_pipeline.py --config JOB.yaml --profile --profile-out {path}` "
                         f"(or set parallel.profile_if_missing=true)")
    with open(path) as f:
        try:
            d = json.load(f)  # JSON only: nothing is unpickled
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not a JSON unit profile ({e})") from None
    prof = Profile.from_dict(d, path)
    diff = key_difference(prof.key, expected_key)
    if diff is not None:
        k, have, want = diff
        raise UsageError(f"profile {path} does not match this job: key '{k}' is {json.dumps(have)} in the "
                         f"profile but {json.dumps(want)} here; re-profile (tools/plan_pipeline.py --profile "
                         f"--profile-out FILE) or point parallel.profile_file elsewhere")
    return prof


def write_profile(profile: Profile, path: str) -> None:
    """Atomic write (a temporary file renamed over ``path``): never a half-written profile."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(profile.to_dict(), f, indent=1)
    os.replace(tmp, path)


def _dtype_bytes(key: Mapping) -> int:
    return 2 if key.get("dtype") in ("bf16", "fp16") else 4


def units_from_profile(profile: Profile, model_cfg: ModelConfig, dp: int = 1,
                       distributed_optimizer: bool = True) -> list[Unit]:
    """The chain for ``model_cfg`` (any N / M) at the profile's shapes: analytic memory,
    parameters and p2p bytes, measured fwd / bwd time per unit kind."""
    k = profile.key
    units = units_for(model_cfg, k["seq_length"], k["micro_batch_size"], k["tensor_model_parallel_size"], dp,
                      k["recompute_granularity"], _dtype_bytes(k), distributed_optimizer,
                      sequence_parallel=k["sequence_parallel"])
    return [replace(u, fwd_time=profile.units[u.kind].fwd_s, bwd_time=profile.units[u.kind].bwd_s)
            for u in units]


def stage_overhead(profile: Profile, dp: int = 1, distributed_optimizer: bool = True) -> StageOverhead:
    c = profile.costs
    return StageOverhead(optimizer_s_per_param=c.optimizer_s_per_param,
                         grad_finalize_s_per_param=c.grad_finalize_s_per_param, fixed_s=c.fixed_s,
                         p2p_latency_s=c.p2p_latency_s, p2p_s_per_byte=c.p2p_s_per_byte,
                         dtype_bytes=_dtype_bytes(profile.key),
                         optimizer_shards=dp if distributed_optimizer else 1,
                         host_contention=c.host_contention, contention_procs=c.contention_procs)


# ---- calibration of the analytic model ---------------------------------------------------------
def _flops_and_bytes(model_cfg: ModelConfig, key: Mapping) -> dict:
    """kind -> ((fwd flops, fwd bytes), (bwd flops, bwd bytes)) as the analytic model counts them."""
    args = (model_cfg, key["seq_length"], key["micro_batch_size"], key["tensor_model_parallel_size"], 1,
            key["recompute_granularity"], _dtype_bytes(key))
    kw = {"sequence_parallel": key["sequence_parallel"]}
    fl = units_for(*args, **kw, hardware=Hardware(1.0, 1.0, math.inf, 1.0))  # time = flops
    by = units_for(*args, **kw, hardware=Hardware(math.inf, 1.0, 1.0, 1.0))  # time = bytes
    out = {}
    for a, b in zip(fl, by):
        out.setdefault(a.kind, ((a.fwd_time, b.fwd_time), (a.bwd_time, b.bwd_time)))
    return out


def fit_hardware(observations: list[tuple[float, float, float]]) -> Hardware:
    """Least squares in relative error of ``t = flops / F + bytes / W`` over (flops, bytes, t)
    observations, F and W >= 0 (a term the data cannot support is dropped: W = inf)."""
    rows = [(f / t, b / t) for f, b, t in observations if t > 0 and (f > 0 or b > 0)]
    if not rows:
        raise ValueError("no unit with both FLOPs/bytes and a positive measured time to calibrate from")

    def solve(use_f: bool, use_b: bool) -> tuple[float, float]:
        if use_f and use_b:
            s11 = sum(x * x for x, _ in rows)
            s12 = sum(x * y for x, y in rows)
            s22 = sum(y * y for _, y in rows)
            r1, r2 = sum(x for x, _ in rows), sum(y for _, y in rows)
            det = s11 * s22 - s12 * s12
            if det <= 1e-12 * max(s11 * s22, 1e-300):
                return -1.0, -1.0
            return (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det
        if use_f:
            s = sum(x * x for x, _ in rows)
            return (sum(x for x, _ in rows) / s if s else -1.0), 0.0
        s = sum(y * y for _, y in rows)
        return 0.0, (sum(y for _, y in rows) / s if s else -1.0)

    def loss(a: float, c: float) -> float:
        return sum((a * x + c * y - 1.0) ** 2 for x, y in rows)

    cands = [(a, c) for a, c in (solve(True, True), solve(True, False), solve(False, True)) if a >= 0 and c >= 0]
    a, c = min(cands, key=lambda ac: loss(*ac))
    return Hardware(peak_flops=1.0 / a if a > 0 else math.inf, flops_efficiency=1.0,
                    mem_bandwidth=1.0 / c if c > 0 else math.inf, bandwidth_efficiency=1.0)


def calibrate(profile: Profile, model_cfg: ModelConfig) -> Hardware:
    """`Hardware` (effective FLOP/s and bandwidth, efficiencies folded in: 1.0) that makes the
    analytic model reproduce the profile's measured fwd / bwd unit times best."""
    fb = _flops_and_bytes(model_cfg, profile.key)
    obs = []
    for kind, ((ff, fbytes), (bf, bbytes)) in fb.items():
        t = profile.units[kind]
        obs += [(ff, fbytes, t.fwd_s), (bf, bbytes, t.bwd_s)]
    return fit_hardware(obs)
