"""The GPU attention kernels' layouts: FlexAttention (one BlockMask per micro-batch) and flash attention's varlen
path. The CPU checks what runs here (the block mask's forward, the layout choice, the refusals); the `gpu` tests
run every layout against the padded batch on CUDA."""

from __future__ import annotations

import os
import sys
from unittest import mock

import pytest
import torch
from launch_utils import read_metrics, run_command, torchrun, train_rm_args
from test_listwise import alone, make_examples
from tiny_models import make_tokenizer, save_tiny_backbone, tiny_config, write_tiny_ranked
from torch.nn.attention.flex_attention import flex_attention
from transformers import AutoModel

from model_utils import RewardModel
from model_utils.kernel_attention import segment_block_mask, segment_ids, varlen_kwargs
from training.arguments import TrainConfig
from training.ds_config import resolve_attention
from training.errors import ConfigError
from training.layout import FLEX, SEGMENTS, VARLEN, BatchLayout, batch_rewards, layout_candidates

PAD = 0
TOLERANCE = 1e-5
FLEX_ARCHITECTURES = ("llama", "qwen2", "gpt_neox", "opt")  # transformers has no flex path for gpt2, bloom


def build(
    architecture: str, attention: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> RewardModel:
    torch.manual_seed(0)
    backbone = AutoModel.from_config(tiny_config(architecture), dtype=dtype, attn_implementation=attention)
    model = RewardModel(backbone)
    torch.nn.init.normal_(model.v_head.weight, std=0.5)
    return model.to(device).eval()


def eager_flex():
    """transformers compiles flex_attention on first use (a minute on CPU); the eager kernel computes the same."""
    import transformers.integrations.flex_attention as integration

    def run(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    return mock.patch.object(integration, "compile_friendly_flex_attention", run)


@pytest.mark.parametrize("architecture", FLEX_ARCHITECTURES)
def test_flex_block_mask_scores_each_response_as_if_alone(architecture):
    model = build(architecture, "flex_attention")
    reference = build(architecture, "sdpa")
    reference.load_state_dict(model.state_dict())
    examples = make_examples()
    with torch.no_grad():
        expected = alone(reference, examples)
        for share_prompt in (False, True):
            layout = BatchLayout(packing=True, share_prompt=share_prompt, attention=FLEX)
            with eager_flex():
                rewards = batch_rewards(model, layout.collator(PAD)(examples), layout)
            torch.testing.assert_close(rewards, expected, atol=TOLERANCE, rtol=0, msg=f"share {share_prompt}")


def test_segment_ids_and_block_mask_follow_the_branch_rule():
    segments = [(0, 2, 1, 2), (5, 3, 0, 0)]
    sequence_id, kind = segment_ids(segments, 9, torch.device("cpu"))
    assert sequence_id.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, -1] and kind.tolist() == [
        0,
        0,
        1,
        2,
        2,
        0,
        0,
        0,
        0,
    ]
    dense = segment_block_mask(segments, 9, torch.device("cpu")).to_dense()  # [1, 1, blocks, blocks]
    assert dense.shape[-1] == 1  # one 128-token block here: the kernel masks within it


def test_varlen_arguments_are_the_sequence_starts():
    arguments = varlen_kwargs([(0, 5, 0, 0), (5, 3, 0, 0), (8, 4, 0, 0)], torch.device("cpu"))
    assert arguments["cu_seq_lens_q"].tolist() == [0, 5, 8, 12] and arguments["max_length_k"] == 5
    with pytest.raises(ValueError, match="unshared"):
        varlen_kwargs([(0, 2, 1, 2)], torch.device("cpu"))


def test_layout_follows_the_backbone_attention():
    model = build("llama", "sdpa")

    def first(config: TrainConfig) -> BatchLayout:
        candidates, reason = layout_candidates(config, model.config)
        return candidates[0] if candidates else reason

    assert first(TrainConfig()).attention == SEGMENTS
    model.config._attn_implementation = "flex_attention"
    flex = first(TrainConfig())
    assert (flex.attention, flex.packing, flex.share_prompt) == (FLEX, True, True)
    model.config._attn_implementation = "flash_attention_2"
    varlen = first(TrainConfig())
    assert (varlen.attention, varlen.packing, varlen.share_prompt) == (VARLEN, True, False)
    assert "not a varlen pattern" in varlen.describe()
    assert "not a varlen pattern" in first(TrainConfig(packing="off"))
    with pytest.raises(ConfigError, match="--share_prompt on: flash_attention_2"):
        first(TrainConfig(share_prompt="on"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_kernels_are_refused_on_cpu_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="no backward pass on CPU"):
        resolve_attention("flex_attention")
    with pytest.raises(ConfigError, match="needs CUDA"):
        resolve_attention("flash_attention_2")
    assert resolve_attention("auto") is None and resolve_attention("eager") == "eager"
    model = save_tiny_backbone(str(tmp_path / "llama"), "llama")
    data = write_tiny_ranked(str(tmp_path / "ranked.jsonl"), 20)
    result = run_command(
        [
            sys.executable,
            *train_rm_args(model, data, str(tmp_path / "out"), "--attn_implementation", "flex_attention"),
        ],
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and "flex_attention" in result.stderr


# --- on a GPU ------------------------------------------------------------------------------------------------------

GPU_LAYOUTS = {
    "sdpa": ("sdpa", [BatchLayout(), BatchLayout(True, False, SEGMENTS), BatchLayout(True, True, SEGMENTS)]),
    "flex_attention": ("flex_attention", [BatchLayout(True, False, FLEX), BatchLayout(True, True, FLEX)]),
    "flash_attention_2": ("flash_attention_2", [BatchLayout(True, False, VARLEN)]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("attention", list(GPU_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_layout_on_cuda_equals_the_padded_batch(attention, dtype):
    """Pairs and K-wise groups, packed and shared, through each GPU kernel, against the padded sdpa batch."""
    if attention == "flash_attention_2" and (dtype == torch.float32 or not _has_flash_attention()):
        pytest.skip("flash attention runs in half precision, with the flash_attn package installed")
    examples = make_examples()
    reference = build("llama", "sdpa", "cuda", dtype)
    model = build("llama", GPU_LAYOUTS[attention][0], "cuda", dtype)
    model.load_state_dict(reference.state_dict())
    tolerance = TOLERANCE if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        padded = BatchLayout()
        expected = batch_rewards(reference, _cuda(padded.collator(PAD)(examples)), padded)
        for layout in GPU_LAYOUTS[attention][1]:
            if layout.attention == SEGMENTS:
                from model_utils.segment_attention import use_segment_attention

                use_segment_attention(model)
            got = batch_rewards(model, _cuda(layout.collator(PAD)(examples)), layout)
            torch.testing.assert_close(
                got, expected, atol=tolerance, rtol=0, msg=f"{attention} {layout.describe()}"
            )


@pytest.mark.gpu
def test_zero3_on_one_gpu_trains_kwise_rows(tmp_path):
    model = save_tiny_backbone(str(tmp_path / "llama"), "llama")
    make_tokenizer().save_pretrained(model)
    data = write_tiny_ranked(str(tmp_path / "ranked.jsonl"), 80)
    output = str(tmp_path / "out")
    flags = ["--zero_stage", "3", "--dtype", "bf16", "--max_steps", "4", "--per_device_train_batch_size", "4",
             "--max_seq_len", "32", "--min_score_gap", "1"]  # fmt: skip
    torchrun(train_rm_args(model, data, output, *flags), nproc=1)
    losses = [record["loss"] for record in read_metrics(output)[0]]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert os.path.isfile(os.path.join(output, "model.safetensors"))


def _cuda(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.cuda() for key, value in batch.items()}


def _has_flash_attention() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True
