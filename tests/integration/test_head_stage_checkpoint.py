"""A head-only pipeline stage end to end: pretrain_splitllama.py at PP=3 with the layout
``L2,A|U3|H`` trains, its torch_dist checkpoint (global keys) saved at iteration 10 resumes at
PP=1 with the losses of the uninterrupted PP=3 run, and export-hf reads it. (Random init is
per stage, so runs of different layouts start from different weights: the reference is the
same layout's uninterrupted run, as in test_resume_with_a_different_layout.)"""
from __future__ import annotations

import pytest
import torch

from splitllama.convert.cli import main as convert
from tests import apprun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REL = 1e-4  # fp32, a different reduction order across stages (as test_resume_with_a_different_layout)


def test_head_stage_trains_saves_and_reshards_to_pp1(tmp_path):
    pp3 = ["parallel.pipeline_model_parallel_size=3", "parallel.pipeline_layout=L2,A|U3|H"]
    straight = tmp_path / "pp3.jsonl"
    apprun.run(3, ["train.train_iters=20", f"logging.metrics_file={straight}", *pp3])
    ref = apprun.losses(straight)
    assert sorted(ref) == list(range(1, 21)) and ref[20] < ref[1] - 0.3, ref  # it trains
    save, m1 = tmp_path / "ckpt", tmp_path / "part1.jsonl"
    apprun.run(3, ["train.train_iters=20", "train.exit_after_iters=10", f"checkpoint.save={save}",
                   f"logging.metrics_file={m1}", *pp3])
    first = apprun.losses(m1)
    assert sorted(first) == list(range(1, 11))
    for i in range(1, 11):
        assert abs(first[i] - ref[i]) <= 1e-6 * abs(ref[i]), (i, first[i], ref[i])
    m2 = tmp_path / "resumed.jsonl"
    apprun.run(1, ["train.train_iters=20", f"checkpoint.load={save}", f"logging.metrics_file={m2}"])
    resumed = apprun.losses(m2)
    assert sorted(resumed) == list(range(11, 21))
    for i in range(11, 21):
        assert abs(resumed[i] - ref[i]) <= REL * abs(ref[i]), (i, resumed[i], ref[i])

    out = tmp_path / "hf"
    assert convert(["export-hf", "--ckpt", str(save), "--out", str(out), "--no-progress"]) == 0
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, torch_dtype=torch.float32)
    logits = hf(input_ids=torch.arange(16)[None]).logits
    assert logits.shape == (1, 16, hf.config.vocab_size) and torch.isfinite(logits).all()
