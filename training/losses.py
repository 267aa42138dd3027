"""Reward-model losses as pure functions of rewards (or per-token values) and the batch's comparisons.

bradley_terry      -log sigmoid(r_better - r_worse - margin), per comparison
pairwise_loss      its mean over pairs (TRL's two-line loss)
comparison_loss    all-pairs Bradley-Terry: every comparison of a prompt, each prompt one batch element
plackett_luce_loss the likelihood of each prompt's ranking (levels from its comparisons), ties sharing a stage
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


def ranking_levels(better: torch.Tensor, worse: torch.Tensor, num_responses: int) -> torch.Tensor:
    """`[N]` rank level of each response, 0 = best, from the comparisons alone: one below the deepest response a
    comparison places above it (0 when none does). Responses no comparison separates share a level, so the
    levels order every comparison, and a pair's are 0 and 1 whatever its scores (a pair's preference is given,
    not scored). On scores, these are the levels of a greedy pass from the top (a response joins the level of the
    best score it does not clear the gap below); a gap is not transitive, so levels can order two responses that
    no comparison orders (3.0, 2.92, 2.84, 2.76 at gap 0.1: 2.92 above 2.84).

    >>> ranking_levels(torch.tensor([1, 2, 0]), torch.tensor([0, 0, 3]), 5).tolist()  # 1 and 2 above 0 above 3
    [1, 0, 0, 2, 0]
    """
    levels = torch.zeros(num_responses, dtype=torch.long)
    better, worse = better.cpu(), worse.cpu()
    for _ in range(num_responses + 1):  # a longest path in a DAG has at most N - 1 edges
        deeper = levels.scatter_reduce(0, worse, levels[better] + 1, "amax")
        if torch.equal(deeper, levels):
            return levels
        levels = deeper
    raise ValueError("the comparisons form a cycle: no ranking orders them")


def plackett_luce_loss(
    rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, group: torch.Tensor
) -> torch.Tensor:
    """Negative log-likelihood of each prompt's ranking under Plackett-Luce, averaged over prompts.

    The responses are ranked in the levels of their comparisons (`ranking_levels`); at each level the tied
    responses are chosen together from those not yet chosen (Breslow's handling of ties):
    `sum_i(-r_i) + m * logsumexp(r_remaining)` for a level of m responses. The last level is chosen from itself:
    nothing for one response, a pull together for tied ones (as at any other level; Breslow's partial likelihood
    has a factor per level, the last included), so a level of m tied responses never costs less than m log m.
    For a pair it is `-log sigmoid(r_c - r_r)`. Examples without a comparison are left out.

    Args:
        rewards, group: `[N]` each response's reward and example.
        better, worse: `[C]` indices into `rewards` of each comparison's preferred / other response.
    """
    levels = ranking_levels(better, worse, len(rewards))
    compared = group[better].cpu().unique().tolist()  # an example without a comparison ranks nothing
    deepest = torch.zeros(int(group.max()) + 1, dtype=torch.long).scatter_reduce(
        0, group.cpu(), levels, "amax"
    )
    levels = levels.to(rewards.device)
    losses = []
    for example in compared:
        member = group == example
        example_rewards, example_levels = rewards[member], levels[member]
        stages = [
            -example_rewards[example_levels == level].sum()
            + (example_levels == level).sum()
            * torch.logsumexp(example_rewards[example_levels >= level], dim=0)
            for level in range(int(deepest[example]) + 1)
        ]
        losses.append(torch.stack(stages).sum())
    return torch.stack(losses).mean()


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
