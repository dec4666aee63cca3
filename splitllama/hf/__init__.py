"""transformers (HF) implementation of SplitLlama: numerical reference and export format.

Modules: ``configuration_splitllama`` (CustomSplitLLamaConfig), ``modeling_splitllama``
(CustomSplitLLamaForCausalLM), ``build`` (split_from_llamas, save_pretrained_with_code, tiny configs).
The first two are self-contained so they can be shipped with checkpoints for ``trust_remote_code``.
"""
