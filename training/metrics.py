"""What a run reports: reward statistics (training eval and `python -m training.evaluate` alike) and the log.

`metrics.jsonl` holds one JSON object per line: training records `{"step", "loss", "train_accuracy", "lr",
"epoch", "pairs_seen", "elapsed_s"}` and evaluation records `{"step", "eval_accuracy", "eval_chosen_mean", ...}`
(every key of `ranking_statistics`, prefixed `eval_`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from model_utils.distributed import rank, world_size
from training.arguments import TrainConfig


@dataclass
class RewardTable:
    """Rewards of evaluated responses and what to compare, gathered batch by batch (and rank by rank).

    Attributes:
        rewards: `[N]` each response's reward.
        groups: `[N]` the example (prompt) of each response, 0..G-1.
        better, worse: `[C]` indices into the N responses of each comparison (the data's, after the score gap:
            what the rankings below are measured against).
    """

    rewards: list[float] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    better: list[int] = field(default_factory=list)
    worse: list[int] = field(default_factory=list)

    def add(
        self, rewards: torch.Tensor, batch: dict[str, torch.Tensor], num_examples: int | None = None
    ) -> None:
        """Append one batch's rewards (in the batch's response order) and its comparison tensors; only the
        first `num_examples` examples of the batch are kept (the rest were padding repeats)."""
        keep_responses = batch["response_group"] < (num_examples if num_examples is not None else 1 << 62)
        keep_comparisons = batch["comparison_group"] < (num_examples if num_examples is not None else 1 << 62)
        # Responses kept, renumbered after those already in the table.
        new_index = torch.cumsum(keep_responses.long(), 0) - 1 + len(self.rewards)
        group_offset = max(self.groups) + 1 if self.groups else 0
        self.better += new_index[batch["better"][keep_comparisons]].tolist()
        self.worse += new_index[batch["worse"][keep_comparisons]].tolist()
        self.rewards += rewards.detach().float().cpu()[keep_responses].tolist()
        self.groups += (batch["response_group"][keep_responses] + group_offset).tolist()

    def extend(self, other: RewardTable) -> None:
        """Append another table (another rank's), renumbering its responses and groups."""
        response_offset, group_offset = len(self.rewards), (max(self.groups) + 1 if self.groups else 0)
        self.better += [index + response_offset for index in other.better]
        self.worse += [index + response_offset for index in other.worse]
        self.rewards += other.rewards
        self.groups += [group + group_offset for group in other.groups]


def preference_signs(count: int, better: list[int], worse: list[int]) -> torch.Tensor:
    """`[K, K]` +1 where response i is preferred over j by a comparison, -1 the reverse, 0 where no comparison
    says (ties, and pairs within the score gap).

    >>> preference_signs(3, [0, 0], [1, 2]).tolist()
    [[0.0, 1.0, 1.0], [-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]
    """
    signs = torch.zeros(count, count, dtype=torch.double)
    signs[better, worse] = 1.0
    signs[worse, better] = -1.0
    return signs


def kendall_tau_b(rewards: torch.Tensor, preference: torch.Tensor) -> float | None:
    """Kendall's tau-b between rewards and the data's preferences (`preference_signs`; pairs it does not order
    count as tied); 0 when the rewards are all equal (they rank nothing), None when nothing is ordered.

    >>> kendall_tau_b(torch.tensor([3.0, 2.0, 1.0]), preference_signs(3, [0, 0, 1], [1, 2, 2]))
    1.0
    """
    reward_sign = torch.sign(rewards[:, None] - rewards[None, :]).triu(1)
    score_sign = preference.triu(1)
    if not score_sign.any():
        return None
    denominator = math.sqrt(float((reward_sign != 0).sum()) * float((score_sign != 0).sum()))
    return float((reward_sign * score_sign).sum()) / denominator if denominator else 0.0


def ranking_statistics(table: RewardTable) -> dict[str, float | int]:
    """Accuracy, reward statistics and ranking quality of evaluated responses (training eval and
    `python -m training.evaluate` alike).

    Returns:
        `accuracy`: share of comparisons whose better response got the higher reward (ties count as wrong);
        `chosen_mean`, `rejected_mean`, `margin_mean`: over comparisons (better, worse, better - worse);
        `reward_mean`, `reward_std`: over all responses (each once, population std); `num_pairs`: comparisons;
        `num_prompts`: examples; `top1_accuracy`: share of prompts where a best response (one no comparison
        places below another) gets a reward above every other response's (ties count as wrong); `kendall_tau`:
        mean over prompts of Kendall's tau-b between rewards and the comparisons (pairs within the score gap
        count as tied; for a pair +1, -1, or 0 when its rewards tie, which `accuracy` counts as wrong). Both
        measure against the comparisons, as `accuracy` does, so a near-tie within `--min_score_gap` is never a
        miss.
    """
    if not table.better:
        raise ValueError("no pairs (comparisons) to evaluate")
    rewards = torch.tensor(table.rewards, dtype=torch.double)
    groups = torch.tensor(table.groups)
    better, worse = rewards[torch.tensor(table.better)], rewards[torch.tensor(table.worse)]
    members = [(groups == group).nonzero().flatten().tolist() for group in range(int(groups.max()) + 1)]
    comparisons: list[tuple[list[int], list[int]]] = [([], []) for _ in members]
    for first, second in zip(table.better, table.worse, strict=True):
        group = table.groups[first]
        comparisons[group][0].append(first)
        comparisons[group][1].append(second)
    top1, taus = [], []
    for member, (group_better, group_worse) in zip(members, comparisons, strict=True):
        if not group_better:
            continue
        local = {response: index for index, response in enumerate(member)}
        preference = preference_signs(
            len(member), [local[i] for i in group_better], [local[i] for i in group_worse]
        )
        group_rewards = rewards[member]
        best = ~(preference == -1).any(dim=1)  # no comparison places it below another
        top1.append(float(group_rewards[best].max() > group_rewards[~best].max()))
        tau = kendall_tau_b(group_rewards, preference)
        if tau is not None:
            taus.append(tau)
    return {
        "accuracy": (better > worse).double().mean().item(),
        "chosen_mean": better.mean().item(),
        "rejected_mean": worse.mean().item(),
        "margin_mean": (better - worse).mean().item(),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        "num_pairs": better.numel(),
        "num_prompts": len(top1),
        "top1_accuracy": sum(top1) / len(top1),
        "kendall_tau": sum(taus) / len(taus) if taus else float("nan"),
    }


def reward_statistics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float | int]:
    """`ranking_statistics` of pairs given as chosen `[B]` and rejected `[B]` rewards.

    >>> stats = reward_statistics(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))
    >>> stats["accuracy"], stats["margin_mean"], stats["num_pairs"]
    (0.3333333333333333, 0.0, 3)
    """
    chosen, rejected = chosen_rewards.detach().flatten().cpu(), rejected_rewards.detach().flatten().cpu()
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected rewards differ in shape: {chosen.shape} vs {rejected.shape}")
    pairs = len(chosen)
    return ranking_statistics(
        RewardTable(
            rewards=torch.cat([chosen, rejected]).tolist(),
            groups=list(range(pairs)) * 2,
            better=list(range(pairs)),
            worse=list(range(pairs, 2 * pairs)),
        )
    )


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
