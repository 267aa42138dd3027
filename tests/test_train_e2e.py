"""`python -m training.train_rm` end to end on a tiny model: single process, 2 processes with ZeRO 0-3, resume."""

import json
import os
import shutil
import sys

import pytest
import torch
from launch_utils import read_metrics, run_command, torchrun, train_rm_args, write_tiny_run_inputs
from safetensors.torch import load_file
from tiny_models import make_tokenizer, save_tiny_backbone, write_tiny_pairs

COMMON = [
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "8",
    "--max_seq_len",
    "32",
    "--learning_rate",
    "2e-3",
    "--num_warmup_steps",
    "2",
    "--dropout",
    "0.0",
    "--logging_steps",
    "1",
]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return write_tiny_run_inputs(str(tmp_path_factory.mktemp("train")), num_pairs=240)


def train_command(model: str, data: str, output: str, *extra: str) -> list[str]:
    return train_rm_args(model, data, output, *COMMON, *extra)


def run_single(model, data, output, *extra, check=True):
    return run_command([sys.executable, *train_command(model, data, output, *extra)], check=check)


def test_single_process_run_learns_logs_and_saves(tiny_setup, tmp_path):
    model, data = tiny_setup
    output = str(tmp_path / "out")
    result = run_single(
        model, data, output, "--num_train_epochs", "3", "--eval_interval", "20", "--enable_tensorboard"
    )
    train_records, eval_records = read_metrics(output)
    assert [r["step"] for r in train_records] == list(range(1, len(train_records) + 1))
    assert len(train_records) == 3 * (216 // 4)  # 10% held out, 3 epochs of whole steps
    assert [r["step"] for r in eval_records][:2] == [20, 40] and eval_records[-1]["step"] == len(
        train_records
    )
    assert eval_records[-1]["eval_accuracy"] >= 0.95, eval_records[-1]  # chance is 0.5
    for key in (
        "eval_chosen_mean",
        "eval_rejected_mean",
        "eval_margin_mean",
        "eval_reward_mean",
        "eval_reward_std",
    ):
        assert key in eval_records[-1]
    assert "held-out accuracy" in result.stdout and os.path.abspath(output) in result.stdout
    assert os.listdir(os.path.join(output, "tensorboard"))
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(output)
    assert loaded.config.num_labels == 1


def test_bad_data_file_stops_before_training_naming_file_line_field(tiny_setup, tmp_path):
    model, _ = tiny_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "the cat", "chosen": " red", "rejected": " blue"})
        + "\n"
        + json.dumps({"prompt": "the dog", "chosen": " red"})
        + "\n"
    )
    output = str(tmp_path / "out")
    result = run_single(model, str(bad), output, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "bad.jsonl line 2: field 'rejected'" in result.stderr
    assert not os.path.exists(os.path.join(output, "metrics.jsonl"))


def test_fp16_on_cpu_is_a_clear_error(tiny_setup, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    model, data = tiny_setup
    result = run_single(model, data, str(tmp_path / "out"), "--dtype", "fp16", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "fp16 is not supported on CPU" in result.stderr


def test_resume_continues_with_identical_losses(tiny_setup, tmp_path):
    model, data = tiny_setup
    output, cache = str(tmp_path / "out"), ("--data_cache_dir", str(tmp_path / "cache"))
    first = run_single(
        model, data, output, "--max_steps", "12", "--save_interval", "6", "--keep_checkpoints", "3", *cache
    )
    uninterrupted, _ = read_metrics(output)
    # Emulate a crash right after step 6's checkpoint: drop what came later, continue with --resume.
    checkpoints = os.path.join(output, "checkpoints")
    shutil.rmtree(os.path.join(checkpoints, "step_12"))
    with open(os.path.join(checkpoints, "latest"), "w") as file:
        file.write("step_6")
    second = run_single(model, data, output, "--max_steps", "12", "--save_interval", "6", "--resume", *cache)
    resumed, _ = read_metrics(output)
    assert "tokenised data: building" in first.stderr and "tokenised data: reusing" in second.stderr
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]
    assert [r["pairs_seen"] for r in resumed] == [r["pairs_seen"] for r in uninterrupted]


def test_lora_merges_into_saved_model(tiny_setup, tmp_path):
    model, data = tiny_setup
    output = str(tmp_path / "out")
    run_single(model, data, output, "--max_steps", "3", "--lora_dim", "4", "--only_optimize_lora")
    weights = load_file(os.path.join(output, "model.safetensors"))
    assert not [name for name in weights if "lora" in name]
    base = load_file(os.path.join(model, "model.safetensors"))
    # Only the adapted (merged) projections moved; embeddings stay as they were (not optimised).
    assert torch.equal(
        weights["model.layers.0.input_layernorm.weight"], base["layers.0.input_layernorm.weight"]
    )
    assert not torch.equal(
        weights["model.layers.0.self_attn.q_proj.weight"], base["layers.0.self_attn.q_proj.weight"]
    )


def test_dschat_loss_and_frozen_layers_run(tiny_setup, tmp_path):
    model, data = tiny_setup
    output = str(tmp_path / "out")
    run_single(model, data, output, "--max_steps", "3", "--loss_type", "dschat", "--num_frozen_layers", "1")
    train_records, _ = read_metrics(output)
    assert len(train_records) == 3 and all(r["loss"] > 0 for r in train_records)
    weights = load_file(os.path.join(output, "model.safetensors"))
    base = load_file(os.path.join(model, "model.safetensors"))
    assert torch.equal(weights["model.layers.0.mlp.up_proj.weight"], base["layers.0.mlp.up_proj.weight"])
    assert not torch.equal(weights["model.layers.1.mlp.up_proj.weight"], base["layers.1.mlp.up_proj.weight"])


# --- 2 processes, real DeepSpeed ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero_runs(tiny_setup, tmp_path_factory):
    model, data = tiny_setup
    losses = {}
    for stage in (0, 1, 2, 3):
        output = str(tmp_path_factory.mktemp(f"zero{stage}"))
        # Weight decay on: ZeRO-3 must group its partitioned matrices (flat shards) like the other stages.
        flags = ("--max_steps", "6", "--zero_stage", str(stage), "--weight_decay", "0.1")
        torchrun(train_command(model, data, output, *flags))
        losses[stage] = read_metrics(output)
    return losses


@pytest.mark.distributed
def test_two_process_zero_stages_give_identical_fp32_losses(zero_runs):
    reference = [r["loss"] for r in zero_runs[0][0]]
    assert len(reference) == 6 and len(set(reference)) > 1
    for stage in (1, 2, 3):
        assert [r["loss"] for r in zero_runs[stage][0]] == pytest.approx(reference, abs=1e-5, rel=0), stage
        assert zero_runs[stage][1][-1]["eval_num_pairs"] == zero_runs[0][1][-1]["eval_num_pairs"] == 24


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_offload_runs(tiny_setup, tmp_path, stage):
    model, data = tiny_setup
    output = str(tmp_path / "out")
    torchrun(train_command(model, data, output, "--max_steps", "3", "--zero_stage", str(stage), "--offload"))
    train_records, eval_records = read_metrics(output)
    assert len(train_records) == 3 and eval_records
    assert os.path.exists(os.path.join(output, "model.safetensors"))


@pytest.mark.distributed
def test_deepspeed_launcher_cpu_bf16_zero3(tiny_setup, tmp_path):
    """The real `deepspeed` launcher (appends --local_rank) with bf16 + ZeRO-3 on CPU."""
    model, data = tiny_setup
    output = str(tmp_path / "out")
    from launch_utils import free_port

    run_command(
        [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            *train_command(model, data, output, "--max_steps", "3", "--zero_stage", "3", "--dtype", "bf16")[
                1:
            ],
        ]
    )
    train_records, _ = read_metrics(output)
    assert len(train_records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train_records)


def test_packing_and_prompt_sharing_train_like_plain_batches(tiny_setup, tmp_path):
    model, data = tiny_setup
    losses = {}
    for name, flags in {
        "plain": ("--packing", "off", "--share_prompt", "off"),
        "packed": ("--packing", "on", "--share_prompt", "on"),
    }.items():
        output = str(tmp_path / name)
        result = run_single(model, data, output, "--max_steps", "8", *flags)
        assert f"packing {name == 'packed'}, prompt sharing {name == 'packed'}" in result.stderr
        losses[name] = [r["loss"] for r in read_metrics(output)[0]]
    assert losses["packed"] == pytest.approx(losses["plain"], abs=1e-5, rel=0)


def test_packing_on_where_not_exact_is_refused(tmp_path):
    model = save_tiny_backbone(str(tmp_path / "bloom"), "bloom")
    make_tokenizer().save_pretrained(model)
    data = write_tiny_pairs(str(tmp_path / "pairs.jsonl"), 40)
    result = run_command(
        [
            sys.executable,
            *train_rm_args(model, data, str(tmp_path / "out"), "--packing", "on", "--max_seq_len", "32"),
        ]
        + ["--max_steps", "1"],
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--packing on:" in result.stderr and "bloom" in result.stderr.lower()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_rank_skips_gradient_reduction_without_changing_training(tiny_setup, tmp_path, dtype):
    """One rank, ZeRO-0: the trainer's backwards run in `engine.no_sync()` (no all-reduce over one rank); the
    losses and the saved weights equal a run that all-reduces every backward, with gradient accumulation 2 (the
    bf16 optimizer's fp32 accumulation and DeepSpeed's micro-step counting must still work)."""
    model, data = tiny_setup
    script = os.path.join(os.path.dirname(__file__), "scripts", "one_rank_reduction.py")
    flags = [*train_command(model, data, "unused", "--dtype", dtype, "--gradient_accumulation_steps", "2")]
    flags = flags[flags.index("--model_name_or_path") :]
    flags = [
        *flags[: flags.index("--output_dir")],
        *flags[flags.index("--output_dir") + 2 :],
        "--max_steps",
        "6",
    ]
    runs = {}
    for mode in ("skip", "reduce"):
        output = str(tmp_path / mode)
        extra = ["--reduce"] if mode == "reduce" else ["--skip"]
        run_command([sys.executable, script, output, *extra, "--", *flags])
        with open(os.path.join(output, "run.json"), encoding="utf-8") as file:
            runs[mode] = json.load(file)
        runs[mode]["weights"] = load_file(os.path.join(output, "model.safetensors"))
    assert runs["skip"]["no_sync_backwards"] == 6 * 2  # every micro-batch's backward skipped the reduction
    assert len(runs["skip"]["losses"]) == 6
    assert runs["skip"]["losses"] == runs["reduce"]["losses"]
    assert runs["skip"]["weights"].keys() == runs["reduce"]["weights"].keys()
    for name, tensor in runs["skip"]["weights"].items():
        assert torch.equal(tensor, runs["reduce"]["weights"][name]), name
