"""Collation: tokenised examples -> the tensors of one micro-batch, padded or packed.

    collate = PaddedCollator(tokenizer.pad_token_id)                      # one padded row per response
    collate = PackedCollator(tokenizer.pad_token_id, max_tokens_per_row=None, share_prompt=True,
                             segment_attention=True)                     # one unpadded row + segments

An example is a pair or a group of K responses to one prompt (`training/data/records.py`). Every batch lists its
N responses in one order, branch-major: the first response of every example, then the second of every example,
and so on (for pairs: all chosen, then all rejected). The model's rewards come back in that order, and these
tensors say what to compare (`comparison_tensors`):
    `better`, `worse` LongTensor[C]: indices into the N rewards of each comparison's preferred / other response;
    `comparison_group` LongTensor[C]: the example each comparison belongs to;
    `margin` FloatTensor[C]: only when some comparison has one (a pair's margin column, or a K-wise score gap);
    `response_group` LongTensor[N]: the example of each response.
Which collator a run uses is decided once, with the rest of the batch layout, in `training/layout.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model_utils.packed_attention import SHARED, packed_attention_mask
from training.data.records import example_comparisons, example_margins, example_responses


def response_order(examples: Sequence[dict]) -> list[tuple[int, int]]:
    """(example, response) of every response in branch-major order (see the module docstring).

    >>> response_order([{"prompt_ids": [], "chosen_ids": [1], "rejected_ids": [2]},
    ...                 {"prompt_ids": [], "response_ids": [[1], [2], [3]], "scores": [0, 1, 2], "comparisons": []}])
    [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]
    """
    counts = [len(example_responses(example)[1]) for example in examples]
    return [(index, k) for k in range(max(counts)) for index, count in enumerate(counts) if k < count]


def comparison_tensors(examples: Sequence[dict], order: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """What to compare in a batch whose rewards come in `order` (see the module docstring)."""
    position = {response: index for index, response in enumerate(order)}
    better, worse, group, margins = [], [], [], []
    for index, example in enumerate(examples):
        for (first, second), margin in zip(
            example_comparisons(example), example_margins(example), strict=True
        ):
            better.append(position[index, first])
            worse.append(position[index, second])
            group.append(index)
            margins.append(margin)
    batch = {
        "better": torch.tensor(better, dtype=torch.long),
        "worse": torch.tensor(worse, dtype=torch.long),
        "comparison_group": torch.tensor(group, dtype=torch.long),
        "response_group": torch.tensor([index for index, _ in order], dtype=torch.long),
    }
    if any(margin is not None for margin in margins):
        batch["margin"] = torch.tensor([0.0 if margin is None else margin for margin in margins])
    return batch


def example_sequence_lengths(example: dict, share_prompt: bool) -> list[int]:
    """Token counts of the sequences one example becomes unsplit: `[P + R_1 + ... + R_K]` shared,
    `[P + R_1, ..., P + R_K]` otherwise."""
    prompt, responses = example_responses(example)
    if share_prompt:
        return [len(prompt) + sum(map(len, responses))]
    return [len(prompt) + len(response) for response in responses]


def pack_lengths(lengths: Sequence[int], max_tokens_per_row: int | None) -> list[list[int]]:
    """Group sequence indices into rows of at most `max_tokens_per_row` tokens (first-fit decreasing).

    A sequence longer than the budget gets a row of its own; `None` gives every sequence its own row.
    Deterministic: ties keep the input order.

    >>> pack_lengths([5, 3, 4, 2, 6], max_tokens_per_row=8)
    [[4, 3], [0, 1], [2]]
    """
    if max_tokens_per_row is None:
        return [[index] for index in range(len(lengths))]
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        row = next((r for r, free in enumerate(room) if free >= length), None)
        if row is None:
            rows.append([])
            room.append(max_tokens_per_row)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= length
    return rows


@dataclass
class PaddedCollator:
    """One row per response, `prompt + response`, padded to the longest; responses in branch-major order (for
    pairs: all chosen rows first, then all rejected ones, as DeepSpeed-Chat lays them out).

    Args:
        pad_token_id: id written into padded positions (the attention mask marks them 0).
        padding_side: "right" or "left".
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor-core friendly).

    Returns (from `__call__`, for N responses): `input_ids` LongTensor[N, T], `attention_mask` LongTensor[N, T],
    and the comparison tensors of the module docstring.

    >>> collate = PaddedCollator(pad_token_id=0)
    >>> batch = collate([
    ...     {"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2], "margin": None},
    ...     {"prompt_ids": [1], "chosen_ids": [9, 2], "rejected_ids": [4, 2], "margin": None},
    ... ])
    >>> batch["input_ids"]
    tensor([[1, 5, 6, 2, 0],
            [1, 9, 2, 0, 0],
            [1, 5, 7, 8, 2],
            [1, 4, 2, 0, 0]])
    >>> batch["attention_mask"][1].tolist(), batch["better"].tolist(), batch["worse"].tolist()
    ([1, 1, 1, 0, 0], [0, 1], [2, 3])
    >>> PaddedCollator(pad_token_id=0, padding_side="left")([
    ...     {"prompt_ids": [1], "chosen_ids": [6, 2], "rejected_ids": [2], "margin": 0.5}])["input_ids"]
    tensor([[1, 6, 2],
            [0, 1, 2]])
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("PaddedCollator needs a pad_token_id (give the tokenizer a pad token)")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        order = response_order(examples)
        parts = [example_responses(example) for example in examples]
        sequences = [list(parts[index][0]) + list(parts[index][1][k]) for index, k in order]
        multiple = self.pad_to_multiple_of or 1
        length = multiple * math.ceil(max(len(sequence) for sequence in sequences) / multiple)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            start = 0 if self.padding_side == "right" else length - len(sequence)
            input_ids[row, start : start + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, start : start + len(sequence)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **comparison_tensors(examples, order),
        }


@dataclass(frozen=True)
class PackedSequence:
    """One packed sequence: `prompt` then `branches` (unshared: the whole sequence is the prompt part and its one
    reward is read at its end); `responses` names the (example, response) of each reward it yields."""

    prompt: list[int]
    branches: list[list[int]]
    responses: list[tuple[int, int]]

    @property
    def length(self) -> int:
        return len(self.prompt) + sum(map(len, self.branches))


@dataclass
class PackedCollator:
    """Pack tokenised examples into rows without padding between sequences; optionally share each prompt.

    Args:
        pad_token_id: id written into the tail of rows shorter than the longest.
        max_tokens_per_row: token budget of a row (sequences are never split across rows; one longer than the
            budget gets a row of its own). None: one sequence per row (prompt sharing without packing). With
            prompt sharing it also bounds a shared sequence: an example whose prompt + responses exceed it is
            split into several sequences, each carrying the prompt (every response still sees exactly
            `prompt + itself`).
        share_prompt: one sequence `prompt + response_1 + ... + response_K` per example instead of K: every
            response branch sees the prompt and itself, never another branch, and its positions restart after
            the prompt, so the prompt is computed once.
        pad_to_multiple_of: round the row length up to a multiple of this.
        segment_attention: lay every sequence of the batch end to end in ONE row (no padding at all) and
            describe them by `segments` instead of a 4D mask; the backbone then attends within each sequence
            only (`model_utils.segment_attention.segment_attention_forward`). `max_tokens_per_row` and
            `pad_to_multiple_of` do not apply.

    Returns (from `__call__`, for N responses packed into R rows of L tokens):
        `input_ids` LongTensor[R, L]; `position_ids` LongTensor[R, L], restarting at 0 for every sequence (and
        at len(prompt) for every branch after the first); `attention_mask` BoolTensor[R, 1, L, L], True where
        query token q may attend to key token k (causal, within one sequence, a branch only to the prompt and
        itself; a padding token only to itself); `reward_index` LongTensor[N], flat indices into
        `input_ids.view(-1)` of each response's last token, in branch-major order; the comparison tensors.
        With `segment_attention`: R = 1, no `attention_mask`, and `segments` LongTensor[S, 2 + K], one row per
        sequence: (start, prefix, branch_1, ..., branch_K) token counts (0 = no such branch): the `prefix +
        branch_1` tokens from `start` are causal, every later branch sees the prefix and itself (an unshared
        sequence: its length, then zeros).

    >>> collate = PackedCollator(pad_token_id=0, max_tokens_per_row=8, share_prompt=True)
    >>> batch = collate([
    ...     {"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2], "margin": None},
    ...     {"prompt_ids": [], "chosen_ids": [9, 2], "rejected_ids": [4, 2], "margin": None},
    ... ])
    >>> batch["input_ids"]
    tensor([[1, 5, 6, 2, 7, 8, 2],
            [9, 2, 4, 2, 0, 0, 0]])
    >>> batch["position_ids"]
    tensor([[0, 1, 2, 3, 2, 3, 4],
            [0, 1, 0, 1, 0, 0, 0]])
    >>> batch["attention_mask"][0, 0, 4].int().tolist()  # the first rejected token: prompt and itself
    [1, 1, 0, 0, 1, 0, 0]
    >>> batch["reward_index"].tolist()  # chosen ends, then rejected ends
    [3, 8, 6, 10]
    """

    pad_token_id: int
    max_tokens_per_row: int | None
    share_prompt: bool = False
    pad_to_multiple_of: int | None = None
    segment_attention: bool = False

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("PackedCollator needs a pad_token_id (give the tokenizer a pad token)")
        if self.max_tokens_per_row is not None and self.max_tokens_per_row < 1:
            raise ValueError(f"max_tokens_per_row must be positive or None, got {self.max_tokens_per_row}")

    def _sequences(self, examples: Sequence[dict]) -> list[PackedSequence]:
        """Every sequence of the batch, in order: per example the shared sequence(s), or one per response."""
        sequences = []
        limit = None if self.segment_attention else self.max_tokens_per_row
        for index, example in enumerate(examples):
            prompt, responses = example_responses(example)
            prompt = list(prompt)
            if not self.share_prompt:
                sequences += [
                    PackedSequence(prompt + list(r), [], [(index, k)]) for k, r in enumerate(responses)
                ]
                continue
            part: list[int] = []
            for k, response in enumerate(responses):
                tokens = len(prompt) + sum(len(responses[j]) for j in part) + len(response)
                if part and limit is not None and tokens > limit:
                    sequences.append(
                        PackedSequence(prompt, [list(responses[j]) for j in part], [(index, j) for j in part])
                    )
                    part = []
                part.append(k)
            sequences.append(
                PackedSequence(prompt, [list(responses[j]) for j in part], [(index, j) for j in part])
            )
        return sequences

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        sequences = self._sequences(examples)
        lengths = torch.tensor([sequence.length for sequence in sequences])
        if self.segment_attention:
            rows, row_length = [list(range(len(sequences)))], int(lengths.sum())
        else:
            rows = pack_lengths(lengths.tolist(), self.max_tokens_per_row)
            multiple = self.pad_to_multiple_of or 1
            row_length = multiple * math.ceil(max(int(lengths[row].sum()) for row in rows) / multiple)

        # Where each sequence starts, as a flat index into the [R, L] batch.
        sequence_row = torch.empty(len(sequences), dtype=torch.long)
        sequence_offset = torch.empty(len(sequences), dtype=torch.long)
        for row, members in enumerate(rows):
            members = torch.tensor(members)
            sequence_row[members] = row
            sequence_offset[members] = lengths[members].cumsum(0) - lengths[members]
        sequence_start = (sequence_row * row_length + sequence_offset).tolist()

        # Every token of every sequence goes to its flat slot (one vectorised write per field). Positions restart
        # at each sequence, and at the end of the prompt for every branch after the first; each response's reward
        # is read at its last token.
        tokens, positions, kinds, reward_at = [], [], [], {}
        for sequence, start in zip(sequences, sequence_start, strict=True):
            prompt = len(sequence.prompt)
            tokens += sequence.prompt
            positions += range(prompt)
            kinds += [SHARED] * prompt
            end = start + prompt
            for branch_index, branch in enumerate(sequence.branches):
                tokens += branch
                positions += range(prompt, prompt + len(branch))
                kinds += [branch_index + 1] * len(branch)
                end += len(branch)
                reward_at[sequence.responses[branch_index]] = end - 1
            if not sequence.branches:
                reward_at[sequence.responses[0]] = end - 1
        flat_slot = torch.repeat_interleave(torch.tensor(sequence_start), lengths) + (
            torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        )
        size = len(rows) * row_length
        input_ids = torch.full((size,), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(size, dtype=torch.long)
        input_ids[flat_slot] = torch.tensor(tokens, dtype=torch.long)
        position_ids[flat_slot] = torch.tensor(positions, dtype=torch.long)

        order = response_order(examples)
        batch = {
            "input_ids": input_ids.view(-1, row_length),
            "position_ids": position_ids.view(-1, row_length),
            "reward_index": torch.tensor([reward_at[response] for response in order], dtype=torch.long),
            **comparison_tensors(examples, order),
        }
        if self.segment_attention:
            width = max(1, *(len(sequence.branches) for sequence in sequences))
            batch["segments"] = torch.tensor(
                [
                    [start, len(sequence.prompt), *map(len, sequence.branches)]
                    + [0] * (width - len(sequence.branches))
                    for sequence, start in zip(sequences, sequence_start, strict=True)
                ],
                dtype=torch.long,
            )
        else:
            kind = torch.full((size,), SHARED, dtype=torch.long)
            kind[flat_slot] = torch.tensor(kinds, dtype=torch.long)
            # Padding gets a distinct negative sequence id per slot, so it attends only to itself (never an
            # empty softmax row) and nothing attends to it.
            sequence_id = -1 - torch.arange(size)
            sequence_id[flat_slot] = torch.repeat_interleave(torch.arange(len(sequences)), lengths)
            mask = packed_attention_mask(sequence_id.view(-1, row_length), kind.view(-1, row_length))
            batch["attention_mask"] = mask.unsqueeze(1)
        return batch
