"""Packed and prompt-shared batches give the plain padded batch's rewards and gradients, with fewer tokens."""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
from launch_utils import SCRIPTS, read_rank_results, torchrun
from tiny_models import ARCHITECTURES, save_tiny_backbone, tiny_config, tokenizer_dir
from transformers import AttentionInterface, AutoModel, GPT2Config

from model_utils import RewardModel, packed_attention, segment_attention
from model_utils.packed_attention import supports_packing
from model_utils.segment_attention import use_segment_attention
from training.arguments import TrainConfig
from training.data.collate import PackedCollator, PaddedCollator, pack_lengths
from training.errors import ConfigError
from training.layout import MASK, SEGMENTS, BatchLayout, batch_rewards, layout_candidates
from training.losses import pairwise_loss
from training.sampling import length_grouped_order

PAD = 0
TOLERANCE = 1e-5
# (prompt, chosen, rejected) lengths: different lengths, an empty prompt, one-token responses.
SHAPES = [(6, 3, 2), (2, 5, 4), (0, 2, 3), (9, 1, 1), (4, 1, 6), (1, 4, 2)]
# mode: (max_tokens_per_row, share_prompt, segment_attention, segment block tokens); 14 tokens forces several
# packed rows; segment blocks of 0 tokens: one SDPA per sequence; 12: some sequences alone, some in blocks.
MODES = {
    "packing": (14, False, False, None),
    "sharing": (None, True, False, None),
    "packing+sharing": (14, True, False, None),
    "segments": (None, False, True, 0),
    "segments+sharing": (None, True, True, 0),
    "segment-blocks": (None, False, True, 12),
    "segment-blocks+sharing": (None, True, True, 12),
}


def make_pairs(shapes=SHAPES, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)

    def ids(length: int) -> list[int]:
        return torch.randint(3, 44, (length,), generator=generator).tolist()

    pairs = []
    for index, (prompt, chosen, rejected) in enumerate(shapes):
        pair = {
            "prompt_ids": ids(prompt),
            "chosen_ids": ids(chosen - 1) + [1],
            "rejected_ids": ids(rejected - 1) + [1],
        }
        if pair["chosen_ids"] == pair["rejected_ids"]:
            pair["rejected_ids"] = [2, *pair["rejected_ids"]]
        pair["margin"] = 0.5 * index if index % 2 else None
        pairs.append(pair)
    return pairs


def build_model(architecture: str, attn_implementation: str | None = None) -> RewardModel:
    torch.manual_seed(0)
    config = tiny_config(architecture)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = RewardModel(AutoModel.from_config(config, dtype=torch.float32, **kwargs))
    torch.nn.init.normal_(model.v_head.weight, std=0.5)  # rewards far from 0, so differences show
    return model.eval()


def rewards_and_gradients(
    model: RewardModel, compute
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    chosen_rewards, rejected_rewards, margin = compute()
    pairwise_loss(chosen_rewards, rejected_rewards, margin).backward()
    gradients = [parameter.grad.clone() for parameter in model.parameters()]
    return chosen_rewards.detach(), rejected_rewards.detach(), gradients


def plain(model: RewardModel, pairs: list[dict]):
    batch = PaddedCollator(pad_token_id=PAD)(pairs)
    chosen_rewards, rejected_rewards = model(batch["input_ids"], batch["attention_mask"]).chunk(2)
    return chosen_rewards, rejected_rewards, batch.get("margin")


def segment_blocks(block_tokens: int | None):
    """Segment attention with blocks of `block_tokens` (None: the default) inside the `with`."""
    if block_tokens is None:
        return contextlib.nullcontext()
    return mock.patch.object(segment_attention, "SEGMENT_BLOCK_TOKENS", block_tokens)


def tokens_computed(batch: dict[str, torch.Tensor]) -> int:
    """Token positions the backbone computes for a batch (padding included): `R * L` or `2B * T`."""
    return batch["input_ids"].numel()


def packed_rewards(model: RewardModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's forward for a packed batch, with the layout its collator made (switching to segment
    attention first, as the start-up probe does)."""
    segments = "segments" in batch
    if segments:
        use_segment_attention(model)
    layout = BatchLayout(packing=True, share_prompt=True, attention=SEGMENTS if segments else MASK)
    return batch_rewards(model, batch, layout).chunk(2)


def packed(
    model: RewardModel,
    pairs: list[dict],
    max_tokens_per_row: int | None,
    share_prompt: bool,
    segment_attention: bool = False,
    block_tokens: int | None = None,
):
    batch = PackedCollator(PAD, max_tokens_per_row, share_prompt, segment_attention=segment_attention)(pairs)
    with segment_blocks(block_tokens):
        return (*packed_rewards(model, batch), batch.get("margin"))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_packed_rewards_and_gradients_equal_plain(architecture):
    model = build_model(architecture)
    pairs = make_pairs()
    supported, reason = supports_packing(model.config, longest_sequence=512)
    if not supported:
        assert architecture == "bloom" and "ALiBi" in reason
        with pytest.raises(ConfigError, match="bloom"):
            layout_candidates(TrainConfig(packing="on"), model.config)
        return
    expected_chosen, expected_rejected, expected_gradients = rewards_and_gradients(
        model, lambda: plain(model, pairs)
    )
    for mode, arguments in MODES.items():
        chosen, rejected, gradients = rewards_and_gradients(
            model, lambda a=arguments: packed(model, pairs, *a)
        )
        torch.testing.assert_close(
            chosen, expected_chosen, atol=TOLERANCE, rtol=0, msg=f"{architecture} {mode}"
        )
        torch.testing.assert_close(
            rejected, expected_rejected, atol=TOLERANCE, rtol=0, msg=f"{architecture} {mode}"
        )
        for gradient, expected in zip(gradients, expected_gradients, strict=True):
            torch.testing.assert_close(
                gradient, expected, atol=TOLERANCE, rtol=0, msg=f"{architecture} {mode}"
            )


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_eager_attention_takes_the_additive_mask(architecture):
    model = build_model(architecture, attn_implementation="eager")
    pairs = make_pairs(seed=1)
    with torch.no_grad():
        expected_chosen, expected_rejected, _ = plain(model, pairs)
        chosen, rejected, _ = packed(model, pairs, 14, True)
    torch.testing.assert_close(chosen, expected_chosen, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(rejected, expected_rejected, atol=TOLERANCE, rtol=0)


def test_segment_attention_is_one_unpadded_row_and_attends_per_sequence(monkeypatch):
    pairs = make_pairs()
    lengths = lengths_of(pairs)
    batch = PackedCollator(PAD, 14, share_prompt=True, segment_attention=True)(pairs)
    assert batch["input_ids"].shape == (1, sum(p + c + r for p, c, r in lengths))
    assert "attention_mask" not in batch and (batch["input_ids"] != PAD).all()
    starts = [0, *torch.tensor([p + c + r for p, c, r in lengths]).cumsum(0)[:-1].tolist()]
    assert batch["segments"].tolist() == [[s, p, c, r] for s, (p, c, r) in zip(starts, lengths, strict=True)]

    # The sdpa backbone is switched to the segment attention, which runs once per layer with the segments
    # (a dropped keyword would silently attend across the whole row); plain batches still give sdpa's rewards.
    model = build_model("llama", attn_implementation="sdpa")
    with torch.no_grad():
        expected_chosen, expected_rejected, _ = plain(model, pairs)
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("rewardspeed_segments"))
        return segment_attention.segment_attention_forward(*args, **kwargs)

    use_segment_attention(model)
    monkeypatch.setitem(AttentionInterface._global_mapping, packed_attention.SEGMENT_ATTENTION, counting)
    with torch.no_grad():
        chosen, rejected = packed_rewards(model, batch)
        assert model.config._attn_implementation == packed_attention.SEGMENT_ATTENTION
        assert len(calls) == model.config.num_hidden_layers and all(calls)
        calls.clear()
        plain_again = plain(model, pairs)
    assert len(calls) == model.config.num_hidden_layers and not any(calls)
    for got, expected in ((chosen, expected_chosen), (rejected, expected_rejected)):
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(plain_again[0], expected_chosen, atol=0, rtol=0)

    eager = build_model("llama", attn_implementation="eager")
    with pytest.raises(ValueError, match="sdpa"):
        packed_rewards(eager, batch)


def test_segment_plan_blocks_short_sequences_and_keeps_long_ones_alone():
    # (start, prefix, first, second): a shared pair of 9 tokens, two sequences of 3 and 4, a long shared pair.
    segments = [(0, 4, 2, 3), (9, 3, 0, 0), (12, 4, 0, 0), (16, 10, 5, 6)]
    plan = segment_attention.plan_segments(segments, torch.device("cpu"), block_tokens=16)
    assert plan.sizes == [16, 15, 6]  # block of the first three; the long pair as prompt+chosen, rejected
    assert [step[0] for step in plan.steps] == ["block", "causal", "branch"]
    block = plan.steps[0][1]
    assert block.shape == (16, 16) and not block[9:, :9].any() and not block[:9, 9:].any()
    assert not block[6:9, 4:6].any() and block[6:9, :4].all()  # rejected: the prompt yes, the chosen no
    _, head, prefix, branch = plan.steps[2]
    assert (head, prefix) == (1, 10) and torch.equal(branch, torch.ones(6, 16, dtype=torch.bool).tril(10))
    alone = segment_attention.plan_segments(segments, torch.device("cpu"), block_tokens=0)
    assert [step[0] for step in alone.steps] == ["causal", "branch", "causal", "causal", "causal", "branch"]


def lengths_of(pairs: list[dict]) -> list[tuple[int, int, int]]:
    return [(len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])) for pair in pairs]


def test_rows_respect_the_budget_and_hold_every_token_once():
    pairs = make_pairs()
    batch = PackedCollator(PAD, max_tokens_per_row=14, share_prompt=False)(pairs)
    real = batch["input_ids"] != PAD  # the pairs' token ids are never PAD
    assert batch["input_ids"].shape[0] >= 3
    assert int(real.sum()) == sum(2 * p + c + r for p, c, r in lengths_of(pairs))
    assert (real.sum(-1) <= 14).all()
    # Padding attends only to itself; every real token to at least itself.
    mask = batch["attention_mask"][:, 0]
    assert (mask.diagonal(dim1=-2, dim2=-1)).all() and (mask.sum(-1)[~real] == 1).all()
    # The token at each pair's chosen end is the chosen EOS, at its position P + C - 1.
    flat_ids, flat_positions = batch["input_ids"].flatten(), batch["position_ids"].flatten()
    chosen_index, rejected_index = batch["reward_index"].chunk(2)  # all chosen ends, then all rejected ones
    assert (flat_ids[chosen_index] == 1).all() and (flat_ids[rejected_index] == 1).all()
    assert flat_positions[chosen_index].tolist() == [p + c - 1 for p, c, _ in lengths_of(pairs)]
    assert flat_positions[rejected_index].tolist() == [p + r - 1 for p, _, r in lengths_of(pairs)]
    assert batch["margin"].tolist() == [0.0, 0.5, 0.0, 1.5, 0.0, 2.5]


def test_sharing_computes_each_prompt_once():
    pairs = make_pairs()
    lengths = lengths_of(pairs)
    plain_batch = PaddedCollator(PAD)(pairs)
    shared_batch = PackedCollator(PAD, None, share_prompt=True)(pairs)
    packed_batch = PackedCollator(PAD, 14, share_prompt=False)(pairs)
    both_batch = PackedCollator(PAD, 29, share_prompt=True)(pairs)
    real_plain = int(plain_batch["attention_mask"].sum())
    real_shared = int((shared_batch["input_ids"] != PAD).sum())
    assert real_plain - real_shared == sum(p for p, _, _ in lengths)
    assert real_shared == int((both_batch["input_ids"] != PAD).sum())
    longest = max(p + max(c, r) for p, c, r in lengths)
    assert tokens_computed(plain_batch) == 2 * len(pairs) * longest
    assert tokens_computed(both_batch) < tokens_computed(shared_batch) < tokens_computed(plain_batch)
    assert tokens_computed(both_batch) < tokens_computed(packed_batch) < tokens_computed(plain_batch)
    assert tokens_computed(both_batch) == 58 == real_shared + 1  # rows of 12+11+5 and 11+11+7 tokens


def test_supports_packing_refuses_with_reasons():
    assert supports_packing(tiny_config("bloom"), 512)[0] is False
    assert "ALiBi" in supports_packing(tiny_config("bloom"), 512)[1]
    config = tiny_config("llama")
    config._attn_implementation = "paged_attention"
    supported, reason = supports_packing(config, 512)
    assert not supported and "paged_attention" in reason and "sdpa" in reason
    assert supports_packing(GPT2Config(n_layer=1), 512)[0]


def test_pack_lengths_and_length_grouped_order_are_deterministic():
    assert pack_lengths([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert pack_lengths([3, 20, 2], 8) == [[1], [0, 2]]  # too long for the budget: a row of its own
    assert pack_lengths([3, 2], None) == [[0], [1]]
    lengths = torch.randint(1, 500, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    order = length_grouped_order(lengths, group_size=8, seed=3)
    assert order == length_grouped_order(lengths, group_size=8, seed=3)
    assert order != length_grouped_order(lengths, group_size=8, seed=4)
    assert sorted(order) == list(range(400))
    spread = [
        max(lengths[i] for i in order[g : g + 8]) - min(lengths[i] for i in order[g : g + 8])
        for g in range(0, 400, 8)
    ]
    random_spread = [max(lengths[g : g + 8]) - min(lengths[g : g + 8]) for g in range(0, 400, 8)]
    assert sum(spread) < sum(random_spread) / 4


def test_packed_rewards_go_through_forward():
    """One `forward` call per packed batch: DeepSpeed's ZeRO-3 bookkeeping runs only around engine(...)."""
    model = build_model("qwen2")
    pairs = make_pairs(seed=2)
    calls = []
    handle = model.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    with torch.no_grad():
        expected_chosen, expected_rejected, _ = plain(model, pairs)
        calls.clear()
        chosen, rejected, _ = packed(model, pairs, 14, True)
    handle.remove()
    assert calls == [(2 * len(pairs),)]
    torch.testing.assert_close(chosen, expected_chosen, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(rejected, expected_rejected, atol=TOLERANCE, rtol=0)


@pytest.mark.distributed
def test_zero3_packed_shared_training_equals_plain(tmp_path):
    model_dir = save_tiny_backbone(str(tmp_path / "llama"), "llama")
    arguments = [
        "--model_dir",
        model_dir,
        "--tokenizer_dir",
        tokenizer_dir(model_dir),
        "--out",
        str(tmp_path),
    ]
    torchrun([os.path.join(SCRIPTS, "zero_packing.py"), *arguments, "--stage", "3", "--accumulation", "2"])
    for result in read_rank_results(str(tmp_path)):
        # Losses of 6 micro-steps (3 optimizer steps): equal, so packed gradients trained the same weights.
        for run in ("packed_forward", "segments", "segments_alone", "probed"):
            torch.testing.assert_close(
                torch.tensor(result[run]), torch.tensor(result["plain"]), rtol=1e-4, atol=1e-7, msg=run
            )
        assert "attention mask" in result["probed_layout"]
        assert "segments ValueError: segment attention cannot apply position_ids" in result["probed_layout"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_attention_on_cuda_equals_the_padded_batch(dtype):
    """The CUDA SDPA kernels (flash / memory-efficient) through segment attention, per sequence and in blocks."""
    model = build_model("llama", attn_implementation="sdpa").to("cuda", dtype)
    pairs = make_pairs(seed=3)
    tolerance = TOLERANCE if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        plain_batch = {key: value.cuda() for key, value in PaddedCollator(pad_token_id=PAD)(pairs).items()}
        expected = model(plain_batch["input_ids"], plain_batch["attention_mask"]).float()
        for block_tokens in (0, 12):
            batch = PackedCollator(PAD, None, share_prompt=True, segment_attention=True)(pairs)
            batch = {key: value.cuda() for key, value in batch.items()}
            with segment_blocks(block_tokens):
                chosen, rejected = packed_rewards(model, batch)
            got = torch.cat([chosen, rejected]).float()
            torch.testing.assert_close(got, expected, atol=tolerance, rtol=0, msg=f"blocks of {block_tokens}")
