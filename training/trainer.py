"""The training loop: step, evaluate, log, checkpoint, resume.

`train()` is one function in a fixed order per optimizer step: micro-steps (forward, backward, engine step),
then log, evaluate, checkpoint, stop. `evaluate()` is its own function. The data order is a pure function of
(seed, epoch, rank), and the position in it is part of every checkpoint, so a resumed run trains exactly the
pairs an uninterrupted run would have trained next.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from model_utils.convert import weights_only_loads
from model_utils.distributed import rank, world_size
from model_utils.reward_model import last_token_index
from training.arguments import TrainConfig
from training.data import PairCollator
from training.evaluate import reward_statistics
from training.losses import center_rewards_loss, divergence_span_loss, pairwise_loss
from training.packing import PackedPairCollator, length_grouped_order, packed_rewards, pair_sequence_lengths

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
Collator = PairCollator | PackedPairCollator


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, ...); the message names the step."""


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


# --- data order --------------------------------------------------------------------------------------------


def epoch_batches(
    num_pairs: int,
    epoch: int,
    seed: int,
    micro_batch_size: int,
    accumulation: int,
    this_rank: int,
    ranks: int,
    lengths: Sequence[int] | None = None,
) -> list[list[int]]:
    """This rank's micro-batches (pair indices) for one epoch; whole optimizer steps only.

    The permutation depends only on (seed, epoch); every rank takes every `ranks`-th pair, so the global
    step sees the same pairs whatever the world size's split. With `lengths` (tokens per pair;
    `--group_by_length`) the permutation is `length_grouped_order` with groups of `micro_batch_size * ranks`:
    the micro-batches that run side by side on the ranks hold pairs of similar length (less padding in plain
    batches, similar work per rank in packed ones), the groups still in random order.

    >>> epoch_batches(10, 0, 0, micro_batch_size=2, accumulation=1, this_rank=0, ranks=2)  # doctest: +SKIP
    [[4, 7], [0, 2]]
    """
    if lengths is not None:
        order = length_grouped_order(lengths, micro_batch_size * ranks, seed=seed * 1000 + epoch)
    else:
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(num_pairs, generator=generator).tolist()
    pairs_per_step = micro_batch_size * accumulation * ranks
    usable = (num_pairs // pairs_per_step) * pairs_per_step
    mine = order[:usable][this_rank::ranks]
    return [mine[start : start + micro_batch_size] for start in range(0, len(mine), micro_batch_size)]


def steps_per_epoch(num_pairs: int, config: TrainConfig, ranks: int) -> int:
    return num_pairs // (config.per_device_train_batch_size * config.gradient_accumulation_steps * ranks)


def total_steps(num_pairs: int, config: TrainConfig, ranks: int) -> int:
    per_epoch = steps_per_epoch(num_pairs, config, ranks)
    if per_epoch == 0:
        raise TrainingError(
            f"{num_pairs} training pairs are fewer than one optimizer step needs "
            f"({config.per_device_train_batch_size} x {config.gradient_accumulation_steps} x {ranks} ranks)"
        )
    steps = per_epoch * config.num_train_epochs
    return min(steps, config.max_steps) if config.max_steps > 0 else steps


# --- loss --------------------------------------------------------------------------------------------------


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def batch_rewards(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen `[B]`, rejected `[B]`) rewards of a plain (`PairCollator`) or packed batch, one forward pass."""
    if "chosen_index" in batch:
        chosen_rewards, rejected_rewards = packed_rewards(engine, batch)
        return chosen_rewards.float(), rejected_rewards.float()
    rewards = engine(batch["input_ids"], batch["attention_mask"]).float()
    chosen_rewards, rejected_rewards = rewards.chunk(2)
    return chosen_rewards, rejected_rewards


def compute_loss(
    engine, batch: dict[str, torch.Tensor], config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen rewards `[B]`, rejected rewards `[B]`) for a collated batch (chosen rows first)."""
    if config.loss_type == "pairwise":
        chosen_rewards, rejected_rewards = batch_rewards(engine, batch)
        loss = pairwise_loss(chosen_rewards, rejected_rewards, batch.get("margin"))
    else:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        values = engine(input_ids, attention_mask, return_values=True).float()
        end = last_token_index(attention_mask, config.num_padding_at_beginning)
        rewards = values.gather(-1, end.unsqueeze(-1)).squeeze(-1)
        chosen_rewards, rejected_rewards = rewards.chunk(2)
        chosen_values, rejected_values = values.chunk(2)
        chosen_ids, rejected_ids = input_ids.chunk(2)
        chosen_mask, rejected_mask = attention_mask.chunk(2)
        loss = divergence_span_loss(
            chosen_values,
            rejected_values,
            chosen_ids,
            rejected_ids,
            chosen_mask,
            rejected_mask,
            config.num_padding_at_beginning,
        )
    if config.center_rewards_coefficient > 0:
        loss = loss + config.center_rewards_coefficient * center_rewards_loss(
            chosen_rewards, rejected_rewards
        )
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
        value /= world_size()
    return value.item()


def check_finite(what: str, value: torch.Tensor, step: int, config: TrainConfig) -> None:
    """Stop every rank with a message naming the step when `value` is NaN/Inf on any rank (collective).

    Checked before the optimizer step, so a non-finite loss never reaches the weights; checkpoints on disk
    are those of earlier steps and stay as they are.
    """
    bad = torch.tensor([0.0 if torch.isfinite(value.detach()).all() else 1.0])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad)
    if bad.item() > 0:
        latest = checkpoint_tags(config.checkpoint_dir)
        kept = f"the last checkpoint ({latest[-1]}) is intact" if latest else "no checkpoint was written"
        raise TrainingError(f"non-finite {what} at step {step}; stopped before updating the weights; {kept}")


# --- evaluation --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(engine, eval_pairs: Sequence[dict], collator: Collator, batch_size: int) -> dict[str, float]:
    """Reward statistics over the whole eval split, every rank scoring an equal share.

    Every rank runs the same number of forward passes (a short share is topped up with repeats that are
    discarded), as ZeRO-3 gathers parameters collectively.
    """
    ranks, this_rank = world_size(), rank()
    share = math.ceil(len(eval_pairs) / ranks)
    mine = list(range(this_rank * share, min(len(eval_pairs), (this_rank + 1) * share)))
    num_batches = math.ceil(share / batch_size)
    padded = mine + [0] * (num_batches * batch_size - len(mine))
    was_training = engine.training
    engine.eval()
    chosen, rejected = [], []
    for start in range(0, len(padded), batch_size):
        batch = to_device(
            collator([eval_pairs[i] for i in padded[start : start + batch_size]]), engine.device
        )
        chosen_rewards, rejected_rewards = batch_rewards(engine, batch)
        chosen += chosen_rewards.cpu().tolist()
        rejected += rejected_rewards.cpu().tolist()
    if was_training:
        engine.train()
    local = (chosen[: len(mine)], rejected[: len(mine)])
    if torch.distributed.is_initialized() and ranks > 1:
        gathered = [None] * ranks
        torch.distributed.all_gather_object(gathered, local)
    else:
        gathered = [local]
    all_chosen = torch.tensor([value for part in gathered for value in part[0]])
    all_rejected = torch.tensor([value for part in gathered for value in part[1]])
    return reward_statistics(all_chosen, all_rejected)


# --- logging -----------------------------------------------------------------------------------------------


def _record_step(line: str) -> float:
    """The step of a metrics line; a line torn by a kill mid-write counts as after any resume point."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """`metrics.jsonl` (one JSON object per line, rank 0) and, when asked, TensorBoard."""

    def __init__(self, config: TrainConfig, resumed_step: int | None) -> None:
        self.enabled = rank() == 0
        self.path = config.metrics_path
        self.writer = None
        if not self.enabled:
            return
        os.makedirs(config.output_dir, exist_ok=True)
        if resumed_step is None:
            open(self.path, "w").close()
        else:
            self._keep_records_up_to(resumed_step)
        if config.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                config.tensorboard_path or os.path.join(config.output_dir, "tensorboard")
            )

    def _keep_records_up_to(self, step: int) -> None:
        """After a resume, drop records of steps the interrupted run did past its last checkpoint."""
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as file:
            records = [line for line in file if _record_step(line) <= step]
        with open(self.path, "w", encoding="utf-8") as file:
            file.writelines(records)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- checkpoints -------------------------------------------------------------------------------------------


LATEST_FILE = "latest"
TEMPORARY_PREFIX = ".incomplete_"


def checkpoint_tags(checkpoint_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (folders still being written carry a temporary name)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    tags = [name for name in os.listdir(checkpoint_dir) if name.startswith(CHECKPOINT_PREFIX)]
    return sorted(tags, key=lambda tag: int(tag[len(CHECKPOINT_PREFIX) :]))


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def save_checkpoint(engine, state: TrainState, config: TrainConfig) -> None:
    """DeepSpeed engine state + our `TrainState`, written so a crash never leaves a half checkpoint as latest.

    Every rank writes under a temporary tag; once all have finished, rank 0 renames the folder into place,
    then replaces `latest` atomically, then removes all but the newest `keep_checkpoints`. A kill at any
    moment leaves `latest` naming a complete checkpoint (or no `latest` at all). Collective.
    """
    tag = f"{CHECKPOINT_PREFIX}{state.global_step}"
    temporary_tag = f"{TEMPORARY_PREFIX}{tag}"
    engine.save_checkpoint(
        config.checkpoint_dir,
        tag=temporary_tag,
        save_latest=False,
        client_state={"train_state": dataclasses.asdict(state)},
    )
    _barrier()
    if rank() == 0:
        final = os.path.join(config.checkpoint_dir, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(os.path.join(config.checkpoint_dir, temporary_tag), final)
        _write_atomically(os.path.join(config.checkpoint_dir, LATEST_FILE), tag)
        for old in checkpoint_tags(config.checkpoint_dir)[: -config.keep_checkpoints]:
            shutil.rmtree(os.path.join(config.checkpoint_dir, old), ignore_errors=True)
        for name in os.listdir(config.checkpoint_dir):
            if name.startswith(TEMPORARY_PREFIX):  # left by a run killed while saving
                shutil.rmtree(os.path.join(config.checkpoint_dir, name), ignore_errors=True)
    _barrier()


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


# --- the loop ----------------------------------------------------------------------------------------------


def train(
    engine,
    train_pairs: Sequence[dict],
    eval_pairs: Sequence[dict],
    collator: Collator,
    config: TrainConfig,
    state: TrainState,
    metrics: MetricsLog,
    on_eval: Callable[[dict[str, float]], None] | None = None,
) -> TrainState:
    """Train until `max_steps` or the last epoch; returns the final state."""
    ranks, this_rank = world_size(), rank()
    accumulation = config.gradient_accumulation_steps
    last_step = total_steps(len(train_pairs), config, ranks)
    data_order = (
        f"pairs={len(train_pairs)} seed={config.seed} micro_batch={config.per_device_train_batch_size} "
        f"accumulation={accumulation} ranks={ranks} group_by_length={config.group_by_length}"
    )
    if state.data_order and state.data_order != data_order:
        raise TrainingError(
            f"cannot resume: the checkpoint's data order ({state.data_order}) differs from this run's "
            f"({data_order}); resume with the same data and flags, or start a new --output_dir"
        )
    state.data_order = data_order
    progress = tqdm(
        total=last_step, initial=state.global_step, desc="train", disable=this_rank != 0, dynamic_ncols=True
    )
    # Tokens a pair costs unpacked (the prompt twice); what --group_by_length sorts by.
    lengths = (
        [sum(pair_sequence_lengths(pair, share_prompt=False)) for pair in train_pairs]
        if config.group_by_length
        else None
    )
    engine.train()
    start_time = time.time()
    while state.global_step < last_step:
        batches = epoch_batches(
            len(train_pairs),
            state.epoch,
            config.seed,
            config.per_device_train_batch_size,
            accumulation,
            this_rank,
            ranks,
            lengths,
        )
        step_loss, step_accuracy = [], []
        while state.batches_done_in_epoch < len(batches) and state.global_step < last_step:
            indices = batches[state.batches_done_in_epoch]
            batch = to_device(collator([train_pairs[i] for i in indices]), engine.device)
            loss, chosen_rewards, rejected_rewards = compute_loss(engine, batch, config)
            check_finite("loss", loss, state.global_step + 1, config)
            engine.backward(loss)
            engine.step()
            state.batches_done_in_epoch += 1
            step_loss.append(loss.detach())
            step_accuracy.append((chosen_rewards > rejected_rewards).float().mean())
            if state.batches_done_in_epoch % accumulation:
                continue
            state.global_step += 1
            state.pairs_seen += config.per_device_train_batch_size * accumulation * ranks
            mean_loss = mean_over_ranks(torch.stack(step_loss).mean())
            mean_accuracy = mean_over_ranks(torch.stack(step_accuracy).mean())
            step_loss, step_accuracy = [], []
            gradient_norm = engine.get_global_grad_norm()
            if gradient_norm is not None:
                check_finite("gradient norm", torch.tensor(float(gradient_norm)), state.global_step, config)
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            if state.global_step % config.logging_steps == 0 or state.global_step == last_step:
                metrics.write(
                    {
                        "step": state.global_step,
                        "loss": mean_loss,
                        "train_accuracy": mean_accuracy,
                        "lr": engine.get_lr()[0],
                        "epoch": state.epoch,
                        "pairs_seen": state.pairs_seen,
                        "elapsed_s": round(time.time() - start_time, 3),
                    }
                )
            if (
                config.eval_interval
                and state.global_step % config.eval_interval == 0
                and state.global_step < last_step
            ):
                results = evaluate(engine, eval_pairs, collator, config.per_device_eval_batch_size)
                metrics.write({"step": state.global_step, **{f"eval_{k}": v for k, v in results.items()}})
                if on_eval:
                    on_eval(results)
            if config.save_interval and state.global_step % config.save_interval == 0:
                save_checkpoint(engine, state, config)
        if state.batches_done_in_epoch >= len(batches):
            state.epoch += 1
            state.batches_done_in_epoch = 0
    progress.close()
    return state
