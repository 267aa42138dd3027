"""Reading a saved reward model and loading it into a (possibly ZeRO-3 partitioned) `RewardModel`.

Weights are read from safetensors when present; pickled `.bin` files are read only with `weights_only=True`.
Missing or unexpected keys, shape mismatches and non-finite values raise `CheckpointError`: nothing is silently
left random.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from model_utils.checkpoint.errors import CheckpointError, one_line
from model_utils.checkpoint.layouts import describe_keys, to_reward_model_names
from model_utils.checkpoint.names import (
    HEAD_NAME,
    HF_HEAD_NAME,
    PYTORCH_FILE,
    PYTORCH_INDEX_FILE,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX_FILE,
)
from model_utils.checkpoint.zero import copy_into_parameter


def read_config(model_name_or_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """`AutoConfig.from_pretrained`, with every failure as a one-line `CheckpointError` naming the folder.

    transformers reports a missing or non-JSON config.json, an unknown `model_type` and invalid field values
    as OSError, ValueError, TypeError or its own validation errors; callers need one type to catch.
    `trust_remote_code` stays False unless asked for: a config.json `auto_map` then never imports code.
    """
    try:
        return AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except Exception as error:  # any of transformers' config errors (see the docstring)
        raise CheckpointError(f"{model_name_or_path}: cannot read its config ({one_line(error)})") from error


def weight_files(path: str) -> list[str]:
    """The weight files of a saved model folder (or the file itself), safetensors first."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or folder")
    for single, index in ((SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE), (PYTORCH_FILE, PYTORCH_INDEX_FILE)):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as index_file:
                    shards = sorted(set(json.load(index_file)["weight_map"].values()))
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
                raise CheckpointError(
                    f"{index_path}: not a weight index (a JSON object with a 'weight_map'): {one_line(error)}"
                ) from None
            if not all(isinstance(shard, str) and os.path.basename(shard) == shard for shard in shards):
                raise CheckpointError(f"{index_path}: shard names must be plain file names in this folder")
            return [os.path.join(path, shard) for shard in shards]
    raise CheckpointError(
        f"{path}: no weights found (looked for {SAFETENSORS_FILE}, {SAFETENSORS_INDEX_FILE}, {PYTORCH_FILE}, "
        f"{PYTORCH_INDEX_FILE})"
    )


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a saved model folder or weight file, on CPU, under their stored names."""
    state_dict: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            if file.endswith(".safetensors"):
                shard = load_file(file, device="cpu")
            else:
                shard = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # corrupt or truncated files: name the file, keep the cause
            raise CheckpointError(f"{file}: cannot read weights ({one_line(error)})") from error
        state_dict.update(shard)
    return state_dict


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The unpartitioned shape (ZeRO-3 keeps it in `ds_shape`)."""
    return getattr(tensor, "ds_shape", tensor.shape)


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise `CheckpointError` naming every missing, unexpected or mis-shaped key and every parameter holding
    NaN or infinity (a corrupt or diverged checkpoint must not load as if it were a model)."""
    persistent = set(model.state_dict().keys())
    expected = {
        name: tensor
        for name, tensor in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
        if name in persistent
    }
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    problems = []
    if HEAD_NAME in missing:
        problems.append(
            f"no value head ({HEAD_NAME}, or {HF_HEAD_NAME} in the transformers layout): "
            "this is not a trained reward model"
        )
    if missing:
        problems.append(f"missing keys: {describe_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {describe_keys(unexpected)}")
    mismatched = [
        f"{name} (checkpoint {tuple(state_dict[name].shape)}, model {tuple(full_shape(tensor))})"
        for name, tensor in expected.items()
        if name in state_dict and tuple(state_dict[name].shape) != tuple(full_shape(tensor))
    ]
    if mismatched:
        problems.append(f"shape mismatches: {describe_keys(mismatched)}")
    non_finite = [
        name
        for name in dict(model.named_parameters())
        if name in state_dict
        and state_dict[name].is_floating_point()
        and not torch.isfinite(state_dict[name]).all()
    ]
    if non_finite:
        problems.append(f"NaN or infinite values in: {describe_keys(non_finite)}")
    if problems:
        raise CheckpointError(f"{source}: cannot load into {type(model).__name__}: " + "; ".join(problems))


@torch.no_grad()
def load_state_dict_into_model(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy a checked state dict into `model`; collective under ZeRO-3 (each partitioned parameter is gathered,
    rank 0's copy written and broadcast on release), so every rank must call it."""
    check_state_dict(model, state_dict, source)
    for name, buffer in model.named_buffers():
        if name in state_dict:
            buffer.copy_(state_dict[name].to(buffer.dtype))
    for name, parameter in model.named_parameters():
        copy_into_parameter(parameter, state_dict[name])


def load_reward_model_weights(reward_model: nn.Module, path: str) -> None:
    """Load a saved reward model (any supported layout) into `reward_model`, failing loudly on key mismatches."""
    state_dict = read_state_dict(path)
    base_model_prefix = getattr(reward_model.backbone, "base_model_prefix", "")
    load_state_dict_into_model(reward_model, to_reward_model_names(state_dict, base_model_prefix), path)
