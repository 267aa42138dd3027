"""DeepSpeed configs: the JSON files in `ds_configs/` are data; code fills only the batch and precision fields.

ds_config = build_ds_config(config, world_size=8)
# train_batch_size == train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size, checked
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from training.arguments import ConfigError, TrainConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")
AUTO = "auto"


def default_config_path(zero_stage: int, offload: bool) -> str:
    """`ds_configs/zero<stage>[_offload].json` (offload exists for stages 2 and 3)."""
    if offload and zero_stage not in (2, 3):
        raise ConfigError(f"--offload needs --zero_stage 2 or 3 (got {zero_stage})")
    name = f"zero{zero_stage}{'_offload' if offload else ''}.json"
    return os.path.join(CONFIG_DIR, name)


def resolve_dtype(dtype: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, else fp32; fp16 is refused on CPU with the reason."""
    if dtype == AUTO:
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if dtype == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "--dtype fp16 is not supported on CPU (DeepSpeed's CPU accelerator has no fp16 training); "
            "use --dtype bf16 or --dtype fp32"
        )
    return dtype


def resolve_attention(attn_implementation: str) -> str | None:
    """`--attn_implementation` for the factory: None for `auto` (transformers' default); the GPU kernels are refused
    on a machine without CUDA, with the reason, before anything loads."""
    if attn_implementation == AUTO:
        return None
    if attn_implementation.startswith(("flex", "flash")) and not torch.cuda.is_available():
        why = (
            "FlexAttention has no backward pass on CPU"
            if attn_implementation.startswith("flex")
            else "it needs CUDA"
        )
        raise ConfigError(
            f"--attn_implementation {attn_implementation}: not on this machine ({why}); use sdpa or eager"
        )
    return attn_implementation


def torch_dtype(dtype: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _fill(section: dict[str, Any], key: str, value: Any) -> None:
    if section.get(key, AUTO) == AUTO:
        section[key] = value


def build_ds_config(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """Load the JSON config and fill its 'auto' batch and precision fields from the flags.

    Raises:
        ValueError: the file's explicit batch fields disagree with the flags, or its stage with --zero_stage.
    """
    path = config.deepspeed_config or default_config_path(config.zero_stage, config.offload)
    with open(path, encoding="utf-8") as file:
        ds_config = json.load(file)
    stage = ds_config.setdefault("zero_optimization", {}).get("stage", 0)
    if config.deepspeed_config is None and stage != config.zero_stage:
        raise ConfigError(
            f"{path}: zero_optimization.stage is {stage}, --zero_stage says {config.zero_stage}"
        )
    _fill(ds_config, "train_micro_batch_size_per_gpu", config.per_device_train_batch_size)
    _fill(ds_config, "gradient_accumulation_steps", config.gradient_accumulation_steps)
    global_batch = (
        ds_config["train_micro_batch_size_per_gpu"] * ds_config["gradient_accumulation_steps"] * world_size
    )
    _fill(ds_config, "train_batch_size", global_batch)
    checks = {
        "train_micro_batch_size_per_gpu": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.per_device_train_batch_size
        * config.gradient_accumulation_steps
        * world_size,
    }
    for key, expected in checks.items():
        if ds_config[key] != expected:
            raise ConfigError(
                f"{path}: {key} is {ds_config[key]}, but the flags give {expected} (micro batch "
                f"{config.per_device_train_batch_size} x accumulation {config.gradient_accumulation_steps} x "
                f"world size {world_size}); set it to 'auto' or match the flags"
            )
    dtype = resolve_dtype(config.dtype)
    ds_config.setdefault("bf16", {})["enabled"] = dtype == "bf16"
    ds_config.setdefault("fp16", {})["enabled"] = dtype == "fp16"
    return ds_config


def inference_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The same config for an engine without an optimizer: ZeRO 1/2 shard only optimizer state -> stage 0."""
    stage = ds_config["zero_optimization"].get("stage", 0)
    zero = {**ds_config["zero_optimization"], "stage": 3 if stage == 3 else 0}
    zero.pop("offload_optimizer", None)
    return {**ds_config, "zero_optimization": zero}
