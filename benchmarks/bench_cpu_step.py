"""One forward + loss + backward of SmolLM2-135M bf16 on CPU, as train_rm lays it out (packing, prompt sharing,
segment attention): what this project's two CPU step settings do to it.

    python benchmarks/alpaca_multi_variants.py --out_dir /tmp/kwise-data           # the data variants first
    python benchmarks/bench_cpu_step.py bound --data_dir /tmp/kwise-data --rounds 4
    python benchmarks/bench_cpu_step.py malloc --data_dir /tmp/kwise-data --rounds 3
    python benchmarks/bench_cpu_step.py profile --data_dir /tmp/kwise-data --rounds 4

`bound`: `segment_attention.CPU_FP32_BACKWARD_MAX_KEYS` set to each of `--bounds` in turn in one process (0 = every
backward in the bf16 kernel), interleaved, on a K-wise row (`--tokens`, max_seq_len 512) and on hh pairs
(`--hh_tokens`); medians of per-round time ratios against the first bound. `malloc`: the K-wise row in separate
processes with and without `model_utils.distributed.keep_freed_memory` (alternating); per process the median of
steps 2-4, and each step's minor page faults and system time. `profile`: where a step's time goes, from the torch
profiler over `--rounds` steps of the K-wise row after one warm-up step: each category's share of the ops' self time
(matmuls, the CPU attention kernels forward and backward, the rest: elementwise ops, casts and copies) and the
matmuls' GFLOP/s (the profiler's FLOP count).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import bench_rm  # noqa: E402
import bench_segment_function  # noqa: E402  (the model and its segment row)

if str(bench_rm.REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(bench_rm.REPO_ROOT))


def build(data_path: str, budget: int):
    """(step function, tokens): one forward + loss + backward of the default model on about `budget` tokens."""
    from training.trainer import compute_loss

    model, batch, layout, config = bench_segment_function.segment_row(
        data_path, budget, "bf16", 512, allow_prompt_truncation=False
    )

    def step() -> float:
        start = time.perf_counter()
        loss, _ = compute_loss(model, batch, layout, config)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step, batch["input_ids"].numel()


def bound_rows(data_path: str, budget: int, bounds: list[int], rounds: int) -> dict:
    from model_utils import segment_attention

    step, tokens = build(data_path, budget)

    def timed(bound: int) -> float:
        segment_attention.CPU_FP32_BACKWARD_MAX_KEYS = bound
        return step()

    for bound in bounds:  # warm-up
        timed(bound)
    times = {bound: [] for bound in bounds}
    for round_index in range(rounds):
        for bound in bounds if round_index % 2 == 0 else bounds[::-1]:
            times[bound].append(timed(bound))
    first = bounds[0]
    return {
        "tokens": tokens,
        "seconds": {bound: [round(value, 2) for value in values] for bound, values in times.items()},
        f"median_ratio_to_bound_{first}": {
            bound: round(statistics.median(a / b for a, b in zip(times[bound], times[first], strict=True)), 3)
            for bound in bounds[1:]
        },
    }


def malloc_worker(data_path: str, budget: int) -> dict:
    """In a fresh process: the settings if asked (`REWARDSPEED_CPU_MALLOC`), then 4 steps."""
    from model_utils.distributed import keep_freed_memory

    line = keep_freed_memory()
    step, tokens = build(data_path, budget)
    seconds, faults, system = [], [], []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF)
        seconds.append(step())
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        system.append(round(after.ru_stime - before.ru_stime, 2))
    return {
        "malloc": line,
        "tokens": tokens,
        "median_step_s": round(statistics.median(seconds[1:]), 2),
        "minor_faults": faults[1:],
        "system_s": system[1:],
    }


# Op names by category for `profile`; every other op is "other" (elementwise, casts, copies, reductions).
PROFILE_CATEGORIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention forward kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "attention backward kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu_backward",),
}


def profile_rows(data_path: str, budget: int, rounds: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    step, tokens = build(data_path, budget)
    step()  # warm-up
    seconds, self_us, matmul_flops = [], {}, 0
    for _ in range(rounds):  # one profiler per step: a profiler's records of several steps exhaust 24 GiB
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as profiler:
            seconds.append(step())
        for event in profiler.key_averages():
            self_us[event.key] = self_us.get(event.key, 0) + event.self_cpu_time_total
            matmul_flops += event.flops if event.key in PROFILE_CATEGORIES["matmul"] else 0
    total = sum(self_us.values())
    category_us = {
        category: sum(self_us.get(name, 0) for name in names)
        for category, names in PROFILE_CATEGORIES.items()
    }
    category_us["other"] = total - sum(category_us.values())
    top = sorted(self_us.items(), key=lambda item: -item[1])[:12]
    return {
        "tokens": tokens,
        "step_s": [round(value, 2) for value in seconds],
        "share_of_op_time": {category: round(us / total, 3) for category, us in category_us.items()},
        "matmul_gflop_per_s": round(matmul_flops / (category_us["matmul"] / 1e6) / 1e9, 1),
        "top_ops_s": {name: round(us / 1e6 / rounds, 3) for name, us in top},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["bound", "malloc", "profile"])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--tokens", type=int, default=5800)
    parser.add_argument("--hh_tokens", type=int, default=1500)
    parser.add_argument("--bounds", type=int, nargs="+", default=[512, 0, 256])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    kwise_path = str(Path(args.data_dir) / "train_kwise.jsonl")
    if args.worker:
        print(json.dumps(malloc_worker(kwise_path, args.tokens)))
        return
    if args.what == "profile":
        results = {"kwise bf16 512": profile_rows(kwise_path, args.tokens, args.rounds)}
    elif args.what == "bound":
        results = {
            "kwise bf16 512": bound_rows(kwise_path, args.tokens, args.bounds, args.rounds),
            "hh bf16 512": bound_rows(str(bench_rm.HH_PATH), args.hh_tokens, args.bounds, args.rounds),
        }
    else:
        results = {"with": [], "without": []}
        for round_index in range(args.rounds):
            for name in ("with", "without") if round_index % 2 == 0 else ("without", "with"):
                env = dict(os.environ, REWARDSPEED_CPU_MALLOC="1" if name == "with" else "0")
                command = [sys.executable, __file__, "malloc", "--worker", *sys.argv[2:]]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(name, results[name][-1], flush=True)
    for name, row in results.items():
        print(name, row, flush=True)
    report = {"command": "python benchmarks/bench_cpu_step.py " + " ".join(sys.argv[1:]), "rows": results}
    output = args.output or str(BENCH_DIR / "results" / f"cpu-step-{args.what}.json")
    Path(output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
