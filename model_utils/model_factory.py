"""Factories that build the backbone and the reward/critic model (DeepSpeed-Chat's `model_utils` shape).

    tokenizer = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")           # model_utils/tokenizer.py
    reward_model = create_critic_model("HuggingFaceTB/SmolLM2-135M-Instruct", tokenizer, ds_config)
    critic = create_critic_model("output/rm", tokenizer, ds_config, rlhf_training=True)  # PPO stage
    reward_model, tokenizer = load_reward_model("output/rm")                   # scoring, one process

Under ZeRO stage 3 an `HfDeepSpeedConfig` is kept alive only for the duration of the factory call, so the weights
are created partitioned; leaving it alive afterwards would make every later `from_pretrained` go through
`zero.Init`, which hangs when only rank 0 builds a model (for saving or conversion).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AutoModel, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from model_utils.checkpoint.errors import CheckpointError, one_line
from model_utils.checkpoint.load import load_reward_model_weights, read_config
from model_utils.reward_model import RewardModel
from model_utils.tokenizer import load_tokenizer, padded_vocab_size

logger = logging.getLogger(__name__)

# Every config attribute that holds a dropout probability in the supported architectures
# (Llama/Qwen2: attention_dropout; GPT-2: *_pdrop; OPT: dropout, attention_dropout, activation_dropout;
# GPT-NeoX: attention_dropout, hidden_dropout; Bloom: attention_dropout, hidden_dropout).
DROPOUT_CONFIG_KEYS = (
    "dropout",
    "attention_dropout",
    "hidden_dropout",
    "activation_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "classifier_dropout",
)


def configure_dropout(config: PretrainedConfig, dropout: float | None) -> None:
    """Set every dropout probability the config knows to `dropout` (None leaves the config as it is)."""
    if dropout is None:
        return
    for key in DROPOUT_CONFIG_KEYS:
        if hasattr(config, key):
            setattr(config, key, dropout)


def is_zero3(ds_config: dict[str, Any] | None) -> bool:
    return bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage", 0) == 3


@contextlib.contextmanager
def zero3_init_context(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """While inside, transformers creates weights partitioned by ZeRO-3 (no-op for other stages).

    The `HfDeepSpeedConfig` is referenced only weakly by transformers; holding it here and unsetting it on exit
    keeps its life to the factory call.
    """
    if not is_zero3(ds_config):
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_deepspeed_config


def resize_embeddings_upward(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ds_config: dict[str, Any] | None = None
) -> None:
    """Grow the input embeddings to `8 * ceil(len(tokenizer) / 8)` rows; never shrink them.

    `num_embeddings` is read from the module, which keeps the full size even when the weight is partitioned.
    Under ZeRO-3 (call inside `zero3_init_context`) transformers gathers the old matrix but builds the new one
    whole on every rank, with rank-local random rows; we hand it to `zero.Init`, which broadcasts rank 0's copy
    and partitions it, so the new rows agree across ranks and no rank keeps the full matrix.
    """
    target = padded_vocab_size(tokenizer)
    current = model.get_input_embeddings().num_embeddings
    if target <= current:
        return
    model.resize_token_embeddings(target, mean_resizing=False)
    logger.info("Resized embeddings from %d to %d rows.", current, target)
    if is_zero3(ds_config):
        import deepspeed

        deepspeed.zero.Init(module=model.get_input_embeddings(), config_dict_or_path=ds_config)


def create_hf_model(
    model_class: type,
    model_name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    ds_config: dict[str, Any] | None = None,
    rlhf_training: bool = False,
    dropout: float | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Build a transformers model (e.g. `AutoModel`) ready for DeepSpeed.

    Args:
        model_class: an auto class such as `AutoModel` or `AutoModelForCausalLM`.
        model_name_or_path: hub id or local folder.
        tokenizer: its `pad_token_id` goes into the config; its length decides the vocabulary padding.
        ds_config: DeepSpeed config dict; with ZeRO stage 3 the weights are created partitioned.
        rlhf_training: build from the config only (weights are loaded afterwards, e.g. a trained reward model).
        dropout: set every dropout probability to this value (0.0 disables dropout); None keeps the config's.
        dtype: dtype to load the weights in (None: the checkpoint's own, as transformers decides).
        attn_implementation: "sdpa", "eager", "flex_attention", "flash_attention_2", ... (None: transformers'
            default for the architecture, sdpa where it has it).
    """
    options = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    config = read_config(model_name_or_path, trust_remote_code=trust_remote_code)
    configure_dropout(config, dropout)
    # An added pad token may lie beyond the checkpoint's rows until the embeddings grow: set it after.
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id < config.vocab_size:
        config.pad_token_id = tokenizer.pad_token_id
    with zero3_init_context(ds_config):
        if rlhf_training:
            try:
                model = model_class.from_config(config, **options)
            except Exception as error:  # a config.json transformers parses but cannot build (e.g. 0 heads)
                raise CheckpointError(
                    f"{model_name_or_path}: cannot build {model_class.__name__} from its config "
                    f"({one_line(error)})"
                ) from error
        else:
            model = model_class.from_pretrained(model_name_or_path, config=config, **options)
        resize_embeddings_upward(model, tokenizer, ds_config)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.end_token_id = tokenizer.eos_token_id
    return model


def create_critic_model(
    model_name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    ds_config: dict[str, Any] | None = None,
    num_padding_at_beginning: int = 0,
    rlhf_training: bool = False,
    dropout: float | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    head_seed: int = 0,
    attn_implementation: str | None = None,
) -> RewardModel:
    """Build a `RewardModel`: a new head on a pretrained backbone, or (PPO) a trained reward model reloaded.

    With `rlhf_training=True`, `model_name_or_path` is a saved reward model in any supported format; the model is
    built from its config (partitioned under ZeRO-3) and its weights are loaded, failing loudly on missing or
    unexpected keys. Otherwise the new head is drawn from N(0, 1 / (hidden + 1)) with `head_seed` alone, so it
    does not depend on how the backbone was built (`init_value_head`).
    """
    backbone = create_hf_model(
        AutoModel,
        model_name_or_path,
        tokenizer,
        ds_config=ds_config,
        rlhf_training=rlhf_training,
        dropout=dropout,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
    )
    reward_model = RewardModel(backbone, num_padding_at_beginning=num_padding_at_beginning)
    if rlhf_training:
        load_reward_model_weights(reward_model, model_name_or_path)
    else:
        init_value_head(reward_model, head_seed)
    return reward_model


@torch.no_grad()
def init_value_head(reward_model: RewardModel, seed: int) -> None:
    """Draw the value head from N(0, 1 / (hidden + 1)) with its own seeded generator (DeepSpeed-Chat's scale)."""
    generator = torch.Generator().manual_seed(seed)
    std = 1.0 / (reward_model.v_head.in_features + 1) ** 0.5
    torch.nn.init.normal_(reward_model.v_head.weight, std=std, generator=generator)


def load_reward_model(
    model_name_or_path: str,
    tokenizer_name_or_path: str | None = None,
    num_padding_at_beginning: int = 0,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[RewardModel, PreTrainedTokenizerBase]:
    """(reward model in eval mode, tokenizer) from a saved reward model folder (any layout), one process.

    What `python -m training.evaluate` and `python -m training.serve` load; for a PPO critic under DeepSpeed use
    `create_critic_model(..., ds_config, rlhf_training=True)`.
    """
    read_config(
        model_name_or_path, trust_remote_code
    )  # a broken config.json is named before the tokenizer trips
    tokenizer = load_tokenizer(
        tokenizer_name_or_path or model_name_or_path, trust_remote_code=trust_remote_code
    )
    reward_model = create_critic_model(
        model_name_or_path,
        tokenizer,
        num_padding_at_beginning=num_padding_at_beginning,
        rlhf_training=True,
        dropout=0.0,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
    )
    return reward_model.eval(), tokenizer
