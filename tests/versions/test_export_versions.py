"""One SplitLlama export (LM and critic) loaded by the transformers versions setup.py admits: its floor 5.5.3
(installed by .ci/verl_venv.sh beside the veRL venv, run with that venv's python), 5.10 (the veRL venv),
5.19 (the vLLM venv, .ci/vllm_venv.sh) and 5.24 (the main venv, the newest admitted).

``hf_worker.py`` runs in each venv (remote code only); its float32 logits / values of a padded batch and of the
same documents packed into one row (position ids restarting, no mask, no cache: veRL's remove-padding input)
equal a float64 reference computed here: max |diff| / max |ref| <= 2e-5 (as the TP parity tests).
A venv that is not configured skips (SPLITLLAMA_VERL_PYTHON / SPLITLLAMA_VLLM_PYTHON), or fails when
SPLITLLAMA_REQUIRE_VERL=1 / SPLITLLAMA_REQUIRE_VLLM=1 (CI).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests import sidevenv
from splitllama.hf.build import (
    critic_from_causal_lm,
    save_pretrained_with_code,
    split_from_llamas,
    tiny_llama_configs,
    tiny_llama_from_config,
)

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("hf_worker.py")
TOL = 2e-5
# (venv name, env var of its python, CI's "require" variable, default path, transformers series, marks)
VENVS = [
    ("main", None, None, None, "5.24.", []),
    ("floor", "SPLITLLAMA_VERL_PYTHON", "SPLITLLAMA_REQUIRE_VERL", ".venv-verl", "5.5.3", [pytest.mark.verl]),
    ("vllm", "SPLITLLAMA_VLLM_PYTHON", "SPLITLLAMA_REQUIRE_VLLM", ".venv-vllm", "5.19.", [pytest.mark.vllm]),
    ("verl", "SPLITLLAMA_VERL_PYTHON", "SPLITLLAMA_REQUIRE_VERL", ".venv-verl", "5.10.", [pytest.mark.verl]),
]
pytestmark = pytest.mark.slow


def _python(var, require, default) -> str:
    return sys.executable if var is None else sidevenv.python(var, require, default)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("versions")
    lo, up = tiny_llama_configs()
    up.update(num_attention_heads=4, num_key_value_heads=1, head_dim=32)  # blocks differ in width, heads, KV heads
    lm = split_from_llamas(tiny_llama_from_config(lo, 0), tiny_llama_from_config(up, 1), 2, 3, mlp=True, seed=3)
    critic = critic_from_causal_lm(lm, init="normal", seed=5)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 512, (n,), generator=g) for n in (7, 3, 10)]
    inputs = {"ids": torch.randint(3, 512, (3, 12), generator=g), "packed_ids": torch.cat(docs)[None],
              "packed_pos": torch.cat([torch.arange(len(d)) for d in docs])[None]}
    save_file(inputs, str(tmp / "inputs.safetensors"))
    lm, critic = lm.double(), critic.double()
    with torch.no_grad():
        ref = {"logits": lm(input_ids=inputs["ids"], use_cache=False).logits,
               "values": critic(input_ids=inputs["ids"]).logits,
               "packed_logits": torch.cat([lm(input_ids=d[None], use_cache=False).logits for d in docs], 1),
               "packed_values": torch.cat([critic(input_ids=d[None]).logits for d in docs], 1)}
    dirs = save_pretrained_with_code(lm.float(), tmp / "lm"), save_pretrained_with_code(critic.float(), tmp / "critic")
    return tmp, dirs, ref


@pytest.mark.parametrize("name,var,require,default,series",
                         [pytest.param(*v[:5], marks=v[5], id=v[0]) for v in VENVS])
def test_export_loads_and_matches_float64(export, name, var, require, default, series):
    python = _python(var, require, default)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if name == "floor":
        floor = Path(python).parents[1] / "transformers-5.5.3"
        if not floor.is_dir():
            pytest.fail(f"no {floor} (bash .ci/verl_venv.sh installs it)")
        env["PYTHONPATH"] = str(floor)
    tmp, (lm_dir, critic_dir), ref = export
    out = tmp / f"{name}.safetensors"
    proc = subprocess.run([python, str(WORKER), str(lm_dir), str(critic_dir), str(tmp / "inputs.safetensors"),
                           str(out)], capture_output=True, text=True, timeout=600, cwd=str(tmp),
                          env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    with safe_open(str(out), "pt") as f:
        version = f.metadata()["transformers"]
    assert version.startswith(series), (name, version)
    got = load_file(str(out))
    for key, want in ref.items():
        rel = ((got[key].double() - want).abs().max() / want.abs().max()).item()
        assert got[key].shape == want.shape and rel <= TOL, (name, version, key, rel)
