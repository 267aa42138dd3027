"""Forward and backward time of one causal attention part on CPU: the bf16 kernel vs fp32 from bf16 inputs.

    python benchmarks/bench_attention.py [--threads 2] [--heads 9] [--head_dim 64]

What `model_utils.segment_attention.CPU_FP32_BACKWARD_MAX_KEYS` rests on: segment rows attend many short parts;
the CPU bf16 flash kernel's forward beats fp32's at every length, its backward only above some length. The forward
columns time the kernel on inputs already in its dtype; the backward columns time the kernel's backward as
`CpuSegmentAttention` runs it (from the bf16 forward's output and log-sum-exp; the fp32 one with the casts of
inputs, output and gradient to fp32 and of the gradients back). Medians of `--repeats` calls.

The column `materialised / fp32` times a backward that is not the kernel's, tried and dropped: the part's score matrix formed again
with batched matmuls (scores and their gradient in fp32, the three products that give the input gradients in bf16,
as the bf16 kernel rounds them). Its matmuls are fast, but the elementwise passes over the `heads x L x L` scores
cost more than the kernel's whole backward at every length measured: 1.1-2.3x the fp32 kernel's time at 64-512 keys,
1.9-4.3x at 768-2048 (two runs, 2 threads). The last column is each backward's relative error (the worst of the
three gradients, in bf16 as returned) against float64 autograd of the same inputs: the materialised one is about
as close as the bf16 kernel (2.5e-3 against 2.9-4.7e-3; the fp32 kernel, rounded once, 1.8-1.9e-3).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def part_backwards(length: int, heads: int, head_dim: int) -> tuple[dict, torch.Tensor]:
    """The three backwards of a causal bf16 part of `length` keys, each a call returning (query, key, value)
    gradients in bf16, and those gradients from float64 autograd of the same inputs (the reference)."""
    query, key, value, grad = (torch.randn(1, heads, length, head_dim).to(torch.bfloat16) for _ in range(4))
    output, logsumexp = FORWARD(query, key, value, 0.0, True)
    scale = head_dim**-0.5
    mask = torch.zeros(length, length).masked_fill_(
        torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf")
    )

    def backward_fp32() -> list[torch.Tensor]:
        fp32 = (tensor.float() for tensor in (query, key, value))
        grads = BACKWARD(grad.float(), *fp32, output.float(), logsumexp, 0.0, True)
        return [tensor.to(torch.bfloat16) for tensor in grads]

    def backward_materialised() -> list[torch.Tensor]:
        q, k, v, d, o = (tensor[0] for tensor in (query, key, value, grad, output))
        scores = torch.baddbmm(mask, q.float(), k.float().transpose(1, 2), alpha=scale)
        probs = scores.sub_(logsumexp[0].unsqueeze(-1)).exp_()
        grad_scores = torch.bmm(d.float(), v.float().transpose(1, 2))
        grad_scores.sub_((d.float() * o.float()).sum(-1, keepdim=True)).mul_(probs)
        probs, grad_scores = probs.to(torch.bfloat16), grad_scores.to(torch.bfloat16)
        grads = (
            torch.bmm(grad_scores, k).mul_(scale),
            torch.bmm(grad_scores.transpose(1, 2), q).mul_(scale),
            torch.bmm(probs.transpose(1, 2), d),
        )
        return [tensor[None] for tensor in grads]

    inputs = [tensor.double().requires_grad_() for tensor in (query, key, value)]
    scores = inputs[0] @ inputs[1].transpose(-1, -2) * scale + mask.double()
    (scores.softmax(-1) @ inputs[2]).backward(grad.double())
    backwards = {
        "bf16": lambda: BACKWARD(grad, query, key, value, output, logsumexp, 0.0, True),
        "fp32": backward_fp32,
        "materialised": backward_materialised,
    }
    return backwards, [tensor.grad for tensor in inputs]


def relative_error(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((g.double() - r).norm() / r.norm()) for g, r in zip(grads, reference, strict=True))


def part_times_ms(length: int, heads: int, head_dim: int, repeats: int) -> dict[str, float]:
    """Forward (bf16 kernel, fp32 kernel) and backward (bf16, fp32 with casts, materialised) times of a causal part
    of `length` keys, and each backward's relative error against float64."""
    query, key, value = (torch.randn(1, heads, length, head_dim).to(torch.bfloat16) for _ in range(3))
    fp32 = [tensor.float() for tensor in (query, key, value)]
    backwards, reference = part_backwards(length, heads, head_dim)
    times = {
        "forward bf16": median_ms(lambda: FORWARD(query, key, value, 0.0, True), repeats),
        "forward fp32": median_ms(lambda: FORWARD(*fp32, 0.0, True), repeats),
    }
    for name, backward in backwards.items():
        times[f"backward {name}"] = median_ms(backward, repeats)
        times[f"error {name}"] = relative_error(backward(), reference)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 384, 512, 768, 1024, 2048])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| keys | forward bf16 ms | forward fp32 ms | bf16 / fp32 | backward bf16 ms | backward fp32 ms | bf16 / fp32 "
        "| materialised / fp32 | error bf16 / fp32 / materialised |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for length in args.lengths:
        times = part_times_ms(length, args.heads, args.head_dim, args.repeats)
        forward = times["forward bf16"] / times["forward fp32"]
        backward = times["backward bf16"] / times["backward fp32"]
        materialised = times["backward materialised"] / times["backward fp32"]
        print(
            f"| {length} | {times['forward bf16']:.2f} | {times['forward fp32']:.2f} | {forward:.2f} "
            f"| {times['backward bf16']:.2f} | {times['backward fp32']:.2f} | {backward:.2f} | {materialised:.2f} "
            f"| {times['error bf16']:.1e} / {times['error fp32']:.1e} / {times['error materialised']:.1e} |"
        )


if __name__ == "__main__":
    main()
