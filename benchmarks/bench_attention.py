"""Forward and backward time of one causal attention part on CPU: the bf16 kernel vs fp32 from bf16 inputs.

    python benchmarks/bench_attention.py [--threads 2] [--heads 9] [--head_dim 64]

What `model_utils.segment_attention.CPU_FP32_BACKWARD_MAX_KEYS` rests on: segment rows attend many short parts;
the CPU bf16 flash kernel's forward beats fp32's at every length, its backward only above some length. The forward
columns time the kernel on inputs already in its dtype; the backward columns time the kernel's backward as
`CpuSegmentAttention` runs it (from the bf16 forward's output and log-sum-exp; the fp32 one with the casts of
inputs, output and gradient to fp32 and of the gradients back). Medians of `--repeats` calls.
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


def part_times_ms(length: int, heads: int, head_dim: int, repeats: int) -> dict[str, float]:
    """Forward (bf16 kernel, fp32 kernel) and backward (bf16, fp32 with casts) of a causal part of `length` keys."""
    query, key, value, grad = (torch.randn(1, heads, length, head_dim).to(torch.bfloat16) for _ in range(4))
    fp32 = [tensor.float() for tensor in (query, key, value)]
    output, logsumexp = FORWARD(query, key, value, 0.0, True)

    def backward_fp32() -> None:
        grads = BACKWARD(
            grad.float(),
            *(tensor.float() for tensor in (query, key, value)),
            output.float(),
            logsumexp,
            0.0,
            True,
        )
        [tensor.to(torch.bfloat16) for tensor in grads]

    return {
        "forward bf16": median_ms(lambda: FORWARD(query, key, value, 0.0, True), repeats),
        "forward fp32": median_ms(lambda: FORWARD(*fp32, 0.0, True), repeats),
        "backward bf16": median_ms(
            lambda: BACKWARD(grad, query, key, value, output, logsumexp, 0.0, True), repeats
        ),
        "backward fp32": median_ms(backward_fp32, repeats),
    }


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
        "| keys | forward bf16 ms | forward fp32 ms | bf16 / fp32 | backward bf16 ms | backward fp32 ms | bf16 / fp32 |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for length in args.lengths:
        times = part_times_ms(length, args.heads, args.head_dim, args.repeats)
        forward = times["forward bf16"] / times["forward fp32"]
        backward = times["backward bf16"] / times["backward fp32"]
        print(
            f"| {length} | {times['forward bf16']:.2f} | {times['forward fp32']:.2f} | {forward:.2f} "
            f"| {times['backward bf16']:.2f} | {times['backward fp32']:.2f} | {backward:.2f} |"
        )


if __name__ == "__main__":
    main()
