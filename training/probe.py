"""The start-up probe: a fast layout is used only where it gives the padded batch's rewards on the model itself.

    layout = choose_layout(config, engine, tokenizer.pad_token_id)   # after deepspeed.initialize, every rank

A config tells what cannot be exact (`layout_candidates`: ALiBi, a short window, flash attention, ...); what it
cannot tell is measured here: whether the decoder layers hand the segment plan through to attention (StableLM's
do not: the row would attend across sequences), whether the model switches attention at all (Falcon only warns),
whether eager attention takes the 4D mask with its softcapping (Gemma 2). A few synthetic pairs of different
lengths (an empty prompt, one-token responses, a long pair up to a segment block's size) are scored in each
candidate layout and in the padded layout, through the engine (collective under ZeRO-3: every rank runs the
same forwards), in eval mode without gradients; the optimizer is not touched. Each candidate is also scored
again with the tokens a response must not read replaced (`content_leak`: the other examples', its sibling
branches'): an exact layout's rewards do not move at all, where a layer carrying state along a packed row
(state-space, linear attention) moves them by less than half precision's tolerance against the padded batch
could see. Before any candidate, `later_token_effect` checks that attention is causal (an encoder attending
both ways cannot be packed).
The first candidate within `probe_tolerance` is kept; `auto` falls back to the padded layout with the measured
differences in the log, `on` stops with a `ConfigError` naming them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from model_utils.packed_attention import rope_batch_dependence
from model_utils.segment_attention import SEGMENT_BLOCK_TOKENS, stop_segment_attention, use_segment_attention
from training.arguments import TrainConfig
from training.data.collate import response_order
from training.errors import ConfigError
from training.layout import SEGMENTS, BatchLayout, batch_rewards, layout_candidates, on_flags

logger = logging.getLogger(__name__)
T = TypeVar("T")

# (prompt, chosen, rejected) tokens: different lengths, an empty prompt, one-token responses.
PROBE_SHAPES = ((0, 1, 2), (5, 1, 1), (3, 7, 4), (12, 2, 9))
# The long pair fills up to this many tokens (or `max_seq_len`): a sequence of a segment block's size, planned
# alone (the "causal" + "branch" steps of segment attention, beside the short pairs' "block" steps).
PROBE_LONGEST = SEGMENT_BLOCK_TOKENS
# Allowed |reward difference| as a fraction of the reward scale (`probe_tolerance`). fp32: the padded batch and
# a packed row compute the same sums in another order (seen: <= 1e-6 on every tiny backbone, 1e-5 on
# SmolLM2-135M). Half precision rounds activations after every matmul, in other groupings. Seen on SmolLM2-135M
# bf16 (30 layers), exact layouts: up to 3.5% of the scale on the probe's pairs (3 value heads x max_seq_len 64,
# 128, 512), 4.8% on 16 default-data pairs; a row attending across its sequences (what a backbone that drops the
# segment plan computes): 31-74% on SmolLM2, 17% on a 2-layer random StableLM. 10% sits between.
FP32_RELATIVE_TOLERANCE = 1e-5
HALF_RELATIVE_TOLERANCE = 0.10
# Allowed change of a sequence's rewards when every other sequence of its batch gets new tokens of the same lengths
# (`content_leak`), as a fraction of the reward scale. In an exact layout no sequence reads another's tokens and
# the passes have the same shapes, so nothing changes: exactly 0 on every exact layout of every family, fp32 and
# bf16 (tests/test_backbone_sweep.py). A layer carrying state along the row (state-space, linear attention,
# recurrence) leaks: 2e-3-0.5 of the scale on 2-layer random models, which half precision's 10% above cannot
# tell from rounding (Qwen3-Next, Qwen3.5, Falcon-H1, MiniMax, RecurrentGemma in bf16). Half precision keeps a
# margin for kernels that might round differently from pass to pass.
FP32_LEAK_TOLERANCE = 1e-6
HALF_LEAK_TOLERANCE = 1e-4


def real_tokens(
    count: int, vocab_size: int, pad_token_id: int | None, generator: torch.Generator
) -> torch.Tensor:
    """`count` random token ids, none of them the pad (the padded layout must not mistake one for padding)."""
    ids = torch.randint(0, vocab_size, (count,), generator=generator)
    if pad_token_id is not None:
        ids[ids == pad_token_id] = (pad_token_id + 1) % vocab_size
    return ids


def probe_pairs(max_seq_len: int, vocab_size: int, pad_token_id: int | None, seed: int = 0) -> list[dict]:
    """Synthetic tokenised pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`, `margin`) that fit `max_seq_len`.

    >>> [tuple(len(p[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")) for p in probe_pairs(8, 50, 0)]
    [(0, 1, 2), (5, 1, 1), (1, 7, 4), (0, 2, 8), (1, 7, 6)]
    """
    longest = min(max_seq_len, PROBE_LONGEST)
    long_pair = (longest // 8, longest - longest // 8, longest - longest // 8 - 1)
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for prompt, chosen, rejected in (*PROBE_SHAPES, long_pair):
        chosen, rejected = min(chosen, max_seq_len), min(rejected, max_seq_len)
        prompt = min(prompt, max_seq_len - max(chosen, rejected))
        ids = real_tokens(prompt + chosen + rejected, vocab_size, pad_token_id, generator).tolist()
        pairs.append(
            {
                "prompt_ids": ids[:prompt],
                "chosen_ids": ids[prompt : prompt + chosen],
                "rejected_ids": ids[prompt + chosen :],
                "margin": None,
            }
        )
    return pairs


def probe_tolerance(expected: torch.Tensor, dtype: torch.dtype, leak: bool = False) -> float:
    """Largest |reward difference| a layout may show and still count as exact: a fraction of the reward scale
    (the largest |padded reward|, at least 1), 1e-5 in fp32, 10% in bf16/fp16, between the rounding noise of
    exact layouts and the error of wrong ones (measured: see `HALF_RELATIVE_TOLERANCE`); with `leak`, the largest
    `content_leak` (1e-6 / 1e-4 of the scale)."""
    scale = max(1.0, float(expected.abs().max()))
    if leak:
        return (FP32_LEAK_TOLERANCE if dtype == torch.float32 else HALF_LEAK_TOLERANCE) * scale
    relative = FP32_RELATIVE_TOLERANCE if dtype == torch.float32 else HALF_RELATIVE_TOLERANCE
    return relative * scale


def engine_device(engine) -> torch.device:
    return getattr(engine, "device", None) or next(engine.parameters()).device


def largest_over_ranks(value: float, device: torch.device) -> float:
    """The largest `value` of any rank, so that every rank keeps the same layout (on `device`: NCCL reduces
    only CUDA tensors)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


def probe_examples(pairs: list[dict]) -> list[dict]:
    """`pairs` and one K-wise group made of their tokens (a prompt with three response branches), so the probe
    also covers more than two branches of one shared prompt."""
    third, second = pairs[2], pairs[1]
    group = {
        "prompt_ids": third["prompt_ids"],
        "response_ids": [third["chosen_ids"], third["rejected_ids"], second["chosen_ids"]],
        "scores": [2.0, 1.0, 0.0],
        "comparisons": [[0, 1], [0, 2], [1, 2]],
    }
    return [*pairs, group]


def layout_rewards(engine, examples: list[dict], layout: BatchLayout, pad_token_id: int) -> torch.Tensor:
    """All rewards of `examples` in `layout` (the batch's response order, float32), from one forward pass."""
    device = engine_device(engine)
    batch = {key: value.to(device) for key, value in layout.collator(pad_token_id)(examples).items()}
    return batch_rewards(engine, batch, layout).float().cpu()


# A part of an example (`with_new_tokens`); its responses are parts 0, 1, ... (chosen, rejected).
PROMPT = "prompt"


def with_new_tokens(
    example: dict, generator: torch.Generator, vocab_size: int, pad_token_id: int, keep: set = frozenset()
) -> dict:
    """`example` with new random tokens (never the pad), of the same lengths, in every part not in `keep`: its
    `PROMPT` and its responses by index."""

    def tokens(ids: list[int]) -> list[int]:
        return real_tokens(len(ids), vocab_size, pad_token_id, generator).tolist()

    changed = {} if PROMPT in keep else {"prompt_ids": tokens(example["prompt_ids"])}
    if "response_ids" in example:
        responses = example["response_ids"]
        changed["response_ids"] = [ids if k in keep else tokens(ids) for k, ids in enumerate(responses)]
    else:
        changed |= {
            key: tokens(example[key]) for k, key in enumerate(("chosen_ids", "rejected_ids")) if k not in keep
        }
    return {**example, **changed}


def content_leak(
    engine, examples: list[dict], layout: BatchLayout, pad_token_id: int, rewards: torch.Tensor
) -> float:
    """The largest change of a response's reward (from `rewards`, in `layout`) when tokens it must not read get
    new values of the same lengths: every other example's (one pass per example), and its sibling responses' (one
    pass per response index, the prompts kept). What a padded comparison in half precision cannot tell from
    rounding: a layer carrying state along a packed row reads the sequences, or the branches, before it."""
    vocab_size = getattr(engine, "module", engine).config.vocab_size
    generator = torch.Generator().manual_seed(1)
    order = response_order(examples)
    rounds = [  # (the responses whose rewards must not move, the examples with what of each is kept)
        (
            [index == kept for index, _ in order],
            [
                example if index == kept else with_new_tokens(example, generator, vocab_size, pad_token_id)
                for index, example in enumerate(examples)
            ],
        )  # fmt: skip
        for kept in range(len(examples))
    ]
    rounds += [
        (
            [k == branch for _, k in order],
            [
                with_new_tokens(example, generator, vocab_size, pad_token_id, {PROMPT, branch})
                for example in examples
            ],
        )
        for branch in range(max(k for _, k in order) + 1)
    ]
    worst = 0.0
    for own, changed in rounds:
        change = layout_rewards(engine, changed, layout, pad_token_id) - rewards
        worst = max(worst, float(change[torch.tensor(own)].abs().max()))
    return worst


def failing_soft(measurement: Callable[[], T], failed: T) -> tuple[T, str]:
    """(`measurement()`, ""), or (`failed`, the error's first line) when the model cannot run it: a layout or
    check that fails is not taken. Collective and out-of-memory errors still end the start-up."""
    try:
        return measurement(), ""
    except torch.distributed.DistError:
        raise
    except (ValueError, RuntimeError, TypeError, IndexError) as error:
        if isinstance(error, torch.OutOfMemoryError):
            raise
        return failed, f"{type(error).__name__}: {error}".splitlines()[0]


@torch.no_grad()
def later_token_effect(engine, pad_token_id: int, max_seq_len: int) -> tuple[float, str]:
    """(how far a token's value moves when the tokens after it change, over every rank; what went wrong when the
    check could not run): two rows of one batch, equal in their first half. 0 for causal attention, whose values
    never read later tokens (and the rows have the same shapes); an encoder attending both ways reads them, which no
    packed layout can give (its rows are causal per sequence)."""
    length = max(2, min(16, max_seq_len))
    vocab_size = getattr(engine, "module", engine).config.vocab_size
    ids = real_tokens(2 * length, vocab_size, pad_token_id, torch.Generator().manual_seed(2)).view(2, length)
    ids[1, : length // 2] = ids[0, : length // 2]
    device = engine_device(engine)

    def effect() -> float:
        values = engine(ids.to(device), torch.ones_like(ids).to(device), return_values=True).float().cpu()
        return float((values[0, : length // 2] - values[1, : length // 2]).abs().max())

    later, failure = failing_soft(effect, math.inf)
    return largest_over_ranks(later, device), failure


def measure(
    engine, examples: list[dict], layout: BatchLayout, pad_token_id: int, expected: torch.Tensor
) -> tuple[float, float, str]:
    """(max |reward - expected|, `content_leak`, both the largest over every rank, or inf; what went wrong when
    the layout could not run)."""

    def difference_and_leak() -> tuple[float, float]:
        if layout.attention == SEGMENTS:
            use_segment_attention(getattr(engine, "module", engine))
        rewards = layout_rewards(engine, examples, layout, pad_token_id)
        leak = content_leak(engine, examples, layout, pad_token_id, rewards)
        return float((rewards - expected).abs().max()), leak

    (difference, leak), failure = failing_soft(difference_and_leak, (math.inf, math.inf))
    device = engine_device(engine)
    return largest_over_ranks(difference, device), largest_over_ranks(leak, device), failure


def probe_layout(
    engine, candidates: list[BatchLayout], config: TrainConfig, pad_token_id: int
) -> BatchLayout:
    """The first of `candidates` whose rewards equal the padded batch's within `probe_tolerance` and do not move
    with tokens they must not read (`content_leak`), its reason saying what was measured; else (also when
    attention is not causal) the padded layout (`ConfigError` when a flag is `on`). Every rank must call it (it
    runs collective forwards under ZeRO-3 and agrees on the largest difference)."""
    start = time.perf_counter()
    reward_model = getattr(engine, "module", engine)
    dtype = reward_model.v_head.weight.dtype
    pairs = probe_examples(probe_pairs(config.max_seq_len, reward_model.config.vocab_size, pad_token_id))
    was_training = engine.training
    engine.eval()
    measured, chosen = [], None
    try:
        with torch.no_grad():
            expected = layout_rewards(engine, pairs, BatchLayout(), pad_token_id)
            tolerance, leak_tolerance = (probe_tolerance(expected, dtype, leak) for leak in (False, True))
            later, failure = later_token_effect(engine, pad_token_id, config.max_seq_len)
            if later > leak_tolerance:
                measured.append(
                    failure or f"attention is not causal (a value moves {later:.2g} with later tokens)"
                )
                candidates = []
            for candidate in candidates:
                difference, leak, failure = measure(engine, pairs, candidate, pad_token_id, expected)
                measured.append(
                    f"{candidate.attention} {failure or f'max diff {difference:.2g}, leak {leak:.2g}'}"
                )
                if difference <= tolerance and leak <= leak_tolerance:
                    chosen = candidate
                    break
                stop_segment_attention(reward_model)
    finally:
        if was_training:
            engine.train()
    summary = (
        f"{', '.join(measured)}; tolerance {tolerance:.2g}, leak {leak_tolerance:.2g} "
        f"({str(dtype).removeprefix('torch.')}); "
        f"probe {time.perf_counter() - start:.2f} s"
    )
    if chosen is not None:
        why = f"{chosen.reason}; " if chosen.reason else ""
        return dataclasses.replace(chosen, reason=f"{why}proved exact at start-up: {summary}")
    reason = f"no fast layout gives the padded rewards on this model: {summary}"
    for flag in on_flags(config):
        raise ConfigError(f"--{flag} on: {reason}; train with --packing off --share_prompt off")
    return BatchLayout(reason=reason)


def choose_layout(config: TrainConfig, engine, pad_token_id: int) -> BatchLayout:
    """The layout the run trains with, chosen once after `deepspeed.initialize` on every rank: the fastest
    candidate the probe proves exact on this model, else padded; logged in one line with the reason (and a
    warning when the backbone's rope makes rewards depend on their batch at this `max_seq_len`, which no layout
    changes). Leaves the backbone switched to segment attention when that is the layout."""
    backbone_config = getattr(engine, "module", engine).config
    candidates, reason = layout_candidates(config, backbone_config)
    layout = (
        probe_layout(engine, candidates, config, pad_token_id) if candidates else BatchLayout(reason=reason)
    )
    logger.info("batch layout: %s", layout.describe())
    if dependence := rope_batch_dependence(backbone_config, config.max_seq_len):
        logger.warning(dependence)
    return layout
