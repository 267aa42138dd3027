"""What makes packing exact: the static refusals read from a config, segment attention refusing what it cannot
apply, and the start-up probe measuring the rest on the model itself (fp32 and bf16)."""

from __future__ import annotations

import doctest

import pytest
import torch
from test_packing import make_pairs
from tiny_models import generic_config, tiny_config, wide_head_reward_model
from transformers import (
    Gemma3TextConfig,
    GPTNeoConfig,
    Llama4TextConfig,
    LlamaConfig,
    MistralConfig,
    MptConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3MoeConfig,
    SmolLM3Config,
)

from model_utils import RewardModel, kernel_attention, packed_attention, segment_attention
from model_utils.packed_attention import (
    SEGMENT_ATTENTION,
    attention_window,
    length_switched_rope,
    rope_batch_dependence,
    supports_packing,
    supports_segment_attention,
)
from model_utils.segment_attention import plan_segments, segment_attention_forward
from training import probe
from training.arguments import TrainConfig
from training.data.collate import PaddedCollator
from training.errors import ConfigError
from training.layout import MASK, PADDED, SEGMENTS, BatchLayout, batch_rewards, layout_candidates
from training.probe import choose_layout, probe_layout, probe_pairs, probe_tolerance

PAD = 0


def build(architecture: str, dtype: torch.dtype = torch.float32, **overrides) -> RewardModel:
    return wide_head_reward_model(tiny_config(architecture, **overrides), dtype)


@pytest.mark.parametrize(
    ("config", "window"),
    [
        (MistralConfig(), ("sliding_window", 4096)),  # every layer, no layer_types
        (MistralConfig(sliding_window=None), None),
        (Qwen2Config(sliding_window=8), None),  # use_sliding_window off: the config drops the window
        (Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=0), ("sliding_window", 8)),
        (Qwen3MoeConfig(use_sliding_window=True, sliding_window=8), ("sliding_window", 8)),
        (SmolLM3Config(sliding_window=8), None),
        (SmolLM3Config(sliding_window=8, layer_types=["sliding_attention"] * 36), ("sliding_window", 8)),
        (Gemma3TextConfig(sliding_window=8), ("sliding_window", 8)),
        # Counted though no layer slides: the rule errs towards refusing, never towards a wrong reward.
        (Gemma3TextConfig(sliding_window=8, layer_types=["full_attention"] * 26), ("sliding_window", 8)),
        (Llama4TextConfig(attention_chunk_size=64), ("attention_chunk_size", 64)),
        (GPTNeoConfig(window_size=32), ("window_size", 32)),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, tuple | type(None)) else str(value),
)
def test_attention_window_reads_every_way_a_config_says_it(config, window):
    assert attention_window(config) == window


def test_a_window_as_wide_as_the_longest_sequence_is_exact_and_one_token_less_is_not():
    """The static rule is tight: a token sees `sliding_window` tokens, itself included, so packed rows (which apply
    no window) equal the plain batch exactly when every sequence fits the window."""
    shapes = [(10, 6, 4), (3, 2, 5)]  # the longest sequence: 16 tokens
    layout = BatchLayout(packing=True, share_prompt=True, attention=MASK, max_tokens_per_row=40)
    differences = {}
    for window in (16, 15):
        model = build("mistral", sliding_window=window).eval()
        pairs = make_pairs(shapes)
        with torch.no_grad():
            expected = batch_rewards(model, PaddedCollator(PAD)(pairs), BatchLayout())
            packed = batch_rewards(model, layout.collator(PAD)(pairs), layout)
        differences[window] = float((packed - expected).abs().max())
        assert supports_packing(model.config, longest_sequence=16)[0] is (window == 16)
    assert differences[16] < 1e-5 and differences[15] > 1e-2, differences


def legacy_rope_scaling(**rope_scaling) -> PretrainedConfig:
    config = PretrainedConfig(max_position_embeddings=64)
    config.rope_scaling = rope_scaling  # transformers 4.x names it so; 5.x reads it into rope_parameters
    return config


# A 2-layer Phi-3 whose rope switches to 4x long factors past 16 positions.
LONGROPE = {
    "original_max_position_embeddings": 16,
    "rope_parameters": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 4,
        "long_factor": [4.0] * 4,
        "original_max_position_embeddings": 16,
    },
}


@pytest.mark.parametrize(
    ("config", "switch"),
    [
        (LlamaConfig(), None),
        (LlamaConfig(rope_parameters={"rope_type": "yarn", "factor": 4.0}), None),  # fixed frequencies
        (
            LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=512),
            ("dynamic", "max_position_embeddings", 512),
        ),
        (Phi3Config(), None),  # Phi-3-mini-4k: no rope scaling
        (tiny_config("phi3", **LONGROPE), ("longrope", "original_max_position_embeddings", 16)),
        (
            Gemma3TextConfig(
                rope_parameters={
                    "full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                }
            ),
            ("dynamic", "max_position_embeddings", 131072),
        ),
        (legacy_rope_scaling(type="dynamic", factor=2.0), ("dynamic", "max_position_embeddings", 64)),
        (  # a layer type without rope: None beside the others
            legacy_rope_scaling(
                full_attention={"rope_type": "dynamic", "factor": 2.0}, linear_attention=None
            ),
            ("dynamic", "max_position_embeddings", 64),
        ),
        (legacy_rope_scaling(rope_type="linear", factor=2.0), None),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, tuple | type(None)) else str(value),
)
def test_length_switched_rope_reads_every_way_a_config_says_it(config, switch):
    assert length_switched_rope(config) == switch


def test_a_longrope_reward_depends_on_its_batch_past_the_switch_in_every_layout_and_the_run_says_so(caplog):
    """transformers picks a longrope backbone's frequencies from the longest position of the forward pass: a short
    pair batched with one longer than `original_max_position_embeddings` gets the long factors. Padded or packed
    alike, so the probe (which compares the two) cannot see it; the start-up log names it instead."""
    model = build("phi3", **LONGROPE).eval()
    short, long = make_pairs([(3, 4, 5)]), make_pairs([(6, 10, 8)], seed=1)  # 9 and 16 tokens at most
    longer = make_pairs([(6, 11, 8)], seed=1)  # 17 tokens: one past the switch
    segments = BatchLayout(packing=True, share_prompt=True, attention=SEGMENTS)
    segment_attention.register_segment_attention()

    def short_rewards(pairs: list[dict], layout: BatchLayout) -> torch.Tensor:
        model.backbone.set_attn_implementation(
            packed_attention.SEGMENT_ATTENTION if layout.attention == SEGMENTS else "sdpa"
        )
        with torch.no_grad():
            rewards = batch_rewards(model, layout.collator(PAD)(pairs), layout)
        return rewards.view(2, -1)[:, 0]  # chosen and rejected of the first pair

    alone = short_rewards(short, BatchLayout())
    for layout in (BatchLayout(), segments):
        assert (short_rewards(short + long, layout) - alone).abs().max() < 1e-5
        assert (short_rewards(short + longer, layout) - alone).abs().max() > 1e-3
    model.backbone.set_attn_implementation("sdpa")

    with caplog.at_level("WARNING", logger="training.probe"):
        choose_layout(TrainConfig(max_seq_len=16), model, PAD)
        assert not caplog.records
        choose_layout(TrainConfig(max_seq_len=32), model, PAD)
    [record] = caplog.records
    assert record.getMessage() == rope_batch_dependence(model.config, 32)
    assert record.getMessage().startswith(
        "phi3: rope_type 'longrope' changes the rotary frequencies of every sequence in a forward pass once one of "
        "them is longer than original_max_position_embeddings=16 tokens, and --max_seq_len allows 32"
    )


def test_static_refusals_name_the_reason():
    cases = {
        "bloom: ALiBi": tiny_config("bloom"),
        "falcon: ALiBi": tiny_config("falcon_alibi"),
        "mpt: ALiBi": MptConfig(),
        "gemma3_text: bidirectional attention": Gemma3TextConfig(use_bidirectional_attention=True),
        "mistral: sliding_window=12 is shorter than the longest sequence (32 tokens)": tiny_config(
            "mistral_short_window"
        ),
    }
    for reason, config in cases.items():
        supported, message = supports_packing(config, longest_sequence=32)
        assert not supported and message.startswith(reason), message
    paged = tiny_config("llama")
    paged._attn_implementation = "paged_attention"
    supported, message = supports_packing(paged, 32)
    assert not supported and "paged_attention" in message and "'sdpa'" in message
    assert supports_packing(tiny_config("mistral_short_window"), longest_sequence=12) == (True, "")

    gemma2 = build("gemma2").config
    assert supports_segment_attention(gemma2) == (
        False,
        "segment attention replaces sdpa, the backbone runs 'eager'",
    )
    softcapped = build("gemma3_text", attn_logit_softcapping=30.0).config
    assert supports_segment_attention(softcapped) == (
        False,
        "attn_logit_softcapping=30.0, which SDPA cannot apply",
    )

    with pytest.raises(
        ConfigError, match=r"--share_prompt on: bloom: ALiBi .*--packing off --share_prompt off"
    ):
        layout_candidates(TrainConfig(share_prompt="on"), tiny_config("bloom"))
    with pytest.raises(ConfigError, match="--packing on: --loss_type dschat needs padded pairs"):
        layout_candidates(TrainConfig(packing="on", loss_type="dschat"), tiny_config("llama"))
    assert layout_candidates(TrainConfig(packing="off", share_prompt="off"), tiny_config("llama")) == (
        [],
        "--packing off, --share_prompt off",
    )


def attention_inputs(tokens: int) -> tuple[torch.nn.Module, torch.Tensor]:
    module = torch.nn.Module()
    module.is_causal = True
    return module, torch.randn(1, 2, tokens, 4)


def test_segment_attention_refuses_what_it_cannot_apply():
    plan = plan_segments([(0, 5, 0, 0), (5, 3, 2, 4)], torch.device("cpu"), block_tokens=0)
    assert plan.longest == 7  # the prompt + the longer branch
    module, states = attention_inputs(sum(plan.sizes))

    def attend(**keywords):
        return segment_attention_forward(
            module, states, states, states, None, rewardspeed_segments=plan, **keywords
        )

    attend(sliding_window=7, position_ids=None, use_cache=False, softcap=None)  # fits: nothing to apply
    for keywords, message in (
        ({"sliding_window": 6}, "sliding_window=6 is narrower than a sequence of 7 tokens"),
        ({"softcap": 50.0}, "cannot apply softcap"),
        ({"position_bias": torch.zeros(1)}, "cannot apply position_bias"),
        ({"s_aux": torch.zeros(2)}, "cannot apply s_aux"),
        ({"is_causal": False}, "segment attention is causal"),
    ):
        with pytest.raises(ValueError, match=message):
            attend(**keywords)
    # Without a plan it is sdpa, which applies what it can and refuses softcap itself.
    output, _ = segment_attention_forward(module, states, states, states, None, sliding_window=2)
    assert output.shape == (1, sum(plan.sizes), 2, 4)


def test_probe_pairs_cover_the_edge_shapes_and_fit_the_run():
    for max_seq_len in (4, 32, 64, 512):
        pairs = probe_pairs(max_seq_len, vocab_size=50, pad_token_id=7)
        shapes = [
            tuple(len(pair[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids")) for pair in pairs
        ]
        assert all(p + max(c, r) <= max_seq_len for p, c, r in shapes)
        assert any(p == 0 for p, _, _ in shapes) and any(c == r == 1 for _, c, r in shapes)
        assert all(7 not in pair["prompt_ids"] + pair["chosen_ids"] + pair["rejected_ids"] for pair in pairs)
    longest = max(p + c + r for p, c, r in shapes)
    assert longest > segment_attention.SEGMENT_BLOCK_TOKENS  # planned alone: the causal + branch steps too
    assert probe_pairs(64, 50, 7) == probe_pairs(64, 50, 7)


def run_probe(model: RewardModel, **flags) -> BatchLayout:
    return choose_layout(TrainConfig(max_seq_len=32, **flags), model, PAD)


def test_the_probe_falls_back_from_segments_to_mask_rows_where_layers_drop_the_plan():
    """StableLM's decoder layers do not hand attention their keywords: a segment row would attend across its
    sequences. The probe sees it in the rewards, switches attention back, and proves the 4D-mask rows exact."""
    model = build("stablelm").train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    layout = run_probe(model)
    assert (layout.attention, layout.packing, layout.share_prompt) == (MASK, True, True)
    segments_difference = measured(layout.reason, SEGMENTS)[0]
    assert segments_difference > 0.05 and "mask max diff" in layout.reason
    assert model.config._attn_implementation == "sdpa"
    assert model.training and all(parameter.grad is None for parameter in model.parameters())
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())

    llama = build("llama")
    assert run_probe(llama).attention == SEGMENTS and llama.config._attn_implementation == SEGMENT_ATTENTION


def test_the_probe_never_uses_segment_attention_on_a_model_that_does_not_switch():
    layout = run_probe(build("falcon"))
    assert layout.attention == MASK and "did not switch to 'rewardspeed_segments'" in layout.reason


def test_a_layout_the_probe_cannot_prove_falls_back_under_auto_and_stops_under_on():
    # A window shorter than the run's sequences, past the static check: the probe's long pair shows it.
    model = build("mistral_short_window").eval()
    mask = BatchLayout(packing=True, share_prompt=True, attention=MASK, max_tokens_per_row=64)
    layout = probe_layout(model, [mask], TrainConfig(max_seq_len=32), PAD)
    assert layout.attention == PADDED and "no fast layout gives the padded rewards" in layout.reason
    assert measured(layout.reason, MASK)[0] > 0.05
    with pytest.raises(ConfigError, match=r"--packing on: no fast layout .* mask max diff .* tolerance"):
        probe_layout(model, [mask], TrainConfig(max_seq_len=32, packing="on"), PAD)


def test_bf16_tolerance_keeps_exact_layouts_and_rejects_wrong_ones():
    exact = run_probe(build("llama", dtype=torch.bfloat16))
    assert exact.attention == SEGMENTS and "(bfloat16)" in exact.reason
    # The tiny StableLM's cross-sequence error is small for a wrong layout (17% of the scale; 31-74% on
    # SmolLM2-135M), and still above the bf16 tolerance.
    wrong = run_probe(build("stablelm", dtype=torch.bfloat16))
    assert wrong.attention == MASK and "segments max diff" in wrong.reason and "(bfloat16)" in wrong.reason
    assert probe_tolerance(torch.tensor([0.5, -4.0]), torch.bfloat16) == pytest.approx(0.4)
    assert probe_tolerance(torch.tensor([0.5, -0.2]), torch.float32) == pytest.approx(1e-5)


def measured(reason: str, attention: str) -> tuple[float, float]:
    """(max diff, leak) the probe's reason gives for `attention`."""
    text = reason.split(f"{attention} max diff ")[1]
    return float(text.split(",")[0]), float(text.split(", leak ")[1].split(",")[0].split(";")[0])


def tolerances(reason: str) -> tuple[float, float]:
    """(tolerance, leak tolerance) the probe's reason gives."""
    text = reason.split("; tolerance ")[1]
    return float(text.split(",")[0]), float(text.split(", leak ")[1].split(" ")[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["qwen3_next", "jamba"])
def test_a_layer_carrying_state_along_the_row_is_caught_by_the_leak_where_bf16_rounding_hides_it(
    family, dtype
):
    """Qwen3-Next's linear-attention and Jamba's Mamba layers carry state along a packed row. In bf16 their packed
    rewards sit within the 10% tolerance of the padded ones; scoring each response again with the other examples'
    tokens changed (Qwen3-Next) or its sibling branches' (Jamba: the rejected branch read the chosen one) shows the
    leak, so they train padded. An exact layout's rewards do not move at all (leak exactly 0)."""
    layout = run_probe(wide_head_reward_model(generic_config(family), dtype).eval())
    assert layout.attention == PADDED and "no fast layout gives the padded rewards" in layout.reason, (
        layout.reason
    )
    tolerance, leak_tolerance = tolerances(layout.reason)
    for attention in (SEGMENTS, MASK):
        difference, leak = measured(layout.reason, attention)
        assert leak > 10 * leak_tolerance, (attention, leak, leak_tolerance)
        if dtype == torch.bfloat16:  # the padded comparison alone would keep it
            assert difference <= tolerance, (attention, difference)

    exact = run_probe(build("qwen3", dtype=dtype))
    assert exact.attention == SEGMENTS and measured(exact.reason, SEGMENTS)[1] == 0.0, exact.reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_encoder_attending_both_ways_trains_padded_because_its_values_read_later_tokens(dtype):
    """Megatron-BERT is in transformers' causal-LM table, but the backbone a reward model wraps attends both ways;
    packed rows are causal per sequence. In bf16 its 4D-mask rows sat within the 10% tolerance on the probe's
    pairs (and 11.5% off on others): the probe now first checks that no value reads a later token."""
    layout = run_probe(wide_head_reward_model(generic_config("megatron-bert"), dtype).eval())
    assert layout.attention == PADDED and "attention is not causal (a value moves" in layout.reason, (
        layout.reason
    )
    assert probe.later_token_effect(build("llama", dtype=dtype).eval(), PAD, max_seq_len=32) == (0.0, "")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen3_moe", "deepseek_v3"])
def test_on_a_gpu_exact_layouts_have_no_leak_in_bf16(family):
    """The leak bound assumes a response's reward does not move when other sequences change; on a GPU a kernel
    might pick another algorithm for another batch content (mixture-of-experts routes other token counts to each
    expert). Exact backbones must keep their fast layout in bf16 there too."""
    model = build(family, dtype=torch.bfloat16).cuda().eval()
    layout = run_probe(model)
    assert layout.attention == SEGMENTS, layout.reason
    assert measured(layout.reason, SEGMENTS)[1] <= tolerances(layout.reason)[1], layout.reason


def test_docstring_examples():
    for module in (packed_attention, segment_attention, kernel_attention, probe):
        assert doctest.testmod(module).failed == 0, module.__name__
