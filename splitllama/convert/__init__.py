"""HF <-> Megatron-Core weight conversion."""
