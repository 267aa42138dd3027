"""Reward-model losses as pure functions of rewards (or per-token values) and the batch's comparisons.

bradley_terry      -log sigmoid(r_better - r_worse - margin), per comparison
pairwise_loss      its mean over pairs (TRL's two-line loss)
comparison_loss    all-pairs Bradley-Terry: every comparison of a prompt, each prompt one batch element
plackett_luce_loss the likelihood of each prompt's ranking, a stage per response its comparisons place above others
center_rewards_loss, divergence_span_loss (DeepSpeed-Chat's)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """Means of `values` `[C]` per group id `[C]`, one per id present, in id order (an example without a
    comparison has no mean, rather than 0/0).

    >>> group_mean(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2])).tolist()
    [2.0, 5.0]
    """
    groups = int(group.max()) + 1
    sums = torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, group, values)
    counts = torch.bincount(group, minlength=groups)
    present = counts > 0
    return sums[present] / counts[present].to(values.dtype)


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


def plackett_luce_loss(
    rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, group: torch.Tensor
) -> torch.Tensor:
    """Negative log-likelihood of each prompt's ranking under Plackett-Luce, summed over the prompt's stages and
    averaged over prompts.

    Each response that a comparison places above another is a stage: it is chosen first from itself and the
    responses its comparisons place below it, `-r_i + logsumexp(r_i, r_worse(i))`. When every two responses are
    compared (a strict ranking) these are Plackett-Luce's stages, each response chosen from the rest of the
    ranking; for a pair, `-log sigmoid(r_c - r_r)`. Two responses no comparison orders (a tie, a gap below
    `--min_score_gap`) enter neither one's stage, as they give `pairs` no comparison. So tied rewards are neither
    pulled together (Breslow's tie rule, which cost accuracy on real data: README) nor apart, and the loss goes to
    0 as the better responses pull ahead. Examples without a comparison are left out.

    Args:
        rewards, group: `[N]` each response's reward and example.
        better, worse: `[C]` indices into `rewards` of each comparison's preferred / other response.
    """
    top = rewards.detach().scatter_reduce(0, better, rewards.detach()[worse], "amax")  # a stable logsumexp
    total = (rewards - top).exp().index_add(0, better, (rewards[worse] - top[better]).exp())
    stages = top + total.log() - rewards  # exactly 0, gradient too, for a response with nothing below it
    groups = int(group.max()) + 1
    sums = torch.zeros(groups, dtype=rewards.dtype, device=rewards.device).index_add(0, group, stages)
    return sums[torch.bincount(group[better], minlength=groups) > 0].mean()


def center_rewards_loss(
    better_rewards: torch.Tensor, worse_rewards: torch.Tensor, group: torch.Tensor
) -> torch.Tensor:
    """`(r_better + r_worse)^2` averaged within each prompt, then over prompts (each prompt one batch element, as
    in `comparison_loss`): pulls rewards toward zero mean; for pairs it is TRL's `center_rewards_coefficient`
    term, `mean((r_c + r_r)^2)`."""
    return group_mean((better_rewards + worse_rewards) ** 2, group).mean()


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
