"""SplitLlama model on Megatron-Core."""
