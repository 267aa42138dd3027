"""Peak memory of one training micro-batch at EQUAL tokens: K-wise groups against expanded pairs (issue 14).

    python benchmarks/alpaca_multi_variants.py --out_dir /tmp/kwise-data           # the data variants first
    python benchmarks/kwise_memory.py --data_dir /tmp/kwise-data --tokens 2048 3072 4096

For each token budget the K-wise rows are taken in the training sampler's order, skipping groups that would
overflow, until the collated row holds at least 98% of the budget (else, after every group, the fullest fit, at
least 90%); then the expanded pairs (every gap-filtered pair) are taken the same way up to the K-wise row's exact
token count, so both rows hold the same tokens within 1% (the tokens the backbone computes: each prompt once per group or pair). Each (budget, variant) runs in its own
process, 2 threads, bf16, SmolLM2-135M, in the layout train_rm proves and takes for these runs (packing, prompt
sharing, segment attention): the model is built, garbage is collected and freed heap returned to the system
(`malloc_trim`), the process's peak RSS is reset (`/proc/self/clear_refs`), then one forward, the loss
(`--listwise_loss pairs`) and one backward run; memory = peak RSS after it minus RSS before it (activations,
attention, and the bf16 parameter gradients, the same ~260 MiB for both). The optimizer's state is the same for
both and left out. glibc's mmap threshold is fixed (`MALLOC_MMAP_THRESHOLD_`) so large tensors do not reuse
resident heap differently in the two processes.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import bench_rm  # noqa: E402  (the shared helpers: worker environment, repository root)

if str(bench_rm.REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(bench_rm.REPO_ROOT))


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def select(examples: list[dict], order: list[int], budget: int, fill: float) -> list[dict]:
    """Examples in `order` whose segment row (each prompt once, no padding) stays within `budget` tokens, until it
    holds `fill` of it."""
    from training.data.collate import example_sequence_lengths

    chosen: list[dict] = []
    total = 0
    for index in order:
        size = sum(example_sequence_lengths(examples[index], share_prompt=True))
        if total + size <= budget:
            chosen.append(examples[index])
            total += size
        if total >= fill * budget:
            return chosen
    if total >= 0.9 * budget:  # the fullest fit the data has (groups come in steps of hundreds of tokens)
        return chosen
    raise RuntimeError(f"no selection of at least 90% of {budget} tokens (got {total})")


def worker(args: argparse.Namespace) -> dict:
    import torch

    from model_utils.default_model import default_model_path
    from model_utils.model_factory import create_critic_model
    from model_utils.segment_attention import use_segment_attention
    from model_utils.tokenizer import load_tokenizer
    from training.arguments import parse_args
    from training.data.records import example_responses, num_comparisons
    from training.layout import SEGMENTS, BatchLayout
    from training.sampling import epoch_order
    from training.train_rm import load_data
    from training.trainer import compute_loss

    torch.set_num_threads(args.threads)
    data_file = "train_kwise.jsonl" if args.variant == "kwise" else "train_expanded.jsonl"
    config = parse_args(
        [
            "--data_path", str(Path(args.data_dir) / data_file), "--max_seq_len", str(args.max_seq_len),
            "--min_score_gap", "0.1", "--listwise_loss", "pairs", "--allow_prompt_truncation",
            "--skip_invalid_rows", "--dtype", "bf16", "--output_dir", "/tmp/unused-kwise-memory",
        ]
    )  # fmt: skip
    model_path = default_model_path()
    tokenizer = load_tokenizer(model_path)
    data = load_data(config, tokenizer)
    layout = BatchLayout(packing=True, share_prompt=True, attention=SEGMENTS)
    collator = layout.collator(tokenizer.pad_token_id)
    order = epoch_order(len(data.train), 0, config.seed, 1)
    examples = select(data.train, order, args.budget, 0.98 if args.variant == "kwise" else 0.99)
    batch = collator(examples)
    model = create_critic_model(
        model_path, tokenizer, dtype=torch.bfloat16, attn_implementation="sdpa", head_seed=config.seed
    )
    use_segment_attention(model)
    model.train()
    del data
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = time.perf_counter()
    loss, _ = compute_loss(model, batch, layout, config)
    loss.backward()
    seconds = time.perf_counter() - start
    return {
        "variant": args.variant,
        "budget": args.budget,
        "tokens": batch["input_ids"].numel(),
        "examples": len(examples),
        "responses": sum(len(example_responses(e)[1]) for e in examples),
        "comparisons": sum(num_comparisons(e) for e in examples),
        "peak_mib": round(rss_mib("VmHWM") - before, 1),
        "rss_before_mib": round(before, 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "forward_backward_s": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 3072, 4096])
    parser.add_argument("--max_seq_len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(BENCH_DIR / "results" / "kwise-memory.json"))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # one measurement, in its own process
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    rows = []
    for budget in args.tokens:
        for variant in ("kwise", "expanded"):
            if variant == "expanded":
                budget = rows[-1]["tokens"]  # the K-wise row's exact token count
            command = [
                sys.executable, __file__, "--data_dir", args.data_dir, "--max_seq_len", str(args.max_seq_len),
                "--threads", str(args.threads), "--variant", variant, "--budget", str(budget),
            ]  # fmt: skip
            env = bench_rm.worker_env(args.threads, "")
            env.update(DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_="131072")
            result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
            if result.returncode or not lines:
                raise RuntimeError(
                    f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}"
                )
            rows.append(json.loads(lines[-1][len("RESULT ") :]))
            print(rows[-1], flush=True)
    report = {"command": "python benchmarks/kwise_memory.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(args.output).write_text(json.dumps(report, indent=1))
    print("| tokens (budget) | variant | tokens | examples | responses | comparisons | peak MiB over RSS |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['budget']} | {row['variant']} | {row['tokens']} | {row['examples']} | {row['responses']} | "
            f"{row['comparisons']} | {row['peak_mib']} |"
        )


if __name__ == "__main__":
    main()
