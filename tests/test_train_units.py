"""Pure pieces of the training side: config, DeepSpeed config assembly, losses, data order."""

import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F

from training.arguments import ConfigError, TrainConfig, parse_args
from training.checkpointing import TrainState
from training.ds_config import CONFIG_DIR, build_ds_config, inference_config, resolve_dtype
from training.losses import center_rewards_loss, divergence_span_loss, pairwise_loss
from training.sampling import check_same_data_order, data_order, epoch_batches, total_steps

# --- config --------------------------------------------------------------------------------------------------


def test_defaults_parse_and_dschat_flag_names_exist():
    config = parse_args([])
    assert config.data_path == ["default"] and config.model_name_or_path == "default"
    flags = [
        "--data_path",
        "a",
        "b",
        "--data_split",
        "2,4,4",
        "--model_name_or_path",
        "m",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "3",
        "--max_seq_len",
        "64",
        "--learning_rate",
        "1e-4",
        "--weight_decay",
        "0.1",
        "--num_train_epochs",
        "2",
        "--gradient_accumulation_steps",
        "4",
        "--lr_scheduler_type",
        "linear",
        "--num_warmup_steps",
        "5",
        "--seed",
        "7",
        "--gradient_checkpointing",
        "--zero_stage",
        "3",
        "--offload",
        "--dtype",
        "bf16",
        "--output_dir",
        "o",
        "--num_padding_at_beginning",
        "1",
        "--eval_interval",
        "10",
        "--enable_tensorboard",
        "--max_steps",
        "20",
        "--save_interval",
        "5",
        "--resume",
        "--save_format",
        "dschat",
        "--local_rank=1",
        "--lora_dim",
        "8",
        "--lora_module_name",
        "layers.",
        "--only_optimize_lora",
    ]
    config = parse_args(flags)
    assert config.data_path == ["a", "b"] and config.gradient_accumulation_steps == 4
    assert config.offload and config.resume and config.zero_stage == 3 and config.local_rank == 1
    assert config.learning_rate == 1e-4 and config.dtype == "bf16" and config.save_format == "dschat"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be positive"),
        (["--only_optimize_lora"], "--only_optimize_lora needs --lora_dim > 0"),
        (["--max_steps", "0"], "--max_steps must be positive"),
        (["--eval_fraction", "1.5"], "--eval_fraction must be in"),
        (["--deepspeed_config", "/nonexistent.json"], "no such file"),
        (["--listwise_loss", "plackett_luce", "--score_gap_margin", "1"], "plackett_luce has none"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_alone_continues_the_embedded_default_run():
    """`launch/train_rm.sh --resume` after a stop signal must continue the default run, not start another."""
    resumed = parse_args(["--resume", "--local_rank=0"])
    assert resumed.resume and resumed.output_dir == "output/default_rm" and resumed.max_steps == 150
    assert parse_args(["--overwrite_output_dir"]).output_dir == "output/default_rm"
    assert parse_args(["--resume", "--seed", "3"]).output_dir == "output/reward_model"  # another run


def test_config_is_frozen():
    config = parse_args([])
    with pytest.raises(AttributeError):
        config.learning_rate = 1.0


# --- DeepSpeed configs ----------------------------------------------------------------------------------------

SHIPPED = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.json")))


def test_every_shipped_config_is_present():
    names = {os.path.basename(path) for path in SHIPPED}
    assert {
        "zero0.json",
        "zero1.json",
        "zero2.json",
        "zero3.json",
        "zero2_offload.json",
        "zero3_offload.json",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_config_fills_and_checks(path):
    with open(path) as file:
        raw = json.load(file)
    stage = raw["zero_optimization"]["stage"]
    config = TrainConfig(
        deepspeed_config=path, per_device_train_batch_size=3, gradient_accumulation_steps=2, dtype="bf16"
    )
    filled = build_ds_config(config, world_size=4)
    assert filled["train_batch_size"] == 3 * 2 * 4
    assert filled["train_micro_batch_size_per_gpu"] == 3 and filled["gradient_accumulation_steps"] == 2
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["gradient_clipping"] > 0
    if stage == 3:
        assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "auto" not in json.dumps(filled)
    assert inference_config(filled)["zero_optimization"]["stage"] in (0, 3)


def test_zero_stage_and_offload_pick_the_file():
    filled = build_ds_config(TrainConfig(zero_stage=3, offload=True), world_size=1)
    assert filled["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="--offload needs --zero_stage 2 or 3"):
        build_ds_config(TrainConfig(zero_stage=1, offload=True), world_size=1)


def test_explicit_batch_that_disagrees_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 0}}))
    config = TrainConfig(deepspeed_config=str(path), per_device_train_batch_size=4)
    with pytest.raises(ConfigError, match="train_batch_size is 64, but the flags give 8"):
        build_ds_config(config, world_size=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_fp16_on_cpu_is_refused_with_reason_and_auto_is_fp32():
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        resolve_dtype("fp16")
    assert resolve_dtype("auto") == "fp32"
    assert resolve_dtype("bf16") == "bf16"


# --- losses -------------------------------------------------------------------------------------------------


def test_pairwise_loss_values_and_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = -(F.logsigmoid(torch.tensor(2.0)) + F.logsigmoid(torch.tensor(-1.0))) / 2
    assert torch.allclose(pairwise_loss(chosen, rejected), expected)
    with_margin = pairwise_loss(chosen, rejected, torch.tensor([1.0, 0.0]))
    assert torch.allclose(
        with_margin, -(F.logsigmoid(torch.tensor(1.0)) + F.logsigmoid(torch.tensor(-1.0))) / 2
    )
    one = torch.tensor([0])
    assert center_rewards_loss(torch.tensor([1.0]), torch.tensor([-1.0]), one).item() == 0.0
    assert center_rewards_loss(torch.tensor([1.0]), torch.tensor([1.0]), one).item() == 4.0
    # Pairs: TRL's mean((r_c + r_r)^2). A prompt with three comparisons weighs as one pair does, as in the loss.
    better, worse = torch.tensor([1.0, 2.0, 2.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    pairs = center_rewards_loss(better, worse, torch.arange(4))
    assert pairs.item() == pytest.approx(((better + worse) ** 2).mean().item())
    grouped = center_rewards_loss(better, worse, torch.tensor([0, 0, 0, 1]))
    assert grouped.item() == pytest.approx(((1 + 4 + 9) / 3 + 4) / 2)


def dschat_reference_loss(
    chosen_values, rejected_values, chosen_ids, rejected_ids, pad_id, num_padding_at_beginning
):
    """DeepSpeed-Chat step 2's per-sample loop (right padding, pad id marks the end)."""
    loss = 0.0
    for i in range(chosen_ids.shape[0]):
        c_inds = (chosen_ids[i] == pad_id).nonzero()
        c_ind = (
            c_inds[num_padding_at_beginning].item()
            if len(c_inds) > num_padding_at_beginning
            else chosen_ids.shape[1]
        )
        divergence = (chosen_ids[i] != rejected_ids[i]).nonzero()
        if len(divergence) == 0:
            end_ind, divergence_ind, r_ind = rejected_values.shape[1], rejected_values.shape[1] - 1, c_ind
        else:
            r_inds = (rejected_ids[i] == pad_id).nonzero()
            r_ind = (
                r_inds[num_padding_at_beginning].item()
                if len(r_inds) > num_padding_at_beginning
                else rejected_ids.shape[1]
            )
            end_ind, divergence_ind = max(c_ind, r_ind), divergence[0].item()
        c_span = chosen_values[i, divergence_ind:end_ind]
        r_span = rejected_values[i, divergence_ind:end_ind]
        loss += -F.logsigmoid(c_span - r_span).mean()
    return loss / chosen_ids.shape[0]


def test_divergence_span_loss_matches_deepspeed_chat_loop():
    torch.manual_seed(0)
    pad = 0
    chosen_ids = torch.tensor(
        [[5, 6, 7, 8, 9, pad, pad], [5, 6, 7, pad, pad, pad, pad], [3, 4, 5, 6, 7, 8, 9]]
    )
    rejected_ids = torch.tensor([[5, 6, 2, 2, pad, pad, pad], [5, 6, 7, 8, 9, 4, pad], [3, 4, 1, 6, 7, 8, 9]])
    chosen_values, rejected_values = torch.randn(3, 7), torch.randn(3, 7)
    ours = divergence_span_loss(
        chosen_values,
        rejected_values,
        chosen_ids,
        rejected_ids,
        (chosen_ids != pad).long(),
        (rejected_ids != pad).long(),
    )
    reference = dschat_reference_loss(chosen_values, rejected_values, chosen_ids, rejected_ids, pad, 0)
    assert torch.allclose(ours, reference, atol=1e-6)


# --- data order -----------------------------------------------------------------------------------------------


def test_epoch_batches_are_deterministic_disjoint_and_whole_steps():
    rank0 = epoch_batches(103, epoch=0, seed=1, micro_batch_size=4, accumulation=2, this_rank=0, ranks=2)
    rank1 = epoch_batches(103, epoch=0, seed=1, micro_batch_size=4, accumulation=2, this_rank=1, ranks=2)
    assert rank0 == epoch_batches(103, 0, 1, 4, 2, 0, 2)
    seen = [i for batch in rank0 + rank1 for i in batch]
    assert len(seen) == len(set(seen)) == 96  # 6 whole steps of 16 pairs
    assert len(rank0) == len(rank1) == 12
    assert epoch_batches(103, 1, 1, 4, 2, 0, 2) != rank0  # reshuffled each epoch


def test_group_by_length_gives_each_step_similar_lengths_on_every_rank():
    lengths = torch.randint(10, 900, (203,), generator=torch.Generator().manual_seed(5)).tolist()
    ranks = [epoch_batches(203, 0, 1, 4, 2, rank, 2, lengths) for rank in (0, 1)]
    assert ranks[0] == epoch_batches(203, 0, 1, 4, 2, 0, 2, lengths)
    assert epoch_batches(203, 1, 1, 4, 2, 0, 2, lengths) != ranks[0]  # reshuffled each epoch
    seen = [i for batches in ranks for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == 192  # 12 whole steps of 16 pairs

    def spread(groups):  # mean max-min length over the 8 pairs that run side by side on the two ranks
        return sum(max(lengths[i] for i in g) - min(lengths[i] for i in g) for g in groups) / len(groups)

    side_by_side = [a + b for a, b in zip(*ranks, strict=True)]
    shuffled = [a + b for a, b in zip(*(epoch_batches(203, 0, 1, 4, 2, r, 2) for r in (0, 1)), strict=True)]
    assert spread(side_by_side) < spread(shuffled) / 4


SPLITS = [
    (1, 16, 1),
    (2, 4, 2),
    (2, 8, 1),
    (4, 2, 2),
    (1, 4, 4),
]  # ranks, micro-batch, accumulation: 16 per step


def step_pairs(num_pairs, epoch, ranks, micro, accumulation, lengths=None):
    """The pairs of each optimizer step (over all ranks), as sorted lists."""
    per_rank = [
        epoch_batches(num_pairs, epoch, 7, micro, accumulation, r, ranks, lengths) for r in range(ranks)
    ]
    steps = len(per_rank[0]) // accumulation
    return [
        sorted(
            i for batches in per_rank for b in batches[s * accumulation : (s + 1) * accumulation] for i in b
        )
        for s in range(steps)
    ]


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "group_by_length"])
def test_every_split_of_a_step_trains_the_same_pairs_and_has_one_data_order(grouped):
    """What lets a run resume on another number of processes: step s trains the same 16 pairs whatever the
    split over ranks, micro-batches and accumulation, and the saved data order says so."""
    lengths = torch.randint(10, 900, (203,), generator=torch.Generator().manual_seed(5)).tolist()
    lengths = lengths if grouped else None
    reference = step_pairs(203, 1, *SPLITS[0], lengths)
    assert len(reference) == 12 and all(len(pairs) == 16 for pairs in reference)
    for split in SPLITS[1:]:
        assert step_pairs(203, 1, *split, lengths) == reference, split
    orders = {
        data_order(203, TrainConfig(per_device_train_batch_size=m, gradient_accumulation_steps=a), r)
        for r, m, a in SPLITS
    }
    assert len(orders) == 1
    assert (
        data_order(203, TrainConfig(per_device_train_batch_size=8), 1) not in orders
    )  # another global batch


def test_resume_refuses_another_data_order_naming_both():
    saved = data_order(40, TrainConfig(per_device_train_batch_size=4), ranks=1)
    check_same_data_order(saved, saved, "out/checkpoints/step_3")
    check_same_data_order("", saved, "out/checkpoints/step_3")  # not recorded: nothing to compare
    grouped = data_order(40, TrainConfig(per_device_train_batch_size=4, group_by_length=True), ranks=1)
    with pytest.raises(
        ConfigError, match="cannot resume out/checkpoints/step_3.*group_by_length=False.*True"
    ):
        check_same_data_order(saved, grouped, "out/checkpoints/step_3")


def test_a_state_saved_before_the_position_was_global_converts():
    old = {
        "global_step": 6,
        "epoch": 0,
        "batches_done_in_epoch": 12,  # per rank, 2 micro-batches per step
        "pairs_seen": 48,
        "data_order": "pairs=40 seed=1 micro_batch=2 accumulation=2 ranks=2 group_by_length=False",
    }
    state = TrainState.from_saved(old)
    assert state.steps_done_in_epoch == 6
    assert state.data_order == "pairs=40 seed=1 pairs_per_step=8 group_by_length=False"
    config = TrainConfig(per_device_train_batch_size=8, seed=1)
    assert state.data_order == data_order(40, config, ranks=1)  # resumable on 1 process
    grouped = TrainState.from_saved({**old, "data_order": old["data_order"].replace("False", "True")})
    assert "ranks=2" in grouped.data_order  # grouping was per micro-step then: left different, so refused


def test_total_steps_respects_epochs_and_max_steps():
    assert total_steps(100, TrainConfig(per_device_train_batch_size=5, num_train_epochs=2), ranks=2) == 20
    assert total_steps(100, TrainConfig(per_device_train_batch_size=5, max_steps=7), ranks=2) == 7


def test_readme_documents_every_flag():
    import dataclasses

    with open(os.path.join(os.path.dirname(CONFIG_DIR), "README.md"), encoding="utf-8") as file:
        readme = file.read()
    flags = [f"--{config_field.name}" for config_field in dataclasses.fields(TrainConfig)]
    assert [flag for flag in flags if f"`{flag}`" not in readme] == []
