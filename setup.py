from setuptools import find_packages, setup

setup(
    name="lrpath_megatron",
    version="0.1.0",
    description="Version updates of GPT models on megatron-core: main path, decaying branches, "
    "LR-triggered data mixing, checkpoint merging, adapters.",
    python_requires=">=3.11",
    packages=find_packages(include=["lrpath_megatron*"]),
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",  # 0.19.x on Python 3.12 (primary), 0.16.1 on 3.11
        "numpy",
        "packaging",
        "sentencepiece",
        "psutil",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "transformers>=5.24",
        "safetensors>=0.8",
        "tokenizers>=0.20",  # Hugging Face tokenizer.json for preprocessing (encode_special_tokens)
        "zstandard>=0.22",  # .zst inputs
        "pyarrow>=14",  # Parquet inputs
    ],
    extras_require={
        # Used when importable, never required: TE layer specs + FP8, apex fused kernels.
        "te": ["transformer-engine[pytorch]"],
        "apex": [],  # NVIDIA apex is not on PyPI; build it from source (see README).
        "test": ["pytest", "hypothesis"],
        # The fast preprocessing backend (--backend fast/auto); without it, auto is the exact backend.
        "fast": ["gigatoken==0.10.0"],
        # Downstream tasks per release (lrpath eval --tasks, plan.evaluate); accelerate: the harness's HFLM.
        "eval": ["lm_eval==0.4.13", "accelerate>=0.26"],
    },
    # The shipped downstream tasks' documents.
    package_data={"lrpath_megatron": ["task_data/*.jsonl"]},
    entry_points={"console_scripts": ["lrpath=lrpath_megatron.cli:main"]},
)
