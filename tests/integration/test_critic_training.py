"""A critic end to end: HF sources -> LM checkpoint (import-hf) -> critic (lm-to-critic) ->
training on preprocessed value targets (pretrain_splitllama.py, TP=2 + SP under torchrun) ->
export-hf -> AutoModelForTokenClassification. The masked-MSE loss falls, and the exported
critic predicts the targets of its training data better than the untrained one."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from splitllama.convert.cli import main as convert
from tests import apprun
from tests.distributed.convert_worker import M, N, SEED, make_sources

pytestmark = pytest.mark.distributed
V = 512


def target(tok: int) -> float:
    """A per-token value the critic can learn from the current token: in [-1, 1)."""
    return ((tok * 37) % 64) / 32.0 - 1.0


def write_corpus(path, n=300, seed=0):
    r = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            toks = r.integers(0, 256, size=int(r.integers(20, 60))).tolist()
            vals = [target(t) if j % 4 else None for j, t in enumerate(toks)]  # some tokens: no target
            f.write(json.dumps({"text": " ".join(map(str, toks)), "values": vals}) + "\n")


def mse_of_export(export_dir, prefix) -> float:
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForTokenClassification

    from splitllama.data.preprocess import values_prefix

    model = AutoModelForTokenClassification.from_pretrained(export_dir, trust_remote_code=True).eval()
    tokens, values = IndexedDataset(prefix), IndexedDataset(values_prefix(prefix))
    err, n = 0.0, 0
    with torch.no_grad():
        for i in range(20):
            t, v = torch.tensor(np.array(tokens[i]), dtype=torch.long), torch.tensor(np.array(values[i]))
            out = model(input_ids=t[None]).logits[0, :, 0]
            keep = torch.isfinite(v)
            err += float(((out - v).square() * keep).nan_to_num().sum())
            n += int(keep.sum())
    return err / n


def test_critic_from_lm_trains_and_exports(tmp_path):
    from tools.preprocess_data import main as preprocess

    make_sources(tmp_path)
    assert convert(["import-hf", "--lower", str(tmp_path / "lower"), "--upper", str(tmp_path / "upper"),
                    "--num-layers-lower", str(N), "--num-layers-upper", str(M), "--seed", str(SEED),
                    "--dtype", "fp32", "--out", str(tmp_path / "lm"), "--no-progress"]) == 0
    assert convert(["lm-to-critic", "--ckpt", str(tmp_path / "lm"), "--out", str(tmp_path / "critic"),
                    "--no-progress"]) == 0
    write_corpus(tmp_path / "values.jsonl")
    assert preprocess(["--input", str(tmp_path / "values.jsonl"), "--output-prefix", str(tmp_path / "c"),
                       "--tokenizer-type", "null", "--vocab-size", str(V), "--values-key", "values",
                       "--append-eod", "--no-progress"]) == 0
    prefix = str(tmp_path / "c_text_document")
    m, save = tmp_path / "m.jsonl", tmp_path / "trained"
    apprun.run(2, ["model.head=value", f"checkpoint.load={tmp_path / 'critic'}", "checkpoint.finetune=true",
                   f"checkpoint.save={save}", "data.mock=false", "data.mock_pattern=false",
                   f"data.data_path=[{prefix}]", "data.split='98,2,0'",
                   f"data.vocab_size={V}", "train.train_iters=60", "optimizer.lr_warmup_iters=5",
                   "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                   f"logging.metrics_file={m}"])
    losses = apprun.losses(m)
    assert sorted(losses) == list(range(1, 61))
    first = sum(losses[i] for i in (1, 2, 3)) / 3
    last = sum(losses[i] for i in range(51, 61)) / 10
    # zero-initialised head: the first loss is the targets' mean square (~1/3)
    assert 0.2 < first < 0.5 and last < 0.5 * first, (first, last)

    assert convert(["export-hf", "--ckpt", str(tmp_path / "critic"), "--out", str(tmp_path / "hf0"),
                    "--no-progress"]) == 0
    assert convert(["export-hf", "--ckpt", str(save), "--out", str(tmp_path / "hf1"), "--no-progress"]) == 0
    before, after = mse_of_export(tmp_path / "hf0", prefix), mse_of_export(tmp_path / "hf1", prefix)
    assert after < 0.5 * before, (before, after)
