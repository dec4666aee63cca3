"""Datasets under torchrun (2 gloo ranks): same data on every rank, rank 0 writes the cache,
data-parallel micro-batches partition the single-process order.

Also the worker script: ``python -m torch.distributed.run ... tests/unit/test_data_dist.py OUT``.
"""
from __future__ import annotations

import json
import os
import sys

import pytest


def _cfgs(prefix: str, cache: str):
    from splitllama.config.data import DataConfig

    return {
        "gpt": DataConfig(mock=False, data_path=[prefix], split="8,2,0", seq_length=8,
                          vocab_size=1000, cache_dir=cache),
        "blend": DataConfig(mock=False, data_path=["1", prefix, "3", prefix], split="1,0,0",
                            seq_length=8, vocab_size=1000, cache_dir=cache),
        "mock": DataConfig(mock=True, mock_pattern=True, seq_length=8, vocab_size=300),
    }


def _batches(cfg, dp_rank: int, dp_size: int, steps: int = 4):
    import torch

    from splitllama.data.datasets import build_datasets
    from splitllama.data.iterator import build_data_iterator
    from splitllama.data.tokenizers import build_tokenizer

    train, _, _ = build_datasets(cfg, global_batch_size=4, train_samples=64, eval_samples=8,
                                 test_samples=0, seed=5, tokenizer=build_tokenizer(cfg))
    it = build_data_iterator(train, 2, 4, dp_rank, dp_size)  # resume after one global batch
    return torch.stack([next(it)["tokens"] for _ in range(steps)])


def _worker(out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with open(os.path.join(out, "prefix.txt")) as f:
        prefix = f.read()
    result = {name: _batches(cfg, rank, world).tolist()
              for name, cfg in _cfgs(prefix, os.path.join(out, "cache")).items()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_datasets_under_torchrun(tmp_path):
    import torch

    from splitllama.data.preprocess import TokenizerSpec, preprocess_jsonl
    from tests.launch import torchrun

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(str((7 * i + j) % 900) for j in range(i % 13 + 1))})
                           + "\n" for i in range(80)))
    prefix = preprocess_jsonl(str(src), str(tmp_path / "d"), TokenizerSpec("null", vocab_size=1000),
                              append_eod=True, progress=False).output_prefix
    (tmp_path / "prefix.txt").write_text(prefix)
    torchrun(2, __file__, str(tmp_path), timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert any(n.endswith("BlendedDataset-train-dataset_index.npy") for n in os.listdir(tmp_path / "cache"))
    for name, cfg in _cfgs(prefix, str(tmp_path / "cache")).items():
        single = _batches(cfg, 0, 1, steps=8)  # same seed, one process, cache now warm
        r0, r1 = (torch.tensor(r[name]) for r in ranks)
        expect = torch.cat([torch.cat([r0[k], r1[k]])[None] for k in range(4)])
        assert torch.equal(expect.reshape(8, 2, -1), single), name


if __name__ == "__main__":
    _worker(sys.argv[1])
