"""Tiny tokenizers and backbones built from configs (no downloads), one per supported architecture."""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModel,
    BloomConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from model_utils import RewardModel

WORDS = [
    "the",
    "a",
    "is",
    "of",
    "and",
    "to",
    "in",
    "on",
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "bird",
    "has",
    "hat",
    "box",
    "what",
    "color",
    "where",
    "sits",
    "likes",
    "one",
    "two",
    "three",
    "four",
    "five",
    "yes",
    "no",
    "human",
    "assistant",
    "question",
    "answer",
    "says",
    "not",
    "who",
    "which",
]
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def make_tokenizer(with_pad: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: 3 specials + 37 words (40 tokens; 41 with a pad, not a multiple of 8)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if with_pad:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


# Settings of the wide backbone table (`BACKBONES`), on top of `tiny_config`'s sizes. Every dropout is 0 (train-
# mode losses of packed and plain batches compare exactly); head_dim 8 where the default is larger; experts tiny.
NO_DROPOUT = {"attention_dropout": 0.0}
WIDE_SETTINGS: dict[str, dict] = {
    "qwen3": {"head_dim": 8, **NO_DROPOUT},
    "qwen3_moe": {
        "head_dim": 8,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "decoder_sparse_step": 1,
        **NO_DROPOUT,
    },
    "mistral": {"head_dim": 8, **NO_DROPOUT},
    "mixtral": {"head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.0},
    "gemma": {"head_dim": 8, **NO_DROPOUT},
    "gemma2": {"head_dim": 8, "query_pre_attn_scalar": 8, **NO_DROPOUT},  # eager only; softcap 50
    "gemma3_text": {"head_dim": 8, "query_pre_attn_scalar": 8, **NO_DROPOUT},
    "phi3": {"original_max_position_embeddings": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **NO_DROPOUT},
    "olmo2": NO_DROPOUT,
    "glm4": {"head_dim": 8, **NO_DROPOUT},
    "smollm3": NO_DROPOUT,
    "starcoder2": {"residual_dropout": 0.0, "embedding_dropout": 0.0, **NO_DROPOUT},
    "deepseek_v3": {  # multi-head latent attention; layer 0 dense, layer 1 mixture of experts
        "num_key_value_heads": 4,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 16,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        **NO_DROPOUT,
    },
    "granite": NO_DROPOUT,  # no native ForSequenceClassification
    "cohere": NO_DROPOUT,  # no native ForSequenceClassification
    "stablelm": {"hidden_dropout": 0.0, **NO_DROPOUT},  # its layers do not hand attention their keywords
}
GPT2_LIKE = {
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_inner": 64,
    "n_positions": 128,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
OWN_SIZES: dict[str, dict] = {
    "gptj": {**GPT2_LIKE, "rotary_dim": 4},  # rotary_dim <= head_dim (8)
    "gpt_bigcode": GPT2_LIKE,  # multi-query attention
    "falcon": {  # rotary (alibi=False), multi-query, parallel attention
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    },
}
# Named variants: (model_type, settings).
VARIANTS: dict[str, tuple[str, dict]] = {
    # A 12-token window on every layer (Mistral / Phi-3 style: `sliding_window` without `layer_types`).
    "mistral_short_window": ("mistral", {"sliding_window": 12}),
    # Gemma 3's interleaved layers with a 12-token window on the sliding ones.
    "gemma3_text_sliding": (
        "gemma3_text",
        {"sliding_window": 12, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "falcon_alibi": ("falcon", {"alibi": True}),
}


def tiny_config(architecture: str, vocab_size: int = 44, **overrides) -> PretrainedConfig:
    """A 2-layer, 32-wide config of `architecture` (hidden 32, 4 heads, 128 positions); any name of
    `BACKBONES` (a model type or a `VARIANTS` name); `overrides` replace any setting."""
    common = {"vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 1}
    decoder = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
    }
    builders = {
        "llama": lambda: LlamaConfig(intermediate_size=64, num_key_value_heads=2, **decoder, **common),
        "qwen2": lambda: Qwen2Config(intermediate_size=64, num_key_value_heads=2, **decoder, **common),
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common),
        # word_embed_proj_dim != hidden_size exercises OPT-350m's projected output (head width 16).
        "opt": lambda: OPTConfig(ffn_dim=64, word_embed_proj_dim=16, pad_token_id=2, **decoder, **common),
        "gpt_neox": lambda: GPTNeoXConfig(intermediate_size=64, **decoder, **common),
        "bloom": lambda: BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common),
    }
    model_type, settings = VARIANTS.get(architecture, (architecture, {}))
    if model_type in builders:
        config = builders[model_type]()
        for name, value in {**settings, **overrides}.items():
            setattr(config, name, value)
        return config
    if model_type in WIDE_SETTINGS:
        sizes = {**decoder, "intermediate_size": 64, "num_key_value_heads": 2}
        settings = {**sizes, **WIDE_SETTINGS[model_type], **settings}
    elif model_type in OWN_SIZES:
        settings = {**OWN_SIZES[model_type], **settings}
    else:
        raise ValueError(f"unknown architecture {architecture}")
    # No pad id of the model's own (some defaults lie outside the tiny vocabulary): the tokenizer's is set later.
    return AutoConfig.for_model(model_type, **common, pad_token_id=None, **{**settings, **overrides})


ARCHITECTURES = ("llama", "qwen2", "gpt2", "opt", "gpt_neox", "bloom")
# The wide table (tests/test_backbones.py): every popular decoder family, the traps a packing rule must see
# (ALiBi, short windows, layers that drop attention keywords, eager-only softcapping, no native reward class).
BACKBONES = (
    *ARCHITECTURES,
    *WIDE_SETTINGS,
    *OWN_SIZES,
    *VARIANTS,
)


# One set of small settings under every name families use for them; a family ignores the names it lacks.
GENERIC_SETTINGS = {
    "vocab_size": 44,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_inner": 64,
    "n_positions": 128,
    "d_model": 32,
    "num_layers": 2,
    "ffn_dim": 64,
    "moe_intermediate_size": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "n_routed_experts": 4,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def wide_head_reward_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> RewardModel:
    """A `RewardModel` on a random backbone of `config` (seed 0), its value head drawn wide (std 0.5) so that
    rewards sit far from 0 and a layout's differences show."""
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(config, dtype=dtype))
    torch.nn.init.normal_(model.v_head.weight, std=0.5)
    return model


def generic_config(model_type: str, **overrides) -> PretrainedConfig:
    """A tiny config of any family from `GENERIC_SETTINGS` (tests/scripts/backbone_sweep.py builds every family so;
    some refuse or do not build with them)."""
    return AutoConfig.for_model(model_type, **{**GENERIC_SETTINGS, **overrides})


def save_tiny_backbone(
    folder: str, architecture: str, vocab_size: int = 44, with_pad: bool = False, seed: int = 0
) -> str:
    """Write a tiny random backbone to `folder` and its tokenizer to `folder/tokenizer`; return `folder`.

    The tokenizer has its own folder because transformers 5 loads a folder whose config says `qwen2` with
    `Qwen2Tokenizer`, which cannot rebuild a word-level vocabulary.
    """
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(architecture, vocab_size), dtype=torch.float32)
    model.save_pretrained(folder)
    make_tokenizer(with_pad=with_pad).save_pretrained(tokenizer_dir(folder))
    return folder


def tokenizer_dir(folder: str) -> str:
    return os.path.join(folder, "tokenizer")


def folder_tokenizer(architecture: str):
    """The tiny tokenizer that loads back from a model folder of `architecture`: the word-level one, except for
    qwen2 (transformers 5 loads such folders as `Qwen2Tokenizer`), a byte-level `Qwen2Tokenizer` without
    merges, one token per byte (257 tokens, EOS = pad, so the project adds its own pad)."""
    if tiny_config(architecture).model_type != "qwen2":
        return make_tokenizer()
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2 import Qwen2Tokenizer

    characters = bytes_to_unicode().values()
    return Qwen2Tokenizer(
        vocab={"<|endoftext|>": 0, **{c: i for i, c in enumerate(characters, 1)}}, merges=[]
    )


def save_trainable_backbone(folder: str, architecture: str, seed: int = 0) -> str:
    """`save_tiny_backbone` plus `folder_tokenizer` in `folder` itself, as `python -m training.train_rm
    --model_name_or_path folder` loads them; returns `folder`."""
    save_tiny_backbone(folder, architecture, seed=seed)
    folder_tokenizer(architecture).save_pretrained(folder)
    return folder


COLORS = ("red", "blue", "green")
ANIMALS = ("cat", "dog", "bird")


def write_tiny_pairs(path: str, num_pairs: int, seed: int = 0) -> str:
    """An easily learnable prompt/chosen/rejected jsonl in the tiny vocabulary (for testing the loop, not a model).

    The chosen answer repeats the prompt's fact and ends in "yes"; the rejected one does neither.
    """
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as file:
        for _ in range(num_pairs):
            animal = rng.choice(ANIMALS)
            color, other = rng.sample(COLORS, 2)
            row = {
                "prompt": f"the {animal} has a {color} hat . what color is the hat of the {animal} ?",
                "chosen": f" {color} yes",
                "rejected": f" {other} no",
            }
            file.write(json.dumps(row) + "\n")
    return path


def write_tiny_ranked(path: str, num_rows: int, seed: int = 0) -> str:
    """A learnable K-wise jsonl (`prompt`, `responses`, `scores`) in the tiny vocabulary: 3-5 responses per
    prompt, scored 3 (right colour, "yes"), 2 (right colour), 1 ("yes" only), 0 (neither); some rows tie."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as file:
        for _ in range(num_rows):
            animal = rng.choice(ANIMALS)
            color, other = rng.sample(COLORS, 2)
            candidates = [
                (f" {color} yes", 3),
                (f" {color} no", 2),
                (f" {other} yes", 1),
                (f" {other} no", 0),
            ]
            candidates += [(f" {other} {color} no", 0)] if rng.random() < 0.5 else []
            chosen = rng.sample(candidates, rng.randint(3, len(candidates)))
            row = {
                "prompt": f"the {animal} has a {color} hat . what color is the hat of the {animal} ?",
                "responses": [text for text, _ in chosen],
                "scores": [score for _, score in chosen],
            }
            file.write(json.dumps(row) + "\n")
    return path
