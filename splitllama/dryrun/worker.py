"""``python -m splitllama.dryrun.worker '{"argv": [...], "world_size": W, "stage": k}'``: resolve
the job of the training command line `argv` for W ranks (as `splitllama.dryrun.run` does),
measure stage k (`splitllama.dryrun.stage`) and print one line ``DRYRUN-JSON {...}``."""
from __future__ import annotations

import json
import sys

def main(spec: str) -> int:
    from splitllama.dryrun.run import dry_run_plan
    from splitllama.dryrun.stage import MARK, measure_stage

    args = json.loads(spec)
    plan = dry_run_plan(args["argv"], int(args["world_size"]))
    result = measure_stage(plan, int(args["stage"]))
    print(MARK + json.dumps(result.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
