"""What a run or tool prints: logging set-up and the library noise hidden at default verbosity.

`setup(verbose)` runs before Megatron-Core is imported (its import-time warnings are filtered
then). At the default verbosity each known noisy source is silenced on its own, by logger
name or by the exact warning text, never by a blanket filter: warnings and errors that are
not on this list, and every WARNING or ERROR record of Megatron's loggers, still show.
``logging.verbose=true`` / ``-v`` (training) or ``--verbose`` (tools) shows everything. Imports nothing heavy.

Known noise (megatron-core 0.16, torch 2.13):
  * TE / Apex fallback UserWarnings emitted when megatron.core modules are imported;
  * INFO records of ``megatron.core.*``: the DDP and optimizer config dumps, "Params for
    bucket" (every parameter name), the dataset builder's split and index messages;
  * "Unable to save <Mock>Dataset indexes because path_to_cache is None": synthetic data has
    nothing to cache;
  * "The .grad attribute of a Tensor that is not a leaf Tensor": megatron-core 0.16's
    DistributedOptimizer.zero_grad reads ``.grad`` of its fp32 parameter shards, which are
    views (Megatron's own comment there: "throws grad-access warning"); fp32 runs only;
  * torch's FutureWarnings that ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` and
    torch.distributed.checkpoint's ``load_state_dict``, which Megatron calls, are deprecated.
"""
from __future__ import annotations

import logging
import re
import warnings

from splitllama.launch_env import rank as launch_rank

NOISY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions"),
)
QUIET_LOGGERS = ("megatron.core",)  # INFO and below hidden; WARNING and above shown
_MOCK_INDEX_WARNING = re.compile(r"Unable to save \w*Mock\w* indexes because path_to_cache is None")


class _DropMockIndexWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _MOCK_INDEX_WARNING.search(record.getMessage())


def setup(verbose: bool = False) -> None:
    """Configure logging for a run; call before Megatron-Core is imported."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SplitLlama's own INFO lines ("resumed from ...") once, from rank 0; warnings from every rank
    logging.getLogger("splitllama").setLevel(logging.INFO if launch_rank() == 0 else logging.WARNING)
    datasets_log = logging.getLogger("megatron.core.datasets.gpt_dataset")
    for f in [f for f in datasets_log.filters if isinstance(f, _DropMockIndexWarning)]:
        datasets_log.removeFilter(f)
    quiet = {(category, message) for category, message in NOISY_WARNINGS}
    warnings.filters[:] = [f for f in warnings.filters  # undo an earlier setup (idempotent)
                           if not (f[0] == "ignore" and f[1] is not None and (f[2], f[1].pattern) in quiet)]
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    if verbose:
        return
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    datasets_log.addFilter(_DropMockIndexWarning())
