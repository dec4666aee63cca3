"""SplitLlama: stitched heterogeneous-width LLaMA models on Megatron-Core."""

__version__ = "0.1.0"
