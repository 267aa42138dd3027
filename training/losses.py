"""Reward-model losses as pure functions of rewards (or per-token values) and the batch's comparisons.

bradley_terry      -log sigmoid(r_better - r_worse - margin), per comparison
pairwise_loss      its mean over pairs (TRL's two-line loss)
comparison_loss    all-pairs Bradley-Terry: every comparison of a prompt, each prompt one batch element
plackett_luce_loss the likelihood of each prompt's whole ranking, ties sharing a stage
center_rewards_loss, divergence_span_loss (DeepSpeed-Chat's)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.data.listwise import clears_gap


def bradley_terry(
    better_rewards: torch.Tensor, worse_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """`-log sigmoid(r_better - r_worse - margin)` per comparison `[C]` (margin: Llama-2 style, how much the
    better response must win by)."""
    difference = better_rewards - worse_rewards
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference)


def pairwise_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Bradley-Terry loss averaged over pairs (`[B]` rewards each, optional `[B]` margin).

    >>> round(pairwise_loss(torch.tensor([1.0]), torch.tensor([1.0])).item(), 4)
    0.6931
    """
    return bradley_terry(chosen_rewards, rejected_rewards, margin).mean()


def group_mean(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """`[G]` means of `values` `[C]` per group id `[C]` (ids 0..G-1, each present).

    >>> group_mean(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 1])).tolist()
    [2.0, 5.0]
    """
    groups = int(group.max()) + 1
    sums = torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, group, values)
    return sums / torch.bincount(group, minlength=groups).to(values.dtype)


def comparison_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    group: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """All-pairs Bradley-Terry: the loss of every comparison, averaged within its prompt, then over prompts, so
    a prompt with K responses counts as one batch element however many comparisons it gives (InstructGPT).
    For pairs it is `pairwise_loss`.

    Args:
        rewards: `[N]` rewards of the batch's responses.
        better, worse: `[C]` indices into `rewards` of each comparison's preferred / other response.
        group: `[C]` the example (prompt) of each comparison, 0..G-1.
        margin: `[C]` or None.
    """
    return group_mean(bradley_terry(rewards[better], rewards[worse], margin), group).mean()


def tie_levels(scores: torch.Tensor, min_score_gap: float = 0.0) -> torch.Tensor:
    """Rank level of each score, 0 = best: a score that does not clear the gap (`clears_gap`, the rule that
    makes the data's comparisons) below the best score of its level shares that level (exact ties always do).

    >>> tie_levels(torch.tensor([1.0, 3.0, 2.95, 1.0, 2.0]), min_score_gap=0.1).tolist()
    [2, 0, 0, 2, 1]
    """
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    levels = torch.empty(len(order), dtype=torch.long)
    level, top = -1, None
    for index in order:
        score = float(scores[index])
        if top is None or clears_gap(top, score, min_score_gap):
            level, top = level + 1, score
        levels[index] = level
    return levels


def plackett_luce_loss(
    rewards: torch.Tensor, scores: torch.Tensor, group: torch.Tensor, min_score_gap: float = 0.0
) -> torch.Tensor:
    """Negative log-likelihood of each prompt's ranking under Plackett-Luce, averaged over prompts.

    The responses are ranked by score (`tie_levels`); at each level the tied responses are chosen together from
    those not yet chosen (Breslow's handling of ties): `sum_i(-r_i) + m * logsumexp(r_remaining)` for a level
    of m responses. The last level adds nothing. For a pair it is `-log sigmoid(r_c - r_r)`.

    Args:
        rewards, scores, group: `[N]` each response's reward, score and example.
    """
    losses = []
    for example in torch.unique(group).tolist():
        member = group == example
        example_rewards = rewards[member]
        levels = tie_levels(scores[member].detach().cpu(), min_score_gap).to(rewards.device)
        stages = [
            -example_rewards[levels == level].sum()
            + (levels == level).sum() * torch.logsumexp(example_rewards[levels >= level], dim=0)
            for level in range(int(levels.max()))
        ]
        losses.append(torch.stack(stages).sum())
    return torch.stack(losses).mean()


def center_rewards_loss(better_rewards: torch.Tensor, worse_rewards: torch.Tensor) -> torch.Tensor:
    """`mean((r_better + r_worse)^2)` over comparisons: pulls rewards toward zero mean (TRL's
    `center_rewards_coefficient` term)."""
    return ((better_rewards + worse_rewards) ** 2).mean()


def divergence_span_loss(
    chosen_values: torch.Tensor,
    rejected_values: torch.Tensor,
    chosen_ids: torch.Tensor,
    rejected_ids: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    num_padding_at_beginning: int = 0,
) -> torch.Tensor:
    """DeepSpeed-Chat step 2's loss, vectorised: the pairwise loss averaged over the divergence span.

    For each pair, the span starts at the first position where the two (right-padded) sequences differ and
    ends at the longer sequence's end; the loss is `-log sigmoid(v_c[t] - v_r[t])` averaged over the span, then
    over pairs. Identical sequences use their last position only. Kept for parity with DeepSpeed-Chat.

    Args:
        chosen_values, rejected_values: per-token values `[B, T]`.
        chosen_ids, rejected_ids: `[B, T]`, right padded.
        chosen_mask, rejected_mask: `[B, T]` attention masks.
        num_padding_at_beginning: positions before it never start the span.
    """
    positions = torch.arange(chosen_ids.shape[-1], device=chosen_ids.device)
    chosen_length = chosen_mask.long().sum(-1)
    rejected_length = rejected_mask.long().sum(-1)
    end = torch.maximum(chosen_length, rejected_length)
    differs = (chosen_ids != rejected_ids) & (positions < end.unsqueeze(-1))
    differs &= positions >= num_padding_at_beginning
    has_divergence = differs.any(-1)
    start = torch.where(has_divergence, differs.long().argmax(-1), end - 1)
    span = (positions >= start.unsqueeze(-1)) & (positions < end.unsqueeze(-1))
    per_token = -F.logsigmoid(chosen_values - rejected_values) * span
    return (per_token.sum(-1) / span.sum(-1)).mean()
