"""Stop signals (SIGTERM, SIGINT, SIGUSR1): the run saves at the next step boundary, exits 128 + the signal, and
`--resume` continues as if nothing happened; a signal before the first step or after the last loses nothing."""

import os
import random
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
    torchrun,
    train_rm_args,
    write_tiny_run_inputs,
)
from safetensors.torch import load_file

STEPS = 30
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
    "--zero_stage",
    "2",
]  # --save_interval 0 (the default): the only checkpoint is the one the signal asks for


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run_inputs(str(tmp_path_factory.mktemp("preemption")))


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    model, data = setup
    output = str(tmp_path_factory.mktemp("uninterrupted"))
    torchrun(train_rm_args(model, data, output, *FLAGS))
    return read_metrics(output)[0], load_file(os.path.join(output, "model.safetensors"))


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=launcher_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, before: set[str], timeout: int = 300) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for leftover in _shm_files() - before:
            os.remove(leftover)
    return output


def wait_for_step(output: str, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        records = read_metrics(output)[0]
        if records and records[-1]["step"] >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run never reached step {step} (exit {process.poll()})")


def worker_pids(launcher_pid: int) -> list[int]:
    """The training processes torchrun started (its children)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if parent == launcher_pid:
                children.append(int(entry))
    return children


@pytest.mark.distributed
# One random step in the default suite; two more (other steps, other ranks) with the slow tests.
@pytest.mark.parametrize(
    "seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
)
def test_sigterm_at_a_random_step_saves_and_resume_equals_uninterrupted_run(
    setup, uninterrupted, tmp_path, seed
):
    """As a scheduler does it: SIGTERM to every process (torchrun forwards it too, so each rank gets it twice)."""
    model, data = setup
    reference_records, reference_weights = uninterrupted
    output = str(tmp_path / "run")
    stop_after = random.Random(seed).randint(3, 20)
    before = _shm_files()
    launcher = start(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            *train_rm_args(model, data, output, *FLAGS),
        ]
    )
    try:
        wait_for_step(output, stop_after, launcher)
        for pid in worker_pids(launcher.pid):
            os.kill(pid, signal.SIGTERM)
        os.killpg(launcher.pid, signal.SIGTERM)
    finally:
        log = finish(launcher, before)
    match = [line for line in log.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(match) == 1, log[-4000:]  # rank 0 says it once
    step = int(match[0].split("at step ")[1].split(";")[0])
    assert f"checkpoint step_{step} written; continue with --resume" in match[0]
    assert stop_after <= step < STEPS
    # torchrun prints its own traceback for the SIGTERM it got; none may come from the training processes.
    assert os.path.join(ROOT, "training") not in log, log[-4000:]
    checkpoints = os.path.join(output, "checkpoints")
    with open(os.path.join(checkpoints, "latest")) as file:
        assert file.read().strip() == f"step_{step}"
    assert [r["step"] for r in read_metrics(output)[0]] == list(range(1, step + 1))  # every trained step kept

    torchrun(train_rm_args(model, data, output, *FLAGS, "--resume"))
    resumed = read_metrics(output)[0]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no step twice, none missing
    assert [r["pairs_seen"] for r in resumed] == [r["pairs_seen"] for r in reference_records]
    assert [r["loss"] for r in resumed] == pytest.approx(
        [r["loss"] for r in reference_records], abs=1e-6, rel=0
    )
    weights = load_file(os.path.join(output, "model.safetensors"))
    assert weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        assert torch.allclose(weights[name], tensor, atol=1e-6, rtol=0), name


def single_process(model: str, data: str, output: str, *flags: str) -> subprocess.Popen:
    return start([sys.executable, *train_rm_args(model, data, output, *flags)])


def test_sigint_before_the_first_step_exits_130_without_a_checkpoint(setup, tmp_path):
    """A signal while data and model load: nothing was trained, nothing to save; the run ends at once."""
    model, data = setup
    output = str(tmp_path / "early")
    before = _shm_files()
    process = single_process(model, data, output, *FLAGS, "--zero_stage", "0")
    lines = []
    try:
        for line in process.stdout:  # the tokenizer's pad-token warning: signal handlers are in place by then
            lines.append(line)
            if "added a dedicated pad token" in line:
                process.send_signal(signal.SIGINT)
                break
    finally:
        log = "".join(lines) + finish(process, before)
    assert process.returncode == 130, log[-3000:]
    assert "stopped by SIGINT before the first step; nothing to save" in log, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert not os.path.exists(os.path.join(output, "checkpoints"))
    assert read_metrics(output)[0] == []


def test_sigusr1_after_the_last_step_lets_the_run_finish_and_exit_0(setup, tmp_path):
    """A signal during the final evaluation: the model is saved and the exit status is 0 (nothing to resume)."""
    model, data = setup
    output = str(tmp_path / "late")
    flags = [*FLAGS, "--zero_stage", "0", "--max_steps", "2", "--per_device_eval_batch_size", "1"]
    before = _shm_files()
    # Half the 400 pairs held out and scored one at a time: the final evaluation takes a few seconds.
    process = single_process(model, data, output, *flags, "--eval_fraction", "0.5")
    try:
        wait_for_step(output, 2, process)  # the last step's record: the final evaluation has begun
        process.send_signal(signal.SIGUSR1)
    finally:
        log = finish(process, before)
    assert process.returncode == 0, log[-3000:]
    assert "received SIGUSR1 after the last step: the run finished and the model is saved" in log, log[-3000:]
    assert os.path.isfile(os.path.join(output, "model.safetensors"))
    assert read_metrics(output)[1][-1]["step"] == 2  # the final evaluation was written


@pytest.mark.distributed
def test_launch_script_forwards_sigusr1_to_the_ranks_and_exits_138(setup, tmp_path):
    """SLURM's `--signal=B:USR1@...` signals the batch shell alone: launch/train_rm.sh passes it to the training
    processes (the deepspeed launcher would die at USR1 without passing it on) and exits with their status."""
    model, data = setup
    output = str(tmp_path / "script")
    flags = train_rm_args(model, data, output, *FLAGS)[2:]  # without "-m training.train_rm"
    before = _shm_files()
    process = subprocess.Popen(
        [os.path.join(ROOT, "launch", "train_rm.sh"), *flags],
        cwd=ROOT,
        env={**launcher_environment(), "NUM_PROCS": "2", "MASTER_PORT": str(free_port())},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_step(output, 3, process)
        process.send_signal(signal.SIGUSR1)
    finally:
        log = finish(process, before)
    assert process.returncode == 138, log[-3000:]
    match = [line for line in log.splitlines() if "stopped by SIGUSR1 at step" in line]
    assert len(match) == 1, log[-3000:]
    step = int(match[0].split("at step ")[1].split(";")[0])
    with open(os.path.join(output, "checkpoints", "latest")) as file:
        assert file.read().strip() == f"step_{step}"
    assert [r["step"] for r in read_metrics(output)[0]] == list(range(1, step + 1))
