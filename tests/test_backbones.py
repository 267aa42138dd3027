"""The wide backbone table: every family trains through `python -m training.train_rm`, takes the fast layout
wherever the start-up probe proves it exact, and saves a model other tools load with the same scores.

One subprocess (tests/scripts/train_runs.py) trains every backbone of `tiny_models.BACKBONES` twice, 3 fp32
steps each: with the default `auto` layout and with `--packing off --share_prompt off`. The tests then read the
start-up layout line, compare the two runs' losses step by step, and load the saved folders.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from launch_utils import ROOT, read_metrics, run_command, train_rm_args
from test_model import pad_batch
from tiny_models import BACKBONES, folder_tokenizer, save_trainable_backbone, write_tiny_pairs
from transformers import AutoModelForSequenceClassification

from model_utils import create_critic_model, load_tokenizer
from model_utils.hf_reward_model import position_ids_from_mask

# A small learning rate: AdamW divides every gradient element by its own magnitude, so float noise in elements
# near zero becomes lr-sized updates (seen: gemma2, two exact layouts, 0.8% apart at step 3 with lr 2e-3;
# 3e-6 apart with 2e-4).
FLAGS = [
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_seq_len", "32",
    "--learning_rate", "2e-4", "--dropout", "0.0", "--max_steps", "3", "--logging_steps", "1",
]  # fmt: skip
PLAIN = ["--packing", "off", "--share_prompt", "off"]
# No native `<Arch>ForSequenceClassification`: saved in the auto_map layout.
AUTO_MAP_BACKBONES = {"granite", "cohere"}
# What the start-up probe must choose (the implementation decides from the config and the measurement, never
# from a list of model types): `segments` wherever the layers hand attention the segment plan; `mask` rows where
# they do not (StableLM), where attention cannot be switched (Falcon) or is eager only (Gemma 2); padded, with
# the reason named, where no packed layout can be exact.
EXPECTED_LAYOUT = {
    "stablelm": ("mask", "segments max diff"),
    "falcon": ("mask", "did not switch"),
    "gemma2": ("mask", "segment attention replaces sdpa, the backbone runs 'eager'; proved exact"),
    "bloom": ("padded", "ALiBi"),
    "falcon_alibi": ("padded", "ALiBi"),
    "mistral_short_window": ("padded", "sliding_window=12 is shorter than the longest sequence (32 tokens)"),
    "gemma3_text_sliding": ("padded", "sliding_window=12 is shorter than the longest sequence (32 tokens)"),
}
# Absolute position embeddings: left-padded batches need positions from the mask (README, "Saved formats").
ABSOLUTE_POSITIONS = {"gpt2", "gpt_bigcode"}
TEXTS = [
    "the cat has a red hat",
    "what color is the box of the dog ? blue",
    "yes",
    "the bird sits on the box",
]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """{backbone: {"auto"/"plain": (output folder, run result)}}, and the start-up checks' results."""
    root = tmp_path_factory.mktemp("backbones")
    data = write_tiny_pairs(str(root / "pairs.jsonl"), 24)
    runs, folders = {}, {}
    for backbone in BACKBONES:
        model = save_trainable_backbone(str(root / backbone / "base"), backbone)
        save_format = ["--save_format", "auto_map"] if backbone in AUTO_MAP_BACKBONES else []
        for mode, extra in (("auto", save_format), ("plain", [*PLAIN, "--save_format", "dschat"])):
            output = str(root / backbone / mode)
            folders[backbone, mode] = output
            runs[f"{backbone}/{mode}"] = train_rm_args(model, data, output, *FLAGS, *extra)[2:]
    granite = os.path.dirname(folders["granite", "auto"])
    runs["granite/hf"] = train_rm_args(f"{granite}/base", str(root / "absent.jsonl"), str(root / "hf"))[2:]
    runs["bloom/on"] = train_rm_args(
        f"{os.path.dirname(folders['bloom', 'auto'])}/base", data, str(root / "on")
    )[2:] + ["--packing", "on"]
    with open(root / "runs.json", "w", encoding="utf-8") as file:
        json.dump(runs, file)
    script = os.path.join(ROOT, "tests", "scripts", "train_runs.py")
    run_command([sys.executable, script, str(root / "runs.json"), str(root / "results.json")], timeout=1200)
    with open(root / "results.json", encoding="utf-8") as file:
        results = json.load(file)
    return {key: (folder, results[f"{key[0]}/{key[1]}"]) for key, folder in folders.items()}, results


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_probe_takes_the_fast_layout_where_exact_and_names_the_reason_elsewhere(table, backbone):
    runs, _ = table
    _, result = runs[backbone, "auto"]
    assert result["error"] is None, result["error"]
    attention, reason = EXPECTED_LAYOUT.get(backbone, ("segments", "segments max diff"))
    layout = result["layout"]
    assert layout.startswith(f"packing {attention != 'padded'}, prompt sharing {attention != 'padded'}, "), (
        layout
    )
    assert f"attention {attention} (" in layout and reason in layout, layout
    if attention != "padded":
        assert "proved exact at start-up" in layout and "tolerance" in layout and "probe " in layout


@pytest.mark.parametrize("backbone", BACKBONES)
def test_packed_and_plain_runs_have_the_same_losses(table, backbone):
    runs, _ = table
    auto, _ = read_metrics(runs[backbone, "auto"][0])
    plain, _ = read_metrics(runs[backbone, "plain"][0])
    assert [record["step"] for record in auto] == [record["step"] for record in plain] == [1, 2, 3]
    torch.testing.assert_close(
        torch.tensor([record["loss"] for record in auto]),
        torch.tensor([record["loss"] for record in plain]),
        rtol=1e-4,
        atol=1e-6,
    )


def padded_batches(tokenizer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    rows = [
        tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in TEXTS
    ]
    return {side: pad_batch(rows, tokenizer.pad_token_id, side) for side in ("left", "right")}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_saved_model_loads_elsewhere_with_equal_left_and_right_padded_scores(table, backbone):
    runs, _ = table
    folder = runs[backbone, "auto"][0]
    remote = backbone in AUTO_MAP_BACKBONES
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=remote).eval()
    assert type(model).__name__.endswith("RewardModel" if remote else "ForSequenceClassification")
    tokenizer = load_tokenizer(folder)
    critic = create_critic_model(folder, tokenizer, rlhf_training=True, dropout=0.0).eval()  # the PPO stage's
    assert len(tokenizer) == len(folder_tokenizer(backbone)) + 1  # the added pad
    with torch.no_grad():
        for side, (input_ids, attention_mask) in padded_batches(tokenizer).items():
            extra = {}
            if side == "left" and backbone in ABSOLUTE_POSITIONS:
                extra["position_ids"] = position_ids_from_mask(attention_mask)
            scores = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, 0]
            expected = critic(input_ids, attention_mask)
            assert (scores - expected).abs().max() < 1e-5, (side, scores, expected)


def test_a_save_format_the_backbone_cannot_take_stops_the_run_before_the_data_is_read(table):
    _, results = table
    error = results["granite/hf"]["error"]
    assert error.startswith("ConfigError: --save_format hf: "), error
    assert "no ForSequenceClassification class for model_type 'granite'" in error and "auto_map" in error


def test_an_on_flag_the_config_refuses_names_the_reason(table):
    _, results = table
    error = results["bloom/on"]["error"]
    assert error.startswith("ConfigError: --packing on: bloom: ALiBi"), error


def test_the_save_format_refusal_exits_2_in_one_line(tmp_path):
    model = save_trainable_backbone(str(tmp_path / "granite"), "granite")
    command = train_rm_args(model, str(tmp_path / "absent.jsonl"), str(tmp_path / "out"))
    result = run_command([sys.executable, *command], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --save_format hf: "), result.stderr[
        -500:
    ]
    assert not os.path.exists(tmp_path / "out")
