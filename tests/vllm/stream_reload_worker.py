"""vLLM venv side of tests/vllm/test_stream_reload.py: start an engine on one export, generate,
reload the whole state in ONE `collective_rpc("reload_weights", weights_iterator=...)` call
from tensors streamed off a live TP=2 x PP=2 model (saved to a safetensors file, names in stream
order), generate again. Writes OUT/reload.json: greedy tokens + top-5 logprobs per step, before
and after the reload.

    python stream_reload_worker.py START_EXPORT STREAM.safetensors STREAM.json PROMPTS.json MAX_NEW OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _generate(llm, prompts, max_new):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_new, min_tokens=max_new, detokenize=False, logprobs=5)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
            "top5": [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs]}


def main(argv: list[str]) -> None:
    import os

    # in-process engine: the weights go to the model as they are (the multiprocess executor serialises the
    # (name, tensor) pairs into lists, which reload_weights does not take)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from safetensors.torch import load_file
    from vllm import LLM

    start, stream_file, stream_meta, prompts_file, max_new, out = argv
    prompts, max_new = json.loads(Path(prompts_file).read_text()), int(max_new)
    llm = LLM(model=start, dtype="float32", enforce_eager=True, max_model_len=128, skip_tokenizer_init=True,
              kv_cache_memory_bytes=64 << 20)
    before = _generate(llm, prompts, max_new)
    tensors = load_file(stream_file)
    names = json.loads(Path(stream_meta).read_text())["names"]
    weights = [(n, tensors[n]) for n in names]  # the stream's order; the whole state in one call
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    after = _generate(llm, prompts, max_new)
    Path(out, "reload.json").write_text(json.dumps({"before": before, "after": after, "reloaded": len(weights)}))


if __name__ == "__main__":
    main(sys.argv[1:])
