"""Default verbosity hides each known noisy source by name or exact text, and nothing else;
the start-up summary lists every config key (issue 10, items 4 and 8)."""
from __future__ import annotations

import logging
import warnings

import pytest

from splitllama import logs


@pytest.fixture
def restore_logging():
    names = ["splitllama", "megatron.core", "megatron.core.datasets.gpt_dataset"]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in names}
    with warnings.catch_warnings():
        yield
    for n, (level, filters) in saved.items():
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).filters[:] = filters


def _emitted(caplog, verbose: bool) -> tuple[list[str], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # drop pytest.ini's filters: show every warning not filtered below
        warnings.simplefilter("always")
        logs.setup(verbose)
        for msg, cat in [("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning),
                         ("Apex is not installed. Falling back to Torch Norm", UserWarning),
                         ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning),
                         ("a real problem the user must see", UserWarning),
                         ("some other deprecation", FutureWarning)]:
            warnings.warn(msg, cat)
    with caplog.at_level(logging.DEBUG, logger="megatron"):
        caplog.clear()
        logging.getLogger("megatron.core.distributed.param_and_grad_buffer").info("Params for bucket 1 ...")
        logging.getLogger("megatron.core.datasets.gpt_dataset").warning(
            "Unable to save LearnableMockDataset indexes because path_to_cache is None")
        logging.getLogger("megatron.core.datasets.gpt_dataset").warning(
            "Unable to save GPTDataset indexes because path_to_cache is None")
        logging.getLogger("megatron.core.optimizer").error("a real optimizer error")
        records = [r.getMessage() for r in caplog.records]
    return [str(w.message) for w in caught], records


def test_default_verbosity_hides_only_the_known_noise(caplog, restore_logging):
    shown, records = _emitted(caplog, verbose=False)
    assert shown == ["a real problem the user must see", "some other deprecation"]
    assert records == ["Unable to save GPTDataset indexes because path_to_cache is None",
                       "a real optimizer error"]


def test_verbose_shows_everything(caplog, restore_logging):
    logs.setup(False)  # a later setup(verbose=True) undoes it
    shown, records = _emitted(caplog, verbose=True)
    assert len(shown) == 5
    assert records[0] == "Params for bucket 1 ..." and len(records) == 4


def test_non_zero_ranks_log_splitllama_info_not(monkeypatch, restore_logging):
    monkeypatch.setenv("RANK", "3")
    logs.setup(False)
    assert not logging.getLogger("splitllama").isEnabledFor(logging.INFO)
    assert logging.getLogger("splitllama").isEnabledFor(logging.WARNING)
    monkeypatch.setenv("RANK", "0")
    logs.setup(False)
    assert logging.getLogger("splitllama").isEnabledFor(logging.INFO)


def test_compact_config_lists_every_key():
    from dataclasses import fields

    from splitllama.config.job import load_job_config
    from splitllama.training.report import compact_config

    job = load_job_config("configs/tiny.yaml", ["data.split=98,2,0"])
    text = "\n".join(compact_config(job))
    for f in fields(job):
        if f.name == "explicit":
            continue
        assert f"{f.name}: " in text
        for k in fields(getattr(job, f.name)):
            assert f" {k.name}=" in text.replace("\n", " "), k.name
    assert "lower=tiny_lower (hidden 64" in text and "split=98,2,0" in text
