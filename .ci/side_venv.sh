# Sourced by .ci/vllm_venv.sh and .ci/verl_venv.sh: `side_venv DEFAULT_DIR [DIR]` goes to the repo root,
# sets venv (DIR, else DEFAULT_DIR) and t0, and creates the venv when it has no python yet.
side_venv() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    venv=${2:-$1}
    t0=$SECONDS
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
}
