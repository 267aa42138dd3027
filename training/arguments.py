"""One typed config for a training run, with DeepSpeed-Chat step-2 flag names, checked once.

`TrainConfig` is parsed from the command line (`parse_args`), validated in `__post_init__` and never mutated
afterwards. Values that depend on the world size are computed where the world is known: the global batch in
`training/ds_config.py::build_ds_config`, the number of optimizer steps in `training/sampling.py::total_steps`.

With no arguments (the `deepspeed` launcher's `--local_rank` aside) the run is the embedded default,
`DEFAULT_RUN`: what `launch/train_rm.sh` and a bare `python -m training.train_rm` train.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field

from model_utils.checkpoint.names import SAVE_FORMATS
from training.data.listwise import ULTRAFEEDBACK_SCORES
from training.data.splits import DEFAULT_DATA_SPLIT
from training.errors import ConfigError

DEFAULT_MODEL = "default"  # the packaged SmolLM2-135M-Instruct (model_utils.default_model)
DEFAULT_DATA = "default"  # the project's generated preference set (training.data.default_data)
# The embedded default run, sized so that 2 CPU cores finish within 15 minutes (README, "The default run").
DEFAULT_RUN = (
    "--model_name_or_path", DEFAULT_MODEL, "--data_path", DEFAULT_DATA, "--dtype", "bf16",
    "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--max_seq_len", "64",
    "--learning_rate", "1e-4", "--num_warmup_steps", "10", "--max_steps", "150", "--lr_scheduler_type", "cosine",
    "--dropout", "0.0", "--eval_interval", "50", "--output_dir", "output/default_rm",
)  # fmt: skip
# Flags that say how a run starts, not which run: with only these (`launch/train_rm.sh --resume` after a stop
# signal) the run is still the embedded default.
RUN_CONTROL_FLAGS = ("--local_rank", "--resume", "--overwrite_output_dir")
LOSS_TYPES = ("pairwise", "dschat")
ATTENTION_IMPLEMENTATIONS = (
    "auto",
    "sdpa",
    "eager",
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
)
LISTWISE_LOSSES = ("pairs", "plackett_luce")
DTYPES = ("auto", "fp32", "bf16", "fp16")
SWITCH = ("auto", "on", "off")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _help(text: str, **kwargs) -> dict:
    return {"help": text, **kwargs}


@dataclass(frozen=True)
class TrainConfig:
    # Data
    data_path: list[str] = field(
        default_factory=lambda: [DEFAULT_DATA],
        metadata=_help(
            "Preference sources (files, folders, save_to_disk folders, hub names), blended. 'default' is the "
            "project's generated set. SOURCE:SUBSET:SPLIT (or SOURCE:SPLIT) chooses a subset and split; a source "
            "with several and none chosen is refused with the list. A trailing [start:stop] selects rows, e.g. "
            "test.jsonl.gz[:2012]."
        ),
    )
    data_split: str = field(
        default=DEFAULT_DATA_SPLIT,
        metadata=_help(
            "DeepSpeed-Chat phase weights (SFT, reward, RLHF); reward training uses the 2nd portion. "
            "The default gives it every training row; 2,4,4 reproduces DeepSpeed-Chat's split."
        ),
    )
    eval_data_path: list[str] = field(
        default_factory=list,
        metadata=_help(
            "Evaluation sources, e.g. DIR:test_prefs (default: the eval split paired with each source's "
            "training split, e.g. test_prefs for train_prefs)."
        ),
    )
    eval_fraction: float = field(
        default=0.1, metadata=_help("Held-out fraction for sources without an eval split (never trained on).")
    )
    column_map: str = field(
        default="",
        metadata=_help("Column mapping for other layouts, e.g. prompt=question,chosen=good,rejected=bad."),
    )
    skip_invalid_rows: bool = field(
        default=False, metadata=_help("Skip invalid rows (counted) instead of stopping with an error.")
    )
    min_score_gap: float = field(
        default=0.0,
        metadata=_help(
            "Rows with several scored responses: two responses are compared only when their scores differ by at "
            "least this (ties and near-ties give no comparison); rows left without one are skipped and counted."
        ),
    )
    ultrafeedback_score: str = field(
        default="overall_score",
        metadata=_help("Which score ranks an UltraFeedback completion.", choices=ULTRAFEEDBACK_SCORES),
    )
    score_gap_margin: float = field(
        default=0.0,
        metadata=_help(
            "Rows with scored responses: margin of each comparison = this x its score gap (0: none)."
        ),
    )
    max_seq_len: int = field(
        default=512, metadata=_help("Longest prompt + response in tokens (prompt cut left).")
    )
    allow_prompt_truncation: bool = field(
        default=False,
        metadata=_help(
            "Train even when max_seq_len leaves more than 5% of the prompts only their first token "
            "(refused otherwise)."
        ),
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata=_help(
            "Tokenised-data cache: each data set is tokenised once per node (its ranks share the work) into "
            "flat arrays every rank memory-maps; resumed and repeated runs reuse it. Default: "
            "$REWARDSPEED_DATA_CACHE, else ~/.cache/rewardspeed/data; 'off': every rank tokenises into memory."
        ),
    )

    # Model
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata=_help("Backbone: hub id or folder; 'default' is the packaged SmolLM2."),
    )
    num_padding_at_beginning: int = field(
        default=0, metadata=_help("DeepSpeed-Chat compatibility: leading pad-like tokens (1 for OPT).")
    )
    dropout: float | None = field(
        default=None, metadata=_help("Set every dropout to this value (0 disables).")
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("Allow custom modeling code from the model folder.")
    )
    attn_implementation: str = field(
        default="auto",
        metadata=_help(
            "The backbone's attention. auto: transformers' default (sdpa where the architecture has it; packed "
            "batches then use segment attention); flex_attention (GPU): packing and prompt sharing through one "
            "BlockMask per micro-batch; flash_attention_2/3 (GPU): packing through the varlen path, no sharing.",
            choices=ATTENTION_IMPLEMENTATIONS,
        ),
    )
    num_frozen_layers: int = field(
        default=0, metadata=_help("Freeze the embeddings and the first N transformer layers (0: train all).")
    )

    # Optimisation
    per_device_train_batch_size: int = field(default=8, metadata=_help("Pairs per micro-batch per device."))
    per_device_eval_batch_size: int = field(
        default=16, metadata=_help("Pairs per evaluation batch per device.")
    )
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (not on biases and norms)."))
    num_train_epochs: int = field(default=1, metadata=_help("Passes over the training pairs."))
    max_steps: int = field(
        default=-1, metadata=_help("Stop after this many optimizer steps (-1: epochs decide).")
    )
    lr_scheduler_type: str = field(default="cosine", metadata=_help("Scheduler.", choices=SCHEDULERS))
    num_warmup_steps: int = field(default=0, metadata=_help("Linear warm-up steps."))
    seed: int = field(default=1234, metadata=_help("Seed for data order, splits and initialisation."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations in backward."))
    group_by_length: bool = field(
        default=False,
        metadata=_help(
            "Each optimizer step trains pairs of similar length (transformers' length-grouped sampling, one "
            "group per step, groups in random order): less padding in plain batches, similar work per rank in "
            "packed ones."
        ),
    )
    loss_type: str = field(
        default="pairwise",
        metadata=_help(
            "pairwise: -logsigmoid(r_c - r_r - margin); dschat: DeepSpeed-Chat's divergence span.",
            choices=LOSS_TYPES,
        ),
    )
    listwise_loss: str = field(
        default="pairs",
        metadata=_help(
            "Loss over a prompt's responses. pairs: Bradley-Terry over every comparison of the prompt, the prompt "
            "weighted as one batch element (InstructGPT); plackett_luce: the likelihood of the prompt's ranking "
            "(ties share a stage). Pairs are the K = 2 case of both.",
            choices=LISTWISE_LOSSES,
        ),
    )
    packing: str = field(
        default="auto",
        metadata=_help(
            "Pack the pairs of a micro-batch into padding-free rows (block-diagonal attention). auto: on where "
            "exact for the backbone and loss.",
            choices=SWITCH,
        ),
    )
    share_prompt: str = field(
        default="auto",
        metadata=_help(
            "Compute each prompt once: prompt + chosen + rejected in one sequence, rejected blind to chosen. "
            "auto: on where exact.",
            choices=SWITCH,
        ),
    )
    center_rewards_coefficient: float = field(
        default=0.0, metadata=_help("Weight of the mean((r_c + r_r)^2) term that centres rewards on 0 (TRL).")
    )

    # LoRA (DeepSpeed-Chat names)
    lora_dim: int = field(default=0, metadata=_help("LoRA rank (0: no LoRA)."))
    lora_module_name: str = field(
        default="layers.", metadata=_help("LoRA goes into the linear layers whose names contain this.")
    )
    only_optimize_lora: bool = field(
        default=False, metadata=_help("Train only LoRA weights and the value head.")
    )

    # DeepSpeed
    zero_stage: int = field(
        default=0, metadata=_help("ZeRO stage 0-3 (picks ds_configs/zero<N>.json).", choices=(0, 1, 2, 3))
    )
    offload: bool = field(
        default=False, metadata=_help("Offload optimizer state (and ZeRO-3 params) to CPU.")
    )
    dtype: str = field(
        default="auto", metadata=_help("auto: bf16 on GPUs that have it, else fp32.", choices=DTYPES)
    )
    deepspeed_config: str | None = field(
        default=None, metadata=_help("DeepSpeed JSON config; 'auto' batch fields are filled from the flags.")
    )
    local_rank: int = field(default=-1, metadata=_help("Set by the deepspeed launcher."))
    dist_timeout_s: int | None = field(
        default=None,
        metadata=_help(
            "Seconds a collective waits for another rank before failing (a lost node ends the run); "
            "default: $REWARDSPEED_DIST_TIMEOUT_S, else DeepSpeed's 30 minutes."
        ),
    )

    # Output
    output_dir: str = field(
        default="output/reward_model", metadata=_help("Final model, metrics.jsonl, checkpoints/.")
    )
    save_format: str = field(default="hf", metadata=_help("Format of the final model.", choices=SAVE_FORMATS))
    save_interval: int = field(default=0, metadata=_help("DeepSpeed checkpoint every N steps (0: none)."))
    keep_checkpoints: int = field(default=2, metadata=_help("How many checkpoints to keep."))
    resume: bool = field(default=False, metadata=_help("Continue from the latest checkpoint in output_dir."))
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help(
            "Start over in an output_dir that holds an earlier run's checkpoints: remove them first "
            "(without it, or --resume, such a run stops before loading anything)."
        ),
    )
    eval_interval: int = field(default=0, metadata=_help("Evaluate every N steps (0: only at the end)."))
    logging_steps: int = field(default=1, metadata=_help("Write a training record every N steps."))
    enable_tensorboard: bool = field(default=False, metadata=_help("Also log to TensorBoard."))
    tensorboard_path: str = field(
        default="", metadata=_help("TensorBoard folder (default output_dir/tensorboard).")
    )

    def __post_init__(self) -> None:
        problems = []
        positive = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "num_train_epochs",
            "max_seq_len",
            "logging_steps",
        )
        problems += [f"--{name} must be positive" for name in positive if getattr(self, name) < 1]
        non_negative = (
            "num_warmup_steps",
            "save_interval",
            "eval_interval",
            "num_padding_at_beginning",
            "lora_dim",
            "num_frozen_layers",
            "center_rewards_coefficient",
            "weight_decay",
        )
        problems += [f"--{name} must not be negative" for name in non_negative if getattr(self, name) < 0]
        if self.dist_timeout_s is not None and self.dist_timeout_s < 1:
            problems.append("--dist_timeout_s must be positive")
        if self.learning_rate <= 0:
            problems.append("--learning_rate must be positive")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append("--max_steps must be positive (or -1)")
        if not 0 <= self.eval_fraction < 1:
            problems.append("--eval_fraction must be in [0, 1)")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            problems.append("--dropout must be in [0, 1)")
        if self.only_optimize_lora and self.lora_dim == 0:
            problems.append("--only_optimize_lora needs --lora_dim > 0")
        if self.resume and self.overwrite_output_dir:
            problems.append(
                "--resume continues the checkpoints that --overwrite_output_dir removes: give one"
            )
        if self.keep_checkpoints < 1:
            problems.append("--keep_checkpoints must be at least 1")
        if self.deepspeed_config is not None and not os.path.isfile(self.deepspeed_config):
            problems.append(f"--deepspeed_config {self.deepspeed_config}: no such file")
        if self.min_score_gap < 0 or self.score_gap_margin < 0:
            problems.append("--min_score_gap and --score_gap_margin must not be negative")
        if self.listwise_loss == "plackett_luce" and self.score_gap_margin > 0:
            problems.append("--score_gap_margin is a margin of --listwise_loss pairs; plackett_luce has none")
        if self.loss_type == "dschat" and self.listwise_loss != "pairs":
            problems.append("--loss_type dschat takes pairs only; it cannot be combined with --listwise_loss")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.output_dir, "checkpoints")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.output_dir, "metrics.jsonl")


def _argument_type(annotation: object) -> tuple[type, bool]:
    """(element type, is_list) of a field's annotation: `int`, `float | None`, `list[str]`, ..."""
    if isinstance(annotation, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train_rm",
        description="Train a reward model on preference pairs with DeepSpeed (DeepSpeed-Chat step-2 flags).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    annotations = typing.get_type_hints(TrainConfig)
    for config_field in dataclasses.fields(TrainConfig):
        flag = f"--{config_field.name}"
        help_text = config_field.metadata["help"]
        choices = config_field.metadata.get("choices")
        default = (
            config_field.default_factory()
            if config_field.default_factory is not dataclasses.MISSING
            else config_field.default
        )
        element_type, is_list = _argument_type(annotations[config_field.name])
        if element_type is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif is_list:
            parser.add_argument(flag, nargs="+", type=element_type, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=element_type, default=default, choices=choices, help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse and validate; a bad combination exits with status 2 and a message naming the flags.

    No arguments (but the launcher's `--local_rank`, `--resume` or `--overwrite_output_dir`) means the embedded
    default run, `DEFAULT_RUN`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if all(argument.startswith(RUN_CONTROL_FLAGS) for argument in argv):
        argv = [*DEFAULT_RUN, *argv]
    parser = build_parser()
    namespace = parser.parse_args(argv)
    try:
        return TrainConfig(**vars(namespace))
    except ConfigError as error:
        parser.error(str(error))
