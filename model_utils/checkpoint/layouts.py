"""What each saved layout is: key names, the class that loads it, its config, its vocabulary rows.

Every layout maps onto `RewardModel`'s own names (`backbone.*`, `v_head.weight`):

- `hf`: transformers' native `<Arch>ForSequenceClassification`: `<base_model_prefix>.*` (e.g. `model.`,
  `transformer.`, `gpt_neox.`) and `score.weight`; `num_labels=1`.
- `auto_map`: a class of `model_utils/hf_reward_model.py` (shipped in the folder as `modeling_reward_model.py`)
  holding the backbone under its `base_model_prefix` (`model.`, `transformer.` or `backbone.`) and
  `v_head.weight`; `config.json` `auto_map` points `AutoModelForSequenceClassification` at it.
- `dschat`: DeepSpeed-Chat's `rwtransformer.*` (old spelling `rwtranrsformer.*` accepted on load) and
  `v_head.weight`, with exactly `8 * ceil(len(tokenizer) / 8)` embedding rows (`dschat_vocabulary`).
- ours / `torch.save(reward_model.state_dict())`: `backbone.*`, `v_head.weight` (read only).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    MODEL_MAPPING,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from model_utils import hf_reward_model
from model_utils.checkpoint.errors import CheckpointError, one_line
from model_utils.checkpoint.names import (
    AUTO_MAP_MODULE,
    BACKBONE_PREFIX,
    DSCHAT_BACKBONE_PREFIX,
    DSCHAT_BACKBONE_PREFIXES,
    HEAD_NAME,
    HF_HEAD_NAME,
    SAVE_FORMATS,
)
from model_utils.tokenizer import padded_vocab_size


def describe_keys(keys, limit: int = 8) -> str:
    """Up to `limit` sorted keys, comma-separated, with the total when there are more."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def meta_model(model_class: type[nn.Module], config: PretrainedConfig) -> nn.Module:
    """`model_class(config)` on the meta device (no memory); a config it cannot build is a `CheckpointError`."""
    try:
        with torch.device("meta"):
            return model_class(config)
    except Exception as error:  # e.g. 0 attention heads: ZeroDivisionError deep inside the modelling code
        raise CheckpointError(
            f"cannot build {model_class.__name__} from this config ({one_line(error)})"
        ) from error


def backbone_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The `AutoModel` class of a config (e.g. `LlamaModel`)."""
    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise CheckpointError(
            f"transformers has no base model for model_type {config.model_type!r}"
        ) from None


def sequence_classification_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The native `<Arch>ForSequenceClassification` class of a config."""
    try:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    except KeyError:
        raise CheckpointError(
            f"transformers has no ForSequenceClassification class for model_type {config.model_type!r}; "
            "save with save_format='auto_map' or 'dschat'"
        ) from None


def check_save_format(save_format: str, config: PretrainedConfig | None = None) -> None:
    """Raise `CheckpointError` unless `save_format` is known and (given the backbone config) can be written."""
    if save_format not in SAVE_FORMATS:
        raise CheckpointError(f"unknown save format {save_format!r} (choose from {', '.join(SAVE_FORMATS)})")
    if config is not None and save_format == "hf":
        sequence_classification_class(config)


def to_reward_model_names(
    state_dict: dict[str, torch.Tensor], base_model_prefix: str
) -> dict[str, torch.Tensor]:
    """Rename keys of any supported layout to `RewardModel`'s (`backbone.*`, `v_head.weight`).

    Args:
        state_dict: tensors as stored.
        base_model_prefix: the backbone class's `base_model_prefix` (the attribute name transformers'
            `<Arch>ForSequenceClassification` stores the backbone under, e.g. "model").
    """
    hf_prefix = f"{base_model_prefix}."
    renamed = {}
    for key, tensor in state_dict.items():
        if key == HF_HEAD_NAME:
            key = HEAD_NAME
        elif key.startswith(DSCHAT_BACKBONE_PREFIXES):
            key = BACKBONE_PREFIX + key.split(".", 1)[1]
        elif base_model_prefix and key.startswith(hf_prefix):
            key = BACKBONE_PREFIX + key[len(hf_prefix) :]
        renamed[key] = tensor
    return renamed


def rename_backbone(
    state_dict: dict[str, torch.Tensor], backbone_prefix: str, head_name: str
) -> dict[str, torch.Tensor]:
    """`RewardModel` names (`backbone.*`, `v_head.weight`) -> `backbone_prefix*` and `head_name`."""
    renamed = {}
    for key, tensor in state_dict.items():
        if key == HEAD_NAME:
            key = head_name
        elif key.startswith(BACKBONE_PREFIX):
            key = backbone_prefix + key[len(BACKBONE_PREFIX) :]
        else:
            raise CheckpointError(f"unexpected key {key!r}: not a RewardModel state dict")
        renamed[key] = tensor
    return renamed


def check_layout(
    state_dict: dict[str, torch.Tensor], model_class: type[PreTrainedModel], config: PretrainedConfig
) -> None:
    """Raise `CheckpointError` unless `state_dict` has exactly the keys `model_class` expects.

    Skipped while an `HfDeepSpeedConfig` is alive: building a model then goes through `zero.Init`, which
    needs every rank, and only rank 0 writes.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return
    expected = set(meta_model(model_class, config).state_dict().keys())
    missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
    if missing or unexpected:
        raise CheckpointError(
            f"state dict does not fit {model_class.__name__}: missing keys: {describe_keys(missing) or '-'}; "
            f"unexpected keys: {describe_keys(unexpected) or '-'}"
        )


def input_embedding_key(state_dict: dict[str, torch.Tensor], config: PretrainedConfig) -> str:
    """The key of the backbone's input embedding matrix in a `RewardModel`-named state dict."""
    backbone = meta_model(backbone_class(config), config)
    embedding = backbone.get_input_embeddings().weight
    name = next(name for name, parameter in backbone.named_parameters() if parameter is embedding)
    key = BACKBONE_PREFIX + name
    if key not in state_dict:
        raise CheckpointError(f"no input embeddings ({key}) in the state dict")
    return key


def input_embedding_rows(state_dict: dict[str, torch.Tensor], config: PretrainedConfig) -> int:
    """Rows of the backbone's input embedding matrix in a `RewardModel`-named state dict."""
    return state_dict[input_embedding_key(state_dict, config)].shape[0]


def dschat_vocabulary(
    state_dict: dict[str, torch.Tensor], config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> dict[str, torch.Tensor]:
    """The state dict with exactly `8 * ceil(len(tokenizer) / 8)` input embedding rows, as DeepSpeed-Chat needs.

    DeepSpeed-Chat's step 3 builds the critic from `config.json`, resizes its embeddings to that size and only
    then loads `pytorch_model.bin`; its loader drops a tensor whose shape differs without a word, leaving the
    embeddings random. We keep more rows when the base model has them (e.g. Qwen2's 151936 for 151665 tokens),
    so they are cut here; rows at or beyond that size belong to ids the tokenizer never produces. A matrix with
    fewer rows but at least one per token (a converted foreign checkpoint, e.g. 32001 rows) is filled up with
    zero rows, equally unreachable; `check_tokenizer` has refused a tokenizer longer than the matrix before.
    """
    key = input_embedding_key(state_dict, config)
    embedding, rows = state_dict[key], padded_vocab_size(tokenizer)
    if embedding.shape[0] == rows:
        return state_dict
    if embedding.shape[0] > rows:
        resized = embedding[:rows].clone()  # a clone, or torch.save would write the whole original storage
    else:
        resized = torch.cat([embedding, embedding.new_zeros(rows - embedding.shape[0], *embedding.shape[1:])])
    return {**state_dict, key: resized}


def output_config(
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    save_format: str,
    dtype: torch.dtype,
    vocab_rows: int,
) -> PretrainedConfig:
    """A copy of the backbone config for one layout: architectures, labels, pad/eos ids, vocab size, dtype."""
    config = copy.deepcopy(config)
    for stale in ("auto_map", "reward_mean", "reward_std", "reward_model_metadata"):
        if hasattr(config, stale):
            delattr(config, stale)
    config.vocab_size = vocab_rows
    config.pad_token_id = tokenizer.pad_token_id
    config.dtype = dtype
    if save_format in ("hf", "auto_map"):
        config.num_labels = 1
        # A scalar score: pipeline("text-classification") then returns it raw (with None, a sigmoid).
        config.problem_type = "regression"
    if save_format == "hf":
        config.architectures = [sequence_classification_class(config).__name__]
    elif save_format == "auto_map":
        reward_class = hf_reward_model.reward_class_for(config)
        config.architectures = [reward_class.__name__]
        config.auto_map = {"AutoModelForSequenceClassification": f"{AUTO_MAP_MODULE}.{reward_class.__name__}"}
    else:
        config.architectures = [backbone_class(config).__name__]
    return config


def layout_state_dict(
    state_dict: dict[str, torch.Tensor], config: PretrainedConfig, save_format: str
) -> dict[str, torch.Tensor]:
    """Rename a `RewardModel` state dict for a layout and check it against the layout's class."""
    if save_format == "dschat":
        renamed = rename_backbone(state_dict, DSCHAT_BACKBONE_PREFIX, HEAD_NAME)
    else:
        hf = save_format == "hf"
        model_class = (
            sequence_classification_class(config) if hf else hf_reward_model.reward_class_for(config)
        )
        renamed = rename_backbone(
            state_dict, f"{model_class.base_model_prefix}.", HF_HEAD_NAME if hf else HEAD_NAME
        )
        check_layout(renamed, model_class, config)
    return {name: tensor.contiguous() for name, tensor in renamed.items()}
