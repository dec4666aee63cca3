"""The dry run's memory tracker (`platform.compat.fake.PeakTracker`) on a module whose memory is
known by hand: a bias-free Linear(IN -> OUT) in fp32 on fake tensors (no storage), two forwards
held before their backwards (as 1F1B holds micro-batches), then an Adam step."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from splitllama.platform.compat import fake

IN, OUT, N = 1024, 512, 256
W = IN * OUT * 4  # bytes of the weight, its gradient, and each Adam moment (fp32)
Y = N * OUT * 4  # bytes of one forward's output


def _kinds(snap) -> dict:
    (dev_snap,) = snap.values()
    return {getattr(k, "value", k): v for k, v in dev_snap.items()}


def test_linear_weight_grad_adam_and_activations_by_hand():
    with FakeTensorMode():
        lin = torch.nn.Linear(IN, OUT, bias=False)
        opt = torch.optim.Adam(lin.parameters(), lr=1e-3, foreach=False)
        x = torch.empty(N, IN)  # no grad: the input's gradient is not needed, only the weight's
        tracker = fake.PeakTracker()
        tracker.track_external(lin, opt, x)
        assert _kinds(tracker.get_tracker_snapshot())["Parameter"] == W
        with tracker:
            outs = []
            for _ in range(2):
                tracker.reset_mod_stats()
                outs.append((lin(x) ** 2).sum())
            # Linear keeps its input (x, tracked as 'Other'); pow keeps Linear's [N, OUT] output
            # for its backward; the squares are freed by sum: per forward one output + a scalar
            after_fwd = _kinds(tracker.get_tracker_snapshot())
            assert after_fwd["Activation"] == 2 * Y + 2 * 4
            for out in outs:
                out.backward()
            del outs, out
            assert _kinds(tracker.get_tracker_snapshot())["Gradient"] == W
            opt.step()
        now = _kinds(tracker.get_tracker_snapshot())
        peak = _kinds(tracker.get_tracker_snapshot("peak"))
    assert now["Optstate"] == 2 * W + 4  # exp_avg + exp_avg_sq + the fp32 scalar 'step'
    assert now["Parameter"] == W and now["Gradient"] == W
    # the peak is in Adam's step: weight + grad + both moments + the input x, and the two
    # weight-sized temporaries alive together in `denom = exp_avg_sq.sqrt() / bias_correction`
    assert peak["Total"] == 4 * W + 2 * W + N * IN * 4 + 4
    assert peak["Total"] > W + 2 * Y + N * IN * 4  # (the forwards' peak is lower)


def test_scalar_answers_constants_and_data_dependent_reads():
    with FakeTensorMode(allow_non_fake_inputs=True), fake.ScalarAnswers():
        assert torch.tensor([3]).item() == 3  # built from a literal: the constant is known
        assert torch.empty(4).sum().item() == 0.0  # data-dependent: answered 0
        assert bool(torch.empty(4).isnan().any()) is False
