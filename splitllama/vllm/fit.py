"""Does a tensor-parallel size fit both blocks of an export? Checked when vLLM builds its config (pure, no vLLM import).

:func:`register` (``splitllama.vllm``) puts :class:`SplitLlamaConfigCheck` into vLLM's per-architecture config hook
table, which ``VllmConfig.__post_init__`` consults (``try_verify_and_update_config``) in the process that creates the
engine, before any worker starts or any memory is allocated. So ``LLM(model=EXPORT, tensor_parallel_size=4)``
on a block that TP=4 does not split raises one :class:`TensorParallelSizeError` in about a second instead of failing after engine
start-up inside worker tracebacks. The model's constructor runs the same check again (other vLLM versions).
"""
from __future__ import annotations


class TensorParallelSizeError(RuntimeError):
    """``tensor_parallel_size`` does not fit a block. Not a ``ValueError`` on purpose: vLLM's config is a pydantic
    dataclass, and pydantic rewraps a ``ValueError`` raised in ``__post_init__`` into a multi-line
    ``ValidationError``; this one reaches the caller unchanged."""


def _block_problems(name: str, cfg: dict, tp: int) -> list[str]:
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    problems = []
    if heads % tp:
        problems.append(f"num_attention_heads={heads} is not divisible by {tp}")
    if kv % tp and tp % kv:  # vLLM splits KV heads or replicates them; neither works for these two numbers
        problems.append(f"num_key_value_heads={kv} neither divides nor is divisible by {tp}")
    if int(cfg["intermediate_size"]) % tp:
        problems.append(f"intermediate_size={cfg['intermediate_size']} is not divisible by {tp}")
    return [f"{name} block: {p}" for p in problems]


def tensor_parallel_problems(hf_config, tp: int) -> list[str]:
    """Every reason why ``tensor_parallel_size=tp`` cannot split the export's blocks and adapter (empty: it fits)."""
    lower, upper = dict(hf_config.config8b), dict(hf_config.config70b)
    problems = _block_problems("lower (config8b)", lower, tp) + _block_problems("upper (config70b)", upper, tp)
    h_lo, h_up = int(lower["hidden_size"]), int(upper["hidden_size"])
    # mlp=false: RowParallelLinear splits its input (lower width); mlp=true: Column (upper) -> Row (upper).
    width, what = (h_up, "upper hidden_size") if hf_config.mlp else (h_lo, "lower hidden_size")
    if width % tp:
        problems.append(f"adapter (mlp={bool(hf_config.mlp)}): {what}={width} is not divisible by {tp}")
    return problems


def check_tensor_parallel(hf_config, tp: int) -> None:
    """Raise one :class:`TensorParallelSizeError` naming each block, value and the TP size when ``tp`` does not fit."""
    problems = tensor_parallel_problems(hf_config, tp)
    if problems:
        raise TensorParallelSizeError(f"tensor_parallel_size={tp} does not fit this SplitLlama export: " + "; ".join(problems))


class SplitLlamaConfigCheck:
    """vLLM's per-architecture config hook (the ``verify_and_update_config`` protocol of
    ``vllm.model_executor.models.config.MODELS_CONFIG_MAP``): refuses a TP size that does not fit, changes nothing."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        """Called by ``ModelConfig`` before the parallel config exists: nothing to check yet."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_tensor_parallel(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)
