"""Engine checkpoints for `--resume`: DeepSpeed's state plus where the run is (`TrainState`), written atomically.

    output_dir/checkpoints/step_40/   DeepSpeed engine state (weights, optimizer, scheduler) + TrainState
    output_dir/checkpoints/latest     names the newest complete checkpoint

Every rank writes under a temporary tag; once all have finished, rank 0 renames the folder into place, then
replaces `latest` atomically, then removes all but the newest `--keep_checkpoints`. A kill at any moment
leaves `latest` naming a complete checkpoint (or no `latest` at all).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass

import torch

from model_utils.checkpoint.names import LATEST_FILE
from model_utils.checkpoint.zero import weights_only_loads
from model_utils.distributed import rank
from training.arguments import TrainConfig
from training.errors import TrainingError

CHECKPOINT_PREFIX = "step_"
TEMPORARY_PREFIX = ".incomplete_"


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done_in_epoch: int = 0  # micro-batches of this epoch already trained (per rank)
    pairs_seen: int = 0  # over all ranks
    # What the epoch order depends on; a resumed run must match it, or `batches_done_in_epoch` would point
    # into a different order (pairs trained twice or never). "" in checkpoints from before it was recorded.
    data_order: str = ""


def checkpoint_tags(checkpoint_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (folders still being written carry a temporary name)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    tags = [name for name in os.listdir(checkpoint_dir) if name.startswith(CHECKPOINT_PREFIX)]
    return sorted(tags, key=lambda tag: int(tag[len(CHECKPOINT_PREFIX) :]))


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


def save_checkpoint(engine, state: TrainState, config: TrainConfig) -> None:
    """DeepSpeed engine state + our `TrainState`, written so a crash never leaves a half checkpoint as latest.
    Collective: every rank must call it."""
    tag = f"{CHECKPOINT_PREFIX}{state.global_step}"
    temporary_tag = f"{TEMPORARY_PREFIX}{tag}"
    engine.save_checkpoint(
        config.checkpoint_dir,
        tag=temporary_tag,
        save_latest=False,
        client_state={"train_state": dataclasses.asdict(state)},
    )
    barrier()
    if rank() == 0:
        final = os.path.join(config.checkpoint_dir, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(os.path.join(config.checkpoint_dir, temporary_tag), final)
        write_atomically(os.path.join(config.checkpoint_dir, LATEST_FILE), tag)
        for old in checkpoint_tags(config.checkpoint_dir)[: -config.keep_checkpoints]:
            shutil.rmtree(os.path.join(config.checkpoint_dir, old), ignore_errors=True)
        for name in os.listdir(config.checkpoint_dir):
            if name.startswith(TEMPORARY_PREFIX):  # left by a run killed while saving
                shutil.rmtree(os.path.join(config.checkpoint_dir, name), ignore_errors=True)
    barrier()


def load_latest_checkpoint(engine, config: TrainConfig) -> TrainState | None:
    """Restore the checkpoint `latest` names (always a complete one); None when there is none yet."""
    latest = os.path.join(config.checkpoint_dir, LATEST_FILE)
    if not os.path.isfile(latest):
        return None
    with open(latest, encoding="utf-8") as file:
        tag = file.read().strip()
    if not os.path.isdir(os.path.join(config.checkpoint_dir, tag)):
        raise TrainingError(f"{latest} names {tag!r}, which is not in {config.checkpoint_dir}")
    with weights_only_loads():  # a checkpoint from elsewhere must not run code on load
        path, client_state = engine.load_checkpoint(config.checkpoint_dir, tag=tag)
    if path is None or "train_state" not in (client_state or {}):
        raise TrainingError(
            f"{os.path.join(config.checkpoint_dir, tag)}: not a complete rewardspeed checkpoint"
        )
    return TrainState(**client_state["train_state"])
