"""One way for every entry point to report bad input: ONE line ``error: ...`` on stderr, from
rank 0 only, exit status 2 (1 for a full disk); unexpected failures keep their traceback.

    sys.exit(cli_main(main, argv))

What counts as bad input (`input_error_code`): `UsageError` (and `ConversionError`, its
subclass), ValueError (config values, divisibility, ...), a missing / unreadable file
(FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError),
invalid YAML. A full disk (ENOSPC anywhere in the exception chain) is reported as
``error: no space left on device ...`` with status 1. Anything else is a bug or a fault: its traceback is printed (rank 0
first: other ranks wait a moment so that the first traceback on the console is rank 0's).
``SPLITLLAMA_TRACEBACK=1`` prints the traceback of input errors too (debugging).
"""
from __future__ import annotations

import errno
import os
import sys
import time
from typing import Callable, Optional

from splitllama.launch_env import rank as launch_rank

TRACEBACK_ENV = "SPLITLLAMA_TRACEBACK"
EXIT_USAGE = 2
EXIT_DISK_FULL = 1


class UsageError(Exception):
    """Bad input (a config value, a file, an argument); the message names it."""


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC anywhere in the chain (torch's writers re-raise it as RuntimeError text)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "no space left on device" in str(e).lower():
            return True
    return False


def input_error_code(exc: BaseException) -> Optional[int]:
    """The exit status for an input error, or None for an unexpected failure."""
    import yaml

    if is_disk_full(exc):
        return EXIT_DISK_FULL
    if isinstance(exc, (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                        IsADirectoryError, PermissionError, yaml.YAMLError)):
        return EXIT_USAGE
    return None


def one_line(exc: BaseException) -> str:
    """The message of `exc` as one line, naming the file for OS and YAML errors."""
    import yaml

    if is_disk_full(exc) and not isinstance(exc, UsageError):
        where = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
        msg = "no space left on device" + (f" writing {where}" if where else "")
    elif isinstance(exc, OSError) and exc.filename and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        msg = f"{mark.name}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {exc.problem}"
    else:
        msg = str(exc) or type(exc).__name__
        if isinstance(exc, KeyError) and len(exc.args) == 1:
            msg = str(exc.args[0])
    return " ".join(msg.split())


def report(exc: BaseException) -> int:
    """Print `exc` as an input error (rank 0 only) and return its exit status."""
    code = input_error_code(exc)
    assert code is not None
    if launch_rank() == 0:
        if os.environ.get(TRACEBACK_ENV) == "1":
            import traceback

            traceback.print_exception(exc)
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    return code


def cli_main(fn: Callable[..., Optional[int]], *args, **kwargs) -> int:
    """Run an entry point; input errors become one line and an exit status, others re-raise."""
    try:
        return fn(*args, **kwargs) or 0
    except Exception as e:  # noqa: BLE001 - classified below; unexpected ones re-raise
        if input_error_code(e) is None:
            if launch_rank() != 0:
                time.sleep(1.0)  # let rank 0's traceback come first
            raise
        return report(e)
