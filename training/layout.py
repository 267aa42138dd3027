"""The batch layout of a run, decided once when the model is built, and the forward pass it needs.

    layout = choose_layout(config, reward_model)         # after the model is built; switches its attention
    collator = layout.collator(tokenizer.pad_token_id)
    rewards = batch_rewards(engine, batch, layout)        # [N], in the batch's response order

Layouts (`BatchLayout.attention` says how the backbone is told which token sees which):
- `padded`: one padded row per response (`PaddedCollator`; pairs: chosen rows first); any backbone, any loss.
- `segments`: packing on an sdpa backbone: the whole micro-batch in ONE unpadded row, attention per sequence
  (`model_utils/packed_attention.py`, segment attention); with prompt sharing, one sequence per prompt holding
  all its responses (K branches).
- `mask`: packing or sharing on an eager backbone, or sharing without packing: rows with a block-diagonal 4D
  mask (`PackedCollator` without segments).
- `flex`: a flex_attention backbone (`--attn_implementation flex_attention`, GPU): the segment row with a
  FlexAttention `BlockMask` built once per micro-batch (`packed_attention.segment_block_mask`); packing and prompt
  sharing with K branches. FlexAttention has no backward on CPU (torch 2.13), so it trains on GPUs only.
- `varlen`: a flash-attention backbone (GPU): packing only, the segment row with restarted positions and the varlen
  arguments (`packed_attention.varlen_kwargs`); a shared prompt is not a varlen pattern, so sharing is off there.
`auto` takes packing and prompt sharing where they give the plain rewards exactly (fp32 1e-5) for the backbone
and the loss; `on` where they cannot is a `ConfigError` naming the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from model_utils.packed_attention import (
    FLASH_ATTENTIONS,
    FLEX_ATTENTION,
    SEGMENT_ATTENTION,
    backbone_attention_mask,
    plan_segments,
    segment_block_mask,
    supports_packing,
    use_segment_attention,
    varlen_kwargs,
)
from training.arguments import TrainConfig
from training.data.collate import PackedCollator, PaddedCollator
from training.errors import ConfigError

logger = logging.getLogger(__name__)

PADDED, MASK, SEGMENTS, FLEX, VARLEN = "padded", "mask", "segments", "flex", "varlen"
# Layouts that lay the whole micro-batch in one unpadded row described by `segments`.
ONE_ROW = (SEGMENTS, FLEX, VARLEN)
Collator = PaddedCollator | PackedCollator


@dataclass(frozen=True)
class BatchLayout:
    """How a micro-batch of pairs is laid out for the backbone.

    Attributes:
        packing: sequences laid end to end without padding, positions restarting per sequence.
        share_prompt: one sequence `prompt + response_1 + ... + response_K` per example.
        attention: `PADDED`, `MASK` or `SEGMENTS` (see the module docstring).
        max_tokens_per_row: token budget of a `MASK` row when packing (None: one sequence per row).
        reason: why the fast paths are off, when they are.
    """

    packing: bool = False
    share_prompt: bool = False
    attention: str = PADDED
    max_tokens_per_row: int | None = None
    reason: str = ""

    def describe(self) -> str:
        """The start-up log line: which layout, and why."""
        why = f" ({self.reason})" if self.reason else ""
        return f"packing {self.packing}, prompt sharing {self.share_prompt}, attention {self.attention}{why}"

    def collator(self, pad_token_id: int) -> Collator:
        if self.attention == PADDED:
            return PaddedCollator(pad_token_id)
        return PackedCollator(
            pad_token_id,
            max_tokens_per_row=self.max_tokens_per_row,
            share_prompt=self.share_prompt,
            segment_attention=self.attention in ONE_ROW,
        )


def choose_layout(config: TrainConfig, reward_model: nn.Module) -> BatchLayout:
    """The layout `--packing`/`--share_prompt` ask for, where exact for this backbone and loss; switches an sdpa
    backbone to segment attention when packing (so the first batch needs nothing more)."""
    supported, reason = supports_packing(reward_model.config)
    if config.loss_type != "pairwise":
        supported, reason = False, f"--loss_type {config.loss_type} needs padded pairs"
    for flag in ("packing", "share_prompt"):
        if getattr(config, flag) == "on" and not supported:
            raise ConfigError(f"--{flag} on: {reason}")
    attention = reward_model.config._attn_implementation
    if supported and attention in FLASH_ATTENTIONS and config.share_prompt != "off":
        if config.share_prompt == "on":
            raise ConfigError(
                f"--share_prompt on: {attention} cannot express a shared prompt (use flex_attention or sdpa)"
            )
        share_reason = f"{attention}: prompt sharing is not a varlen pattern"
    else:
        share_reason = ""
    packing = supported and config.packing != "off"
    share_prompt = supported and config.share_prompt != "off" and not share_reason
    if not (packing or share_prompt):
        layout = BatchLayout(reason=reason)
    elif attention == FLEX_ATTENTION:
        layout = BatchLayout(packing, share_prompt, FLEX)
    elif attention in FLASH_ATTENTIONS:
        layout = BatchLayout(packing, False, VARLEN, reason=share_reason)
    elif packing and attention in ("sdpa", SEGMENT_ATTENTION):
        # One row per micro-batch, attention per sequence: no padding, no L x L mask.
        use_segment_attention(reward_model)
        layout = BatchLayout(packing, share_prompt, SEGMENTS)
    else:
        budget = config.max_seq_len * (2 if share_prompt else 1) if packing else None
        layout = BatchLayout(packing, share_prompt, MASK, max_tokens_per_row=budget)
    logger.info("batch layout: %s", layout.describe())
    return layout


def batch_rewards(
    model_or_engine: nn.Module, batch: dict[str, torch.Tensor], layout: BatchLayout
) -> torch.Tensor:
    """Rewards `[N]` (float32) of the responses of a batch collated for `layout`, in the batch's response order
    (`training/data/collate.py`), from ONE forward pass.

    Always through `model_or_engine(...)`: DeepSpeed 0.19 runs its backward prologue (ZeRO gradient-accumulation
    boundary, backward depth) from hooks that only `engine.forward` registers; calling another module method
    trains wrongly under ZeRO-3 with gradient accumulation (tests/scripts/zero_packing.py checks it).
    """
    if layout.attention == PADDED:
        return model_or_engine(batch["input_ids"], batch["attention_mask"]).float()
    if layout.attention == FLEX:
        segments = batch["segments"].tolist()
        block_mask = segment_block_mask(segments, batch["input_ids"].shape[1], batch["input_ids"].device)
        rewards = model_or_engine(
            batch["input_ids"], block_mask, batch["position_ids"], reward_index=batch["reward_index"]
        )
    elif layout.attention == VARLEN:
        rewards = model_or_engine(
            batch["input_ids"],
            torch.ones_like(
                batch["input_ids"]
            ),  # no padding: flash attention takes the varlen path from positions
            batch["position_ids"],
            reward_index=batch["reward_index"],
            **varlen_kwargs(batch["segments"].tolist(), batch["input_ids"].device),
        )
    elif layout.attention == SEGMENTS:
        rewards = model_or_engine(
            batch["input_ids"],
            torch.ones_like(batch["input_ids"]),  # sdpa_mask turns an all-ones mask into None (no L x L mask)
            batch["position_ids"],
            reward_index=batch["reward_index"],
            rewardspeed_segments=plan_segments(batch["segments"].tolist(), batch["input_ids"].device),
        )
    else:
        reward_model = getattr(model_or_engine, "module", model_or_engine)
        attention_mask = backbone_attention_mask(
            batch["attention_mask"], reward_model.config, reward_model.v_head.weight.dtype
        )
        rewards = model_or_engine(
            batch["input_ids"], attention_mask, batch["position_ids"], reward_index=batch["reward_index"]
        )
    return rewards.float()
