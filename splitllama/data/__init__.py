"""SplitLlama data: config, tokenizers, JSONL preprocessing, megatron.core datasets, iterators.

Import the submodules directly (``splitllama.data.datasets`` etc.); this package imports nothing
so that light users (tokenizers, config, preprocessing workers) do not pay for megatron/torch.
"""
