"""Typed configuration: the one source of defaults."""
from splitllama.config.model import PRESETS, LlamaBlockConfig, ModelConfig
from splitllama.config.parallel import ParallelConfig

__all__ = ["PRESETS", "LlamaBlockConfig", "ModelConfig", "ParallelConfig"]
