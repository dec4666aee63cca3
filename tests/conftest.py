"""Suite-wide: a fast-set test (not slow / distributed / slurm / vllm) that runs past
FAST_TIMEOUT_S fails with its stack (pytest-timeout) instead of holding up the run; the others
keep pytest.ini's ceiling. An explicit ``@pytest.mark.timeout(N)`` or ``--timeout N`` wins."""
import pytest

FAST_TIMEOUT_S = 300  # the slowest fast-set test takes ~20 s alone, ~60 s on a loaded 2-core box
_LONG = ("slow", "distributed", "slurm", "vllm")


def pytest_collection_modifyitems(config, items):
    if config.getoption("timeout", None) is not None:  # --timeout given: it applies to all
        return
    for item in items:
        if item.get_closest_marker("timeout") is None and not any(item.get_closest_marker(m) for m in _LONG):
            item.add_marker(pytest.mark.timeout(FAST_TIMEOUT_S))
