"""The one way a benchmark writes its JSON result: the folder made first, then where it went."""
from __future__ import annotations

import json
import os


def write_result(result: dict, path: str, lead: str = "", **dump_kwargs) -> None:
    """Write `result` to `path` as JSON (``json.dump`` keywords, default ``indent=2``) and print
    ``wrote PATH`` (after `lead`, e.g. a blank line)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, **{"indent": 2, **dump_kwargs})
    print(f"{lead}wrote {path}")
