"""Segment attention: a packed row attended one sequence at a time, for sdpa backbones.

    plan = plan_segments(batch["segments"].tolist(), device)     # once per forward (`training/layout.py`)
    model(..., rewardspeed_segments=plan)                         # the decoder layers hand it to attention

A segment row (`training/data/collate.py`) lays a micro-batch end to end without padding; `segments` says where
each sequence starts, its prompt and its response branches (`packed_attention.py` has the rule of which token
sees which). `use_segment_attention` switches a built backbone to `SEGMENT_ATTENTION`, registered in
transformers' `AttentionInterface`; for any call without a plan it IS sdpa, so the switched model scores padded
batches as before. With a plan, attention runs per part of the row (`attention_parts`): it costs the sum of the
squared sequence lengths instead of the square of the row, and no `L x L` mask is built.

On CPU the parts go through one autograd function (`CpuSegmentAttention`) around the kernel SDPA itself runs
there: it keeps for backward the row's query and its grouped key/value (not per-part copies of them in the
attention dtype, nor a copy of a prompt's keys for every later branch), so a K-branch row holds no more
activation memory per token than pairs do. Other devices call SDPA per part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .packed_attention import SEGMENT_ATTENTION, SHARED, packed_attention_mask


@dataclass(frozen=True)
class SegmentPlan:
    """How `segment_attention_forward` cuts a packed row, made once per forward by `plan_segments`.

    `sizes` splits the row into parts; `steps[i]` says how part i attends: `("causal",)` (one sequence, or the
    prompt + first branch of a shared sequence), `("branch", head, prefix, mask)` (a later branch: keys are the
    first `prefix` keys of part `head` and its own), `("block", mask)` (several short sequences with a
    block-diagonal mask: one SDPA call instead of one per sequence). `longest` is the most keys any query
    attends to (a sequence, or a prompt + one branch): a sliding window at least that wide changes nothing.
    """

    sizes: list[int]
    steps: list[tuple]
    longest: int = 0
    # Additive float masks by (part, dtype), made on first use: the CPU kernel takes no boolean mask.
    additive_masks: dict = field(default_factory=dict, compare=False, repr=False)

    def additive_mask(self, part: int, dtype: torch.dtype) -> torch.Tensor:
        """Part `part`'s boolean mask (the last item of its step) as 0 where attended and -inf elsewhere, in
        `dtype` (made once per plan)."""
        if (part, dtype) not in self.additive_masks:
            mask = self.steps[part][-1]
            additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            self.additive_masks[part, dtype] = additive.masked_fill(~mask, float("-inf"))
        return self.additive_masks[part, dtype]


# Sequences shorter than this are attended together in blocks of up to this many tokens: per-call overhead
# outweighs the masked-out work below it (CPU, SmolLM2, bf16, 16 pairs of ~50 tokens: one call per sequence
# 0.89x the 4D-mask rows, blocks of 128 1.03x; `python benchmarks/bench_layouts.py`).
SEGMENT_BLOCK_TOKENS = 128


def plan_segments(
    segments: Sequence[Sequence[int]], device: torch.device, block_tokens: int | None = None
) -> SegmentPlan:
    """The `SegmentPlan` of a batch's `segments` rows `(start, prefix, branch_1, ..., branch_K)` (0 = no
    branch; an unshared sequence is `(start, length, 0, ...)`), in row order; `block_tokens` defaults to
    `SEGMENT_BLOCK_TOKENS` (0: every sequence on its own)."""
    if block_tokens is None:
        block_tokens = SEGMENT_BLOCK_TOKENS
    blocks: list[list[tuple[int, list[int]]]] = []
    block_length, longest = 0, 0
    for _, prefix, *branches in segments:
        branches = [length for length in branches if length]
        length = prefix + sum(branches)
        longest = max(longest, prefix + max(branches, default=0))
        if not blocks or block_length + length > block_tokens:
            blocks.append([])
            block_length = 0
        blocks[-1].append((prefix, branches))
        block_length += length
    sizes, steps = [], []
    for block in blocks:
        if len(block) == 1:
            prefix, branches = block[0]
            head = len(steps)
            sizes.append(prefix + (branches[0] if branches else 0))
            steps.append(("causal",))
            for branch in branches[1:]:
                mask = torch.ones(branch, prefix + branch, dtype=torch.bool, device=device).tril(prefix)
                sizes.append(branch)
                steps.append(("branch", head, prefix, mask))
            continue
        kinds = [
            kind
            for prefix, branches in block
            for kind in [SHARED] * prefix + [i for i, length in enumerate(branches, 1) for _ in range(length)]
        ]
        lengths = torch.tensor([prefix + sum(branches) for prefix, branches in block])
        sequence_id = torch.repeat_interleave(torch.arange(len(block)), lengths)
        sizes.append(int(lengths.sum()))
        steps.append(("block", packed_attention_mask(sequence_id, torch.tensor(kinds)).to(device)))
    return SegmentPlan(sizes, steps, longest)


# Keywords the decoder layers hand attention that segment attention may ignore: they carry no attention math
# (`sliding_window` and `is_causal` are checked against the plan by `check_plan_arguments`).
PASSIVE_ATTENTION_KEYWORDS = frozenset(
    {"position_ids", "use_cache", "cache_position", "output_attentions", "sliding_window", "is_causal"}
)


def check_plan_arguments(module: nn.Module, plan: SegmentPlan, keywords: dict) -> None:
    """Raise ValueError naming what segment attention cannot honour for this plan, where ignoring it would
    change the rewards silently: a sliding window narrower than a sequence of the plan, a non-causal module,
    and any other keyword with a value (`softcap`, `position_bias`, attention sinks, ...)."""
    window = keywords.get("sliding_window")
    if window is not None and window < plan.longest:
        raise ValueError(
            f"segment attention applies no window: sliding_window={window} is narrower than a sequence of "
            f"{plan.longest} tokens"
        )
    if keywords.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError(f"segment attention is causal; {type(module).__name__} is not")
    ignored = sorted(
        name
        for name, value in keywords.items()
        if value is not None and name not in PASSIVE_ATTENTION_KEYWORDS
    )
    if ignored:
        raise ValueError(
            f"segment attention cannot apply {', '.join(ignored)} (given by {type(module).__name__})"
        )


# On CPU (torch 2.13, 2 threads, 9 heads of 64, causal; `python benchmarks/bench_attention.py`) the bf16 flash
# kernel's forward takes 0.41-0.81x fp32's time at every part size (64-2048 keys), but its backward is slower for
# short parts: 3.0x fp32's (casts included) at 64 keys, 2.3x at 128, about even at 256-512, 0.82-0.89x at 768-2048.
# `CpuSegmentAttention` therefore runs every part's forward in the inputs' dtype (the kernel per-part SDPA runs) and
# the backward of a half-precision part with at most this many keys in fp32, from the same inputs, the saved
# output and its fp32 log-sum-exp (the gradient of the same attention, rounded once at the end). One forward + loss
# + backward of SmolLM2-135M bf16 (`python benchmarks/bench_cpu_step.py bound --data_dir /tmp/kwise-data`, 4
# interleaved rounds, medians of per-round ratios): every backward in bf16 (bound 0) takes 1.21x this bound's time
# on a K-wise row of 5,292 tokens at max_seq_len 512 and on hh pairs of 1,443 tokens; a bound of 256 1.08x / 1.06x.
CPU_FP32_BACKWARD_MAX_KEYS = 512


def cpu_backward_dtype(query: torch.Tensor, num_keys: int) -> torch.dtype:
    """The dtype `CpuSegmentAttention` runs one part's backward in: fp32 for a half-precision part with at most
    `CPU_FP32_BACKWARD_MAX_KEYS` keys (faster there, see above), else the inputs' own dtype."""
    if query.dtype in (torch.bfloat16, torch.float16) and num_keys <= CPU_FP32_BACKWARD_MAX_KEYS:
        return torch.float32
    return query.dtype


class AttentionPart(NamedTuple):
    """One SDPA call of a segment row: the part's queries and the keys/values it attends, with the key/value
    heads expanded to the query heads, in the dtype `attention_parts` was asked for."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    is_causal: bool
    mask: torch.Tensor | None  # boolean, True = attend; or the plan's additive mask (`additive` below)
    # A later branch: its keys start with the first `prompt_tokens` keys of part `prompt_part` (0 and -1 otherwise).
    prompt_part: int = -1
    prompt_tokens: int = 0


def attention_parts(
    plan: SegmentPlan,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    additive: bool = False,
    dtype_of: Callable[[int], torch.dtype] | None = None,
) -> Iterator[AttentionPart]:
    """The parts of a segment row in plan order (`[1, heads, tokens, head_dim]` inputs, `key`/`value` with their
    own, possibly fewer, heads). A later branch's keys are the prompt's keys (the first `prefix` of part `head`)
    followed by its own; `additive` gives masks as the CPU kernel takes them; `dtype_of(keys)` the dtype a part
    with that many keys is given in (default: the inputs' own). Head expansion and casts run once on the whole
    row (a row has tens of parts: per-part copies cost more in calls than in bytes)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: every query head gets its key/value head
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    key_counts = [
        size + (step[2] if step[0] == "branch" else 0)
        for size, step in zip(plan.sizes, plan.steps, strict=True)
    ]
    dtypes = [query.dtype if dtype_of is None else dtype_of(count) for count in key_counts]
    # Split (not slice) the row: the backward of a split is one concatenation, where every slice's backward
    # would write a zero-filled tensor of the whole row.
    rows = {
        dtype: [tensor.to(dtype).split(plan.sizes, dim=2) for tensor in (query, key, value)]
        for dtype in dict.fromkeys(dtypes)
    }
    for part, (step, dtype) in enumerate(zip(plan.steps, dtypes, strict=True)):
        queries, keys, values = rows[dtype]
        part_keys, part_values, mask, head, prefix = keys[part], values[part], None, -1, 0
        if step[0] == "branch":
            _, head, prefix, mask = step
            part_keys = torch.cat([keys[head][:, :, :prefix], part_keys], dim=2)
            part_values = torch.cat([values[head][:, :, :prefix], part_values], dim=2)
        elif step[0] == "block":
            mask = step[1]
        if additive and mask is not None:
            mask = plan.additive_mask(part, dtype)
        yield AttentionPart(queries[part], part_keys, part_values, step[0] == "causal", mask, head, prefix)


# The kernel SDPA runs on CPU, called directly for its log-sum-exp and its backward (`CpuSegmentAttention`).
CPU_FLASH_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
CPU_FLASH_ATTENTION_BACKWARD = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)


def cpu_kernel_applies(
    plan: SegmentPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float
) -> bool:
    """Whether `CpuSegmentAttention` may run: CPU tensors, no dropout, no autocast (the direct kernel call would not
    be cast as SDPA is), one head size for query, key and value with unit stride, no empty part, and the flash
    kernel available and not turned off (SDPA falls back to its math kernel otherwise; so do we)."""
    return (
        CPU_FLASH_ATTENTION is not None
        and query.device.type == "cpu"
        and dropout == 0.0
        and not torch.is_autocast_enabled("cpu")
        and query.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and all(tensor.stride(-1) == 1 for tensor in (query, key, value))
        and min(plan.sizes, default=0) > 0
        and torch.backends.cuda.flash_sdp_enabled()  # the one switch for the flash kernel, CPU included
    )


class CpuSegmentAttention(torch.autograd.Function):
    """Segment attention on CPU, `[1, heads, L, head_dim]` -> `[1, heads, L, head_dim]`: the forward makes the kernel
    calls of per-part SDPA, with its results. Saved for backward: the row's query and grouped key/value (as given),
    and each part's output and log-sum-exp. The backward forms every part's inputs again (head expansion, cast
    to `cpu_backward_dtype`, prompt concatenation: copies, no attention math), runs the kernel's backward per part,
    adds a branch's gradient of its prompt's keys/values to the prompt's (in fp32), and sums a key/value head's
    over the query heads it served."""

    @staticmethod
    def forward(ctx, query, key, value, plan: SegmentPlan, scaling: float | None):
        outputs, logsumexps = [], []
        for part in attention_parts(plan, query, key, value, additive=True):
            output, logsumexp = CPU_FLASH_ATTENTION(
                part.query, part.key, part.value, 0.0, part.is_causal, attn_mask=part.mask, scale=scaling
            )
            outputs.append(output)
            logsumexps.append(logsumexp)
        ctx.plan, ctx.scaling = plan, scaling
        ctx.save_for_backward(query, key, value, *outputs, *logsumexps)
        return torch.cat(outputs, dim=2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        query, key, value, *saved = ctx.saved_tensors
        plan, count = ctx.plan, len(ctx.plan.sizes)
        grad_queries, grad_keys, grad_values = [], [], []
        parts = attention_parts(plan, query, key, value, True, partial(cpu_backward_dtype, query))
        grads = grad_output.split(plan.sizes, dim=2)
        for index, (part, grad) in enumerate(zip(parts, grads, strict=True)):
            dtype = part.query.dtype
            grad_query, grad_key, grad_value = CPU_FLASH_ATTENTION_BACKWARD(
                grad.to(dtype), part.query, part.key, part.value, saved[index].to(dtype),
                saved[count + index], 0.0, part.is_causal, attn_mask=part.mask, scale=ctx.scaling,
            )  # fmt: skip
            # A later branch: the gradient of its prompt's keys goes to the prompt's part, summed over the
            # branches in at least fp32 (a no-op once widened, and for fp32/float64).
            if part.prompt_tokens:
                prompt, tokens = part.prompt_part, part.prompt_tokens
                wide = torch.promote_types(grad_keys[prompt].dtype, torch.float32)
                grad_keys[prompt] = grad_keys[prompt].to(wide)
                grad_values[prompt] = grad_values[prompt].to(wide)
                grad_keys[prompt][:, :, :tokens].add_(grad_key[:, :, :tokens])
                grad_values[prompt][:, :, :tokens].add_(grad_value[:, :, :tokens])
                grad_key, grad_value = grad_key[:, :, tokens:], grad_value[:, :, tokens:]
            grad_queries.append(grad_query)
            grad_keys.append(grad_key)
            grad_values.append(grad_value)
        grad_key, grad_value = torch.cat(grad_keys, dim=2), torch.cat(grad_values, dim=2)  # the widest dtype
        if query.shape[1] != key.shape[1]:  # a key/value head served `groups` query heads
            grad_key, grad_value = (
                grad.unflatten(1, (key.shape[1], -1)).sum(2) for grad in (grad_key, grad_value)
            )
        grad_query = torch.cat(grad_queries, dim=2)
        return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype), None, None


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
    """Attention of a segment row: one SDPA per sequence (short ones in small blocks) instead of one masked
    SDPA over the whole row, so the cost is about the sum of the squared sequence lengths, not the square of
    their sum. The plan arrives as the `rewardspeed_segments` keyword, which the decoder layers hand through
    to attention; without it (plain padded batches) this IS `sdpa`.

    For a shared sequence `(start, prompt, branch_1, branch_2, ...)`: prompt + branch_1 attend causally among
    themselves; every later branch attends to the prompt and causally to itself (keys = prompt + branch, mask
    `tril(diagonal=prompt)`), exactly what `prompt + branch` alone computes for it.

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
    check_plan_arguments(module, plan, kwargs)
    dropout = dropout if module.training else 0.0
    if cpu_kernel_applies(plan, query, key, value, dropout):
        output = CpuSegmentAttention.apply(query, key, value, plan, scaling)
    else:
        output = torch.cat(
            [
                functional.scaled_dot_product_attention(
                    part.query, part.key, part.value, part.mask, dropout, part.is_causal, scale=scaling
                )
                for part in attention_parts(plan, query, key, value)
            ],
            dim=2,
        )
    return output.transpose(1, 2).contiguous(), None


def register_segment_attention() -> None:
    """Make `SEGMENT_ATTENTION` known to transformers (idempotent): the attention function, and sdpa's mask
    builder for it (an all-ones 2D mask becomes None, so no `L x L` mask is built)."""
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
            f"segment attention needs attn_implementation='sdpa', the backbone has {attention!r}; "
            "collate without segment attention (a 4D mask) instead"
        )
    register_segment_attention()
    reward_model.backbone.set_attn_implementation(SEGMENT_ATTENTION)
    # transformers only warns when a model cannot switch; the row would then attend across sequences.
    if reward_model.config._attn_implementation != SEGMENT_ATTENTION:
        raise ValueError(
            f"{type(reward_model.backbone).__name__} did not switch to {SEGMENT_ATTENTION!r} attention; "
            "collate without segment attention (a 4D mask) instead"
        )


def stop_segment_attention(reward_model: nn.Module) -> None:
    """Switch a backbone from `SEGMENT_ATTENTION` back to sdpa (a no-op for any other attention)."""
    if reward_model.config._attn_implementation == SEGMENT_ATTENTION:
        reward_model.backbone.set_attn_implementation("sdpa")
