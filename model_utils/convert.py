"""Convert a saved reward model between layouts (hf, auto_map, dschat), or out of a DeepSpeed ZeRO checkpoint.

    python -m model_utils.convert --input output/rm --output output/rm-dschat --format dschat
    python -m model_utils.convert --input dschat_step2_output --output rm-hf --format hf
    python -m model_utils.convert --input output/rm/checkpoints --output rm-hf \\
        --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct        # engine.save_checkpoint folder

Inputs:
    - a folder in any layout `create_critic_model(rlhf_training=True)` reads: ours (hf, auto_map, dschat),
      one written by DeepSpeed-Chat itself (`rwtransformer.*` or the old `rwtranrsformer.*` keys), or a
      `torch.save(reward_model.state_dict())` folder with a config.
    - a DeepSpeed checkpoint folder (the one holding `latest`, or one tag folder inside it, e.g. the trainer's
      `checkpoints/step_40`), consolidated with `deepspeed.utils.zero_to_fp32` (fp32 master weights, any ZeRO
      stage; see `model_utils/checkpoint/zero.py`).

Architecture: the `config.json` of `--model_name_or_path` when given, else of the input folder, else of its
parent folders (a training `--output_dir` holds `checkpoints/`). The vocabulary size always comes from the
embedding matrix in the weights (it was padded to a multiple of 8 at training time).
Tokenizer: `--tokenizer_name_or_path`, else the first of the input folder, `--model_name_or_path` and the
parent folders that holds tokenizer files. A tokenizer without a real pad token gets one (as in training);
it must fit the embedding rows.

Every tensor is carried over bit for bit (no dtype change) and checked against the architecture: missing or
unexpected keys are an error naming them. Errors are printed as one line (no traceback), exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from model_utils.checkpoint.errors import CheckpointError
from model_utils.checkpoint.layouts import (
    backbone_class,
    input_embedding_rows,
    meta_model,
    to_reward_model_names,
)
from model_utils.checkpoint.load import check_state_dict, read_config, read_state_dict
from model_utils.checkpoint.names import CONFIG_FILE, SAVE_FORMATS, TOKENIZER_CONFIG_FILE
from model_utils.checkpoint.save import write_reward_model
from model_utils.checkpoint.zero import read_zero_checkpoint, zero_checkpoint_location
from model_utils.reward_model import RewardModel
from model_utils.tokenizer import load_tokenizer

TOKENIZER_FILES = (TOKENIZER_CONFIG_FILE, "tokenizer.json")
PARENT_LEVELS = 2


@dataclass
class LoadedRewardModel:
    """A reward model read from disk: `RewardModel`-named tensors, backbone config, tokenizer, metadata."""

    state_dict: dict[str, torch.Tensor]
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    metadata: dict[str, Any] = field(default_factory=dict)


def parent_folders(path: str) -> list[str]:
    """`path`'s parent and grandparent folders (a checkpoint's training output folder)."""
    parents, current = [], os.path.abspath(path)
    for _ in range(PARENT_LEVELS):
        current = os.path.dirname(current)
        parents.append(current)
    return parents


def find_config_source(path: str, model_name_or_path: str | None) -> str:
    """Where the architecture comes from: `--model_name_or_path`, the input folder, or a parent folder."""
    if model_name_or_path:
        return model_name_or_path
    for candidate in [path, *parent_folders(path)]:
        if os.path.isfile(os.path.join(candidate, CONFIG_FILE)):
            return candidate
    raise CheckpointError(
        f"{path}: no {CONFIG_FILE} here or in its parent folders; pass --model_name_or_path (the base model)"
    )


def find_tokenizer_source(
    path: str, model_name_or_path: str | None, tokenizer_name_or_path: str | None
) -> str:
    """Where the tokenizer comes from (see the module docstring)."""
    if tokenizer_name_or_path:
        return tokenizer_name_or_path
    candidates = [path, model_name_or_path, *parent_folders(path)]
    for candidate in filter(None, candidates):
        if not os.path.isdir(candidate) or any(
            os.path.isfile(os.path.join(candidate, name)) for name in TOKENIZER_FILES
        ):
            return candidate
    raise CheckpointError(f"{path}: no tokenizer found; pass --tokenizer_name_or_path")


def check_reward_state_dict(
    state_dict: dict[str, torch.Tensor], config: PretrainedConfig, source: str
) -> None:
    """Raise `CheckpointError` naming missing/unexpected/mis-shaped keys, against a meta-device `RewardModel`."""
    backbone = meta_model(backbone_class(config), config)
    with torch.device("meta"):
        reward_model = RewardModel(backbone)
    check_state_dict(reward_model, state_dict, source)


def read_reward_model(
    path: str,
    model_name_or_path: str | None = None,
    tokenizer_name_or_path: str | None = None,
    tag: str | None = None,
) -> LoadedRewardModel:
    """Read any supported saved reward model or DeepSpeed checkpoint into `RewardModel` names, checked.

    Args:
        path: a saved model folder (any layout) or a DeepSpeed checkpoint folder.
        model_name_or_path: where the architecture's config comes from (default: found near `path`).
        tokenizer_name_or_path: where the tokenizer comes from (default: found near `path`).
        tag: checkpoint tag (e.g. `step_40`) when `path` is a DeepSpeed checkpoint folder.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    config = read_config(find_config_source(path, model_name_or_path))
    zero_location = zero_checkpoint_location(path)
    if zero_location is not None:
        checkpoint_dir, found_tag = zero_location
        state_dict = read_zero_checkpoint(checkpoint_dir, tag or found_tag)
    else:
        state_dict = read_state_dict(path)
    base_model_prefix = backbone_class(config).base_model_prefix
    state_dict = to_reward_model_names(state_dict, base_model_prefix)
    with contextlib.suppress(CheckpointError):  # no embeddings: the key check below names what is wrong
        config.vocab_size = input_embedding_rows(state_dict, config)
    check_reward_state_dict(state_dict, config, path)
    tokenizer = load_tokenizer(find_tokenizer_source(path, model_name_or_path, tokenizer_name_or_path))
    metadata = dict(getattr(config, "reward_model_metadata", None) or {})
    return LoadedRewardModel(state_dict, config, tokenizer, metadata)


def convert(
    input_path: str,
    output_dir: str,
    save_format: str = "hf",
    model_name_or_path: str | None = None,
    tokenizer_name_or_path: str | None = None,
    tag: str | None = None,
) -> str:
    """Read `input_path` (see `read_reward_model`) and write it to `output_dir` in `save_format`."""
    if os.path.abspath(input_path) == os.path.abspath(output_dir):
        raise CheckpointError(f"{output_dir}: the output folder must differ from the input folder")
    loaded = read_reward_model(input_path, model_name_or_path, tokenizer_name_or_path, tag)
    return write_reward_model(
        loaded.state_dict, loaded.config, loaded.tokenizer, output_dir, save_format, loaded.metadata
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rewardspeed-convert", description="Convert a saved reward model between layouts."
    )
    parser.add_argument(
        "--input", required=True, help="saved model folder (any layout) or DeepSpeed checkpoint"
    )
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--format", default="hf", choices=SAVE_FORMATS, help="layout to write (default: hf)")
    parser.add_argument("--model_name_or_path", default=None, help="base model for the architecture's config")
    parser.add_argument(
        "--tokenizer_name_or_path", default=None, help="tokenizer (default: found near input)"
    )
    parser.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: its 'latest')")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversion; return the exit status (0, or 2 with a one-line error on stderr)."""
    args = parse_args(argv)
    try:
        written = convert(
            args.input,
            args.output,
            args.format,
            args.model_name_or_path,
            args.tokenizer_name_or_path,
            args.tag,
        )
    except (CheckpointError, OSError, ValueError) as error:
        print(f"rewardspeed-convert: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} reward model to {written}")
    return 0


def cli() -> None:
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
