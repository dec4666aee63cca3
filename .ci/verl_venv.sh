#!/usr/bin/env bash
# The veRL test venv (separate from .venv: verl 0.9.1 admits transformers >= 5.5.3, < 5.11, != 5.6.0 only).
# verl==0.9.1, its newest admitted transformers (5.10.x), torch 2.13.0+cpu (held by a constraint so that pip
# never swaps in a CUDA build), splitllama (editable, its extra [verl]), then `pip check`.
# Idempotent: an existing venv whose verl imports is kept, only splitllama is (re)installed editable.
# Usage: bash .ci/verl_venv.sh [VENV_DIR]   (default .venv-verl in the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-verl}
t0=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
constraint="$venv/torch-constraint.txt"
echo "torch==2.13.0" > "$constraint"
if ! "$venv/bin/python" -c "import verl" >/dev/null 2>&1; then
    "$venv/bin/pip" install -q torch==2.13.0
    # uvicorn, fastapi: imported by verl.workers.engine_workers (via its rollout utils) but not declared by verl
    "$venv/bin/pip" install -q -c "$constraint" 'verl==0.9.1' 'transformers>=5.10,<5.11' uvicorn fastapi
fi
# The floor of setup.py's transformers range, beside (not in) the venv: tests/versions runs the export on it with
# this venv's python and PYTHONPATH=$venv/transformers-5.5.3 (its other requirements are met by this venv's).
if [ ! -d "$venv/transformers-5.5.3/transformers" ]; then
    "$venv/bin/pip" install -q --no-deps --target "$venv/transformers-5.5.3" 'transformers==5.5.3'
fi
# splitllama itself with the [verl] extra; its other requirements (megatron-core, ...) so that pip check is clean.
"$venv/bin/pip" install -q -c "$constraint" -e '.[verl]'
"$venv/bin/pip" check
"$venv/bin/python" -c "import verl, transformers, torch; print('verl', verl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
echo "== verl venv ready in $((SECONDS - t0)) s"
