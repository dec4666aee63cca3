"""The launch scripts submitted for real to the local 2-node SLURM cluster (.ci/slurm_up.sh), tiny
config on CPU/gloo:

- `sbatch -N 2 --ntasks-per-node=1 launch/slurm.sbatch` trains with one rank on each node and writes
  a checkpoint;
- preemption: `scancel --signal=USR1 --batch` -> checkpoint -> `scontrol requeue` -> the requeued job
  resumes, and the iterations of both runs are 1..N with no gap and no repeat;
- launch/adapter_warmup.sh: phase 2 (a dependent job) starts from phase 1's checkpoint, and phase 1
  changed the adapter only (checkpoint tensors compared bit for bit with its starting weights);
- launch/convert.sh: the converter as a batch job (success, and a failure's exit status);
- a user's `checkpoint.save=DIR` override is where the job saves and resumes (issue 9.12).

Without a cluster these tests skip, unless SPLITLLAMA_REQUIRE_SLURM=1 (CI), where they fail.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.launch import REPO

pytestmark = pytest.mark.slurm

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# Tiny, fast and deterministic: no eval, a line per iteration, warmup shorter than any run here.
QUICK = ["train.eval_interval=0", "logging.log_interval=1", "optimizer.lr_warmup_iters=2"]
ITER_RE = re.compile(r"^iter\s+(\d+)/(\d+) \|", re.M)


def _env(tmp: Path, **extra) -> dict:
    """The scripts find the checkout themselves (submit dir / their own location)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_",
                                "SPLITLLAMA_HOME", "RUN_DIR", "CKPT_DIR", "INIT_CKPT"))}
    env.update(PYTHON=sys.executable, RUN_ROOT=str(tmp), CONFIG="configs/tiny.yaml", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _job_info(job: str) -> dict:
    p = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout)) if p.returncode == 0 else {}


def _wait(job: str, timeout: float, release_requeued: bool = False) -> dict:
    """Poll until the job reaches a final state. A requeued job is held by SLURM for cred_expire
    (120 s by default) before it may start again; with release_requeued the test lets it start
    now (`scontrol update StartTime=now`) to stay in its time budget — what a real cluster does
    after the hold, only sooner."""
    t0 = time.time()
    info: dict = {}
    held_since = None
    while time.time() - t0 < timeout:
        info = _job_info(job)
        state = info.get("JobState", "")
        if state in FINAL_STATES:
            return info
        if release_requeued and state == "PENDING" and info.get("Reason") == "BeginTime" \
                and int(info.get("Restarts", "0")) > 0:
            held_since = held_since or time.time()
            # not at once: slurmd refuses a credential issued in the second the old one was revoked
            if time.time() - held_since > 5:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                               capture_output=True, timeout=30)
                held_since = None
        time.sleep(0.5)
    subprocess.run(["scancel", job], capture_output=True, timeout=30)
    raise AssertionError(f"job {job} not finished after {timeout:.0f} s (cancelled): {info}")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


def _submit(args: list[str], env: dict) -> tuple[str, Path]:
    """launch/submit.sh ... -> (job id, run dir)."""
    p = subprocess.run([str(REPO / "launch/submit.sh"), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"^job (\d+) run_dir (\S+)$", p.stdout, re.M)
    assert m, p.stdout
    return m.group(1), Path(m.group(2))


def _iterations(log: str) -> list[int]:
    return [int(m.group(1)) for m in ITER_RE.finditer(log)]


def _metrics_iterations(path: Path) -> list[int]:
    return [json.loads(ln)["iteration"] for ln in path.read_text().splitlines()
            if ln.strip() and "loss" in json.loads(ln)]


def _model_tensors(ckpt_root: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a torch_dist checkpoint (root with `latest`), read in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = ckpt_root / (ckpt_root / "latest").read_text().strip()
    md = FileSystemReader(str(path)).read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
          if isinstance(v, TensorStorageMetadata) and not k.startswith("optimizer.")}
    dcp.load(sd, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return sd


def _sbatch_2_nodes(tmp: Path, overrides: list[str], timeout: float) -> tuple[str, str]:
    """`CONFIG=configs/tiny.yaml sbatch -N 2 --ntasks-per-node=1 launch/slurm.sbatch OVERRIDES`
    run to completion (asserted): (job id, its output)."""
    p = subprocess.run(["sbatch", "--parsable", "-N", "2", "--ntasks-per-node=1", "--time=10",
                        f"--output={tmp}/%x-%j.out", "launch/slurm.sbatch", *overrides, *QUICK],
                       cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    info = _wait(job, timeout)
    out = _read(tmp / f"splitllama-{job}.out")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-5000:]
    return job, out


# ----------------------------------------------------------------------------------- tests
def test_two_node_training_writes_a_checkpoint(tmp_path):
    """The issue's interface: CONFIG=... sbatch -N 2 --ntasks-per-node=1 launch/slurm.sbatch KEY=VALUE."""
    iters = 6
    job, out = _sbatch_2_nodes(tmp_path, [f"train.train_iters={iters}"], 150)
    # the script names its per-job run dir; everything is logged there too
    run_dir = Path(re.search(r"run dir: (\S+)", out).group(1))
    assert run_dir == tmp_path / f"splitllama-{job}"
    log = _read(run_dir / "job.log")
    tasks = re.findall(r"^\[task\] rank=(\d+)/(\d+) local_rank=\d+ node=(\S+)", log, re.M)
    assert sorted(tasks) == [("0", "2", "n1"), ("1", "2", "n2")], log[-5000:]
    assert re.search(r"^pipeline layout: .* tp=1 pp=1 dp=2 ", log, re.M), log[-5000:]
    assert _iterations(log) == list(range(1, iters + 1)), log[-5000:]
    assert f"done: {iters} iterations this run" in log
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"iter_{iters:07d}"
    assert (ckpt / f"iter_{iters:07d}" / "COMPLETE").is_file()
    assert _metrics_iterations(run_dir / "metrics.jsonl") == list(range(1, iters + 1))


def test_users_checkpoint_save_is_where_the_job_resumes(tmp_path):
    """Issue 9.12: `sbatch ... launch/slurm.sbatch train.train_iters=5 checkpoint.save=DIR` used
    to fail at start (checkpoint.load pointed at the script's own, absent, run directory). Now
    DIR is saved to and resumed from: a second job continues at iteration 6."""
    save = tmp_path / "mine"

    def submit(iters: int) -> tuple[str, Path]:
        job, out = _sbatch_2_nodes(tmp_path, [f"train.train_iters={iters}", f"checkpoint.save={save}"], 180)
        return out, tmp_path / f"splitllama-{job}"

    out, run_dir = submit(5)
    assert f"checkpoints: {save}" in out and (save / "latest").read_text().strip() == "iter_0000005"
    assert not (run_dir / "checkpoints").exists()
    out, run_dir = submit(8)
    assert f"start: resume from {save}/iter_0000005" in out, out[-5000:]
    assert _metrics_iterations(run_dir / "metrics.jsonl") == [6, 7, 8]
    assert (save / "latest").read_text().strip() == "iter_0000008"


def test_preemption_checkpoints_requeues_and_resumes_without_gap(tmp_path):
    iters = 30
    job, run_dir = _submit(["-N", "2", "--ntasks-per-node=1", "--time=10", "--",
                            f"train.train_iters={iters}", *QUICK], _env(tmp_path))
    log_path = run_dir / "job.log"
    t0 = time.time()
    while not any(i >= 3 for i in _iterations(_read(log_path))):
        assert time.time() - t0 < 120, f"no iteration 3 within 120 s\n{_read(log_path)[-5000:]}"
        assert _job_info(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), _read(log_path)[-5000:]
        time.sleep(0.2)
    # what SLURM does before the time limit with `#SBATCH --signal=B:USR1@<s>`
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = _wait(job, 200, release_requeued=True)
    log = _read(log_path)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-6000:]}"

    saved = [int(k) for k in re.findall(r"^\[signal\] checkpoint saved at iteration (\d+) ", log, re.M)]
    assert len(saved) == 1 and 3 <= saved[0] < iters, log[-6000:]
    k = saved[0]
    assert re.search(rf"requeueing job {job} \(restart 1\)", log), log[-6000:]
    assert re.search(r"=== job \d+ \(splitllama\) attempt 2 ===", log), log[-6000:]
    assert f"start: resume from {run_dir}/checkpoints/iter_{k:07d}" in log
    assert f"resumed from {run_dir}/checkpoints/iter_{k:07d} at iteration {k}" in log
    first, second = log.split("attempt 2 ===", 1)
    assert _iterations(first)[-1] == k and _iterations(second)[0] == k + 1
    # the whole sequence over both runs: no gap, no repeat (log lines and the metrics file)
    assert _iterations(log) == list(range(1, iters + 1)), log[-6000:]
    assert _metrics_iterations(run_dir / "metrics.jsonl") == list(range(1, iters + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{iters:07d}"


def test_adapter_warmup_pipeline(tmp_path):
    """Phase 1 (adapter only) from a base checkpoint, phase 2 (everything) from phase 1's
    checkpoint, as two jobs with afterok."""
    base, pipe = tmp_path / "base", tmp_path / "pipe"
    # The starting weights (stands in for a converted HF checkpoint): a 2-iteration run.
    p = subprocess.run([sys.executable, "pretrain_splitllama.py", "--config", "configs/tiny.yaml",
                        "train.train_iters=2", "train.eval_interval=0", "optimizer.lr_warmup_iters=0",
                        f"checkpoint.save={base}"], cwd=REPO, env=_env(tmp_path, SPLITLLAMA_DEVICE="cpu"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    warm_iters, train_iters = 6, 4
    p = subprocess.run([str(REPO / "launch/adapter_warmup.sh"), "-N", "2", "--ntasks-per-node=1", "--time=10",
                        "--", f"train.train_iters={train_iters}", *QUICK],
                       cwd=REPO, env=_env(tmp_path, BASE_CKPT=base, WARMUP_ITERS=warm_iters, PIPELINE_DIR=pipe),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    (j1, d1), (j2, d2) = re.findall(r"^(?:warmup|train) job (\d+) run_dir (\S+)$", p.stdout, re.M)
    info2 = _wait(j2, 200)
    info1 = _job_info(j1)
    log1, log2 = _read(Path(d1) / "job.log"), _read(Path(d2) / "job.log")
    assert info1.get("JobState") == "COMPLETED", f"{info1}\n{log1[-5000:]}"
    assert info2["JobState"] == "COMPLETED", f"{info2}\n{log2[-5000:]}"
    # afterok: phase 2 started only after phase 1 had finished
    end1 = re.search(r"^\[launch ([\d: -]+)\] training processes exited with status 0$", log1, re.M)
    start2 = re.search(r"^\[launch ([\d: -]+)\] === job", log2, re.M)
    assert end1 and start2 and start2.group(1) >= end1.group(1), (log1[-2000:], log2[:2000])

    # phase 1: adapter-only from the base weights
    assert "model.freeze=all_but_adapter" in log1
    assert f"loaded weights from {base}/iter_0000002 (finetune" in log1, log1[-5000:]
    assert _iterations(log1) == list(range(1, warm_iters + 1))
    # phase 2: from phase 1's final checkpoint, a fresh run (iteration 1..) training everything
    w = f"iter_{warm_iters:07d}"
    assert (pipe / "warmup" / "latest").read_text().strip() == w
    assert f"loaded weights from {pipe}/warmup/{w} (finetune" in log2, log2[-5000:]
    assert "model.freeze=all_but_adapter" not in log2
    assert _iterations(log2) == list(range(1, train_iters + 1))
    assert (pipe / "train" / "latest").read_text().strip() == f"iter_{train_iters:07d}"

    t_base, t_warm, t_train = (_model_tensors(d) for d in (base, pipe / "warmup", pipe / "train"))
    assert t_base.keys() == t_warm.keys() == t_train.keys()
    adapter = {k for k in t_base if k.startswith("adapter.")}
    assert adapter and len(adapter) < len(t_base)
    for k in t_base:
        if k in adapter:
            assert not torch.equal(t_base[k], t_warm[k]), f"phase 1 did not train {k}"
        else:
            assert torch.equal(t_base[k], t_warm[k]), f"phase 1 changed frozen {k}"
    changed = [k for k in t_base if k not in adapter and not torch.equal(t_warm[k], t_train[k])]
    assert len(changed) == len(t_base) - len(adapter), "phase 2 left some parameters untrained"


def test_convert_batch_job(tmp_path):
    from splitllama.hf.build import tiny_llama_from_config
    from splitllama.hf.configuration_splitllama import tiny_llama_configs

    lo_cfg, up_cfg = tiny_llama_configs()
    tiny_llama_from_config(lo_cfg, seed=0).save_pretrained(tmp_path / "lower")
    tiny_llama_from_config(up_cfg, seed=1).save_pretrained(tmp_path / "upper")
    env = _env(tmp_path)

    def submit(*args: str) -> str:
        p = subprocess.run(["sbatch", "--parsable", "--time=10", f"--output={tmp_path}/%x-%j.out",
                            "launch/convert.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip().split(";")[0]

    out = tmp_path / "ckpt"
    common = ["--num-layers-lower", "2", "--num-layers-upper", "3", "--dtype", "fp32"]
    good = submit("import-hf", "--lower", str(tmp_path / "lower"), "--upper", str(tmp_path / "upper"),
                  *common, "--out", str(out))
    bad = submit("import-hf", "--lower", str(tmp_path / "missing"), "--upper", str(tmp_path / "upper"),
                 *common, "--out", str(tmp_path / "never"))
    info = _wait(good, 150)
    log = _read(tmp_path / f"splitllama-convert-{good}" / "job.log")
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-5000:]}"
    assert "convert_checkpoint.py exited with status 0" in log
    latest = (out / "latest").read_text().strip()
    assert (out / latest / "COMPLETE").is_file()
    model = json.loads((out / latest / "model_config.json").read_text())
    assert (model["num_layers_lower"], model["num_layers_upper"]) == (2, 3)
    assert len(_model_tensors(out)) > 10

    info = _wait(bad, 120)
    log = _read(tmp_path / f"splitllama-convert-{bad}" / "job.log")
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), f"{info}\n{log[-3000:]}"
    assert "error:" in log and not (tmp_path / "never").exists()
