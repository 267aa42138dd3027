"""Reward models as transformers `PreTrainedModel`s, for the `auto_map` (trust_remote_code) layout.

A folder saved with `save_format="auto_map"` carries a copy of this file as `modeling_reward_model.py` and a
`config.json` whose `auto_map` points `AutoModelForSequenceClassification` at one of these classes:

    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    rewards = model(input_ids, attention_mask=attention_mask).logits[:, 0]    # [B]

Each class holds the backbone under its `base_model_prefix` and the head as `v_head` (no bias), and reads the
reward at the last real token found from the attention mask, with positions counted from the mask, so left
and right padding give the same rewards as `model_utils.reward_model.RewardModel`.

This file is copied into saved folders: it must import only torch and transformers. It is also the one home of
the helpers `RewardModel` shares with it (`head_input_size`, `position_ids_from_mask`, `last_token_index`).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from transformers import (
    AutoModel,
    BloomConfig,
    BloomModel,
    BloomPreTrainedModel,
    LlamaConfig,
    LlamaModel,
    LlamaPreTrainedModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES


def head_input_size(config: PretrainedConfig) -> int:
    """Width of the hidden states the backbone returns.

    OPT-350m style configs project the decoder output to `word_embed_proj_dim`; everything else returns
    `hidden_size` (GPT-2's `n_embd` is mapped to it by its config class).
    """
    return getattr(config, "word_embed_proj_dim", None) or config.hidden_size


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row sees the same positions as unpadded.

    >>> position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])).tolist()
    [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor, num_padding_at_beginning: int = 0) -> torch.Tensor:
    """Index of the last real (mask == 1) token of each row: `[B, T] -> [B]`.

    Works for left padding, right padding and rows without padding (a truncated row uses its last token).
    The first `num_padding_at_beginning` positions are never chosen (DeepSpeed-Chat's OPT convention, where
    the first token is a pad-like BOS).

    >>> last_token_index(torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])).tolist()
    [2, 4, 4]
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    index = (attention_mask.long() * positions).argmax(dim=-1)
    return index.clamp(min=num_padding_at_beginning)


def sequence_rewards(
    backbone: PreTrainedModel,
    v_head: nn.Linear,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    num_padding_at_beginning: int,
    **backbone_kwargs,
) -> SequenceClassifierOutput:
    """Run the backbone and read the head at each row's last real token.

    Args:
        backbone: a transformers base model returning `last_hidden_state` `[B, T, H]`.
        v_head: `Linear(H, 1)`.
        input_ids: `[B, T]`.
        attention_mask: `[B, T]` (all ones when None).
        position_ids: `[B, T]`; derived from the mask when None and the backbone takes them.
        num_padding_at_beginning: positions never read as a sequence's end (DeepSpeed-Chat's OPT convention).

    Returns:
        `SequenceClassifierOutput` with `logits` `[B, 1]`.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if "position_ids" in inspect.signature(backbone.forward).parameters:
        backbone_kwargs["position_ids"] = (
            position_ids_from_mask(attention_mask) if position_ids is None else position_ids
        )
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **backbone_kwargs
    ).last_hidden_state
    values = v_head(hidden).squeeze(-1)
    index = last_token_index(attention_mask, num_padding_at_beginning)
    return SequenceClassifierOutput(logits=values.gather(-1, index.unsqueeze(-1)))


class RewardHead:
    """What every reward class shares: the backbone under `base_model_prefix`, a bias-free `v_head`, the reward
    at each row's last real token, and a `from_pretrained` that raises on missing or unexpected keys (a folder
    whose head is missing or renamed must not load as a reward model with a random head). Mixed in before the
    `PreTrainedModel` class."""

    def attach(self, backbone: PreTrainedModel) -> None:
        setattr(self, self.base_model_prefix, backbone)
        self.v_head = nn.Linear(head_input_size(self.config), 1, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys")}
        if any(problems.values()):
            raise ValueError(
                f"{cls.__name__}: checkpoint does not fit: missing keys: {problems['missing_keys']}; "
                f"unexpected keys: {problems['unexpected_keys']}"
            )
        return (model, info) if wants_info else model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """Rewards as `logits` `[B, 1]` for `input_ids` `[B, T]` padded on either side."""
        padding = getattr(self.config, "num_padding_at_beginning", 0)
        backbone = getattr(self, self.base_model_prefix)
        return sequence_rewards(backbone, self.v_head, input_ids, attention_mask, position_ids, padding)


class LlamaRewardModel(RewardHead, LlamaPreTrainedModel):
    """Llama backbone (`model.*`) + `v_head`; logits `[B, 1]`."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.attach(LlamaModel(config))


class BloomRewardModel(RewardHead, BloomPreTrainedModel):
    """Bloom backbone (`transformer.*`) + `v_head`; logits `[B, 1]`."""

    def __init__(self, config: BloomConfig) -> None:
        super().__init__(config)
        self.attach(BloomModel(config))


class AutoBackboneRewardModel(RewardHead, PreTrainedModel):
    """Any `AutoModel` backbone (`backbone.*`) + `v_head`; logits `[B, 1]`. Folders name a subclass bound to
    their config class (`auto_reward_class`), which transformers requires for model types without a native
    class of their own."""

    config_class = PretrainedConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    # The attention implementation is the backbone's: the wrapper accepts any, the backbone checks its own.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.attach(AutoModel.from_config(config))

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()


REWARD_CLASSES_BY_MODEL_TYPE: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaRewardModel,
    "bloom": BloomRewardModel,
}
AUTO_CLASS_SUFFIX = "RewardModel"


def auto_class_name(config_class: type[PretrainedConfig]) -> str:
    """`GraniteConfig` -> `"GraniteRewardModel"`."""
    return config_class.__name__.removesuffix("Config") + AUTO_CLASS_SUFFIX


@functools.cache
def auto_reward_class(config_class: type[PretrainedConfig]) -> type[PreTrainedModel]:
    """`AutoBackboneRewardModel` bound to `config_class`: transformers' `AutoModelForSequenceClassification`
    refuses a remote class whose `config_class` is not the folder's config class."""
    return type(
        auto_class_name(config_class),
        (AutoBackboneRewardModel,),
        {"config_class": config_class, "__module__": __name__, "__doc__": AutoBackboneRewardModel.__doc__},
    )


def reward_class_for(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The reward class for a backbone config: the family's own class, else `auto_reward_class`."""
    return REWARD_CLASSES_BY_MODEL_TYPE.get(config.model_type) or auto_reward_class(type(config))


def __getattr__(name: str) -> type[PreTrainedModel]:
    """The `auto_reward_class` a folder's `auto_map` names (transformers looks it up in this module by name)."""
    if name.endswith(AUTO_CLASS_SUFFIX):
        for model_type, config_name in CONFIG_MAPPING_NAMES.items():
            if config_name.removesuffix("Config") + AUTO_CLASS_SUFFIX == name:
                return auto_reward_class(CONFIG_MAPPING[model_type])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
