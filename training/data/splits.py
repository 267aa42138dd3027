"""Phase splits: DeepSpeed-Chat's `--data_split` weights and the held-out evaluation rows.

Each source's training rows are shuffled once with `seed`. If the source has no evaluation split of its own
(and no evaluation sources are given), the first `round(eval_fraction * n)` shuffled rows (at least one when the
fraction is positive and n >= 2) are held out for evaluation BEFORE the phase split, so they are never training
rows of any phase. The remaining rows are cut into consecutive portions weighted by `data_split`
(DeepSpeed-Chat `--data_split 2,4,4`: SFT, reward model, RLHF); reward-model training takes portion
`phase_index` (1). Unlike DeepSpeed-Chat the evaluation split is not cut by phase: all of it is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from training.data.records import DataError

# Every training row goes to the reward model; "2,4,4" reproduces DeepSpeed-Chat's three-phase split.
DEFAULT_DATA_SPLIT = "0,1,0"
REWARD_PHASE = 1


def parse_data_split(data_split: str, phase_index: int) -> list[float]:
    """`"2,4,4" -> [2.0, 4.0, 4.0]`, checked to give phase `phase_index` a positive weight."""
    try:
        weights = [float(part) for part in data_split.split(",")]
    except ValueError:
        raise DataError(
            f"data_split must be comma-separated numbers such as '2,4,4', got {data_split!r}"
        ) from None
    if any(not math.isfinite(weight) or weight < 0 for weight in weights):
        raise DataError(f"data_split weights must be non-negative numbers, got {data_split!r}")
    if not 0 <= phase_index < len(weights) or weights[phase_index] == 0:
        raise DataError(f"data_split {data_split!r} gives phase {phase_index} no rows")
    return weights


def held_out_size(num_rows: int, eval_fraction: float) -> int:
    """Rows held out for evaluation: `round(eval_fraction * num_rows)`, at least 1 when that is possible."""
    if eval_fraction <= 0 or num_rows < 2:
        return 0
    return min(max(1, round(eval_fraction * num_rows)), num_rows - 1)


def split_indices(
    num_rows: int, weights: Sequence[float], phase_index: int, seed: int, eval_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of one phase's training portion and of the held-out evaluation rows, both sorted.

    One seeded permutation: its first `held_out_size` rows are the evaluation rows (the same for every phase
    and every `weights`), the rest is cut into consecutive portions proportional to `weights`.
    """
    order = np.random.default_rng(seed).permutation(num_rows)
    num_eval = held_out_size(num_rows, eval_fraction)
    held_out, rest = order[:num_eval], order[num_eval:]
    bounds = np.rint(np.cumsum([0.0, *weights]) / sum(weights) * len(rest)).astype(int)
    bounds[-1] = len(rest)
    return np.sort(rest[bounds[phase_index] : bounds[phase_index + 1]]), np.sort(held_out)
