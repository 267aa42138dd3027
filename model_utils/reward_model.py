"""The reward model: a transformer backbone and a scalar value head.

`RewardModel` is a plain `nn.Module` (DeepSpeed-Chat's shape): `backbone` is an `AutoModel` (no LM head) and
`v_head` maps each hidden state to one number. The reward of a sequence is the head's value at its last real
token, found from the attention mask, so left padding, right padding and no padding give the same rewards.

Importing this module must stay cheap: no DeepSpeed here. The mask helpers live in `hf_reward_model.py`, the
file that ships inside `auto_map` folders, so both score the same way from one definition.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import PreTrainedModel

from model_utils.hf_reward_model import head_input_size, last_token_index, position_ids_from_mask


class RewardModel(nn.Module):
    """Backbone + `v_head`. `forward` gives one reward per sequence, `forward_value` per-token values for PPO.

    Args:
        backbone: a `transformers` base model (`AutoModel`), returning `last_hidden_state`.
        num_padding_at_beginning: DeepSpeed-Chat compatibility (1 for OPT); positions before it are never
            read as a sequence's end.
    """

    def __init__(self, backbone: PreTrainedModel, num_padding_at_beginning: int = 0) -> None:
        super().__init__()
        self.config = backbone.config
        self.num_padding_at_beginning = num_padding_at_beginning
        self.backbone = backbone
        self.v_head = nn.Linear(head_input_size(self.config), 1, bias=False)
        backbone_parameter = next(backbone.parameters())
        # Under bf16 + ZeRO-3 an fp32 head beside a bf16 backbone breaks DeepSpeed's partitioning.
        self.v_head.to(dtype=backbone_parameter.dtype)
        self._backbone_takes_position_ids = "position_ids" in inspect.signature(backbone.forward).parameters

    # Pass-throughs the training loop and DeepSpeed-Chat's PPO stage call.
    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.backbone.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.backbone.is_gradient_checkpointing

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **backbone_kwargs,
    ) -> torch.Tensor:
        """Last hidden states `[B, T, H]`; positions are derived from the mask unless given."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self._backbone_takes_position_ids:
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask)
            backbone_kwargs["position_ids"] = position_ids
        outputs = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **backbone_kwargs
        )
        return outputs.last_hidden_state

    def values(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **backbone_kwargs,
    ) -> torch.Tensor:
        """Per-token values `[B, T]` (the head applied to every position)."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, **backbone_kwargs)
        return self.v_head(hidden).squeeze(-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        reward_index: torch.Tensor | None = None,
        return_values: bool = False,
        **backbone_kwargs,
    ) -> torch.Tensor:
        """Rewards `[B]`: the value at each row's last real token (or at `reward_index`).

        Everything a training step needs goes through `forward`, because DeepSpeed's engine runs its
        ZeRO-3 gradient bookkeeping only around `engine(...)` calls, not around other module methods.

        Args:
            input_ids: `[B, T]` token ids, padded on either side.
            attention_mask: `[B, T]`, 1 for real tokens (all ones when omitted); or a 4D mask for packed rows,
                then with `position_ids` and `reward_index`.
            position_ids: `[B, T]`; derived from a 2D mask when omitted.
            reward_index: `[N]` flat indices into the `[B, T]` values to read rewards at (packed batches).
            return_values: return the per-token values `[B, T]` instead (DeepSpeed-Chat's span loss).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        values = self.values(input_ids, attention_mask, position_ids, **backbone_kwargs)
        if return_values:
            return values
        if reward_index is not None:
            return values.flatten()[reward_index]
        end_index = last_token_index(attention_mask, self.num_padding_at_beginning)
        return values.gather(-1, end_index.unsqueeze(-1)).squeeze(-1)

    def forward_value(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_value_only: bool = False,
        prompt_length: int = 0,
        **backbone_kwargs,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Per-token values for PPO, as DeepSpeed-Chat's critic exposes them.

        Args:
            input_ids: `[B, T]` prompt + generated tokens.
            attention_mask: `[B, T]`.
            return_value_only: return only the values `[B, T]`.
            prompt_length: number of prompt positions; the end score is read after them.

        Returns:
            values `[B, T]`, or `{"values": [B, T], "chosen_end_scores": [B]}` where the end score is the value at
            the last real token of the generated part (at the last prompt position when nothing was generated).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        values = self.values(input_ids, attention_mask, **backbone_kwargs)
        if return_value_only:
            return values
        end_index = last_token_index(attention_mask, self.num_padding_at_beginning)
        end_index = end_index.clamp(min=max(prompt_length - 1, 0))
        end_scores = values.gather(-1, end_index.unsqueeze(-1)).squeeze(-1)
        return {"values": values, "chosen_end_scores": end_scores}
