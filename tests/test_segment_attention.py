"""Segment attention itself (`model_utils/segment_attention.py`): the CPU autograd function against per-part SDPA,
what it keeps for backward, and the dtype each part's backward runs in."""

from __future__ import annotations

import pytest
import torch

from model_utils import segment_attention
from model_utils.segment_attention import cpu_kernel_applies, plan_segments, segment_attention_forward

HEADS, KEY_HEADS, HEAD_DIM = 6, 2, 8
# (start, prefix, branch_1, ...): a prompt with three branches, an unshared sequence (the two share a block of
# 128 tokens), a short prompt whose second branch has more keys than the CPU fp32-backward bound (bf16 in bf16), a
# short shared sequence, and a long prompt whose first part (280 keys) and second branch (230 keys) are fp32.
BOUND = segment_attention.CPU_FP32_BACKWARD_MAX_KEYS
LONG = BOUND + 20
SEGMENTS = [
    (0, 20, 30, 25, 7),
    (82, 0, 40, 0, 0),
    (122, 5, 3, LONG, 0),
    (130 + LONG, 3, 4, 5, 0),
    (142 + LONG, 200, 80, 30, 0),
]
ROW = 452 + LONG


def row_inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = ((1, HEADS, ROW, HEAD_DIM), (1, KEY_HEADS, ROW, HEAD_DIM), (1, KEY_HEADS, ROW, HEAD_DIM))
    return tuple(torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes)


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind `tensor`."""
    names, pending = set(), [tensor.grad_fn]
    while pending:
        node = pending.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            pending.extend(next_node for next_node, _ in node.next_functions)
    return names


def attend(inputs, plan, fused: bool, monkeypatch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Output and input gradients of segment attention, through the CPU function or per-part SDPA."""
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(segment_attention, "cpu_kernel_applies", lambda *args: False)
        output, _ = segment_attention_forward(
            torch.nn.Module().eval(), *inputs, None, rewardspeed_segments=plan
        )
    assert ("CpuSegmentAttentionBackward" in graph_nodes(output)) == fused
    grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(9)).to(output.dtype)
    return output, torch.autograd.grad(output, inputs, grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_tokens", [0, 128])
def test_cpu_function_equals_per_part_sdpa_in_outputs_and_gradients(dtype, block_tokens, monkeypatch):
    """The CPU function's forward runs the kernels per-part SDPA runs, so outputs are equal bit for bit; gradients
    differ in the order a prompt's key/value gradients are summed over its branches and a key head's over its query
    heads, and in bf16 by the rounding of short parts' fp32 backward (`cpu_backward_dtype`)."""
    plan = plan_segments(SEGMENTS, torch.device("cpu"), block_tokens=block_tokens)
    assert ("block" in [step[0] for step in plan.steps]) == bool(block_tokens)
    inputs = row_inputs(dtype)
    fused_output, fused_grads = attend(inputs, plan, True, monkeypatch)
    sdpa_output, sdpa_grads = attend(inputs, plan, False, monkeypatch)
    assert fused_output.dtype == dtype and fused_output.shape == (1, ROW, HEADS, HEAD_DIM)
    torch.testing.assert_close(fused_output, sdpa_output, atol=0, rtol=0)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 5e-2)
    for name, fused, sdpa in zip(("query", "key", "value"), fused_grads, sdpa_grads, strict=True):
        assert fused.dtype == dtype and fused.shape == sdpa.shape, name
        torch.testing.assert_close(fused.float(), sdpa.float(), atol=tolerance, rtol=0, msg=name)


def test_cpu_function_keeps_no_per_branch_copies_for_backward(monkeypatch):
    """What backward keeps is the row's query and grouped key/value plus each part's output and log-sum-exp:
    the same bytes per token however many branches share a prompt. Per-part SDPA keeps each part's inputs in
    the attention dtype, a later branch's with a copy of its prompt's keys/values."""
    plan = plan_segments(SEGMENTS, torch.device("cpu"), block_tokens=0)

    def saved_bytes(fused: bool, dtype: torch.dtype) -> int:
        storages = {}

        def keep(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        inputs = row_inputs(dtype)
        with monkeypatch.context() as patch, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            if not fused:
                patch.setattr(segment_attention, "cpu_kernel_applies", lambda *args: False)
            segment_attention_forward(torch.nn.Module().eval(), *inputs, None, rewardspeed_segments=plan)
        return sum(storages.values())

    for dtype in (torch.float32, torch.bfloat16):
        row = sum(tensor.nbytes for tensor in row_inputs(dtype))
        # Outputs in the inputs' dtype and one fp32 log-sum-exp per query and head.
        outputs = ROW * HEADS * HEAD_DIM * dtype.itemsize + ROW * HEADS * 4
        assert saved_bytes(True, dtype) == row + outputs, dtype
        assert saved_bytes(False, dtype) > row + outputs, dtype


def test_short_bf16_parts_run_their_backward_in_fp32_on_cpu_and_long_ones_in_bf16():
    """CPU bf16: every part's forward is the bf16 kernel (the output per-part SDPA gives); the backward of a part
    with at most CPU_FP32_BACKWARD_MAX_KEYS keys is the fp32 kernel's on the same inputs, output and log-sum-exp,
    a longer part's the bf16 kernel's."""
    bound = segment_attention.CPU_FP32_BACKWARD_MAX_KEYS
    generator = torch.Generator().manual_seed(0)
    short, long = 40, bound + 8
    inputs = tuple(
        torch.randn(1, 2, short + long, 8, generator=generator).to(torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    plan = plan_segments([[0, short, 0], [short, long, 0]], torch.device("cpu"), block_tokens=0)
    output, _ = segment_attention_forward(torch.nn.Module().eval(), *inputs, None, rewardspeed_segments=plan)
    assert output.dtype == torch.bfloat16 and output.shape == (1, short + long, 2, 8)
    grad = torch.randn(output.shape, generator=generator).to(torch.bfloat16)
    grads = torch.autograd.grad(output, inputs, grad)
    for span, dtype in ((slice(0, short), torch.float32), (slice(short, short + long), torch.bfloat16)):
        query, key, value = (tensor.detach()[:, :, span] for tensor in inputs)
        part_output, logsumexp = segment_attention.CPU_FLASH_ATTENTION(query, key, value, 0.0, True)
        torch.testing.assert_close(output[:, span], part_output.transpose(1, 2), atol=0, rtol=0)
        expected = segment_attention.CPU_FLASH_ATTENTION_BACKWARD(
            grad[:, span].transpose(1, 2).to(dtype), query.to(dtype), key.to(dtype), value.to(dtype),
            part_output.to(dtype), logsumexp, 0.0, True,
        )  # fmt: skip
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got[:, :, span], want.to(torch.bfloat16), atol=0, rtol=0)
    assert segment_attention.cpu_backward_dtype(inputs[0], bound) == torch.float32
    assert segment_attention.cpu_backward_dtype(inputs[0], bound + 1) == torch.bfloat16
    assert segment_attention.cpu_backward_dtype(inputs[0].float(), 4) == torch.float32


def test_the_fp32_backward_choice_counts_a_branch_part_s_keys_not_its_queries():
    """A later branch of a shared sequence attends the prompt too: with few queries but more keys than the bound,
    its backward is the bf16 kernel's (its query gradient equals SDPA's over prompt + branch in bf16 with the
    branch mask)."""
    bound = segment_attention.CPU_FP32_BACKWARD_MAX_KEYS
    prefix, first, second = bound - 10, 6, 20  # the second branch: 20 queries over bound + 10 keys
    generator = torch.Generator().manual_seed(1)
    query, key, value = (
        torch.randn(1, 2, prefix + first + second, 8, generator=generator).to(torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    plan = plan_segments([[0, prefix, first, second]], query.device, block_tokens=0)
    output, _ = segment_attention_forward(
        torch.nn.Module().eval(), query, key, value, None, rewardspeed_segments=plan
    )
    branch = slice(prefix + first, prefix + first + second)
    grad = torch.randn(output.shape, generator=generator).to(torch.bfloat16)
    (grad_query,) = torch.autograd.grad(output, (query,), grad)
    branch_query = query.detach()[:, :, branch].requires_grad_()
    keys, values = (
        torch.cat([t.detach()[:, :, :prefix], t.detach()[:, :, branch]], dim=2) for t in (key, value)
    )
    mask = torch.ones(second, prefix + second, dtype=torch.bool).tril(diagonal=prefix)
    expected = torch.nn.functional.scaled_dot_product_attention(branch_query, keys, values, attn_mask=mask)
    torch.testing.assert_close(output[:, branch], expected.transpose(1, 2), atol=0, rtol=0)
    (expected_grad,) = torch.autograd.grad(expected, (branch_query,), grad[:, branch].transpose(1, 2))
    torch.testing.assert_close(grad_query[:, :, branch], expected_grad, atol=0, rtol=0)


def test_cpu_function_runs_only_where_sdpa_would_run_the_same_kernel():
    plan = plan_segments(SEGMENTS, torch.device("cpu"), block_tokens=0)
    query, key, value = (tensor.detach() for tensor in row_inputs(torch.float32))
    assert cpu_kernel_applies(plan, query, key, value, 0.0)
    assert not cpu_kernel_applies(plan, query, key, value, 0.1)  # dropout: per-part SDPA
    assert not cpu_kernel_applies(plan, query, key, value[..., :4], 0.0)  # value heads of another size
    assert not cpu_kernel_applies(plan, query, key.transpose(2, 3).contiguous().transpose(2, 3), value, 0.0)
    empty = plan_segments([(0, 0, 0, 0)], torch.device("cpu"))
    assert empty.sizes == [0] and not cpu_kernel_applies(
        empty, query[:, :, :0], key[:, :, :0], value[:, :, :0], 0.0
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_kernel_applies(plan, query, key, value, 0.0)
