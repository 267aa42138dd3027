"""What a run reports: reward statistics (training eval and `python -m training.evaluate` alike) and the log.

`metrics.jsonl` holds one JSON object per line: training records `{"step", "loss", "train_accuracy", "lr",
"epoch", "pairs_seen", "elapsed_s"}` and evaluation records `{"step", "eval_accuracy", "eval_chosen_mean", ...}`
(every key of `reward_statistics`, prefixed `eval_`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from model_utils.distributed import rank, world_size
from training.arguments import TrainConfig


def reward_statistics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float | int]:
    """Pairwise accuracy and reward statistics (the training loop's evaluation uses this too).

    Args:
        chosen_rewards: `[N]` rewards of the preferred responses.
        rejected_rewards: `[N]` rewards of the other responses, pair by pair.

    Returns:
        `accuracy` (share of pairs with chosen > rejected; ties count as wrong), `chosen_mean`,
        `rejected_mean`, `margin_mean` (mean of chosen - rejected), `reward_mean` and `reward_std` (over all
        2N rewards, population std), `num_pairs`.

    >>> stats = reward_statistics(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))
    >>> stats["accuracy"], stats["margin_mean"], stats["num_pairs"]
    (0.3333333333333333, 0.0, 3)
    """
    chosen = chosen_rewards.detach().double().flatten().cpu()
    rejected = rejected_rewards.detach().double().flatten().cpu()
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected rewards differ in shape: {chosen.shape} vs {rejected.shape}")
    if chosen.numel() == 0:
        raise ValueError("no pairs to evaluate")
    both = torch.cat([chosen, rejected])
    return {
        "accuracy": (chosen > rejected).double().mean().item(),
        "chosen_mean": chosen.mean().item(),
        "rejected_mean": rejected.mean().item(),
        "margin_mean": (chosen - rejected).mean().item(),
        "reward_mean": both.mean().item(),
        "reward_std": both.std(unbiased=False).item(),
        "num_pairs": chosen.numel(),
    }


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
        value /= world_size()
    return value.item()


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
