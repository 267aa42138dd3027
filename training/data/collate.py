"""Collation: tokenised pairs -> the tensors of one micro-batch, padded or packed.

    collate = PairCollator(tokenizer.pad_token_id)                       # plain: [2B, T], chosen rows first
    collate = PackedPairCollator(tokenizer.pad_token_id, max_tokens_per_row=None, share_prompt=True,
                                 segment_attention=True)                # one unpadded row + segments

Which collator a run uses is decided once, with the rest of the batch layout, in `training/layout.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model_utils.packed_attention import SHARED, packed_attention_mask


def collate_margins(pairs: Sequence[dict]) -> dict[str, torch.Tensor]:
    """`{"margin": FloatTensor[B]}` when any pair has a margin (a missing one counts as 0.0), else `{}`."""
    margins = [pair.get("margin") for pair in pairs]
    if all(margin is None for margin in margins):
        return {}
    return {"margin": torch.tensor([0.0 if margin is None else margin for margin in margins])}


def pair_sequence_lengths(pair: dict, share_prompt: bool) -> list[int]:
    """Token counts of the sequences one pair becomes: `[P + C + R]` shared, `[P + C, P + R]` otherwise."""
    prompt, chosen, rejected = len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])
    return [prompt + chosen + rejected] if share_prompt else [prompt + chosen, prompt + rejected]


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
class PairCollator:
    """Pad tokenised pairs into one batch: all chosen sequences first, then all rejected ones.

    Args:
        pad_token_id: id written into padded positions (the attention mask marks them 0).
        padding_side: "right" or "left".
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor-core friendly).

    Returns (from `__call__`, for B pairs):
        `input_ids` LongTensor[2B, T], `attention_mask` LongTensor[2B, T] (rows 0..B-1 chosen, B..2B-1
        rejected), and `margin` FloatTensor[B] when any pair has a margin (a missing one counts as 0.0).

    >>> collate = PairCollator(pad_token_id=0)
    >>> batch = collate([
    ...     {"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2], "margin": None},
    ...     {"prompt_ids": [1], "chosen_ids": [9, 2], "rejected_ids": [4, 2], "margin": None},
    ... ])
    >>> batch["input_ids"]
    tensor([[1, 5, 6, 2, 0],
            [1, 9, 2, 0, 0],
            [1, 5, 7, 8, 2],
            [1, 4, 2, 0, 0]])
    >>> batch["attention_mask"][1].tolist()
    [1, 1, 1, 0, 0]
    >>> PairCollator(pad_token_id=0, padding_side="left")([
    ...     {"prompt_ids": [1], "chosen_ids": [6, 2], "rejected_ids": [2], "margin": 0.5}])["input_ids"]
    tensor([[1, 6, 2],
            [0, 1, 2]])
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("PairCollator needs a pad_token_id (give the tokenizer a pad token)")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def _padded_length(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of or 1
        return multiple * math.ceil(longest / multiple)

    def __call__(self, pairs: Sequence[dict]) -> dict[str, torch.Tensor]:
        sequences = [pair["prompt_ids"] + pair["chosen_ids"] for pair in pairs]
        sequences += [pair["prompt_ids"] + pair["rejected_ids"] for pair in pairs]
        length = self._padded_length(max(len(sequence) for sequence in sequences))
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            start = 0 if self.padding_side == "right" else length - len(sequence)
            input_ids[row, start : start + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, start : start + len(sequence)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **collate_margins(pairs)}


@dataclass
class PackedPairCollator:
    """Pack tokenised pairs into rows without padding between sequences; optionally share each prompt.

    Args:
        pad_token_id: id written into the tail of rows shorter than the longest.
        max_tokens_per_row: token budget of a row (sequences are never split; one longer than the budget gets
            a row of its own). None: one sequence per row (prompt sharing without packing).
        share_prompt: one sequence `prompt + chosen + rejected` per pair instead of two; the rejected branch
            sees the prompt, never the chosen tokens, and its positions restart after the prompt.
        pad_to_multiple_of: round the row length up to a multiple of this.
        segment_attention: lay every sequence of the batch end to end in ONE row (no padding at all) and
            describe them by `segments` instead of a 4D mask; the backbone then attends within each sequence
            only (`model_utils.packed_attention.segment_attention_forward`), so attention costs what the
            sequences cost alone, not the square of the row. `max_tokens_per_row` and `pad_to_multiple_of` do
            not apply.

    Returns (from `__call__`, for B pairs packed into R rows of L tokens):
        `input_ids` LongTensor[R, L]; `position_ids` LongTensor[R, L], restarting at 0 for every sequence (and
        at len(prompt) for a shared pair's rejected tokens); `attention_mask` BoolTensor[R, 1, L, L], True where
        query token q may attend to key token k (causal, within one sequence, rejected never to chosen; a
        padding token only to itself); `chosen_index`, `rejected_index` LongTensor[B], flat indices into
        `input_ids.view(-1)` of each pair's last chosen / last rejected token; `margin` FloatTensor[B] when any
        pair has a margin, as `PairCollator` gives it.
        With `segment_attention`: R = 1, no `attention_mask`, and `segments` LongTensor[S, 4], one row per
        sequence: (start, prefix, first, second) token counts: the `prefix + first` tokens from `start` are
        causal; the `second` tokens after them see the prefix and each other, not `first` (a shared pair:
        prompt, chosen, rejected; an unshared sequence: its length, 0, 0).

    >>> collate = PackedPairCollator(pad_token_id=0, max_tokens_per_row=8, share_prompt=True)
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
    >>> batch["chosen_index"].tolist(), batch["rejected_index"].tolist()
    ([3, 8], [6, 10])
    """

    pad_token_id: int
    max_tokens_per_row: int | None
    share_prompt: bool = False
    pad_to_multiple_of: int | None = None
    segment_attention: bool = False

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("PackedPairCollator needs a pad_token_id (give the tokenizer a pad token)")
        if self.max_tokens_per_row is not None and self.max_tokens_per_row < 1:
            raise ValueError(f"max_tokens_per_row must be positive or None, got {self.max_tokens_per_row}")

    def _sequences(self, pairs: Sequence[dict]) -> tuple[list[int], list[list[int]]]:
        """(prefix length, branch lengths) of every sequence, in order: per pair the one shared sequence
        `(prompt, [chosen, rejected])`, or chosen then rejected as `(prompt + response, [])`."""
        sequences = []
        for pair in pairs:
            prompt, chosen, rejected = (
                len(pair[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids")
            )
            if self.share_prompt:
                sequences.append((prompt, [chosen, rejected]))
            else:
                sequences += [(prompt + chosen, []), (prompt + rejected, [])]
        return sequences

    def __call__(self, pairs: Sequence[dict]) -> dict[str, torch.Tensor]:
        sequences = self._sequences(pairs)
        lengths = torch.tensor([prefix + sum(branches) for prefix, branches in sequences])
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
        sequence_start = sequence_row * row_length + sequence_offset

        # Every token of every sequence goes to its flat slot (one vectorised write per field). Positions
        # restart at each sequence, and at the end of the prompt for every branch after the first.
        tokens, positions, kinds = [], [], []
        for pair in pairs:
            prompt, responses = pair["prompt_ids"], [pair["chosen_ids"], pair["rejected_ids"]]
            if self.share_prompt:
                tokens += [*prompt, *responses[0], *responses[1]]
                positions += [
                    *range(len(prompt) + len(responses[0])),
                    *range(len(prompt), len(prompt) + len(responses[1])),
                ]
                kinds += [SHARED] * len(prompt) + [1] * len(responses[0]) + [2] * len(responses[1])
            else:
                for response in responses:
                    tokens += [*prompt, *response]
                    positions += range(len(prompt) + len(response))
                    kinds += [SHARED] * (len(prompt) + len(response))
        flat_slot = torch.repeat_interleave(sequence_start, lengths) + (
            torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        )
        size = len(rows) * row_length
        input_ids = torch.full((size,), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(size, dtype=torch.long)
        input_ids[flat_slot] = torch.tensor(tokens, dtype=torch.long)
        position_ids[flat_slot] = torch.tensor(positions, dtype=torch.long)

        # Each pair's reward positions: last chosen / last rejected token.
        prompt_length = torch.tensor([len(pair["prompt_ids"]) for pair in pairs])
        chosen_length = torch.tensor([len(pair["chosen_ids"]) for pair in pairs])
        rejected_length = torch.tensor([len(pair["rejected_ids"]) for pair in pairs])
        if self.share_prompt:
            chosen_index = sequence_start + prompt_length + chosen_length - 1
            rejected_index = chosen_index + rejected_length
        else:
            chosen_index = sequence_start[0::2] + prompt_length + chosen_length - 1
            rejected_index = sequence_start[1::2] + prompt_length + rejected_length - 1

        batch = {
            "input_ids": input_ids.view(-1, row_length),
            "position_ids": position_ids.view(-1, row_length),
            "chosen_index": chosen_index,
            "rejected_index": rejected_index,
            **collate_margins(pairs),
        }
        if self.segment_attention:
            # (start, prefix, first, second): an unshared sequence is (start, length, 0, 0).
            shape = [[prefix, *branches, 0, 0][:3] for prefix, branches in sequences]
            batch["segments"] = torch.cat(
                [sequence_start[:, None], torch.tensor(shape, dtype=torch.long)], dim=1
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
