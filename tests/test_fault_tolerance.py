"""Faults during training: SIGKILL mid-run and --resume, non-finite losses, torn checkpoints."""

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from launch_utils import (
    ROOT,
    _shm_files,
    free_port,
    launcher_environment,
    read_metrics,
    run_command,
    torchrun,
    train_rm_args,
    write_tiny_run_inputs,
)
from safetensors.torch import load_file

STEPS = 40
FLAGS = [
    "--per_device_train_batch_size",
    "2",
    "--max_seq_len",
    "32",
    "--learning_rate",
    "2e-3",
    "--num_warmup_steps",
    "2",
    "--dropout",
    "0.0",
    "--max_steps",
    str(STEPS),
    "--save_interval",
    "3",
    "--zero_stage",
    "2",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run_inputs(str(tmp_path_factory.mktemp("faults")))


def command(model: str, data: str, output: str, *extra: str) -> list[str]:
    return train_rm_args(model, data, output, *FLAGS, *extra)


def metrics(output: str) -> list[dict]:
    return read_metrics(output)[0]


def start_and_kill_at(model: str, data: str, output: str, kill_step: int) -> int:
    """Start a 2-process run and SIGKILL its whole process group once `kill_step` is logged."""
    before = _shm_files()
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            *command(model, data, output),
        ],
        cwd=ROOT,
        env=launcher_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline and launcher.poll() is None:
            done = metrics(output)
            if done and done[-1]["step"] >= kill_step:
                break
            time.sleep(0.01)
        os.killpg(launcher.pid, signal.SIGKILL)
    finally:
        launcher.wait()
        for leftover in _shm_files() - before:
            os.remove(leftover)
    return metrics(output)[-1]["step"] if metrics(output) else 0


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    model, data = setup
    output = str(tmp_path_factory.mktemp("uninterrupted"))
    torchrun(command(model, data, output))
    return metrics(output), load_file(os.path.join(output, "model.safetensors"))


@pytest.mark.distributed
# One random step in the default suite; two more (other steps, other ranks) with the slow tests.
@pytest.mark.parametrize(
    "seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
)
def test_sigkill_then_resume_equals_uninterrupted_run(setup, uninterrupted, tmp_path, seed):
    model, data = setup
    reference_records, reference_weights = uninterrupted
    output = str(tmp_path / "run")
    kill_step = random.Random(seed).randint(4, 24)
    reached = start_and_kill_at(model, data, output, kill_step)
    assert reached < STEPS, "the run finished before it could be killed"
    checkpoints = os.path.join(output, "checkpoints")
    with open(os.path.join(checkpoints, "latest")) as file:
        latest = file.read().strip()
    assert os.path.isdir(os.path.join(checkpoints, latest))

    torchrun(command(model, data, output, "--resume"))
    resumed = metrics(output)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no step twice, none missing
    assert [r["pairs_seen"] for r in resumed] == [r["pairs_seen"] for r in reference_records]
    assert [r["loss"] for r in resumed] == pytest.approx(
        [r["loss"] for r in reference_records], abs=1e-6, rel=0
    )
    weights = load_file(os.path.join(output, "model.safetensors"))
    assert weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        assert torch.allclose(weights[name], tensor, atol=1e-6, rtol=0), name
    assert not [name for name in os.listdir(checkpoints) if name.startswith(".incomplete_")]
    assert len([name for name in os.listdir(checkpoints) if name.startswith("step_")]) <= 2


def test_torn_checkpoint_is_never_taken_as_latest(setup, tmp_path):
    """A folder left half-written (killed during save) is ignored; resume uses the complete one."""
    model, data = setup
    output = str(tmp_path / "run")
    flags = ["--max_steps", "6", "--save_interval", "3", "--zero_stage", "0"]
    run_command([sys.executable, *command(model, data, output, *flags)])
    checkpoints = os.path.join(output, "checkpoints")
    os.makedirs(os.path.join(checkpoints, ".incomplete_step_9"))
    with open(os.path.join(checkpoints, ".incomplete_step_9", "mp_rank_00_model_states.pt"), "wb") as file:
        file.write(b"torn")
    result = run_command([sys.executable, *command(model, data, output, *flags, "--resume")])
    assert "resuming at step 6" in result.stderr


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(setup, tmp_path):
    model, data = setup
    output = str(tmp_path / "run")
    # A learning rate of 1e12 makes the weights explode after the first update: step 2's loss is not finite.
    result = run_command(
        [
            sys.executable,
            *command(
                model, data, output, "--learning_rate", "1e12", "--save_interval", "1", "--zero_stage", "0"
            ),
        ],
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    match = re.search(
        r"error: non-finite loss at step (\d+); stopped before updating the weights", result.stderr
    )
    assert match, result.stderr[-2000:]
    step = int(match.group(1))
    assert step >= 2
    assert f"the last checkpoint (step_{step - 1}) is intact" in result.stderr
    with open(os.path.join(output, "checkpoints", "latest")) as file:
        assert file.read().strip() == f"step_{step - 1}"
    assert [r["step"] for r in metrics(output)] == list(range(1, step))
