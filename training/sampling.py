"""The order pairs are trained in: one seeded permutation per epoch, optionally grouped by length.

The order depends only on (seed, epoch) and, with `--group_by_length`, the pair lengths; every rank takes every
`ranks`-th pair of it, so an optimizer step sees the same pairs however they are split over ranks, micro-batches
and accumulation. A run's `DataOrder` is saved with each checkpoint: a resumed run must have the same one, or
its position in the epoch would point into a different order (pairs trained twice or never).
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
    of `group_size`). Use it in place of the epoch's random permutation (with `group_size = micro_batch_size
    * ranks` when ranks take every `ranks`-th index, so the micro-batches the ranks run side by side are one
    group): similar lengths pad little and give the ranks similar work, the groups still come in random order,
    and the same seed gives the same order.

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


def total_steps(num_pairs: int, config: TrainConfig, ranks: int) -> int:
    """Optimizer steps of a run: whole steps per epoch times epochs, capped by `--max_steps`.

    Raises:
        ConfigError: fewer pairs than one optimizer step needs.
    """
    micro_batch, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    per_epoch = num_pairs // (micro_batch * accumulation * ranks)
    if per_epoch == 0:
        raise ConfigError(
            f"{num_pairs} training pairs are fewer than one optimizer step needs (--per_device_train_batch_size "
            f"{micro_batch} x --gradient_accumulation_steps {accumulation} x {ranks} ranks)"
        )
    steps = per_epoch * config.num_train_epochs
    return min(steps, config.max_steps) if config.max_steps > 0 else steps
