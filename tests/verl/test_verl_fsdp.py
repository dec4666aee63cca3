"""veRL 0.9.1 trains SplitLlama: its own FSDP2 ``TrainingWorker`` (unmodified) as actor and as critic, on CPU.

Here (main venv): a tiny checkpoint trained by ``pretrain_splitllama.py`` (3 iterations, mlp adapter), made a
critic by ``convert_checkpoint.py lm-to-critic`` (normal value head), both exported by ``export-hf --tokenizer``
(a small HF tokenizer: veRL's ``HFModelConfig`` loads the tokenizer from the model path), and a rollout batch in
veRL's padded layout (left-padded prompts, right-padded responses).
There (the veRL venv, .ci/verl_venv.sh; ``worker.py`` under torchrun, gloo, 1 and 2 processes):
``HFModelConfig(path, trust_remote_code=True)``, remove-padding on, veRL's default attention request
(flash_attention_2, which the export turns into sdpa without flash-attn), fp32 parameters and compute:
- actor: ``infer_batch`` log-probs of the responses equal a float64 transformers forward of each unpadded sequence
  (this venv, 5.24) within 1e-5 absolute; one ``ppo_loss`` step has a finite loss, grad norm > 0 and moves
  every parameter; the tensors ``get_per_tensor_param()`` streams to a rollout carry exactly the export's names and
  shapes (kept in ``<tmp>/verl_run_p{P}/actor_stream_names.json``; the test prints the path);
- critic: ``infer_batch`` values equal ``AutoModelForTokenClassification`` (float64) within 1e-5 with a non-zero
  value head; one ``value_loss`` step, finite, grad norm > 0, the head moved.

Needs the veRL venv: SPLITLLAMA_VERL_PYTHON (default .venv-verl/bin/python). Without it the tests skip, or fail
when SPLITLLAMA_REQUIRE_VERL=1 (CI), so a venv that did not build cannot pass silently.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests import sidevenv
from splitllama.convert.cli import main as convert
from tests import apprun

pytestmark = [pytest.mark.verl, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
VOCAB, TOL = 512, 1e-5
PROMPT_LENS, RESPONSE_LENS = [6, 4, 5, 3], [5, 3, 4, 2]  # 4 sequences: 2 per rank at 2 processes


def _tokenizer(path: Path) -> Path:
    """A word-level HF tokenizer with the tiny model's vocabulary (t0 .. t511), saved as a directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0",
                            unk_token="t0").save_pretrained(path)
    return path


def _batch(path: Path) -> dict[str, torch.Tensor]:
    """veRL's padded rollout batch: input_ids = [left-padded prompt | right-padded response]."""
    g = torch.Generator().manual_seed(0)
    b, p, r = len(PROMPT_LENS), max(PROMPT_LENS), max(RESPONSE_LENS)
    mask = torch.zeros(b, p + r, dtype=torch.long)
    for i, (pl, rl) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        mask[i, p - pl: p + rl] = 1
    ids = torch.randint(3, VOCAB, (b, p + r), generator=g) * mask
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
             "response_mask": mask[:, p:].clone(), "advantages": torch.randn(b, r, generator=g),
             "returns": torch.randn(b, r, generator=g), "values": torch.randn(b, r, generator=g)}
    save_file(batch, str(path))
    return batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    python = sidevenv.verl_python()
    tmp = tmp_path_factory.mktemp("verl")
    ckpt, critic_ckpt = tmp / "ckpt", tmp / "critic_ckpt"
    apprun.run(1, ["model.mlp=true", "train.train_iters=3", "optimizer.lr_warmup_iters=1",
                   f"checkpoint.save={ckpt}"], timeout=600)
    assert convert(["lm-to-critic", "--ckpt", str(ckpt), "--out", str(critic_ckpt), "--value-head-init", "normal",
                    "--seed", "5", "--no-progress"]) == 0
    tok = _tokenizer(tmp / "tokenizer")
    for src, out in ((ckpt, tmp / "actor"), (critic_ckpt, tmp / "critic")):
        assert convert(["export-hf", "--ckpt", str(src), "--out", str(out), "--tokenizer", str(tok),
                        "--no-progress"]) == 0
    return python, tmp, _batch(tmp / "batch.safetensors")


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def run(request, setup):
    python, tmp, batch = setup
    nproc = request.param
    out = tmp / f"verl_run_p{nproc}"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), VERL_PLATFORM="cpu", VERL_ENGINE_DEVICE="cuda",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER),
           str(tmp / "actor"), str(tmp / "critic"), str(out), str(tmp / "batch.safetensors")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=900)
    assert proc.returncode == 0, f"veRL worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    print(f"veRL TrainingWorker, {nproc} process(es): {time.perf_counter() - t0:.0f} s")
    results = {}
    for mode, key in (("actor", "log_probs"), ("critic", "values")):
        got = torch.zeros(batch["response_mask"].shape, dtype=torch.float64)
        metas = []
        for rank in range(nproc):
            t = load_file(str(out / f"{mode}_rank{rank}.safetensors"))
            got[t["rows"]] = t[key].double()
            metas.append(json.loads((out / f"{mode}_rank{rank}.json").read_text()))
        results[mode] = got, metas
    return nproc, tmp, batch, out, results


def _reference(model, batch, kind: str) -> torch.Tensor:
    """Per sequence, unpadded, float64: log p(response token t | tokens before t), or (veRL's critic convention)
    the value at the token before each response token, the state the response token is chosen in."""
    r = batch["response_mask"].shape[1]
    ref = torch.zeros(batch["response_mask"].shape, dtype=torch.float64)
    for i in range(len(batch["input_ids"])):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        n = int(batch["response_mask"][i].sum())
        with torch.no_grad():
            out = model(input_ids=ids[None], use_cache=False).logits[0]
        if kind == "actor":
            lp = torch.log_softmax(out, -1)[:-1].gather(1, ids[1:, None])[:, 0]
            ref[i, :n] = lp[-n:]
        else:
            ref[i, :n] = out[-n - 1:-1, 0]
    assert ref.shape[1] == r
    return ref


def _export_shapes(export: Path) -> dict[str, list[int]]:
    shapes = {}
    for file in sorted(export.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            shapes.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def _check_step(metas, changed_must_include: list[str]):
    for meta in metas:
        assert meta["verl"] == "0.9.1" and meta["transformers"].startswith("5.10."), meta
        assert meta["attn_implementation"] == "sdpa"  # veRL asked for flash_attention_2; no flash-attn here
        assert math.isfinite(meta["loss"]) and meta["grad_norm"] > 0, meta
        assert set(changed_must_include) <= set(meta["changed"]), meta["changed"]


def test_actor_log_probs_and_ppo_step(run):
    from transformers import AutoModelForCausalLM

    nproc, tmp, batch, out, results = run
    got, metas = results["actor"]
    assert all(m["world_size"] == nproc for m in metas)
    model = AutoModelForCausalLM.from_pretrained(tmp / "actor", trust_remote_code=True, dtype=torch.float64).eval()
    ref = _reference(model, batch, "actor")
    mask = batch["response_mask"].bool()
    assert (got - ref)[mask].abs().max() <= TOL, (got - ref)[mask].abs().max()
    assert (got[~mask] == 0).all() and ref[mask].abs().min() > 0
    _check_step(metas, ["lm_head.weight", "model.adapter_linear_1.weight", "model.layers_first.0.self_attn.q_proj.weight",
                        "model.layers_last.2.mlp.down_proj.weight", "model.embed_tokens.weight"])


def test_actor_streams_the_export_names(run):
    nproc, tmp, _, out, _ = run
    streamed = json.loads((out / "actor_stream_names.json").read_text())
    export = _export_shapes(tmp / "actor")
    print(f"names veRL's actor streams to its rollout ({nproc} process(es)): {out / 'actor_stream_names.json'}")
    assert streamed == export


def test_critic_values_and_value_step(run):
    from transformers import AutoModelForTokenClassification

    nproc, tmp, batch, out, results = run
    got, metas = results["critic"]
    model = AutoModelForTokenClassification.from_pretrained(tmp / "critic", trust_remote_code=True,
                                                            dtype=torch.float64).eval()
    assert model.score.weight.abs().max() > 0, "the value head must be non-zero for the comparison to mean much"
    ref = _reference(model, batch, "critic")
    mask = batch["response_mask"].bool()
    assert (got - ref)[mask].abs().max() <= TOL, (got - ref)[mask].abs().max()
    assert ref[mask].abs().max() > 10 * TOL
    _check_step(metas, ["score.weight", "score.bias", "model.layers_last.2.mlp.down_proj.weight"])
    streamed = json.loads((out / "critic_stream_names.json").read_text())
    assert streamed == _export_shapes(tmp / "critic")
