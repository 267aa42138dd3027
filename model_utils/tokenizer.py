"""The tokenizer side of a reward model: a real pad token, and the vocabulary size the embeddings get."""

from __future__ import annotations

import logging
import math

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model_utils.checkpoint.errors import CheckpointError, one_line

logger = logging.getLogger(__name__)

DEFAULT_PAD_TOKEN = "<|pad|>"


def load_tokenizer(
    model_name_or_path: str, add_pad_token: bool = True, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and give it a real pad token that is not EOS.

    A pad that falls back to EOS makes the end-of-response EOS look like padding to every consumer that finds
    the last token from `pad_token_id` (transformers' sequence classification, TRL's PPO reward utility), so
    the reward is read off the wrong token. When the tokenizer has no pad, or its pad is its EOS, a dedicated
    `<|pad|>` token is added (and logged); the factory then grows the embeddings to cover it.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers reads config.json and tokenizer files here: any of its errors
        raise CheckpointError(
            f"{model_name_or_path}: cannot load its tokenizer ({one_line(error)})"
        ) from error
    if add_pad_token and (tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id):
        previous = tokenizer.pad_token
        tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
        logger.warning(
            "Tokenizer of %s had pad token %r (EOS or none); added a dedicated pad token %r (id %d).",
            model_name_or_path,
            previous,
            tokenizer.pad_token,
            tokenizer.pad_token_id,
        )
    return tokenizer


def padded_vocab_size(tokenizer: PreTrainedTokenizerBase, multiple: int = 8) -> int:
    """`8 * ceil(len(tokenizer) / 8)`: the embedding rows the model gets (never fewer than it has)."""
    return multiple * math.ceil(len(tokenizer) / multiple)
