"""A run resumed on another number of processes or another ZeRO stage trains the pairs and reaches the losses and
weights of an uninterrupted run with the same pairs per optimizer step (fp32); what cannot be resumed is refused
before anything loads."""

import json
import os
import shutil
import sys

import pytest
import torch
from launch_utils import read_metrics, run_command, torchrun, train_rm_args, write_tiny_run_inputs
from safetensors.torch import load_file

STEPS = 8
FLAGS = [
    "--max_seq_len",
    "32",
    "--learning_rate",
    "2e-3",
    "--num_warmup_steps",
    "2",
    "--weight_decay",
    "0.1",  # a group without decay (biases, norms) must keep its own hyperparameters across the hop
    "--dropout",
    "0.0",
    "--max_steps",
    str(STEPS),
    "--save_interval",
    "2",
    "--keep_checkpoints",
    "10",
    "--num_frozen_layers",
    "1",  # frozen weights are not in the optimizer: they come from the checkpoint's module states
]
TWO_PROCESSES = ["--per_device_train_batch_size", "2"]  # 4 pairs per optimizer step either way
ONE_PROCESS = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run_inputs(str(tmp_path_factory.mktemp("resize")))


def run(model, data, output, processes, *flags):
    arguments = train_rm_args(model, data, output, *FLAGS, *flags)
    if processes == 1:
        return run_command([sys.executable, *arguments])
    return torchrun(arguments, nproc=processes)


def rewind(source: str, output: str, step: int) -> None:
    """`output` = `source` as a run killed after step `step` would have left it (same checkpoint files)."""
    shutil.copytree(source, output)
    checkpoints = os.path.join(output, "checkpoints")
    for name in os.listdir(checkpoints):
        if name.startswith("step_") and int(name[5:]) > step:
            shutil.rmtree(os.path.join(checkpoints, name))
    with open(os.path.join(checkpoints, "latest"), "w") as file:
        file.write(f"step_{step}")


def written_by(output: str, step: int) -> tuple[int, int]:
    with open(os.path.join(output, "checkpoints", f"step_{step}", "train_state.json")) as file:
        saved = json.load(file)
    return saved["world_size"], saved["zero_stage"]


def assert_same_run(output: str, reference: str) -> None:
    records, reference_records = read_metrics(output)[0], read_metrics(reference)[0]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # no step twice, none skipped
    assert [r["pairs_seen"] for r in records] == [r["pairs_seen"] for r in reference_records]
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in reference_records], abs=1e-5)
    assert [r["lr"] for r in records] == pytest.approx([r["lr"] for r in reference_records], abs=1e-12)
    weights = load_file(os.path.join(output, "model.safetensors"))
    for name, tensor in load_file(os.path.join(reference, "model.safetensors")).items():
        assert torch.allclose(weights[name], tensor, atol=1e-5, rtol=0), name


@pytest.fixture(scope="module")
def zero2_two_processes(setup, tmp_path_factory):
    """The uninterrupted reference: 2 processes, ZeRO-2, checkpoints every 2 steps."""
    model, data = setup
    output = str(tmp_path_factory.mktemp("zero2_w2") / "run")
    run(model, data, output, 2, *TWO_PROCESSES, "--zero_stage", "2")
    assert written_by(output, 4) == (2, 2)
    return output


@pytest.mark.distributed
def test_two_processes_zero2_hop_to_zero3_then_to_one_process_zero1(setup, zero2_two_processes, tmp_path):
    """2 processes ZeRO-2 -> (after step 4) 2 processes ZeRO-3 -> (after step 6) 1 process ZeRO-1: the losses and
    weights of the uninterrupted ZeRO-2 run, through DeepSpeed's universal checkpoint conversion."""
    model, data = setup
    hop = str(tmp_path / "hop")
    rewind(zero2_two_processes, hop, 4)
    result = run(model, data, hop, 2, *TWO_PROCESSES, "--zero_stage", "3", "--resume")
    assert "on 2 processes under ZeRO-3" in result.stderr and "resuming at step 4" in result.stderr
    assert written_by(hop, 6) == (2, 3)

    second = str(tmp_path / "second_hop")
    rewind(hop, second, 6)
    result = run(model, data, second, 1, *ONE_PROCESS, "--zero_stage", "1", "--resume")
    assert "(2 processes, ZeRO-3) on 1 processes under ZeRO-1" in result.stderr
    assert_same_run(second, zero2_two_processes)
    assert os.path.isdir(os.path.join(second, "checkpoints", "step_6", "universal"))  # converted once, kept


@pytest.mark.distributed
def test_one_process_zero0_resumes_on_two(setup, zero2_two_processes, tmp_path):
    """ZeRO-0 keeps the full optimizer state in one file: DeepSpeed's own loader, any number of processes."""
    model, data = setup
    reference = str(tmp_path / "reference")
    run(model, data, reference, 1, *ONE_PROCESS, "--zero_stage", "0")
    resumed = str(tmp_path / "resumed")
    rewind(reference, resumed, 4)
    result = run(model, data, resumed, 2, *TWO_PROCESSES, "--zero_stage", "0", "--resume")
    assert "resuming at step 4" in result.stderr
    assert_same_run(resumed, reference)
    assert_same_run(resumed, zero2_two_processes)  # fp32: ZeRO stage and world size do not change the numbers


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--zero_stage", "0"], "a ZeRO-0 checkpoint resumes under --zero_stage 0 and a ZeRO 1-3 one under"),
        (
            ["--zero_stage", "2", "--per_device_train_batch_size", "2"],
            "its data order (pairs=360 seed=1234 pairs_per_step=4 group_by_length=False) differs from this "
            "run's (pairs=360 seed=1234 pairs_per_step=2 group_by_length=False)",
        ),
        (["--zero_stage", "2", *ONE_PROCESS, "--seed", "7"], "seed=7"),
    ],
    ids=["zero0_from_zero2", "another_global_batch", "another_seed"],
)
def test_what_cannot_resume_is_refused_before_anything_loads(
    setup, zero2_two_processes, tmp_path, flags, message
):
    model, data = setup
    output = str(tmp_path / "refused")
    rewind(zero2_two_processes, output, 4)
    before = sorted(os.listdir(os.path.join(output, "checkpoints")))
    result = run_command(
        [sys.executable, *train_rm_args(model, data, output, *FLAGS, *flags, "--resume")], check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message in result.stderr
    assert "Loading weights" not in result.stderr  # refused before the model loads
    assert sorted(os.listdir(os.path.join(output, "checkpoints"))) == before


class CodeExecution:
    """Unpickling this calls `os.mkdir(marker)`: the stand-in for code planted in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_code_planted_in_a_checkpoint_never_runs_when_it_is_converted(setup, zero2_two_processes, tmp_path):
    """DeepSpeed's converter unpickles with weights_only=False; the resume runs it weights-only."""
    model, data = setup
    output = str(tmp_path / "planted")
    rewind(zero2_two_processes, output, 4)
    optimizer_file = os.path.join(
        output, "checkpoints", "step_4", "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    )
    marker = tmp_path / "code_ran"
    state = torch.load(optimizer_file, weights_only=False)  # our own file
    torch.save({**state, "planted": CodeExecution(str(marker))}, optimizer_file)
    result = run_command(
        [
            sys.executable,
            *train_rm_args(model, data, output, *FLAGS, *ONE_PROCESS, "--zero_stage", "2", "--resume"),
        ],
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "DeepSpeed's universal-checkpoint conversion failed" in result.stderr
    assert "weights-only unpickler refused it" in result.stderr
    assert not marker.exists()
