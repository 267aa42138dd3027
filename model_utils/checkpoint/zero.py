"""ZeRO-3 partitioned parameters, and DeepSpeed engine checkpoints read weights-only.

DeepSpeed is imported inside the functions that need it: a model without partitioned parameters never
imports it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
from collections.abc import Iterator

import torch
from torch import nn

from model_utils.checkpoint.errors import CheckpointError, one_line
from model_utils.checkpoint.names import LATEST_FILE, MODEL_STATES_PATTERN

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def is_partitioned(parameter: torch.Tensor) -> bool:
    """Whether ZeRO-3 holds only a shard of this parameter on this rank."""
    return hasattr(parameter, "ds_id")


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


@torch.no_grad()
def copy_into_parameter(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """`parameter.copy_(value)`, gathering a partitioned parameter: rank 0's value is broadcast on release.
    Collective for partitioned parameters."""
    if not is_partitioned(parameter):
        parameter.copy_(value.to(parameter.dtype))
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            parameter.copy_(value.to(parameter.dtype))


@torch.no_grad()
def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unpartitioned) state dict on rank 0, `None` on other ranks; collective under ZeRO-3.

    Parameters are gathered one at a time so peak memory stays at one full tensor beyond rank 0's copy.
    Every tensor is cloned to CPU, so nothing in the result is empty or 0-sized.
    """
    keep = is_rank0()
    persistent = set(model.state_dict().keys())
    state_dict: dict[str, torch.Tensor] = {}
    for name, parameter in model.named_parameters():
        gathered = contextlib.nullcontext()
        if is_partitioned(parameter):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([parameter])
        with gathered:
            if keep:
                state_dict[name] = parameter.detach().cpu().clone()
    if not keep:
        return None
    for name, buffer in model.named_buffers():
        if name in persistent:
            state_dict[name] = buffer.detach().cpu().clone()
    return state_dict


def deepspeed_checkpoint_globals() -> list[type]:
    """The non-tensor classes DeepSpeed pickles into its `*_optim_states.pt` files (plain data, no behaviour)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every `torch.load` uses the restricted (weights-only) unpickler, even DeepSpeed's own calls.

    `deepspeed.utils.zero_to_fp32` calls `torch.load(..., weights_only=False)`, which would run any code a
    crafted checkpoint file names. torch's `TORCH_FORCE_WEIGHTS_ONLY_LOAD` overrides that per call; the few
    DeepSpeed classes a real checkpoint holds are allowed by name.
    """
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def zero_checkpoint_location(path: str) -> tuple[str, str | None] | None:
    """`(checkpoint_dir, tag)` when `path` is a DeepSpeed checkpoint folder or one of its tag folders."""
    if os.path.isfile(os.path.join(path, LATEST_FILE)):
        return path, None
    if glob.glob(os.path.join(path, MODEL_STATES_PATTERN)):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    return None


def read_stage0_checkpoint(checkpoint_dir: str, tag: str | None) -> dict[str, torch.Tensor] | None:
    """The full module state of a ZeRO stage 0 checkpoint (which `zero_to_fp32` cannot read); None otherwise."""
    if tag is None:
        with open(os.path.join(checkpoint_dir, LATEST_FILE), encoding="utf-8") as latest:
            tag = latest.read().strip()
    tag_dir = os.path.join(checkpoint_dir, tag)
    if glob.glob(os.path.join(tag_dir, "*optim_states.pt")):
        return None  # ZeRO 1-3: the fp32 weights live in the partitioned optimizer states
    model_states = sorted(glob.glob(os.path.join(tag_dir, MODEL_STATES_PATTERN)))
    if not model_states:
        raise FileNotFoundError(f"{tag_dir}: no {MODEL_STATES_PATTERN} files")
    state = torch.load(model_states[0], map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise CheckpointError(f"{model_states[0]}: no module state in this DeepSpeed checkpoint")
    return {
        name: tensor.float() if tensor.is_floating_point() else tensor
        for name, tensor in state["module"].items()
    }


def read_zero_checkpoint(checkpoint_dir: str, tag: str | None) -> dict[str, torch.Tensor]:
    """fp32 weights consolidated from a DeepSpeed checkpoint (any ZeRO stage), under the module's names.

    Its pickled files are read with the weights-only unpickler (`weights_only_loads`): one that needs
    anything else (e.g. a `__reduce__` that runs code) is refused as a `CheckpointError`.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with weights_only_loads():
            state_dict = read_stage0_checkpoint(checkpoint_dir, tag)
            if state_dict is None:
                state_dict = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as error:
        raise CheckpointError(
            f"{checkpoint_dir}: cannot read the DeepSpeed checkpoint ({one_line(error)})"
        ) from error
    return {name: tensor.detach().cpu().clone() for name, tensor in state_dict.items()}
