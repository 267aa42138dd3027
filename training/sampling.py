"""The order pairs are trained in: one seeded permutation per epoch, optionally grouped by length.

The order depends only on (seed, epoch, pairs per optimizer step) and, with `--group_by_length`, the pair lengths;
optimizer step `s` of an epoch trains pairs `order[s * G : (s + 1) * G]` (G pairs per step), every rank taking
every `ranks`-th of them. So a step sees the same pairs however they are split over ranks, micro-batches and
accumulation, and a run may resume on another number of processes. A run's `data_order` (what the order
depends on) is saved with each checkpoint, its position as optimizer steps done in the epoch: a resumed run must
have the same `data_order`, or that position would point into a different order (pairs trained twice or never).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from training.arguments import TrainConfig
from training.errors import ConfigError


def length_grouped_order(
    lengths: Sequence[int], group_size: int, seed: int, megabatch_groups: int = 32
) -> list[int]:
    """A permutation of `range(len(lengths))` whose consecutive `group_size` blocks hold similar lengths.

    As transformers' `LengthGroupedSampler`: shuffle with `seed`, cut into megabatches of
    `group_size * megabatch_groups`, sort each by length (longest first), then shuffle the order of the
    full groups (a megabatch's incomplete last group goes to the end, so every group starts at a multiple
    of `group_size`). Use it in place of the epoch's random permutation (with `group_size` = the pairs of one
    optimizer step: each step is one group, and as ranks take every `ranks`-th index of it, the micro-batches
    the ranks run side by side hold neighbours in length order): similar lengths pad little and give the
    ranks similar work, the groups still come in random order, and the same seed gives the same order.

    >>> order = length_grouped_order([9, 1, 8, 2, 7, 3], group_size=2, seed=0, megabatch_groups=3)
    >>> sorted(order), [sorted([9, 1, 8, 2, 7, 3][i] for i in order[g : g + 2]) for g in (0, 2, 4)]
    ([0, 1, 2, 3, 4, 5], [[8, 9], [1, 2], [3, 7]])
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    megabatch = group_size * megabatch_groups
    groups = []
    for start in range(0, len(order), megabatch):
        chunk = sorted(order[start : start + megabatch], key=lambda i: -lengths[i])
        groups += [chunk[g : g + group_size] for g in range(0, len(chunk), group_size)]
    full = [group for group in groups if len(group) == group_size]
    rng.shuffle(full)
    return [index for group in full + [g for g in groups if len(g) < group_size] for index in group]


def pairs_per_step(config: TrainConfig, ranks: int) -> int:
    """Pairs one optimizer step trains, over all ranks (the global batch)."""
    return config.per_device_train_batch_size * config.gradient_accumulation_steps * ranks


def data_order(num_pairs: int, config: TrainConfig, ranks: int) -> str:
    """What the epoch order depends on; saved with each checkpoint, a resumed run must match it.

    Not the split of a step over ranks, micro-batches and accumulation: that does not change the order.

    >>> data_order(100, TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2), ranks=2)
    'pairs=100 seed=1234 pairs_per_step=16 group_by_length=False'
    """
    return (
        f"pairs={num_pairs} seed={config.seed} pairs_per_step={pairs_per_step(config, ranks)} "
        f"group_by_length={config.group_by_length}"
    )


def check_same_data_order(saved: str, order: str, checkpoint_path: str) -> None:
    """Refuse to resume a checkpoint whose data order differs (its position would point into another order).

    Raises:
        ConfigError: naming both orders.
    """
    if saved and saved != order:
        raise ConfigError(
            f"cannot resume {checkpoint_path}: its data order ({saved}) differs from this run's ({order}); "
            "resume with the same data, seed, pairs per optimizer step and --group_by_length (how a step is split "
            "over processes, micro-batches and accumulation may change), or start over with --overwrite_output_dir"
        )


def epoch_order(
    num_pairs: int, epoch: int, seed: int, step_pairs: int, lengths: Sequence[int] | None = None
) -> list[int]:
    """The epoch's pair order, whole optimizer steps only: step `s` trains `order[s * step_pairs : (s + 1) *
    step_pairs]`. A seeded permutation of (seed, epoch), or with `lengths` (tokens per pair;
    `--group_by_length`) `length_grouped_order` with one optimizer step per group."""
    if lengths is not None:
        order = length_grouped_order(lengths, step_pairs, seed=seed * 1000 + epoch)
    else:
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(num_pairs, generator=generator).tolist()
    return order[: (num_pairs // step_pairs) * step_pairs]


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

    Micro-batch `s * accumulation + k` is micro-step `k` of optimizer step `s`. Every rank takes every
    `ranks`-th pair of `epoch_order`, so step `s` trains the same pairs whatever the split; with `lengths`
    the pairs a step's micro-batches run side by side on the ranks are neighbours in length order.

    >>> epoch_batches(10, 0, 0, micro_batch_size=2, accumulation=1, this_rank=0, ranks=2)  # doctest: +SKIP
    [[4, 7], [0, 2]]
    """
    step_pairs = micro_batch_size * accumulation * ranks
    mine = epoch_order(num_pairs, epoch, seed, step_pairs, lengths)[this_rank::ranks]
    return [mine[start : start + micro_batch_size] for start in range(0, len(mine), micro_batch_size)]


def total_steps(num_pairs: int, config: TrainConfig, ranks: int) -> int:
    """Optimizer steps of a run: whole steps per epoch times epochs, capped by `--max_steps`.

    Raises:
        ConfigError: fewer pairs than one optimizer step needs.
    """
    micro_batch, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    per_epoch = num_pairs // pairs_per_step(config, ranks)
    if per_epoch == 0:
        raise ConfigError(
            f"{num_pairs} training pairs are fewer than one optimizer step needs (--per_device_train_batch_size "
            f"{micro_batch} x --gradient_accumulation_steps {accumulation} x {ranks} ranks)"
        )
    steps = per_epoch * config.num_train_epochs
    return min(steps, config.max_steps) if config.max_steps > 0 else steps
