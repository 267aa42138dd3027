"""The batch layout of a run, decided once after the model is built, and the forward pass it needs.

    layout = choose_layout(config, engine, tokenizer.pad_token_id)   # training/probe.py: candidates, then proof
    collator = layout.collator(tokenizer.pad_token_id)
    rewards = batch_rewards(engine, batch, layout)        # [N], in the batch's response order

Layouts (`BatchLayout.attention` says how the backbone is told which token sees which):
- `padded`: one padded row per response (`PaddedCollator`; pairs: chosen rows first); any backbone, any loss.
- `segments`: packing on an sdpa backbone: the whole micro-batch in ONE unpadded row, attention per sequence
  (`model_utils/segment_attention.py`, segment attention); with prompt sharing, one sequence per prompt holding
  all its responses (K branches).
- `mask`: packing or sharing on an eager backbone (or one that keeps the segment plan from attention), or
  sharing without packing: rows with a block-diagonal 4D mask (`PackedCollator` without segments).
- `flex`: a flex_attention backbone (`--attn_implementation flex_attention`, GPU): the segment row with a
  FlexAttention `BlockMask` built once per micro-batch (`kernel_attention.segment_block_mask`); packing and prompt
  sharing with K branches. FlexAttention has no backward on CPU (torch 2.13), so it trains on GPUs only.
- `varlen`: a flash-attention backbone (GPU): packing only, the segment row with restarted positions and the varlen
  arguments (`kernel_attention.varlen_kwargs`); a shared prompt is not a varlen pattern, so sharing is off there.
`layout_candidates` lists, from the config alone, the fast layouts `--packing`/`--share_prompt` allow for the
backbone and the loss (an `on` that a static check refuses is a `ConfigError` naming the reason); the start-up
probe (`training/probe.py`) keeps the first one whose rewards equal the padded batch's on the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from model_utils.kernel_attention import segment_block_mask, varlen_kwargs
from model_utils.packed_attention import (
    FLASH_ATTENTIONS,
    FLEX_ATTENTION,
    backbone_attention_mask,
    supports_packing,
    supports_segment_attention,
)
from model_utils.segment_attention import plan_segments
from training.arguments import TrainConfig
from training.data.collate import PackedCollator, PaddedCollator
from training.errors import ConfigError

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
        attention: `PADDED`, `MASK`, `SEGMENTS`, `FLEX` or `VARLEN` (see the module docstring).
        max_tokens_per_row: token budget of a `MASK` row when packing (None: one sequence per row).
        reason: why this layout: what the start-up probe measured, or why the fast paths are off.
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


def on_flags(config: TrainConfig) -> list[str]:
    """The fast-path flags the run set to `on` (a fallback to the padded layout would break their promise)."""
    return [flag for flag in ("packing", "share_prompt") if getattr(config, flag) == "on"]


def layout_candidates(
    config: TrainConfig, backbone_config: PretrainedConfig
) -> tuple[list[BatchLayout], str]:
    """The fast layouts `--packing`/`--share_prompt` allow for this backbone and loss, fastest first, before the
    probe proves one exact (a candidate's `reason`: why a faster one is not among them); with none, the reason.

    Reads the config only (safe before the model is loaded; the attention implementation is then not known
    yet and is checked again once the model is built). An `on` flag that a static check refuses raises
    `ConfigError` naming the reason.
    """
    packing, share_prompt = config.packing != "off", config.share_prompt != "off"
    if not (packing or share_prompt):
        return [], "--packing off, --share_prompt off"
    if config.loss_type != "pairwise":
        reason = f"--loss_type {config.loss_type} needs padded pairs"
    else:
        reason = supports_packing(backbone_config, config.max_seq_len)[1]
    if reason:
        for flag in on_flags(config):
            raise ConfigError(f"--{flag} on: {reason}; train with --packing off --share_prompt off")
        return [], reason
    attention = backbone_config._attn_implementation
    if attention == FLEX_ATTENTION:  # one BlockMask per micro-batch expresses packing and sharing alike
        return [BatchLayout(packing, share_prompt, FLEX)], ""
    if attention in FLASH_ATTENTIONS:
        why_not_shared = f"{attention}: a shared prompt is not a varlen pattern (use flex_attention or sdpa)"
        if config.share_prompt == "on":
            raise ConfigError(f"--share_prompt on: {why_not_shared}")
        if not packing:
            return [], why_not_shared
        return [BatchLayout(True, False, VARLEN, reason=why_not_shared if share_prompt else "")], ""
    candidates = []
    segments, why_not_segments = supports_segment_attention(backbone_config)
    if packing and segments:
        # One row per micro-batch, attention per sequence: no padding, no L x L mask.
        candidates.append(BatchLayout(packing, share_prompt, SEGMENTS))
    budget = config.max_seq_len * (2 if share_prompt else 1) if packing else None
    mask_reason = why_not_segments if packing else ""
    candidates.append(BatchLayout(packing, share_prompt, MASK, max_tokens_per_row=budget, reason=mask_reason))
    return candidates, ""


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
    elif layout.attention == VARLEN:  # no padding: flash attention takes the varlen path from the positions
        rewards = model_or_engine(
            batch["input_ids"],
            torch.ones_like(batch["input_ids"]),
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
