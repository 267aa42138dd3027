"""Engine checkpoints for `--resume`: DeepSpeed's state plus where the run is (`TrainState`), written atomically.

    output_dir/checkpoints/step_40/                   DeepSpeed engine state (weights, optimizer, scheduler)
    output_dir/checkpoints/step_40/train_state.json   TrainState + the world size and ZeRO stage that wrote it
    output_dir/checkpoints/latest                     names the newest complete checkpoint

Every rank writes under a temporary tag; once all have finished, rank 0 writes `train_state.json` into it,
renames the folder into place, replaces `latest` atomically, then removes this run's older checkpoints beyond
`--keep_checkpoints` (never the one `latest` names, never another run's). A kill at any moment leaves `latest`
naming a complete checkpoint (or no `latest` at all).

`training/resume.py` restores them, on any world size and ZeRO stage: the position in the data is global
(optimizer steps done in the epoch), so the run continues with the pairs an uninterrupted run would train next.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass

import torch

from model_utils.checkpoint.names import LATEST_FILE
from model_utils.distributed import rank
from training.arguments import TrainConfig
from training.errors import ConfigError

CHECKPOINT_PREFIX = "step_"
TEMPORARY_PREFIX = ".incomplete_"
STATE_FILE = "train_state.json"

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0
    # Optimizer steps of this epoch already trained: a global position (step s trains pairs s*G..(s+1)*G-1 of
    # the epoch's order, `sampling.epoch_order`), the same whatever the split over ranks and micro-batches.
    steps_done_in_epoch: int = 0
    pairs_seen: int = 0  # over all ranks
    # What the epoch order depends on (`sampling.data_order`); a resumed run must match it, or
    # `steps_done_in_epoch` would point into a different order (pairs trained twice or never).
    data_order: str = ""
    # The run that wrote the checkpoint: a fresh run draws a new one, --resume keeps it. Pruning removes only
    # checkpoints of the run that writes, so another run's checkpoints in the folder are never lost.
    run_id: str = ""

    @classmethod
    def from_saved(cls, saved: dict) -> TrainState:
        """A saved state; checkpoints from before the position was global counted micro-batches per rank."""
        saved = dict(saved)
        if "batches_done_in_epoch" in saved:
            # Its data_order reads "pairs= seed= micro_batch= accumulation= ranks= group_by_length=".
            old = dict(part.split("=", 1) for part in saved.get("data_order", "").split())
            accumulation = int(old.get("accumulation", 1))
            saved["steps_done_in_epoch"] = saved.pop("batches_done_in_epoch") // accumulation
            if old and old["group_by_length"] == "False":  # ungrouped, the order was the same as now
                step_pairs = int(old["micro_batch"]) * accumulation * int(old["ranks"])
                saved["data_order"] = (
                    f"pairs={old['pairs']} seed={old['seed']} pairs_per_step={step_pairs} group_by_length=False"
                )
        return cls(**saved)


def new_run_id() -> str:
    """A fresh run's id, drawn on rank 0 and shared, so every rank records the same. Collective."""
    run_id = [uuid.uuid4().hex[:12]]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(run_id, src=0)
    return run_id[0]


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk and what its `train_state.json` says."""

    path: str
    # None: written before train_state.json existed (the state is then in DeepSpeed's files).
    state: TrainState | None
    # The world size and ZeRO stage that wrote it (None: not recorded).
    world_size: int | None
    zero_stage: int | None

    @property
    def tag(self) -> str:
        return os.path.basename(self.path)


def checkpoint_tags(checkpoint_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (folders still being written carry a temporary name)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    tags = [
        name
        for name in os.listdir(checkpoint_dir)
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(tags, key=lambda tag: int(tag[len(CHECKPOINT_PREFIX) :]))


def read_checkpoint(path: str) -> Checkpoint:
    """What `path/train_state.json` records (a checkpoint without one is from an earlier rewardspeed).

    Raises:
        ConfigError: the file is there but unreadable.
    """
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        return Checkpoint(path, None, None, None)
    try:
        with open(state_path, encoding="utf-8") as file:
            saved = json.load(file)
        return Checkpoint(
            path, TrainState.from_saved(saved["train_state"]), saved["world_size"], saved["zero_stage"]
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{state_path}: not a rewardspeed checkpoint state ({error})") from None


def latest_checkpoint(config: TrainConfig) -> Checkpoint | None:
    """The checkpoint `latest` names; None when there is no `latest` yet.

    Raises:
        ConfigError: `latest` names a folder that is not there (it never should; a hand-edited folder).
    """
    latest = os.path.join(config.checkpoint_dir, LATEST_FILE)
    if not os.path.isfile(latest):
        return None
    with open(latest, encoding="utf-8") as file:
        tag = file.read().strip()
    path = os.path.join(config.checkpoint_dir, tag)
    if not os.path.isdir(path):
        present = ", ".join(checkpoint_tags(config.checkpoint_dir)) or "none"
        raise ConfigError(
            f"{latest} names {tag!r}, which is not in {config.checkpoint_dir} (checkpoints there: {present}); "
            "write the tag of a complete checkpoint into it, or start over with --overwrite_output_dir"
        )
    return read_checkpoint(path)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def write_atomically(path: str, text: str) -> None:
    """Write `text` to a temporary file, flush it to disk, and rename it over `path`."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def checkpoint_run_id(path: str) -> str | None:
    """The run that wrote a checkpoint (None: unknown, e.g. from an earlier rewardspeed or unreadable)."""
    try:
        checkpoint = read_checkpoint(path)
    except ConfigError:
        return None
    return checkpoint.state.run_id if checkpoint.state else None


def prune_checkpoints(checkpoint_dir: str, newest: TrainState, keep: int) -> None:
    """Keep the checkpoint just written and this run's `keep - 1` newest before it; remove this run's others.

    Checkpoints of other runs (another run id, or none recorded) are never removed; nor is the newest, which
    `latest` names. This run's checkpoints past the newest step are from an interrupted attempt this resumed run
    is replacing.
    """
    newest_tag = f"{CHECKPOINT_PREFIX}{newest.global_step}"
    own = [tag for tag in checkpoint_tags(checkpoint_dir) if tag != newest_tag]
    own = [tag for tag in own if checkpoint_run_id(os.path.join(checkpoint_dir, tag)) == newest.run_id]
    earlier = [tag for tag in own if int(tag[len(CHECKPOINT_PREFIX) :]) < newest.global_step]
    kept = set(earlier[len(earlier) - (keep - 1) :]) if keep > 1 else set()
    for tag in own:
        if tag not in kept:
            shutil.rmtree(os.path.join(checkpoint_dir, tag), ignore_errors=True)


def save_checkpoint(engine, state: TrainState, config: TrainConfig) -> str:
    """DeepSpeed engine state + our `TrainState`, written so a crash never leaves a half checkpoint as latest.
    Collective: every rank must call it. Returns the tag written."""
    tag = f"{CHECKPOINT_PREFIX}{state.global_step}"
    temporary_tag = f"{TEMPORARY_PREFIX}{tag}"
    engine.save_checkpoint(config.checkpoint_dir, tag=temporary_tag, save_latest=False)
    barrier()
    if rank() == 0:
        temporary = os.path.join(config.checkpoint_dir, temporary_tag)
        record = {
            "train_state": dataclasses.asdict(state),
            "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "zero_stage": engine.zero_optimization_stage(),
        }
        write_atomically(os.path.join(temporary, STATE_FILE), json.dumps(record, indent=1))
        final = os.path.join(config.checkpoint_dir, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        write_atomically(os.path.join(config.checkpoint_dir, LATEST_FILE), tag)
        prune_checkpoints(config.checkpoint_dir, state, config.keep_checkpoints)
        for name in os.listdir(config.checkpoint_dir):
            if name.startswith(TEMPORARY_PREFIX):  # left by a run killed while saving
                shutil.rmtree(os.path.join(config.checkpoint_dir, name), ignore_errors=True)
    barrier()
    return tag


def remove_checkpoints(config: TrainConfig) -> None:
    """`--overwrite_output_dir`: remove an earlier run's checkpoints before this one starts. Collective."""
    if rank() == 0 and os.path.isdir(config.checkpoint_dir):
        logger.warning("--overwrite_output_dir: removing %s", config.checkpoint_dir)
        shutil.rmtree(config.checkpoint_dir)
    barrier()
