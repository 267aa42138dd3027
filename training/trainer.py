"""The training loop and evaluation.

`train()` is one function in a fixed order per optimizer step: next epoch if due -> forward and backward each
micro-batch -> step bookkeeping -> log -> evaluate -> checkpoint -> stop if a signal asked (`preemption.py`).
`run_evaluation()` is its own function. The data order is a pure function of (seed, epoch, pairs per step)
(`sampling.py`), and the position in it (optimizer steps done in the epoch) is part of every checkpoint
(`checkpointing.py`), so a resumed run trains exactly the pairs an uninterrupted run would have, on any number
of processes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from model_utils.distributed import rank, world_size
from model_utils.hf_reward_model import last_token_index
from training.arguments import TrainConfig
from training.checkpointing import TrainState, checkpoint_tags, save_checkpoint
from training.data.store import ExampleStore
from training.errors import TrainingError
from training.layout import BatchLayout, Collator, batch_rewards
from training.losses import center_rewards_loss, comparison_loss, divergence_span_loss, plackett_luce_loss
from training.metrics import MetricsLog, RewardTable, mean_over_ranks, ranking_statistics
from training.preemption import stop_if_requested
from training.sampling import epoch_batches


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def compute_loss(
    engine, batch: dict[str, torch.Tensor], layout: BatchLayout, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, whether each comparison's better response won `[C]`) for a batch collated for `layout`."""
    if config.loss_type == "dschat":  # DeepSpeed-Chat's span loss reads per-token values of padded pairs
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        values = engine(input_ids, attention_mask, return_values=True).float()
        end = last_token_index(attention_mask, config.num_padding_at_beginning)
        rewards = values.gather(-1, end.unsqueeze(-1)).squeeze(-1)
        loss = divergence_span_loss(
            *values.chunk(2), *input_ids.chunk(2), *attention_mask.chunk(2), config.num_padding_at_beginning
        )
    else:
        rewards = batch_rewards(engine, batch, layout)
        if config.listwise_loss == "plackett_luce":
            loss = plackett_luce_loss(rewards, batch["better"], batch["worse"], batch["response_group"])
        else:
            loss = comparison_loss(
                rewards, batch["better"], batch["worse"], batch["comparison_group"], batch.get("margin")
            )
    better, worse = rewards[batch["better"]], rewards[batch["worse"]]
    if config.center_rewards_coefficient > 0:
        loss = loss + config.center_rewards_coefficient * center_rewards_loss(
            better, worse, batch["comparison_group"]
        )
    return loss, (better > worse).detach()


def check_finite(what: str, value: torch.Tensor, step: int, config: TrainConfig) -> None:
    """Stop every rank with a message naming the step when `value` is NaN/Inf on any rank (collective).

    Checked before the optimizer step, so a non-finite loss never reaches the weights; checkpoints on disk
    are those of earlier steps and stay as they are.
    """
    # On the value's device: NCCL reduces only GPU tensors.
    bad = torch.tensor([0.0 if torch.isfinite(value.detach()).all() else 1.0], device=value.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad)
    if bad.item() > 0:
        latest = checkpoint_tags(config.checkpoint_dir)
        kept = f"the last checkpoint ({latest[-1]}) is intact" if latest else "no checkpoint was written"
        raise TrainingError(f"non-finite {what} at step {step}; stopped before updating the weights; {kept}")


@torch.no_grad()
def run_evaluation(
    engine, eval_examples: Sequence[dict], collator: Collator, layout: BatchLayout, batch_size: int
) -> dict[str, float]:
    """Ranking statistics over the whole eval split (`metrics.ranking_statistics`), every rank scoring an equal
    share.

    Every rank runs the same number of forward passes (a short share is topped up with repeats that are
    discarded), as ZeRO-3 gathers parameters collectively.
    """
    ranks, this_rank = world_size(), rank()
    share = math.ceil(len(eval_examples) / ranks)
    mine = list(range(this_rank * share, min(len(eval_examples), (this_rank + 1) * share)))
    num_batches = math.ceil(share / batch_size)
    padded = mine + [0] * (num_batches * batch_size - len(mine))
    was_training = engine.training
    engine.eval()
    table = RewardTable()
    for start in range(0, len(padded), batch_size):
        batch = to_device(
            collator([eval_examples[i] for i in padded[start : start + batch_size]]), engine.device
        )
        real = max(0, min(batch_size, len(mine) - start))  # the examples of this batch that are not repeats
        table.add(
            batch_rewards(engine, batch, layout), {key: value.cpu() for key, value in batch.items()}, real
        )
    if was_training:
        engine.train()
    tables = [table]
    if torch.distributed.is_initialized() and ranks > 1:
        tables = [None] * ranks
        torch.distributed.all_gather_object(tables, table)
    gathered = RewardTable()
    for part in tables:
        gathered.extend(part)
    return ranking_statistics(gathered)


def train(
    engine,
    train_examples: ExampleStore,
    eval_examples: Sequence[dict],
    collator: Collator,
    layout: BatchLayout,
    config: TrainConfig,
    state: TrainState,
    metrics: MetricsLog,
    last_step: int,
) -> TrainState:
    """Train from `state` (fresh, or as a checkpoint left it) until optimizer step `last_step`
    (`sampling.total_steps`); returns the final state. Raises `preemption.RunStopped` after saving when a stop
    signal arrived."""
    ranks, this_rank = world_size(), rank()
    accumulation = config.gradient_accumulation_steps
    # Tokens an example costs unpacked (the prompt once per response); what --group_by_length sorts by.
    lengths = train_examples.sequence_lengths().tolist() if config.group_by_length else None

    def batches_of(epoch: int) -> list[list[int]]:
        return epoch_batches(
            len(train_examples),
            epoch,
            config.seed,
            config.per_device_train_batch_size,
            accumulation,
            this_rank,
            ranks,
            lengths,
        )

    progress = tqdm(
        total=last_step, initial=state.global_step, desc="train", disable=this_rank != 0, dynamic_ncols=True
    )
    # One rank without ZeRO: DeepSpeed's gradient all-reduce would copy every gradient into a flat buffer,
    # "reduce" it over that one rank and copy it back (0.3-1.2 s per step of SmolLM2-135M on 2 shared cores in
    # fp32); the gradients are already the mean over the world, so it is skipped there (`engine.no_sync` skips
    # only that reduction: the bf16 optimizer's fp32 accumulation and the step's clipping still run).
    reduce_gradients = engine.zero_optimization() or ranks > 1
    batches = batches_of(state.epoch)
    engine.train()
    start_time = time.time()
    saved_step = state.global_step  # a resumed run starts from its checkpoint
    while state.global_step < last_step:
        # next epoch, when this one's steps are all done
        if state.steps_done_in_epoch * accumulation == len(batches):
            state.epoch += 1
            state.steps_done_in_epoch = 0
            batches = batches_of(state.epoch)

        # forward and backward each micro-batch; DeepSpeed updates the weights after the last one
        losses, wins, compared = [], 0, 0  # accuracy over the step's comparisons, every micro-batch's
        for micro_step in range(accumulation):
            indices = batches[state.steps_done_in_epoch * accumulation + micro_step]
            batch = to_device(collator([train_examples[i] for i in indices]), engine.device)
            loss, won = compute_loss(engine, batch, layout, config)
            check_finite("loss", loss, state.global_step + 1, config)
            with contextlib.nullcontext() if reduce_gradients else engine.no_sync():
                engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
            wins, compared = wins + won.sum(), compared + won.numel()

        # the step is done
        state.global_step += 1
        state.steps_done_in_epoch += 1
        state.pairs_seen += (
            config.per_device_train_batch_size * accumulation * ranks
        )  # examples: pairs or groups
        gradient_norm = engine.get_global_grad_norm()
        if gradient_norm is not None:
            norm = torch.tensor(float(gradient_norm), device=engine.device)  # NCCL reduces only GPU tensors
            check_finite("gradient norm", norm, state.global_step, config)
        mean_loss = mean_over_ranks(torch.stack(losses).mean())
        progress.update(1)
        progress.set_postfix(loss=f"{mean_loss:.4f}")

        # log, evaluate, checkpoint, stop if a signal asked
        if state.global_step % config.logging_steps == 0 or state.global_step == last_step:
            metrics.write(
                {
                    "step": state.global_step,
                    "loss": mean_loss,
                    "train_accuracy": mean_over_ranks(wins)
                    / mean_over_ranks(torch.tensor(float(compared), device=engine.device)),
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
            results = run_evaluation(
                engine, eval_examples, collator, layout, config.per_device_eval_batch_size
            )
            metrics.write({"step": state.global_step, **{f"eval_{k}": v for k, v in results.items()}})
        if config.save_interval and state.global_step % config.save_interval == 0:
            save_checkpoint(engine, state, config)
            saved_step = state.global_step
        stop_if_requested(engine, state, config, saved_step)
    progress.close()
    return state
