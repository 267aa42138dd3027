"""Writing a reward model in one layout: weights, `config.json`, tokenizer, model card.

    save_reward_model(engine.module, tokenizer, "output/rm", save_format="hf")   # collective under ZeRO-3
    write_reward_model(state_dict, config, tokenizer, "output/rm-dschat", "dschat")   # a state dict in hand

What each layout holds is `layouts.py`. Extras for transformers 4.51 (the version RewardBench pins): a
tokenizer class it knows, `model_input_names`, the chat template inside `tokenizer_config.json`, additional
special tokens as `additional_special_tokens` (v5 writes a list under `extra_special_tokens`, which 4.x cannot
read), no load-time keys (`is_local`), a top-level `rope_theta` beside v5's `rope_parameters`, and `torch_dtype`
beside `dtype`. The model card shows plain transformers code that scores exactly as training did.

Training metadata (`base_model`, `data`, `steps`, `eval_accuracy`, `reward_mean`, `reward_std`, ...) goes into
`config.json` (`reward_mean`/`reward_std` at the top level, everything under `reward_model_metadata`) and into
the model card.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from model_utils import hf_reward_model
from model_utils.checkpoint.errors import CheckpointError
from model_utils.checkpoint.layouts import (
    check_save_format,
    dschat_vocabulary,
    input_embedding_rows,
    layout_state_dict,
    output_config,
)
from model_utils.checkpoint.names import (
    AUTO_MAP_MODULE,
    CONFIG_FILE,
    MODEL_CARD_FILE,
    PYTORCH_FILE,
    PYTORCH_INDEX_FILE,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX_FILE,
    TOKENIZER_CONFIG_FILE,
)
from model_utils.checkpoint.zero import gathered_state_dict

# Tokenizer classes of transformers 5 that transformers 4.x does not know; the fast base class reads the same
# tokenizer.json.
V5_ONLY_TOKENIZER_CLASSES = ("TokenizersBackend",)
LEGACY_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]
# Where transformers 5 loaded a tokenizer from; it saves them back, though they describe no saved tokenizer.
LOAD_TIME_KEYS = ("is_local", "local_files_only")


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_rows: int, save_format: str) -> None:
    """Every token must have an embedding row; the pad token must exist and (for `hf`) differ from EOS.

    transformers' ForSequenceClassification finds each row's last token from `input_ids == pad_token_id`: a pad
    equal to EOS would read the reward before the response's EOS.
    """
    if len(tokenizer) > vocab_rows:
        raise CheckpointError(
            f"the tokenizer has {len(tokenizer)} tokens but the embeddings only {vocab_rows} rows: "
            "it is not the tokenizer this model was trained with"
        )
    pad = tokenizer.pad_token_id
    if pad is None or pad >= vocab_rows:
        raise CheckpointError(
            f"tokenizer pad token id {pad} is missing or beyond the {vocab_rows} embedding rows"
        )
    if save_format == "hf" and pad == tokenizer.eos_token_id:
        raise CheckpointError("tokenizer pad token is its EOS: the hf layout needs a real pad token")


def weights_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the first floating-point tensor (the dtype the model was trained/saved in)."""
    return next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _write_json(path: str, value: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2, sort_keys=True)
        file.write("\n")


def write_config(config: PretrainedConfig, output_dir: str, metadata: dict[str, Any]) -> None:
    """`config.json`, plus what transformers 4.51 reads (`rope_theta`, `torch_dtype`) and the metadata."""
    config.save_pretrained(output_dir)
    path = os.path.join(output_dir, CONFIG_FILE)
    values = _read_json(path)
    rope_parameters = values.get("rope_parameters") or {}
    if "rope_theta" in rope_parameters and "rope_theta" not in values:
        values["rope_theta"] = rope_parameters["rope_theta"]
    if "dtype" in values:
        values["torch_dtype"] = values["dtype"]
    for key in ("reward_mean", "reward_std"):
        if metadata.get(key) is not None:
            values[key] = metadata[key]
    if metadata:
        values["reward_model_metadata"] = metadata
    _write_json(path, values)


def write_tokenizer(tokenizer: PreTrainedTokenizerBase, output_dir: str) -> None:
    """The full tokenizer, with a class name, input names, special tokens and chat template transformers 4.51
    also reads (RewardBench 0.1.4 and DeepSpeed-Chat step 3 run on 4.x)."""
    tokenizer.save_pretrained(output_dir)
    path = os.path.join(output_dir, TOKENIZER_CONFIG_FILE)
    values = _read_json(path)
    if values.get("tokenizer_class") in V5_ONLY_TOKENIZER_CLASSES:
        values["tokenizer_class"] = LEGACY_TOKENIZER_CLASS
    extra_special_tokens = values.get("extra_special_tokens")
    if isinstance(extra_special_tokens, list):  # 4.x reads a dict there (AttributeError: no .keys())
        del values["extra_special_tokens"]
        values["additional_special_tokens"] = extra_special_tokens
    for key in LOAD_TIME_KEYS:
        values.pop(key, None)
    values["model_input_names"] = MODEL_INPUT_NAMES
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        values["chat_template"] = tokenizer.chat_template
    _write_json(path, values)


# The card's scoring code: the reward exactly as training read it (tests/test_consumers.py runs it verbatim).
SCORING_SNIPPET = """import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = {path}  # this folder (or its hub id once uploaded)
model = AutoModelForSequenceClassification.from_pretrained(path{trust})
tokenizer = AutoTokenizer.from_pretrained(path)


def reward(text: str) -> float:
    \"\"\"The reward as training read it: one BOS, and the score at the EOS that ends the text.\"\"\"
    input_ids = tokenizer(text)["input_ids"]
    if tokenizer.bos_token_id is not None and input_ids[:2] == [tokenizer.bos_token_id] * 2:
        input_ids = input_ids[1:]  # a chat template that writes its own BOS
    if input_ids[-1] != tokenizer.eos_token_id:
        input_ids = input_ids + [tokenizer.eos_token_id]  # training ends every response with EOS
    with torch.no_grad():
        return model(torch.tensor([input_ids])).logits[0, 0].item()

"""
CHAT_EXAMPLE = """
# Chat data: the chat template's text, trailing whitespace removed (as in training).
messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
print(reward(tokenizer.apply_chat_template(messages, tokenize=False).rstrip()))
"""
TEXT_EXAMPLE = """
# Text data: prompt + response, nothing added between them.
print(reward("What is 2 + 2?" + " 4"))
"""


def scoring_usage(save_format: str, path: str, chat: bool) -> list[str]:
    """The card's usage section: how to get the training reward with plain transformers."""
    if save_format == "dschat":
        return ["Load with DeepSpeed-Chat's `create_critic_model(..., rlhf_training=True)` or ours."]
    trust = ", trust_remote_code=True" if save_format == "auto_map" else ""
    code = (
        SCORING_SNIPPET.format(path=json.dumps(path), trust=trust)
        + (CHAT_EXAMPLE if chat else "")
        + TEXT_EXAMPLE
    )
    return [
        "Training reads each reward at the EOS that ends the sequence (appended when the text does not end",
        "with it), after one BOS; `reward()` does the same, so it returns the training reward (a bare",
        "`model(**tokenizer(text))` without that EOS does not).",
        "",
        "```python",
        *code.rstrip("\n").split("\n"),
        "```",
        "",
        '`pipeline("text-classification", model=path)` returns the same raw reward (`problem_type` is',
        '`"regression"` in `config.json`: no sigmoid) when the text already gives those tokens: it ends in',
        "`tokenizer.eos_token` (and does not start with a BOS the tokenizer adds again).",
    ]


def model_card(
    config: PretrainedConfig, save_format: str, metadata: dict[str, Any], path: str, chat: bool
) -> str:
    """A short README.md: what the model is, how it was trained (from `metadata`), how to score with it.

    Args:
        path: the folder, as the scoring code names it.
        chat: whether the tokenizer has a chat template (the code then shows scoring a conversation).
    """
    base_model = metadata.get("base_model")
    front_matter = ["---", "library_name: transformers", "pipeline_tag: text-classification"]
    if base_model and not os.path.isabs(str(base_model)):
        front_matter.append(f"base_model: {base_model}")
    front_matter += ["tags:", "- reward-model", "- rlhf", "---", ""]
    facts = {
        "Architecture": config.architectures[0] if config.architectures else config.model_type,
        "Layout": save_format,
        "Base model": base_model,
        "Training data": ", ".join(map(str, metadata["data"])) if metadata.get("data") else None,
        "Training steps": metadata.get("steps"),
        "Eval accuracy": metadata.get("eval_accuracy"),
        "Reward mean / std": (
            f"{metadata['reward_mean']:.4f} / {metadata['reward_std']:.4f}"
            if metadata.get("reward_mean") is not None and metadata.get("reward_std") is not None
            else None
        ),
    }
    lines = [f"- **{name}**: {value}" for name, value in facts.items() if value is not None]
    body = [
        "# Reward model",
        "",
        "A scalar reward model (one score per sequence, read at its last real token), trained with rewardspeed.",
        "",
        *lines,
        "",
        "## Usage",
        "",
        *scoring_usage(save_format, path, chat),
        "",
    ]
    return "\n".join(front_matter + body)


def write_reward_model(
    state_dict: dict[str, torch.Tensor],
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str,
    save_format: str = "hf",
    metadata: dict[str, Any] | None = None,
) -> str:
    """Write a full `RewardModel` state dict (`backbone.*`, `v_head.weight`) in one layout (one process).

    Args:
        state_dict: every tensor, unpartitioned, under `RewardModel`'s names; written in its own dtype.
        config: the backbone config; copied and adjusted for the layout (never modified).
        tokenizer: saved in full; its pad id becomes `config.pad_token_id`; for "dschat" its length fixes the
            embedding rows (`dschat_vocabulary`).
        output_dir: created if needed; files of the layout are overwritten.
        save_format: "hf", "auto_map" or "dschat".
        metadata: training facts for the model card and `config.json` (see the module docstring).

    Returns:
        `output_dir`.
    """
    check_save_format(save_format)
    metadata = dict(metadata or {})
    check_tokenizer(tokenizer, input_embedding_rows(state_dict, config), save_format)
    if save_format == "dschat":
        state_dict = dschat_vocabulary(state_dict, config, tokenizer)
    vocab_rows = input_embedding_rows(state_dict, config)
    config = output_config(config, tokenizer, save_format, weights_dtype(state_dict), vocab_rows)
    tensors = layout_state_dict(state_dict, config, save_format)
    os.makedirs(output_dir, exist_ok=True)
    for stale in (
        SAFETENSORS_FILE,
        SAFETENSORS_INDEX_FILE,
        PYTORCH_FILE,
        PYTORCH_INDEX_FILE,
        f"{AUTO_MAP_MODULE}.py",
    ):
        if os.path.exists(os.path.join(output_dir, stale)):
            os.remove(os.path.join(output_dir, stale))
    if save_format == "dschat":
        torch.save(tensors, os.path.join(output_dir, PYTORCH_FILE))
    else:
        save_file(tensors, os.path.join(output_dir, SAFETENSORS_FILE), metadata={"format": "pt"})
    if save_format == "auto_map":
        shutil.copyfile(hf_reward_model.__file__, os.path.join(output_dir, f"{AUTO_MAP_MODULE}.py"))
    write_config(config, output_dir, metadata)
    write_tokenizer(tokenizer, output_dir)
    with open(os.path.join(output_dir, MODEL_CARD_FILE), "w", encoding="utf-8") as card:
        chat = isinstance(getattr(tokenizer, "chat_template", None), str)
        card.write(model_card(config, save_format, metadata, output_dir, chat))
    return output_dir


def save_reward_model(
    reward_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str,
    save_format: str = "hf",
    metadata: dict[str, Any] | None = None,
) -> str | None:
    """Save a (possibly ZeRO-3 partitioned) `RewardModel`; COLLECTIVE: every rank must call it.

    Parameters are gathered one at a time (`gathered_state_dict`), rank 0 writes every tensor in full, and all
    ranks wait until the folder is complete; a failure on rank 0 is raised on every rank.

    Args:
        reward_model: a `RewardModel` (or a DeepSpeed engine's `.module`).
        tokenizer: the tokenizer the model was trained with (real pad token).
        output_dir: destination folder.
        save_format: "hf" (native ForSequenceClassification, default), "auto_map" or "dschat".
        metadata: `base_model`, `data`, `steps`, `eval_accuracy`, `reward_mean`, `reward_std`, ... (optional).

    Returns:
        `output_dir` on rank 0, None on the other ranks.
    """
    check_save_format(save_format)  # on every rank, before the collective gathers
    state_dict = gathered_state_dict(reward_model)
    if not torch.distributed.is_initialized():
        return write_reward_model(
            state_dict, reward_model.config, tokenizer, output_dir, save_format, metadata
        )
    written, failure = None, None
    if state_dict is not None:
        try:
            written = write_reward_model(
                state_dict, reward_model.config, tokenizer, output_dir, save_format, metadata
            )
        except Exception as error:  # every rank must learn of it, or the others wait forever
            failure = f"{type(error).__name__}: {error}"
    outcome = [failure]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CheckpointError(f"{output_dir}: saving on rank 0 failed ({outcome[0]})")
    return written
