"""Forward + backward time of one causal attention part on CPU, bf16 kernel vs fp32 from bf16 inputs.

    python benchmarks/bench_attention.py [--threads 2] [--heads 9] [--head_dim 64]

What `model_utils.segment_attention.CPU_FP32_ATTENTION_MAX_KEYS` rests on: segment rows attend many short parts,
and below some length the bf16 kernel costs more than casting to fp32 and back.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional


def part_time_ms(length: int, dtype: torch.dtype, heads: int, head_dim: int, repeats: int) -> float:
    """Mean ms of forward + backward of a causal part of `length` tokens given as bf16, attended in `dtype`."""
    inputs = [
        torch.randn(1, heads, length, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    ]

    def once() -> None:
        query, key, value = (tensor.to(dtype) for tensor in inputs)
        output = functional.scaled_dot_product_attention(query, key, value, is_causal=True)
        output.to(torch.bfloat16).sum().backward()

    for _ in range(3):
        once()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 768, 1024, 2048])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| keys | bf16 kernel ms | fp32 ms | bf16 / fp32 |\n| ---: | ---: | ---: | ---: |")
    for length in args.lengths:
        bf16, fp32 = (
            part_time_ms(length, dtype, args.heads, args.head_dim, args.repeats)
            for dtype in (torch.bfloat16, torch.float32)
        )
        print(f"| {length} | {bf16:.2f} | {fp32:.2f} | {bf16 / fp32:.2f} |")


if __name__ == "__main__":
    main()
