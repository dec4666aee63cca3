"""vLLM support: a native vLLM model for ``CustomSplitLLamaForCausalLM`` exports (optional extra ``vllm``).

Installing splitllama registers :func:`register` under vLLM's ``vllm.general_plugins`` entry point group, which
vLLM calls in every process it starts (engine core and each worker). Then an HF export serves as is::

    from vllm import LLM
    llm = LLM(model=EXPORT_DIR)          # no trust_remote_code needed

Rollout weight sync into a running engine: :mod:`splitllama.vllm.sync` (``WeightSync``). A tensor-parallel size
that does not fit a block is refused when vLLM builds its config (:mod:`splitllama.vllm.fit`).

Nothing here is imported by the rest of splitllama, and importing this package does not import vLLM.
"""

from __future__ import annotations

ARCHITECTURE = "CustomSplitLLamaForCausalLM"
MODEL_TYPE = "custom_split_llama"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the config class and the model class.

    The config goes through transformers' public ``AutoConfig.register``; transformers then resolves the export's
    ``model_type`` locally, so vLLM loads it with ``trust_remote_code=False`` (the copied code files are unused).
    The model is registered lazily (``"module:Class"``) so this runs without importing vLLM's model layers.
    """
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from splitllama.hf.configuration_splitllama import CustomSplitLLamaConfig

    AutoConfig.register(MODEL_TYPE, CustomSplitLLamaConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "splitllama.vllm.model:SplitLlamaForCausalLM")
    _register_config_check()


def _register_config_check() -> None:
    """Refuse a tensor-parallel size that does not fit a block when vLLM builds its config (before any worker).

    vLLM (0.32.0, the tested version) looks architectures up in ``MODELS_CONFIG_MAP`` from
    ``VllmConfig.__post_init__``; it has no public registration call for it, so this adds the entry when the table
    exists and otherwise leaves the model constructor's check (the same one, later) as the only one.
    """
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except ImportError:
        return
    from .fit import SplitLlamaConfigCheck

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, SplitLlamaConfigCheck)


__all__ = ["ARCHITECTURE", "MODEL_TYPE", "register"]
