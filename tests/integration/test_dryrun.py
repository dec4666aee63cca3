"""`pretrain_splitllama.py --dry-run`: the real-width model (LLaMA-3-8B lower layers, 70B upper
layers, 128256 vocab) with few layers, on a fake 4-rank job (TP 2 x PP 2), run as a user runs it;
and the flag checks (fast, in-process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitllama.errors import cli_main
from splitllama import entry

REPO = Path(__file__).resolve().parents[2]
H_LO, H_UP, KV, F_LO, F_UP, VOCAB = 4096, 8192, 1024, 14336, 28672, 128256  # LLaMA-3 8B / 70B


def _layer(h: int, f: int, tp: int) -> int:
    """One LLaMA layer on one TP rank: q, o (h x h), k, v (h x 1024) and 3 MLP GEMMs over tp,
    two replicated RMSNorm weights."""
    return (2 * h * h + 2 * h * KV + 3 * h * f) // tp + 2 * h


@pytest.mark.slow
def test_dry_run_real_widths_tp2_pp2():
    """Stage 0 = embedding + 2 lower layers + adapter, stage 1 = 1 upper layer + head; a 15 GiB
    budget is exceeded by stage 1 (its fp32 grads + Adam state alone are ~14 GiB): the report
    is printed, then one error line and exit 2."""
    tp = 2
    cmd = [sys.executable, "pretrain_splitllama.py", "--config", "configs/llama3_8b_70b.yaml",
           "--dry-run", "--world-size", "4", "--json", f"parallel.tensor_model_parallel_size={tp}",
           "parallel.pipeline_model_parallel_size=2", "model.num_layers_lower=2",
           "model.num_layers_upper=1", "parallel.pipeline_layout=L2,A|U1", "parallel.memory_budget_gb=15"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "pipeline stage 1" in errors[0] and "memory_budget_gb=15" in errors[0], errors
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["layout"] == "L2,A|U1" and (doc["tp"], doc["pp"], doc["dp"]) == (2, 2, 1)
    keys = {"stage", "params", "params_gib", "grads_gib", "optimizer_gib", "activations_gib",
            "peak_gib", "planner_peak_gib"}
    s0, s1 = doc["stages"]
    assert keys <= set(s0) and keys <= set(s1)
    # parameters on each stage's TP rank 0, counted from the LLaMA-3 shapes
    assert s0["params"] == VOCAB // tp * H_LO + 2 * _layer(H_LO, F_LO, tp) + H_LO * H_UP // tp
    assert s1["params"] == _layer(H_UP, F_UP, tp) + H_UP + VOCAB // tp * H_UP
    gib = 2 ** 30
    for s in (s0, s1):  # bf16 weights, fp32 grad buffer, fp32 master + 2 Adam moments (DP 1)
        assert s["params_gib"] == pytest.approx(2 * s["params"] / gib, rel=1e-6)
        assert s["grads_gib"] == pytest.approx(4 * s["params"] / gib, rel=1e-3)  # buffer padding
        assert s["optimizer_gib"] == pytest.approx(12 * s["params"] / gib, rel=1e-3)
        assert s["activations_gib"] > 0.5  # GiBs of saved tensors at seq 4096 (not model state)
        assert s["planner_peak_gib"] == pytest.approx(s["peak_gib"], rel=0.10)
    assert (s0["in_flight"], s1["in_flight"]) == (2, 1)  # 1F1B: min(pp - stage, m)
    seq = 4096  # p2p: [seq / tp (sequence parallel), micro-batch, the adapter's output width]
    assert s0["p2p"] == {"recv": None, "send": [seq // tp, 1, H_UP]}
    assert s1["p2p"] == {"recv": [seq // tp, 1, H_UP], "send": None}
    assert s0["shards"]["lower.layers.*.mlp.linear_fc1.weight"] == [2 * F_LO // tp, H_LO]
    assert s0["shards"]["lower.layers.*.self_attention.linear_qkv.weight"] == [(H_LO + 2 * KV) // tp, H_LO]
    assert s1["shards"]["output_layer.weight"] == [VOCAB // tp, H_UP]


@pytest.mark.parametrize("argv, pattern", [
    (["--dry-run"], "--dry-run needs --world-size"),
    (["--world-size", "8"], "--world-size and --json are options of --dry-run"),
    (["--json"], "--world-size and --json are options of --dry-run"),
])
def test_dry_run_flags_refused(capsys, argv, pattern):
    rc = cli_main(entry._main, ["--config", str(REPO / "configs" / "tiny.yaml"), *argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert rc == 2 and len(err) == 1 and pattern in err[0], err
