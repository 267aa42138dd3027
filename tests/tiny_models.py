"""Tiny tokenizers and backbones built from configs (no downloads), one per supported architecture."""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
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


def tiny_config(architecture: str, vocab_size: int = 44) -> PretrainedConfig:
    """A 2-layer, 32-wide config of `architecture` (hidden 32, 4 heads, 128 positions)."""
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
    if architecture not in builders:
        raise ValueError(f"unknown architecture {architecture}")
    return builders[architecture]()


ARCHITECTURES = ("llama", "qwen2", "gpt2", "opt", "gpt_neox", "bloom")


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
