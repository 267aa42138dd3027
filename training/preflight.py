"""Everything that can fail late, checked first: a mistake costs seconds, not a data and model load.

`preflight(config, model_path)` runs on every rank before the process group starts (read-only, apart from
creating `--output_dir`); each problem is a one-line `ConfigError` or `CheckpointError` naming the flag or file
(exit status 2):

- `--output_dir`: a folder this process can write (not a file);
- its checkpoints: a run without `--resume` into a folder holding checkpoints stops, naming them and the two ways
  on (`--resume`, or `--overwrite_output_dir`, which removes them first); with `--resume`, `latest` must name a
  folder that is there;
- `--model_name_or_path`: a local-looking path must exist; its config must be readable, `--save_format`
  writable for its architecture (`model_utils.checkpoint.layouts.check_save_format`), and a fast-path flag set to
  `on` not refused by the config alone (ALiBi, a short sliding window: `training.layout.layout_candidates`).

The DeepSpeed config is read and checked against the flags and by DeepSpeed itself in
`ds_config.build_ds_config`, once the world size is known and before any data is read. `check_prompt_truncation`
runs after tokenisation, before the model loads.
"""

from __future__ import annotations

import logging
import os
import tempfile

from training.arguments import DEFAULT_MODEL, TrainConfig
from training.checkpointing import checkpoint_tags, latest_checkpoint
from training.errors import ConfigError

logger = logging.getLogger(__name__)

# Share of prompts cut down to their first token (BOS) above which a --max_seq_len is refused.
MAX_SHARE_OF_PROMPTS_CUT_TO_FIRST_TOKEN = 0.05


def preflight(config: TrainConfig, model_path: str) -> None:
    """Check what would otherwise fail after data and model have loaded (see the module docstring)."""
    check_model_path(config, model_path)
    check_existing_checkpoints(config)
    check_output_dir(config.output_dir)  # last: it creates the folder, which a refused run should not leave


def check_output_dir(output_dir: str) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output_dir {output_dir}: is a file, not a folder")
    try:
        os.makedirs(output_dir, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=output_dir, prefix=".write_probe_")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--output_dir {output_dir}: cannot write there ({error.strerror})") from None


def check_existing_checkpoints(config: TrainConfig) -> None:
    """A run that starts afresh never mixes its checkpoints with an earlier run's; a resumed one finds what
    `latest` names."""
    if config.resume and latest_checkpoint(config) is not None:  # raises when `latest` names a missing folder
        return
    tags = checkpoint_tags(config.checkpoint_dir)
    if not tags or config.overwrite_output_dir:
        return
    where = f"--output_dir {config.output_dir} holds checkpoints of an earlier run ({', '.join(tags)} in "
    if config.resume:  # a `latest` lost or never written (killed right after the first checkpoint's rename)
        raise ConfigError(
            f"{where}{config.checkpoint_dir}) but no `latest` file names the one to continue; write its tag into "
            f"{os.path.join(config.checkpoint_dir, 'latest')}, or start over with --overwrite_output_dir "
            "(removes them first) instead of --resume"
        )
    raise ConfigError(
        f"{where}{config.checkpoint_dir}); continue that run with --resume, or start over with "
        "--overwrite_output_dir (removes them first)"
    )


def looks_local(path: str) -> bool:
    """Whether a model name can only be a local path: not of the hub's `name` / `namespace/name` form, or
    starting at a folder that exists here."""
    if os.path.isabs(path) or path.startswith(("./", "../", "~", ".\\")) or "\\" in path:
        return True
    parts = path.split("/")
    return len(parts) > 2 or "" in parts or (len(parts) == 2 and os.path.isdir(parts[0]))


def check_model_path(config: TrainConfig, model_path: str) -> None:
    """A local-looking `--model_name_or_path` must exist; its config must say a `--save_format` we can write
    (else no run would lose its model at the end) and allow an `on` fast-path flag."""
    from model_utils.checkpoint.errors import CheckpointError
    from model_utils.checkpoint.layouts import check_save_format
    from model_utils.checkpoint.load import read_config
    from training.layout import layout_candidates

    flag = f"--model_name_or_path {config.model_name_or_path}"
    if (
        config.model_name_or_path != DEFAULT_MODEL
        and looks_local(model_path)
        and not os.path.exists(model_path)
    ):
        raise ConfigError(f"{flag}: no such folder")
    model_config = read_config(model_path, trust_remote_code=config.trust_remote_code)
    try:
        check_save_format(config.save_format, model_config)
    except CheckpointError as error:
        raise ConfigError(f"--save_format {config.save_format}: {error}") from None
    layout_candidates(config, model_config)


def check_prompt_truncation(stats: dict, config: TrainConfig) -> None:
    """Refuse a `--max_seq_len` that leaves more than 5% of the prompts (train or eval) only their first token,
    unless `--allow_prompt_truncation`: a reward model that never sees the prompt is a silent wrong answer.

    Args:
        stats: `PreferenceData.stats`, with `prompts_cut_to_first_token` and `train_examples`/`eval_examples`.
    """
    cut, worst = stats.get("prompts_cut_to_first_token", {}), None
    for split in ("train", "eval"):
        pairs = stats.get(f"{split}_examples", 0)
        if pairs and cut.get(split, 0) / pairs > MAX_SHARE_OF_PROMPTS_CUT_TO_FIRST_TOKEN:
            worst = worst or (split, cut[split], pairs)
    if worst is None:
        return
    split, count, pairs = worst
    message = (
        f"--max_seq_len {config.max_seq_len}: {count} of {pairs} {split} rows ({100 * count / pairs:.0f}%) keep "
        "only the first token of their prompt (the responses fill the rest)"
    )
    if not config.allow_prompt_truncation:
        raise ConfigError(
            f"{message}; raise --max_seq_len, or pass --allow_prompt_truncation to train anyway"
        )
    logger.warning("%s; training anyway (--allow_prompt_truncation)", message)
