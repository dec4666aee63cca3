"""vLLM support: a native vLLM model for ``CustomSplitLLamaForCausalLM`` exports (optional extra ``vllm``).

Installing splitllama registers :func:`register` under vLLM's ``vllm.general_plugins`` entry point group, which
vLLM calls in every process it starts (engine core and each worker). Then an HF export serves as is::

    from vllm import LLM
    llm = LLM(model=EXPORT_DIR)          # no trust_remote_code needed

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


__all__ = ["ARCHITECTURE", "MODEL_TYPE", "register"]
