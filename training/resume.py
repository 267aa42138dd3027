"""`--resume`: restore a checkpoint on any world size and ZeRO stage (a job handed back fewer or more nodes).

On the world size and ZeRO stage that wrote it, DeepSpeed's own loader restores a checkpoint. That loader needs
them for a ZeRO 1-3 checkpoint, whose optimizer state is partitioned over the ranks; for another world size or
stage (1, 2 and 3 in any direction):

1. rank 0 converts the checkpoint once with DeepSpeed's universal-checkpoint converter
   (`deepspeed.checkpoint.ds_to_universal`) into `<checkpoint>/universal/zero/<parameter name>/` holding that
   parameter's full fp32 weight and Adam moments (written under a temporary name, renamed when complete, reused
   by a later resume);
2. every rank copies its part of each parameter into the running engine through DeepSpeed's
   `safe_set_full_fp32_param` / `safe_set_full_optimizer_state`, then the module weights from the fp32 masters;
   the learning-rate scheduler and DeepSpeed's step counters come from the checkpoint's model-states file, the
   weights of frozen layers from the checkpoint's module weights.

DeepSpeed's own universal loading (`"checkpoint": {"load_universal": true}`) is not used: with DeepSpeed 0.19.8 on
CPU it failed between ZeRO 1/2 and 3 (bare AssertionErrors), and under ZeRO-3 it gave every parameter group the
first group's hyperparameters (weight decay on biases and norms) and one shared step tensor (fused AdamW counts it
up once per group), so later losses drifted.

A ZeRO-0 checkpoint is one file with the full optimizer state: DeepSpeed's own loader resumes it on any world
size. Between ZeRO-0 and ZeRO 1-3 (a different optimizer state layout) the resume is refused with the reason.
The data position is global (`TrainState.steps_done_in_epoch`), so the resumed run trains exactly the pairs
the uninterrupted run would have, split over its own ranks.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from types import SimpleNamespace

import torch

from model_utils.checkpoint.errors import CheckpointError, one_line
from model_utils.checkpoint.zero import is_partitioned, weights_only_loads
from model_utils.distributed import rank, world_size
from training.checkpointing import Checkpoint, TrainState, barrier
from training.errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)

UNIVERSAL_DIR = "universal"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
# What the restore touches inside DeepSpeed's ZeRO optimizers beyond its public `safe_set_*` functions (as in
# DeepSpeed 0.19.8, where it was tested); another version without them is refused with the reason.
ZERO_INTERNALS = {
    1: ("single_partition_of_fp32_groups", "update_lp_params", "_lazy_init_hp_params_optimizer_state"),
    2: ("single_partition_of_fp32_groups", "update_lp_params", "_lazy_init_hp_params_optimizer_state"),
    3: (
        "fp32_partitioned_groups_flat",
        "fp16_partitioned_groups_flat",
        "fp16_partitioned_groups",
        "unflatten",
        "checkpoint_event_prologue",
        "checkpoint_event_epilogue",
    ),
}


def check_topology(checkpoint: Checkpoint, ranks: int, zero_stage: int) -> None:
    """Refuse, before anything loads, a resume that no loader can do: between ZeRO-0 and ZeRO 1-3."""
    if checkpoint.zero_stage is None or (checkpoint.zero_stage == 0) == (zero_stage == 0):
        return
    raise ConfigError(
        f"cannot resume {checkpoint.path} (ZeRO-{checkpoint.zero_stage}, {checkpoint.world_size} processes) "
        f"under ZeRO-{zero_stage}: a ZeRO-0 checkpoint resumes under --zero_stage 0 and a ZeRO 1-3 one under "
        "--zero_stage 1, 2 or 3 (any number of processes either way)"
    )


def needs_resize(engine, checkpoint: Checkpoint) -> bool:
    """Whether `checkpoint` was written by another world size or ZeRO stage than `engine` runs (ZeRO-0 aside)."""
    if checkpoint.world_size is None:  # from before this was recorded: DeepSpeed's own loader, as then
        return False
    stage = engine.zero_optimization_stage()
    check_topology(checkpoint, world_size(), stage)
    return stage != 0 and (checkpoint.world_size, checkpoint.zero_stage) != (world_size(), stage)


def resume_from_checkpoint(engine, checkpoint: Checkpoint) -> TrainState:
    """Restore `checkpoint` into `engine` and return where the run was: DeepSpeed's loader when this world size
    and ZeRO stage (or ZeRO-0 on any world size) wrote it, else `load_resized`. Collective."""
    if needs_resize(engine, checkpoint):
        load_resized(engine, checkpoint)
        return checkpoint.state
    checkpoint_dir, tag = os.path.split(checkpoint.path)
    with weights_only_loads():  # a checkpoint from elsewhere must not run code on load
        path, client_state = engine.load_checkpoint(checkpoint_dir, tag=tag)
    if path is None:
        raise TrainingError(f"{checkpoint.path}: not a complete DeepSpeed checkpoint")
    if checkpoint.state is not None:
        return checkpoint.state
    if "train_state" not in (client_state or {}):
        raise TrainingError(f"{checkpoint.path}: not a complete rewardspeed checkpoint")
    return TrainState.from_saved(client_state["train_state"])


def universal_folder(checkpoint: Checkpoint) -> str:
    """`<checkpoint>/universal`, converted by rank 0 unless an earlier resume did. Collective."""
    folder = os.path.join(checkpoint.path, UNIVERSAL_DIR)
    if rank() == 0 and not os.path.isdir(folder):
        from deepspeed.checkpoint import ds_to_universal

        # The converter also writes `latest_universal` beside its output: keep that inside the temporary folder.
        temporary = os.path.join(checkpoint.path, f".incomplete_{UNIVERSAL_DIR}")
        shutil.rmtree(temporary, ignore_errors=True)
        arguments = SimpleNamespace(
            input_folder=checkpoint.path,
            output_folder=os.path.join(temporary, UNIVERSAL_DIR),
            num_extract_workers=1,  # in this process: no worker pool
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # ZeRO 1/2 checkpoints outside Megatron carry no universal-checkpoint info
        )
        logger.info(
            "%s was written by %d processes under ZeRO-%d: converting it to a universal checkpoint",
            checkpoint.path,
            checkpoint.world_size,
            checkpoint.zero_stage,
        )
        try:
            with weights_only_loads():
                ds_to_universal.main(arguments)
        except Exception as error:  # the converter's own errors: asserts, missing files, ...
            raise CheckpointError(
                f"{checkpoint.path}: DeepSpeed's universal-checkpoint conversion failed ({one_line(error)})"
            ) from error
        os.replace(arguments.output_folder, folder)
        shutil.rmtree(temporary, ignore_errors=True)
    barrier()
    return folder


def read_file(path: str):
    """`torch.load`, weights only: tensors, containers and the few DeepSpeed classes `weights_only_loads` allows
    (a checkpoint from elsewhere must not run code)."""
    with weights_only_loads():
        return torch.load(path, map_location="cpu", weights_only=True)


def read_tensor(parameter_dir: str, key: str, shape: torch.Size) -> torch.Tensor:
    """One state (`fp32`, `exp_avg`, `exp_avg_sq`) of one parameter, full and shaped (ZeRO-3 conversions write
    bare flat tensors, ZeRO-1/2 ones `{"param": tensor}`)."""
    path = os.path.join(parameter_dir, f"{key}.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing from the converted checkpoint")
    value = read_file(path)
    value = value["param"] if isinstance(value, dict) else value
    if value.numel() != shape.numel():
        raise CheckpointError(f"{path}: {tuple(value.shape)} does not fit the parameter's {tuple(shape)}")
    return value.reshape(shape).float()


def optimizer_globals(zero_dir: str) -> tuple[torch.Tensor, list[dict]]:
    """(Adam's step count, the saved hyperparameters of each parameter group: lr as the scheduler left it,
    weight decay, betas, ...). A ZeRO-1/2 conversion writes the step per parameter, a ZeRO-3 one in
    `optimizer_state.pt` (groups there, or inside its `optimizer_state_dict`)."""
    saved = read_file(os.path.join(zero_dir, "optimizer_state.pt"))
    inner = saved.get("optimizer_state_dict") or {}
    groups = saved.get("param_groups") or inner.get("param_groups")
    per_parameter = glob.glob(os.path.join(zero_dir, "*", "step.pt"))
    step = read_file(per_parameter[0]) if per_parameter else inner["state"][0]["step"]
    return torch.as_tensor(step, dtype=torch.float32), groups


def model_states(checkpoint: Checkpoint) -> list[dict]:
    """DeepSpeed's model-states files of the checkpoint, in rank order (one under ZeRO 1/2, one per rank under
    ZeRO-3): scheduler, step counters, frozen weights."""
    paths = glob.glob(os.path.join(checkpoint.path, "*model_states.pt"))
    if not paths:
        raise CheckpointError(f"{checkpoint.path}: no DeepSpeed model-states file")
    rank_of = re.compile(r"zero_pp_rank_(\d+)_")
    paths.sort(key=lambda path: int(match[1]) if (match := rank_of.search(os.path.basename(path))) else 0)
    return [read_file(path) for path in paths]


def frozen_weights(states: list[dict]) -> dict[str, torch.Tensor]:
    """Full weights of the parameters the optimizer does not hold (frozen layers), from the module states."""
    first = states[0]
    if first.get("frozen_param_shapes") and "frozen_param_fragments" in first:  # ZeRO-3: a fragment per rank
        return {
            name: torch.cat([state["frozen_param_fragments"][name].flatten() for state in states])[
                : shape.numel()
            ].reshape(shape)
            for name, shape in first["frozen_param_shapes"].items()
        }
    return dict(first.get("module") or {})


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's ZeRO wrapper (its state is keyed by the flat fp32 partitions)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def prepare_optimizer_state(engine, step: torch.Tensor, saved_groups: list[dict], path: str) -> None:
    """Give AdamW the saved group hyperparameters and its state before the first step (torch creates it lazily),
    so that the checkpoint's moments have somewhere to go, and link DeepSpeed's per-parameter views to it (ZeRO
    1/2 link them once, lazily)."""
    optimizer = base_optimizer(engine)
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{path}: {len(saved_groups)} optimizer parameter groups, this run has {len(optimizer.param_groups)}"
        )
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        group.update({key: value for key, value in saved.items() if key != "params"})
    # ZeRO-3 puts a sub-group's flat partition into its group only while stepping it: take the partitions.
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
        flat for group in optimizer.param_groups for flat in group["params"]
    ]
    for flat in flats:
        state = optimizer.state[flat]
        state["step"] = step.clone().to(flat.device)  # its own tensor: fused AdamW counts it up in place
        for key in ADAM_MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    if engine.zero_optimization_stage() in (1, 2):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


@torch.no_grad()
def copy_masters_into_module(engine) -> None:
    """The module weights (the low-precision copy the forward pass uses, partitioned under ZeRO-3) from the fp32
    masters just restored, as DeepSpeed does after loading its own checkpoints."""
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() in (1, 2):
        optimizer.update_lp_params()
        return
    for index, master in enumerate(optimizer.fp32_partitioned_groups_flat):
        if master.numel() > 0:
            optimizer.fp16_partitioned_groups_flat[index].data.copy_(master.data)
        flat = optimizer.fp16_partitioned_groups_flat[index]
        partitions = optimizer.fp16_partitioned_groups[index]
        for partition, value in zip(partitions, optimizer.unflatten(flat, partitions), strict=True):
            partition.data = value.data


@torch.no_grad()
def set_frozen(parameter: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Copy a frozen parameter's full value in (ZeRO-3: gathered and re-partitioned; collective)."""
    if not is_partitioned(parameter):
        parameter.data.copy_(value.to(parameter.dtype).view_as(parameter))
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
        if rank() == 0:
            parameter.data.copy_(value.to(parameter.dtype).view_as(parameter))


def load_resized(engine, checkpoint: Checkpoint) -> None:
    """Restore `checkpoint`, written by another world size or ZeRO stage, into `engine`. Collective.

    Raises:
        CheckpointError: the conversion failed, or the checkpoint's parameters are not this model's.
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    stage = engine.zero_optimization_stage()
    missing_internals = [name for name in ZERO_INTERNALS[stage] if not hasattr(engine.optimizer, name)]
    if missing_internals:
        raise CheckpointError(
            f"{checkpoint.path}: resuming it under ZeRO-{stage} on {world_size()} processes needs DeepSpeed "
            f"internals that deepspeed {deepspeed.__version__} lacks ({', '.join(missing_internals)}; tested with "
            f"0.19.8); resume on {checkpoint.world_size} processes under ZeRO-{checkpoint.zero_stage}"
        )
    zero_dir = os.path.join(universal_folder(checkpoint), "zero")
    states = model_states(checkpoint)
    named = list(engine.module.named_parameters())
    trainable = {name for name, parameter in named if parameter.requires_grad}
    converted = {name for name in os.listdir(zero_dir) if os.path.isdir(os.path.join(zero_dir, name))}
    if not trainable <= converted:
        missing = ", ".join(sorted(trainable - converted)[:8])
        raise CheckpointError(f"{checkpoint.path}: holds no optimizer state for {missing} (another model?)")
    frozen = frozen_weights(states)

    if stage == 3:  # every parameter back to its partition (a forward may have left small ones gathered)
        engine.optimizer.checkpoint_event_prologue()
    prepare_optimizer_state(engine, *optimizer_globals(zero_dir), checkpoint.path)
    for name, parameter in named:
        shape = parameter.ds_shape if is_partitioned(parameter) else parameter.shape
        if not parameter.requires_grad:
            if name in frozen:
                set_frozen(parameter, frozen[name].reshape(shape))
            continue
        parameter_dir = os.path.join(zero_dir, name)
        safe_set_full_fp32_param(parameter, read_tensor(parameter_dir, "fp32", shape))
        for key in ADAM_MOMENTS:
            safe_set_full_optimizer_state(parameter, read_tensor(parameter_dir, key, shape), key)
    copy_masters_into_module(engine)
    if stage == 3:  # as DeepSpeed's loader ends: persistent (always gathered) params from the new values
        engine.optimizer.checkpoint_event_epilogue()

    first = states[0]
    if engine.lr_scheduler is not None and first.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(first["lr_scheduler"])
    engine.global_steps = first["global_steps"]
    engine.global_samples = first["global_samples"]
    engine.skipped_steps = first["skipped_steps"]
    logger.info(
        "restored %s (%d processes, ZeRO-%d) on %d processes under ZeRO-%d",
        checkpoint.path,
        checkpoint.world_size,
        checkpoint.zero_stage,
        world_size(),
        engine.zero_optimization_stage(),
    )
