"""What a backbone needs to run packed rows: the capability check, segment attention, and switching to it.

A packed row holds several sequences end to end, `position_ids` restarting at each. With prompt sharing a
sequence is `prompt + response_1 + ... + response_K`: every response branch sees the prompt and itself, never
another branch, and its positions restart right after the prompt, so each branch token computes exactly what it
computes in `prompt + response_i` alone. Two ways to tell the backbone which token sees which:

- a 4D mask (`packed_attention_mask`, `backbone_attention_mask`): `[R, 1, L, L]`, handed to the backbone as
  `attention_mask`; transformers 5's `masking_utils.create_causal_mask` returns a 4D mask as is for `sdpa`
  (boolean, True = attend) and `eager` (additive float);
- segment attention (`SEGMENT_ATTENTION`, sdpa backbones): one unpadded row and a `SegmentPlan`; attention runs
  per sequence (`segment_attention_forward`), so it costs the sum of the squared sequence lengths instead of the
  square of the row, and no `L x L` mask is built. The function is registered in transformers'
  `AttentionInterface` by `use_segment_attention`, which switches a built model once; for any call without a
  plan it IS sdpa, so the switched model scores padded batches as before.

Whether a backbone can take either is decided in two steps. `supports_packing` and `supports_segment_attention`
read the config and refuse, with the reason, what cannot be exact: ALiBi (built from the 2D mask), bidirectional
attention, attention kernels that take no 4D mask, a sliding window (or attention chunk) shorter than the longest
sequence, logit softcapping under segment attention. What a config cannot tell, whether the decoder layers hand
the plan through to attention (StableLM's do not) or whether the model switches attention at all (Falcon and
Bloom only warn), is measured on the model itself at start-up (`training/probe.py`).

On GPU with `flash_attention_2`/`_3` a 4D mask cannot be used. Packing alone (no sharing) has a native varlen
path there: call the backbone with `attention_mask=None` and the restarted `position_ids` (transformers then
infers `cu_seqlens` from where the positions restart). Prompt sharing is not a varlen pattern (a branch skips
part of its segment) and needs sdpa or eager with the 4D mask (or a flex-attention BlockMask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

# What a token is, for the rule "a branch sees the prompt and itself": 0 for prompt tokens and every token of
# an unshared sequence, i >= 1 for the tokens of response branch i.
SHARED = 0

# The backbone attention that reads a `SegmentPlan` (and is exactly `sdpa` for any other call).
SEGMENT_ATTENTION = "rewardspeed_segments"
# Attention implementations that take a packed row: a 4D mask (sdpa, eager) or a `SegmentPlan`.
MASK_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", SEGMENT_ATTENTION)
# Backbones whose every layer adds ALiBi biases (others say so with an `alibi` setting: Falcon, MPT).
ALIBI_MODEL_TYPES = ("bloom",)
# Also exact with packed rows, through their own kernels' arguments (GPU): a BlockMask, or varlen sequence starts.
FLEX_ATTENTION = "flex_attention"
FLASH_ATTENTIONS = ("flash_attention_2", "flash_attention_3")
KERNEL_ATTENTION_IMPLEMENTATIONS = (FLEX_ATTENTION, *FLASH_ATTENTIONS)


def uses_alibi(config: PretrainedConfig) -> bool:
    """Whether the backbone adds ALiBi biases (Bloom; Falcon with `alibi=True`; MPT's `attn_config.alibi`)."""
    attention_config = getattr(config, "attn_config", None)
    nested = (
        attention_config.get("alibi")
        if isinstance(attention_config, dict)
        else getattr(attention_config, "alibi", False)
    )
    return config.model_type in ALIBI_MODEL_TYPES or bool(getattr(config, "alibi", False)) or bool(nested)


def attention_window(config: PretrainedConfig) -> tuple[str, int] | None:
    """The narrowest attention a layer of this backbone applies, as (setting, tokens), or None when every layer
    attends to the whole sequence. A token sees `sliding_window` tokens, itself included.

    Read as transformers 5 applies them: `sliding_window` for every layer (Mistral, Mixtral, Phi-3, Starcoder2)
    unless `use_sliding_window` is off (Qwen2/3, Qwen3-MoE, SmolLM3: their `max_window_layers` and
    `no_rope_layers` are folded into `layer_types` by the config); `layer_types` naming `sliding_attention`
    (Gemma 2/3, Cohere2, SmolLM3) or `chunked_attention` (`attention_chunk_size`, Llama 4) layers; GPT-Neo's
    `local` layers (`window_size`). A window whose `layer_types` name no sliding layer is still counted: the
    rule errs towards refusing a long run, never towards a wrong reward.

    >>> from transformers import MistralConfig
    >>> attention_window(MistralConfig(sliding_window=4))
    ('sliding_window', 4)
    """
    layer_types = getattr(config, "layer_types", None) or ()
    sliding_window = getattr(config, "sliding_window", None)
    windows = []
    if sliding_window and ("sliding_attention" in layer_types or getattr(config, "use_sliding_window", True)):
        windows.append(("sliding_window", sliding_window))
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk and "chunked_attention" in layer_types:
        windows.append(("attention_chunk_size", chunk))
    if "local" in (getattr(config, "attention_layers", None) or ()):
        windows.append(("window_size", config.window_size))
    return min(windows, key=lambda window: window[1]) if windows else None


def supports_packing(config: PretrainedConfig, longest_sequence: int) -> tuple[bool, str]:
    """Whether packed / prompt-shared rows CAN give the plain batch's rewards on this backbone, read from its
    config; the start-up probe (`training/probe.py`) then checks that they do, on the model itself.

    Args:
        longest_sequence: the most tokens one sequence (with prompt sharing: the prompt + one response) of
            the run can hold, i.e. its `max_seq_len`.

    Returns:
        (True, "") or (False, the reason, naming the backbone and the setting).

    A packed row hands attention a 4D mask (or a segment plan) that transformers uses as is, so a sliding
    window is never applied to it: packing is exact only when every sequence fits the window.

    >>> from transformers import BloomConfig, LlamaConfig, MistralConfig
    >>> supports_packing(LlamaConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2), 512)[0]
    True
    >>> supports_packing(BloomConfig(n_layer=1, hidden_size=8, n_head=2), 512)[1][:40]
    'bloom: ALiBi position biases are built f'
    >>> supports_packing(MistralConfig(sliding_window=4), 32)[1][:41]
    'mistral: sliding_window=4 is shorter than'
    """
    model_type = config.model_type
    if uses_alibi(config):
        return False, (
            f"{model_type}: ALiBi position biases are built from the 2D attention mask, so a packed row's "
            "restarted positions and 4D mask cannot be given"
        )
    if getattr(config, "use_bidirectional_attention", False) or getattr(config, "is_causal", True) is False:
        return False, f"{model_type}: bidirectional attention; packed rows are built for causal attention"
    # None: not chosen yet (a config read from disk, not bound to a model).
    attention = config._attn_implementation
    if (
        attention is not None
        and attention not in MASK_ATTENTION_IMPLEMENTATIONS + KERNEL_ATTENTION_IMPLEMENTATIONS
    ):
        return False, (
            f"{model_type} with attn_implementation={attention!r}: packed batches need sdpa, eager, "
            "flex_attention or flash attention; load the model with attn_implementation='sdpa'"
        )
    window = attention_window(config)
    if window is not None and window[1] < longest_sequence:
        setting, tokens = window
        return False, (
            f"{model_type}: {setting}={tokens} is shorter than the longest sequence ({longest_sequence} "
            f"tokens); packed rows apply no window, so they equal the plain batch only when every sequence "
            f"fits it (a token sees {tokens} tokens, itself included)"
        )
    return True, ""


def supports_segment_attention(config: PretrainedConfig) -> tuple[bool, str]:
    """Whether segment attention can stand in for this backbone's attention (config only; whether the layers
    hand the plan through is measured by the start-up probe). Returns (True, "") or (False, the reason)."""
    attention = config._attn_implementation
    if attention not in ("sdpa", SEGMENT_ATTENTION):
        return False, f"segment attention replaces sdpa, the backbone runs {attention!r}"
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        return False, f"attn_logit_softcapping={softcap}, which SDPA cannot apply"
    return True, ""


def packed_attention_mask(sequence_id: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """Boolean `[..., L, L]` mask, True where query q may attend to key k: causal, within one sequence, and a
    branch token only to prompt tokens and its own branch (`sequence_id`, `kind`: `[..., L]`).

    >>> packed_attention_mask(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 2, 2])).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]
    """
    length = sequence_id.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_id.device).tril()
    same_sequence = sequence_id[..., :, None] == sequence_id[..., None, :]
    key_kind, query_kind = kind[..., None, :], kind[..., :, None]
    same_branch = (key_kind == SHARED) | (key_kind == query_kind)
    return same_sequence & causal & same_branch


def backbone_attention_mask(mask: torch.Tensor, config: PretrainedConfig, dtype: torch.dtype) -> torch.Tensor:
    """The boolean `[R, 1, L, L]` mask in the form the backbone's attention takes: as is for sdpa, additive
    (0 where attended, the dtype's minimum elsewhere) for eager, which adds the mask to the scores."""
    if config._attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return mask


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


# On CPU (torch 2.13) the bf16 flash-attention kernel's forward + backward is slower than fp32 for short parts of a
# segment row and faster for long ones (2 threads, 9 heads of 64, causal, casts included, two runs: 64 keys 1.9-2.4x
# the fp32 time, 128 keys 1.5-2.0x, 256 keys 0.8-1.2x, 384-2048 keys 0.7-0.95x; `python
# benchmarks/bench_attention.py`). Parts with at most this many keys are attended in fp32 from the bf16 inputs: the
# same softmax attention, rounded once at the output instead of inside the kernel. End to end (train_rm bf16,
# SmolLM2-135M, hh, 4 pairs per step, most parts ~180 keys) fp32 parts took 7-14% off the step time in 3 quiet A/B
# rounds (measured with the bound at 512; 256 is where the kernel microbenchmark crosses over).
CPU_FP32_ATTENTION_MAX_KEYS = 256


def attention_compute_dtype(query: torch.Tensor, num_keys: int) -> torch.dtype:
    """The dtype one segment part is attended in: fp32 for a half-precision part on CPU with at most
    `CPU_FP32_ATTENTION_MAX_KEYS` keys (faster there, see above), else the inputs' own dtype."""
    if (
        query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and num_keys <= CPU_FP32_ATTENTION_MAX_KEYS
    ):
        return torch.float32
    return query.dtype


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
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: every query head gets its key/value head
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    dropout = dropout if module.training else 0.0
    # Split (not slice) the row: the backward of a split is one concatenation, where every slice's backward
    # would write a zero-filled tensor of the whole row.
    queries, keys, values = (tensor.split(plan.sizes, dim=2) for tensor in (query, key, value))
    outputs = []
    for part, step in enumerate(plan.steps):
        part_queries, part_keys, part_values, options = queries[part], keys[part], values[part], {}
        if step[0] == "causal":
            options["is_causal"] = True
        elif step[0] == "branch":
            _, head, prefix, options["attn_mask"] = step
            part_keys = torch.cat([keys[head][:, :, :prefix], part_keys], dim=2)
            part_values = torch.cat([values[head][:, :, :prefix], part_values], dim=2)
        else:
            options["attn_mask"] = step[1]
        compute_dtype = attention_compute_dtype(part_queries, part_keys.shape[2])
        output = functional.scaled_dot_product_attention(
            part_queries.to(compute_dtype),
            part_keys.to(compute_dtype),
            part_values.to(compute_dtype),
            dropout_p=dropout,
            scale=scaling,
            **options,
        )
        outputs.append(output.to(query.dtype))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


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
