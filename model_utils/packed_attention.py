"""What a backbone needs to run packed rows: the capability checks, the rule of which token sees which, and the
4D mask that says it.

A packed row holds several sequences end to end, `position_ids` restarting at each. With prompt sharing a
sequence is `prompt + response_1 + ... + response_K`: every response branch sees the prompt and itself, never
another branch, and its positions restart right after the prompt, so each branch token computes exactly what it
computes in `prompt + response_i` alone. Two ways to tell the backbone which token sees which:

- a 4D mask (`packed_attention_mask`, `backbone_attention_mask`): `[R, 1, L, L]`, handed to the backbone as
  `attention_mask`; transformers 5's `masking_utils.create_causal_mask` returns a 4D mask as is for `sdpa`
  (boolean, True = attend) and `eager` (additive float);
- segment attention (`SEGMENT_ATTENTION`, sdpa backbones; `segment_attention.py`): one unpadded row and a
  `SegmentPlan`; attention runs per sequence, so it costs the sum of the squared sequence lengths instead of the
  square of the row, and no `L x L` mask is built.

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

import torch
from transformers import PretrainedConfig

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


def length_switched_rope(config: PretrainedConfig) -> tuple[str, str, int] | None:
    """(rope type, setting, tokens) when the backbone's rotary frequencies change for a whole forward pass once its
    longest position passes `tokens`, else None. transformers picks them from `max(position_ids)` of the pass:
    `longrope` (Phi-3.5, Phi-4-mini: the long factors past `original_max_position_embeddings`) and `dynamic` NTK
    scaling (past `max_position_embeddings`; it also keeps the grown scale for later, shorter passes). Read from
    `rope_parameters` (transformers 5, also per layer type) or `rope_scaling` (4.x).

    >>> from transformers import LlamaConfig
    >>> length_switched_rope(LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    ('dynamic', 'max_position_embeddings', 2048)
    """
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(parameters, dict):
        return None
    # Per layer type when any value is a dict (a type without rope may be None); else one flat dict.
    nested = any(isinstance(value, dict) for value in parameters.values())
    switches = []
    for entry in (
        [value for value in parameters.values() if isinstance(value, dict)] if nested else [parameters]
    ):
        rope_type = entry.get("rope_type", entry.get("type")) or ""
        if rope_type == "longrope":
            setting = "original_max_position_embeddings"
            tokens = entry.get(setting) or getattr(config, setting, None) or config.max_position_embeddings
        elif "dynamic" in rope_type:
            setting, tokens = "max_position_embeddings", config.max_position_embeddings
        else:
            continue
        switches.append((rope_type, setting, int(tokens)))
    return min(switches, key=lambda switch: switch[2]) if switches else None


def rope_batch_dependence(config: PretrainedConfig, longest_sequence: int) -> str:
    """Why rewards of this backbone depend on what a sequence is batched with, in any layout, when sequences of
    `longest_sequence` tokens pass its rope switch (`length_switched_rope`); "" when they cannot."""
    switch = length_switched_rope(config)
    if switch is None or switch[2] >= longest_sequence:
        return ""
    rope_type, setting, tokens = switch
    history = " and on earlier, longer passes" if "dynamic" in rope_type else ""
    return (
        f"{config.model_type}: rope_type {rope_type!r} changes the rotary frequencies of every sequence in a forward "
        f"pass once one of them is longer than {setting}={tokens} tokens, and --max_seq_len allows "
        f"{longest_sequence}: a reward then depends on the sequences batched with it{history} (transformers "
        f"applies one frequency set per pass, padded or packed alike); --max_seq_len {tokens} keeps rewards "
        "independent"
    )


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
