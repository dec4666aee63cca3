"""Small pure pieces of the training app: freeze rules, checkpoint layout, metrics sinks."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from splitllama.checkpoint import dirs
from splitllama.training.freeze import apply_freeze, trainable_predicate
from splitllama.training import signals
from splitllama.training.state import TrainState


def test_freeze_rules():
    names = ["embedding.word_embeddings.weight", "lower.layers.0.input_layernorm.weight", "adapter.linear.weight",
             "upper.layers.1.pre_mlp_layernorm.weight", "final_layernorm.weight", "output_layer.weight"]
    assert [trainable_predicate("none")(n) for n in names] == [True] * 6
    assert [trainable_predicate("all_but_adapter")(n) for n in names] == [False, False, True, False, False, False]
    keep_norms = trainable_predicate("all_but:layernorm")
    assert [keep_norms(n) for n in names] == [False, True, True, True, True, False]
    with pytest.raises(ValueError, match="model.freeze: 'adapter' is not"):
        trainable_predicate("adapter")
    m = torch.nn.Module()
    m.adapter = torch.nn.Linear(2, 3, bias=False)
    m.output_layer = torch.nn.Linear(3, 4, bias=False)
    assert apply_freeze(m, "all_but_adapter") == (6, 12)
    assert m.adapter.weight.requires_grad and not m.output_layer.weight.requires_grad


def test_preemption_flag_is_set_by_its_own_handlers_only():
    """signals.install() returns the flag its handlers set (no module state): a second flag
    replaces the first as the handler; SIGUSR1 is recorded, not fatal."""
    saved = {s: signal.getsignal(s) for s in signals.SIGNALS}
    try:
        first = signals.install()
        second = signals.install()
        assert first.received() is None and second.received() is None
        signal.raise_signal(signal.SIGUSR1)  # handlers run before it returns
        assert second.received() == signal.SIGUSR1 and first.received() is None
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_train_state_reads_older_checkpoints():
    """train_state.json of older checkpoints holds consumed_valid_samples (removed, never
    advanced) next to the scheduler and layout: those keys are ignored, the counters kept."""
    old = {"iteration": 7, "consumed_train_samples": 56, "consumed_valid_samples": 0, "skipped_iterations": 1,
           "consecutive_skipped": 0, "floating_point_operations": 3.5, "scheduler": {"num_steps": 56}}
    st = TrainState.from_dict(old)
    assert (st.iteration, st.consumed_train_samples, st.skipped_iterations, st.floating_point_operations) == (7, 56, 1, 3.5)
    assert "consumed_valid_samples" not in st.to_dict()


def test_checkpoint_layout_atomic_finalize_and_prune(tmp_path):
    root = str(tmp_path)
    for it in (10, 20, 30):
        tmp = os.path.join(root, dirs.tmp_dirname(it))
        os.makedirs(tmp)
        assert not dirs.is_complete(tmp)
        dirs.finalize(root, tmp, it)
    assert dirs.resolve(root).endswith("iter_0000030")
    os.makedirs(os.path.join(root, dirs.tmp_dirname(40)))  # a crashed save: never loadable
    assert dirs.resolve(root).endswith("iter_0000030")
    with pytest.raises(ValueError, match="neither a complete checkpoint"):
        dirs.resolve(os.path.join(root, dirs.tmp_dirname(40)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dirs.resolve(os.path.join(root, "nope"))
    removed = dirs.prune(root, keep_last=2)
    assert [os.path.basename(p) for p in removed] == ["iter_0000010"]
    assert [i for i, _ in dirs.list_complete(root)] == [20, 30]


def test_tensorboard_sink_writes_events(tmp_path, monkeypatch):
    pytest.importorskip("torch.utils.tensorboard")
    pytest.importorskip("tensorboard")
    import torch.distributed as dist

    from splitllama.config.train import LoggingConfig
    from splitllama.training.metrics import MetricsSink

    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    sink = MetricsSink(LoggingConfig(metrics_file=str(tmp_path / "m.jsonl"), tensorboard_dir=str(tmp_path / "tb")), {})
    sink.write({"iteration": 1, "loss": 2.5, "lr": 0.1})
    sink.close()
    assert (tmp_path / "m.jsonl").read_text().strip() == '{"iteration": 1, "loss": 2.5, "lr": 0.1}'
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
