"""Fewer tokens per pair: padding-free packing and prompt sharing for reward-model batches.

    collator = PackedPairCollator(tokenizer.pad_token_id, max_tokens_per_row=2048, share_prompt=True)
    batch = collator(pairs)                                   # pairs as `training.data.tokenize_rows` makes them
    chosen_rewards, rejected_rewards = packed_rewards(engine, batch)      # one forward, [B] and [B]

Packing: sequences are laid end to end in rows of at most `max_tokens_per_row` tokens (first-fit decreasing),
`position_ids` restart at every sequence, and a block-diagonal causal 4D mask keeps the sequences apart, so a
row computes exactly what each sequence would compute alone, without the padding of a plain batch.

Prompt sharing: a pair is ONE sequence `prompt + chosen + rejected`. The rejected tokens may attend to the
prompt and to earlier rejected tokens but not to the chosen ones, and their positions restart right after the
prompt, so each rejected token sees exactly what it sees in `prompt + rejected`; the prompt is computed once.
Rewards are read at the last chosen and the last rejected token. Sharing and packing combine: several such
pair-sequences go into one packed row.

Segment attention (`segment_attention=True`, what training uses with sdpa backbones): the whole micro-batch
is ONE row with no padding at all, and instead of a mask the batch carries `segments`, where each sequence
(and a shared pair's rejected branch) starts and how long it is. `packed_rewards` switches the backbone to
`SEGMENT_ATTENTION`, an attention function registered in transformers' `AttentionInterface` that runs one
causal SDPA per sequence (`segment_attention_forward`), so attention costs the sum of the squared sequence
lengths instead of the squared row length, and no `L x L` mask is built. For any batch without `segments` the
function is plain `sdpa`, so the switched model scores padded batches as before.

Otherwise, the 4D mask is handed to the backbone as `attention_mask`; transformers 5's `masking_utils.create_causal_mask`
returns a 4D mask as is (the documented way to give a custom mask), for `sdpa` (boolean, True = attend) and
`eager` (additive float, converted here). Backbones whose position information does not come from
`position_ids` (Bloom's ALiBi is built from the 2D mask) cannot take this and are refused by
`supports_packing`.

On GPU with `flash_attention_2`/`_3` a 4D mask cannot be used. Packing alone (no sharing) has a native varlen
path there: call the backbone with `attention_mask=None` and the restarted `position_ids` (transformers then
infers `cu_seqlens` from where the positions restart, or takes `cu_seq_lens_q/k` and `max_length_q/k` kwargs
as `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` produces them). `RewardModel.hidden_states`
replaces a None mask by all ones, which `flash_attention_mask` turns back into None, so
`model.values(input_ids[None], None, position_ids[None])` on a single flattened row selects that path.
Prompt sharing is not a varlen pattern (the rejected branch skips part of its segment) and needs sdpa or
eager with the 4D mask (or a flex-attention BlockMask).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

# What a token is, for the prompt-sharing rule "rejected never sees chosen".
SHARED = 0  # prompt tokens, and every token of an unshared sequence
CHOSEN = 1
REJECTED = 2

# Backbones checked token for token against the plain padded batch (tests/test_packing.py).
EXACT_MODEL_TYPES = ("llama", "qwen2", "gpt2", "opt", "gpt_neox")
# The backbone attention that reads `segments` (and is exactly `sdpa` for any other batch).
SEGMENT_ATTENTION = "rewardspeed_segments"
MASK_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", SEGMENT_ATTENTION)


def supports_packing(config: PretrainedConfig) -> tuple[bool, str]:
    """Whether packed / prompt-shared batches give exactly the plain batch's rewards for this backbone.

    Returns:
        (True, "") or (False, the reason, naming the backbone and what to do instead).

    >>> from transformers import BloomConfig, LlamaConfig
    >>> supports_packing(LlamaConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2))[0]
    True
    >>> supports_packing(BloomConfig(n_layer=1, hidden_size=8, n_head=2))[1][:40]
    'bloom: ALiBi position biases are built f'
    """
    model_type = config.model_type
    if model_type == "bloom":
        return False, (
            "bloom: ALiBi position biases are built from the 2D attention mask, so restarted positions and a "
            "custom 4D mask cannot be given; train without --packing/--share_prompt"
        )
    if model_type not in EXACT_MODEL_TYPES:
        return False, (
            f"{model_type}: packing is verified only for {', '.join(EXACT_MODEL_TYPES)}; train without "
            "--packing/--share_prompt"
        )
    # None: not chosen yet (a config not bound to a model); `packed_rewards` checks the built model's again.
    attention = config._attn_implementation
    if attention is not None and attention not in MASK_ATTENTION_IMPLEMENTATIONS:
        return False, (
            f"{model_type} with attn_implementation={attention!r}: packed batches need a 4D mask, which only "
            f"{' and '.join(MASK_ATTENTION_IMPLEMENTATIONS)} take; load the model with attn_implementation='sdpa'"
        )
    if any(layer == "sliding_attention" for layer in getattr(config, "layer_types", None) or ()):
        return False, f"{model_type}: sliding-window layers are not expressed by the packed mask"
    return True, ""


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


def pair_sequence_lengths(pair: dict, share_prompt: bool) -> list[int]:
    """Token counts of the sequences one pair becomes: `[P + C + R]` shared, `[P + C, P + R]` otherwise."""
    prompt, chosen, rejected = len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])
    return [prompt + chosen + rejected] if share_prompt else [prompt + chosen, prompt + rejected]


@dataclass
class PackedPairCollator:
    """Pack tokenised pairs into rows without padding between sequences; optionally share each prompt.

    Args:
        pad_token_id: id written into the tail of rows shorter than the longest.
        max_tokens_per_row: token budget of a row (sequences are never split; one longer than the budget gets
            a row of its own). None: one sequence per row (prompt sharing without packing).
        share_prompt: one sequence `prompt + chosen + rejected` per pair instead of two.
        pad_to_multiple_of: round the row length up to a multiple of this.
        segment_attention: lay every sequence of the batch end to end in ONE row (no padding at all) and
            describe them by `segments` instead of a 4D mask; the backbone then attends within each sequence
            only (`segment_attention_forward`), so attention costs what the sequences cost alone, not the
            square of the row. `max_tokens_per_row` and `pad_to_multiple_of` do not apply.

    Returns (from `__call__`, for B pairs packed into R rows of L tokens):
        `input_ids` LongTensor[R, L]; `position_ids` LongTensor[R, L], restarting at 0 for every sequence (and
        at len(prompt) for a shared pair's rejected tokens); `attention_mask` BoolTensor[R, 1, L, L], True where
        query token q may attend to key token k (causal, within one sequence, rejected never to chosen; a
        padding token only to itself); `chosen_index`, `rejected_index` LongTensor[B], flat indices into
        `input_ids.view(-1)` of each pair's last chosen / last rejected token; `margin` FloatTensor[B] when any
        pair has a margin (a missing one counts as 0.0), as `PairCollator` gives it.
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

    def _sequences(self, pairs: Sequence[dict]) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """(token ids, positions, kinds) of every sequence, in order: per pair chosen then rejected (unshared)
        or the one shared sequence."""
        tokens, positions, kinds = [], [], []
        for pair in pairs:
            prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
            if self.share_prompt:
                tokens.append(prompt + chosen + rejected)
                positions.append(
                    [*range(len(prompt) + len(chosen)), *range(len(prompt), len(prompt) + len(rejected))]
                )
                kinds.append([SHARED] * len(prompt) + [CHOSEN] * len(chosen) + [REJECTED] * len(rejected))
            else:
                for response in (chosen, rejected):
                    tokens.append(prompt + response)
                    positions.append(list(range(len(prompt) + len(response))))
                    kinds.append([SHARED] * (len(prompt) + len(response)))
        return tokens, positions, kinds

    def __call__(self, pairs: Sequence[dict]) -> dict[str, torch.Tensor]:
        tokens, positions, kinds = self._sequences(pairs)
        lengths = torch.tensor([len(sequence) for sequence in tokens])
        if self.segment_attention:
            rows, row_length = [list(range(len(tokens)))], int(lengths.sum())
        else:
            rows = pack_lengths(lengths.tolist(), self.max_tokens_per_row)
            multiple = self.pad_to_multiple_of or 1
            row_length = multiple * math.ceil(max(int(lengths[row].sum()) for row in rows) / multiple)

        # Where each sequence starts, as a flat index into the [R, L] batch.
        sequence_row = torch.empty(len(tokens), dtype=torch.long)
        sequence_offset = torch.empty(len(tokens), dtype=torch.long)
        for row, members in enumerate(rows):
            members = torch.tensor(members)
            sequence_row[members] = row
            sequence_offset[members] = lengths[members].cumsum(0) - lengths[members]
        sequence_start = sequence_row * row_length + sequence_offset

        # Scatter every token of every sequence to its flat slot (one vectorised write per field).
        flat_slot = torch.repeat_interleave(sequence_start, lengths) + (
            torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        )
        size = len(rows) * row_length
        input_ids = torch.full((size,), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(size, dtype=torch.long)
        input_ids[flat_slot] = torch.tensor(
            [token for sequence in tokens for token in sequence], dtype=torch.long
        )
        position_ids[flat_slot] = torch.tensor(
            [p for sequence in positions for p in sequence], dtype=torch.long
        )

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
        }
        if self.segment_attention:
            if self.share_prompt:
                batch["segments"] = torch.stack(
                    [sequence_start, prompt_length, chosen_length, rejected_length], dim=1
                )
            else:
                zeros = torch.zeros_like(lengths)
                batch["segments"] = torch.stack([sequence_start, lengths, zeros, zeros], dim=1)
        else:
            kind = torch.full((size,), SHARED, dtype=torch.long)
            kind[flat_slot] = torch.tensor([k for sequence in kinds for k in sequence], dtype=torch.long)
            # Padding gets a distinct negative sequence id per slot, so it attends only to itself (never an
            # empty softmax row) and nothing attends to it.
            sequence_id = -1 - torch.arange(size)
            sequence_id[flat_slot] = torch.repeat_interleave(torch.arange(len(tokens)), lengths)
            mask = pair_attention_mask(sequence_id.view(-1, row_length), kind.view(-1, row_length))
            batch["attention_mask"] = mask.unsqueeze(1)
        margins = [pair.get("margin") for pair in pairs]
        if any(margin is not None for margin in margins):
            batch["margin"] = torch.tensor([0.0 if margin is None else margin for margin in margins])
        return batch


def backbone_attention_mask(mask: torch.Tensor, config: PretrainedConfig, dtype: torch.dtype) -> torch.Tensor:
    """The boolean `[R, 1, L, L]` mask in the form the backbone's attention takes: as is for sdpa, additive
    (0 where attended, the dtype's minimum elsewhere) for eager, which adds the mask to the scores."""
    if config._attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return mask


def pair_attention_mask(sequence_id: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """Boolean `[..., L, L]` mask, True where query q may attend to key k: causal, within one sequence, and a
    rejected token never to a chosen one (`sequence_id`, `kind`: `[..., L]`)."""
    length = sequence_id.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_id.device).tril()
    same_sequence = sequence_id[..., :, None] == sequence_id[..., None, :]
    rejected_sees_chosen = (kind[..., :, None] == REJECTED) & (kind[..., None, :] == CHOSEN)
    return same_sequence & causal & ~rejected_sees_chosen


@dataclass(frozen=True)
class SegmentPlan:
    """How `segment_attention_forward` cuts a packed row, made once per forward by `plan_segments`.

    `sizes` splits the row into parts; `steps[i]` says how part i attends: `("causal",)` (one sequence, or the
    prompt + chosen of a shared pair), `("branch", head, prefix, mask)` (a shared pair's rejected tokens: keys
    are the first `prefix` keys of part `head` and their own), `("block", mask)` (several short sequences with
    a block-diagonal mask: one SDPA call instead of one per sequence).
    """

    sizes: list[int]
    steps: list[tuple]


# Sequences shorter than this are attended together in blocks of up to this many tokens: per-call overhead
# outweighs the masked-out work below it (CPU, SmolLM2, bf16, 16 pairs of ~50 tokens: one call per sequence
# 0.89x the 4D-mask rows, blocks of 128 1.03x; `python benchmarks/bench_layouts.py`).
SEGMENT_BLOCK_TOKENS = 128


def plan_segments(
    segments: Sequence[Sequence[int]], device: torch.device, block_tokens: int | None = None
) -> SegmentPlan:
    """The `SegmentPlan` of a batch's `segments` rows `(start, prefix, first, second)`, in row order;
    `block_tokens` defaults to `SEGMENT_BLOCK_TOKENS` (0: every sequence on its own)."""
    if block_tokens is None:
        block_tokens = SEGMENT_BLOCK_TOKENS
    blocks: list[list[tuple[int, int, int]]] = []
    block_length = 0
    for _, prefix, first, second in segments:
        length = prefix + first + second
        if not blocks or block_length + length > block_tokens:
            blocks.append([])
            block_length = 0
        blocks[-1].append((prefix, first, second))
        block_length += length
    sizes, steps = [], []
    for block in blocks:
        if len(block) == 1:
            prefix, first, second = block[0]
            sizes.append(prefix + first)
            steps.append(("causal",))
            if second:
                mask = torch.ones(second, prefix + second, dtype=torch.bool, device=device).tril(prefix)
                sizes.append(second)
                steps.append(("branch", len(steps) - 1, prefix, mask))
            continue
        lengths = torch.tensor([sum(sequence) for sequence in block])
        sequence_id = torch.repeat_interleave(torch.arange(len(block)), lengths)
        kind = torch.tensor(
            [k for p, f, r in block for k in [SHARED] * p + [CHOSEN] * f + [REJECTED] * r], dtype=torch.long
        )
        sizes.append(int(lengths.sum()))
        steps.append(("block", pair_attention_mask(sequence_id, kind).to(device)))
    return SegmentPlan(sizes, steps)


def segment_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    rewardspeed_segments: SegmentPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of a `segment_attention` row: one SDPA per sequence (short ones in small blocks) instead of
    one masked SDPA over the whole row, so the cost is about the sum of the squared sequence lengths, not the
    square of their sum.

    Registered in transformers' `AttentionInterface` as `SEGMENT_ATTENTION`; `packed_rewards` switches an sdpa
    backbone to it and passes the batch's `SegmentPlan` as the `rewardspeed_segments` keyword, which the
    decoder layers hand through to attention. Without that keyword (plain padded batches) it IS `sdpa`.

    For a shared pair `(start, prompt, chosen, rejected)`: the prompt + chosen tokens attend causally among
    themselves; the rejected tokens attend to the prompt and causally to each other (keys = prompt + rejected,
    mask `tril(diagonal=prompt)`), exactly what `prompt + rejected` alone computes for them.

    Returns:
        `([1, N, heads, head_dim], None)` as transformers' attention functions do.
    """
    if rewardspeed_segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"segment attention takes one packed row, got a batch of {query.shape[0]}")
    plan = rewardspeed_segments
    if sum(plan.sizes) != query.shape[2]:
        raise ValueError(f"segments cover {sum(plan.sizes)} tokens, the row has {query.shape[2]}")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: every query head gets its key/value head
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    dropout = dropout if module.training else 0.0
    # Split (not slice) the row: the backward of a split is one concatenation, where every slice's backward
    # would write a zero-filled tensor of the whole row.
    queries, keys, values = (tensor.split(plan.sizes, dim=2) for tensor in (query, key, value))
    outputs = []
    for part, step in enumerate(plan.steps):
        part_keys, part_values, options = keys[part], values[part], {}
        if step[0] == "causal":
            options["is_causal"] = True
        elif step[0] == "branch":
            _, head, prefix, options["attn_mask"] = step
            part_keys = torch.cat([keys[head][:, :, :prefix], part_keys], dim=2)
            part_values = torch.cat([values[head][:, :, :prefix], part_values], dim=2)
        else:
            options["attn_mask"] = step[1]
        outputs.append(
            functional.scaled_dot_product_attention(
                queries[part], part_keys, part_values, dropout_p=dropout, scale=scaling, **options
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, sdpa_mask)


def use_segment_attention(reward_model: nn.Module) -> None:
    """Switch an sdpa backbone to `SEGMENT_ATTENTION` (a no-op when it already is; plain batches compute the
    same either way). Raises ValueError for other attention implementations, naming them."""
    attention = reward_model.config._attn_implementation
    if attention == SEGMENT_ATTENTION:
        return
    if attention != "sdpa":
        raise ValueError(
            f"segment_attention batches need attn_implementation='sdpa', the backbone has {attention!r}; "
            "collate without segment_attention (a 4D mask) instead"
        )
    reward_model.backbone.set_attn_implementation(SEGMENT_ATTENTION)
    # transformers only warns when a model cannot switch; the row would then attend across sequences.
    if reward_model.config._attn_implementation != SEGMENT_ATTENTION:
        raise ValueError(
            f"{type(reward_model.backbone).__name__} did not switch to {SEGMENT_ATTENTION!r} attention; "
            "collate without segment_attention (a 4D mask) instead"
        )


def packed_rewards(
    model_or_engine: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected rewards `([B], [B])` of a `PackedPairCollator` batch, from ONE forward pass.

    Always through `model_or_engine(..., reward_index=...)`: DeepSpeed 0.19 runs its backward prologue (ZeRO
    gradient-accumulation boundary, backward depth) from hooks that only `engine.forward` registers; calling
    another module method trains wrongly under ZeRO-3 with gradient accumulation
    (tests/scripts/zero_packing.py checks the packed loss against the plain one there).

    Args:
        model_or_engine: a `RewardModel`, or a DeepSpeed engine wrapping one.
        batch: `input_ids [R, L]`, `position_ids [R, L]`, `attention_mask [R, 1, L, L]` (bool), `chosen_index
            [B]`, `rejected_index [B]`, on the model's device.

    Raises:
        ValueError: the backbone cannot take packed batches exactly (see `supports_packing`).
    """
    reward_model = getattr(model_or_engine, "module", model_or_engine)
    supported, reason = supports_packing(reward_model.config)
    if not supported:
        raise ValueError(reason)
    reward_index = torch.cat([batch["chosen_index"], batch["rejected_index"]])
    if "segments" in batch:
        use_segment_attention(reward_model)
        rewards = model_or_engine(
            batch["input_ids"],
            torch.ones_like(batch["input_ids"]),  # sdpa_mask turns an all-ones mask into None (no L x L mask)
            batch["position_ids"],
            reward_index=reward_index,
            rewardspeed_segments=plan_segments(batch["segments"].tolist(), batch["input_ids"].device),
        )
        return rewards.chunk(2)
    attention_mask = backbone_attention_mask(
        batch["attention_mask"], reward_model.config, reward_model.v_head.weight.dtype
    )
    rewards = model_or_engine(
        batch["input_ids"], attention_mask, batch["position_ids"], reward_index=reward_index
    )
    return rewards.chunk(2)


def tokens_computed(batch: dict[str, torch.Tensor]) -> int:
    """Token positions the backbone computes for a batch (padding included): `R * L` or `2B * T`."""
    return batch["input_ids"].numel()
