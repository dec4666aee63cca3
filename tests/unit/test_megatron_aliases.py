"""Megatron-LM's common flag names on the training command line: aliases of the keys they
mean, or refused in one line naming the key to use (config parsing only: no torch)."""
from __future__ import annotations

import pytest

from splitllama.config.cli import MEGATRON_ALIASES, megatron_aliases, parse_train_args
from splitllama.config.job import load_job_config


def test_aliases_set_the_same_config_as_the_keys():
    mega = parse_train_args(["--config", "configs/tiny.yaml", "--tensor-model-parallel-size", "2",
                             "--pipeline-model-parallel-size=2", "--micro-batch-size", "2",
                             "--global-batch-size", "16", "--lr", "0.02", "--train-iters", "7",
                             "--save", "/tmp/x", "--load", "/tmp/y", "--seq-length", "32",
                             "--sequence-parallel", "--log-interval", "3"])
    ours = load_job_config("configs/tiny.yaml", [
        "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
        "train.micro_batch_size=2", "train.global_batch_size=16", "optimizer.lr=0.02", "train.train_iters=7",
        "checkpoint.save=/tmp/x", "checkpoint.load=/tmp/y", "data.seq_length=32",
        "parallel.sequence_parallel=true", "logging.log_interval=3"])
    assert mega == ours
    assert mega.parallel.tensor_model_parallel_size == 2 and mega.optimizer.lr == 0.02


def test_every_alias_names_an_existing_key():
    from splitllama.config.job import JobConfig
    import dataclasses

    sections = {f.name: f.type for f in dataclasses.fields(JobConfig)}
    job = JobConfig()
    for flag, key in MEGATRON_ALIASES.items():
        section, name = key.split(".")
        assert section in sections, flag
        assert hasattr(getattr(job, section), name), (flag, key)


def test_switch_and_explicit_value():
    assert megatron_aliases(["--bf16"]) == ["train.bf16=true"]
    assert megatron_aliases(["--bf16=false", "x.y=1"]) == ["train.bf16=false", "x.y=1"]


@pytest.mark.parametrize("argv,msg", [
    (["--data-path", "a"], "--data-path is Megatron-LM's; here use data.data_path=[PREFIX,...]"),
    (["--num-layers", "4"], "--num-layers is Megatron-LM's; here use model.num_layers_lower=N"),
    (["--lr"], "--lr needs a value (it means optimizer.lr=VALUE)"),
])
def test_refused_with_the_key_to_use(argv, msg):
    with pytest.raises(ValueError) as e:
        megatron_aliases(argv)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_cli_error_is_one_line(capsys):
    from splitllama.training.entry import main

    assert main(["--config", "configs/tiny.yaml", "--num-layers", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --num-layers is Megatron-LM's; here use model.num_layers_lower=N "
                   "model.num_layers_upper=M (the stitched model's two depths)"]
