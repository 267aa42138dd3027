"""What used to fail late (a traceback after data and model loaded, or a silent wrong answer) now stops first:
one line naming the flag or file, exit status 2, nothing written; and an output folder that holds another run's
checkpoints is never mixed up with a new run's."""

import json
import os
import sys

import pytest
from launch_utils import read_metrics, run_command, train_rm_args, write_tiny_run_inputs

from training.arguments import TrainConfig
from training.checkpointing import STATE_FILE, TrainState, prune_checkpoints
from training.errors import ConfigError
from training.preflight import (
    check_existing_checkpoints,
    check_model_path,
    check_prompt_truncation,
    looks_local,
)

FLAGS = ["--per_device_train_batch_size", "4", "--max_seq_len", "32", "--dropout", "0.0", "--zero_stage", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run_inputs(str(tmp_path_factory.mktemp("preflight")), num_pairs=120)


def train(model, data, output, *flags, check=True):
    return run_command([sys.executable, *train_rm_args(model, data, output, *FLAGS, *flags)], check=check)


def listing(folder: str) -> dict[str, float]:
    return {
        os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_a_new_run_into_a_folder_with_checkpoints_stops_and_overwrite_starts_over(setup, tmp_path):
    """The issue's sequence: 4 steps saving every 2, then a fresh 1-step run saving every step into the same
    folder. It used to prune its own step_1 (keeping step_2, step_4) and leave `latest` naming it."""
    model, data = setup
    output = str(tmp_path / "reused")
    train(model, data, output, "--max_steps", "4", "--save_interval", "2")
    before = listing(output)

    refused = train(model, data, output, "--max_steps", "1", "--save_interval", "1", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "holds checkpoints of an earlier run (step_2, step_4 in" in refused.stderr
    assert "continue that run with --resume, or start over with --overwrite_output_dir" in refused.stderr
    assert "Preference data" not in refused.stderr  # stopped before reading any data
    assert listing(output) == before  # nothing touched

    train(model, data, output, "--max_steps", "1", "--save_interval", "1", "--overwrite_output_dir")
    checkpoints = os.path.join(output, "checkpoints")
    assert sorted(name for name in os.listdir(checkpoints) if name.startswith("step_")) == ["step_1"]
    with open(os.path.join(checkpoints, "latest")) as file:
        assert file.read().strip() == "step_1"
    assert [r["step"] for r in read_metrics(output)[0]] == [1]
    resumed = train(model, data, output, "--max_steps", "1", "--save_interval", "1", "--resume")
    assert "resuming at step 1" in resumed.stderr


def test_resume_without_latest_in_a_folder_with_checkpoints_stops(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), resume=True)
    check_existing_checkpoints(config)  # nothing there: --resume starts fresh
    write_checkpoint(config.checkpoint_dir, 3, "earlier")
    with pytest.raises(ConfigError, match="step_3 in .* but no `latest` file names the one to continue"):
        check_existing_checkpoints(config)
    with open(os.path.join(config.checkpoint_dir, "latest"), "w") as file:
        file.write("step_3")
    check_existing_checkpoints(config)
    with open(os.path.join(config.checkpoint_dir, "latest"), "w") as file:
        file.write("step_9")
    with pytest.raises(
        ConfigError, match="latest names 'step_9', which is not in .*checkpoints there: step_3"
    ):
        check_existing_checkpoints(config)


def write_checkpoint(folder: str, step: int, run_id: str | None) -> None:
    path = os.path.join(folder, f"step_{step}")
    os.makedirs(path)
    if run_id is not None:
        state = TrainState(global_step=step, run_id=run_id)
        with open(os.path.join(path, STATE_FILE), "w") as file:
            json.dump({"train_state": state.__dict__, "world_size": 1, "zero_stage": 0}, file)


def test_pruning_removes_only_the_writing_runs_checkpoints_and_never_the_newest(tmp_path):
    folder = str(tmp_path)
    for step in (2, 4, 6):
        write_checkpoint(folder, step, "other")
    write_checkpoint(folder, 8, None)  # from an earlier rewardspeed: no run id, never removed
    for step in (1, 3, 5, 9):  # step 9: this run's, from an attempt the resumed run is replacing
        write_checkpoint(folder, step, "mine")
    prune_checkpoints(folder, TrainState(global_step=5, run_id="mine"), keep=2)
    assert sorted(os.listdir(folder)) == ["step_2", "step_3", "step_4", "step_5", "step_6", "step_8"]
    prune_checkpoints(folder, TrainState(global_step=5, run_id="mine"), keep=1)
    assert "step_3" not in os.listdir(folder) and "step_5" in os.listdir(folder)


def write_file(path: str, text: str) -> str:
    with open(path, "w") as file:
        file.write(text)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "output_dir_is_a_file",
        "json_syntax",
        "optimizer_section",
        "precision",
        "unknown_field",
        "missing_model",
    ],
)
def test_late_failures_stop_first_with_one_line_and_exit_2(setup, tmp_path, case):
    model, data = setup
    output = str(tmp_path / "out")
    base = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 0}}

    def ds_config(text: str) -> list[str]:
        return ["--deepspeed_config", write_file(str(tmp_path / "ds.json"), text)]

    make_flags, message = {
        "output_dir_is_a_file": (
            lambda: ["--output_dir", write_file(str(tmp_path / "a_file"), "x")],
            f"--output_dir {tmp_path}/a_file: is a file, not a folder",
        ),
        "json_syntax": (
            lambda: ds_config('{\n  "zero_optimization": {"stage": 2,}\n}'),
            f"{tmp_path}/ds.json line 2 column 36: not valid JSON",
        ),
        "optimizer_section": (
            lambda: ds_config(json.dumps({**base, "optimizer": {"type": "Adam"}})),
            "has a 'optimizer' section, which would be ignored",
        ),
        "precision": (
            lambda: ds_config(json.dumps({**base, "bf16": {"enabled": True}})),
            "bf16.enabled is True, but --dtype auto gives fp32",
        ),
        "unknown_field": (
            lambda: ds_config(json.dumps({**base, "zero_optimization": {"stag": 2}})),
            "DeepSpeed rejects it (ValidationError",
        ),
        "missing_model": (
            lambda: ["--model_name_or_path", str(tmp_path / "models" / "not_there")],
            f"--model_name_or_path {tmp_path}/models/not_there: no such folder",
        ),
    }[case]
    flags = make_flags()
    arguments = train_rm_args(model, data, output, *FLAGS, *flags)
    result = run_command([sys.executable, *arguments], check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Preference data" not in result.stderr  # before any data was read


def test_max_seq_len_that_leaves_prompts_one_token_is_refused_unless_allowed(setup, tmp_path):
    model, data = setup
    refused = train(model, data, str(tmp_path / "short"), "--max_seq_len", "4", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "--max_seq_len 4: 108 of 108 train rows (100%) keep only the first token of their prompt" in (
        refused.stderr
    )
    assert "Loading weights" not in refused.stderr  # before the model loads
    allowed = train(model, data, str(tmp_path / "allowed"), "--max_seq_len", "4", "--allow_prompt_truncation")
    assert "training anyway (--allow_prompt_truncation)" in allowed.stderr


def test_prompt_truncation_threshold_is_five_percent():
    config = TrainConfig(max_seq_len=64)
    stats = {
        "train_examples": 100,
        "eval_examples": 20,
        "prompts_cut_to_first_token": {"train": 5, "eval": 1},
    }
    check_prompt_truncation(stats, config)  # 5% and 5%: accepted
    with pytest.raises(ConfigError, match="2 of 20 eval rows \\(10%\\)"):
        check_prompt_truncation({**stats, "prompts_cut_to_first_token": {"train": 0, "eval": 2}}, config)


def test_local_looking_model_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("models")
    assert looks_local("/abs/model") and looks_local("./model") and looks_local("a/b/c")
    assert looks_local("models/x")  # starts at a folder that exists here
    assert not looks_local("gpt2") and not looks_local("Qwen/Qwen2.5-0.5B")


def test_save_format_that_the_architecture_cannot_write_is_refused_before_loading(tmp_path):
    from transformers import CONFIG_MAPPING

    folder = str(tmp_path / "bitnet")
    CONFIG_MAPPING["bitnet"](hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        folder
    )
    with pytest.raises(
        ConfigError, match="--save_format hf: .*no ForSequenceClassification class for model_type 'bitnet'"
    ):
        check_model_path(TrainConfig(model_name_or_path=folder, save_format="hf"), folder)
    check_model_path(TrainConfig(model_name_or_path=folder, save_format="dschat"), folder)
