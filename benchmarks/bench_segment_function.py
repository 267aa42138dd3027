"""CPU segment attention: `CpuSegmentAttention` against per-part SDPA autograd, in time and in what backward keeps.

    python benchmarks/alpaca_multi_variants.py --out_dir /tmp/kwise-data           # the data variants first
    python benchmarks/bench_segment_function.py --data_dir /tmp/kwise-data --rounds 6

For each row (a K-wise row and an expanded-pairs row of about `--tokens` tokens at max_seq_len 128, as
`kwise_memory.py` selects them; and hh pairs at 512 in bf16 and fp32), SmolLM2-135M in the layout train_rm takes
(packing, prompt sharing, segment attention) runs one forward + loss + backward with the CPU function and with
per-part SDPA (`segment_attention.cpu_kernel_applies` forced False: the path other devices take), interleaved,
`--rounds` rounds after one step of each that counts what backward keeps (and warms up); reported: the median of the per-round time ratios, and the bytes the
autograd graph keeps for backward per token (`torch.autograd.graph.saved_tensors_hooks`, parameters excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import bench_rm  # noqa: E402
import kwise_memory  # noqa: E402  (the equal-token row selection)

if str(bench_rm.REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(bench_rm.REPO_ROOT))


def segment_row(
    data_path: str, budget: int, dtype: str, max_seq_len: int, allow_prompt_truncation: bool = True
):
    """(model, batch, layout, config): SmolLM2-135M in the layout train_rm takes (packing, prompt sharing, segment
    attention) and one segment row of about `budget` tokens of `data_path` (`kwise_memory.select`)."""
    import torch

    from model_utils import segment_attention
    from model_utils.default_model import default_model_path
    from model_utils.model_factory import create_critic_model
    from model_utils.tokenizer import load_tokenizer
    from training.arguments import parse_args
    from training.layout import SEGMENTS, BatchLayout
    from training.sampling import epoch_order
    from training.train_rm import load_data

    config = parse_args(
        [
            "--data_path", data_path, "--max_seq_len", str(max_seq_len), "--min_score_gap", "0.1",
            "--listwise_loss", "pairs", "--skip_invalid_rows", "--dtype", dtype,
            "--output_dir", "/tmp/unused-bench-segment-function",
            *(["--allow_prompt_truncation"] if allow_prompt_truncation else []),
        ]
    )  # fmt: skip
    model_path = default_model_path()
    tokenizer = load_tokenizer(model_path)
    data = load_data(config, tokenizer)
    layout = BatchLayout(packing=True, share_prompt=True, attention=SEGMENTS)
    order = epoch_order(len(data.train), 0, config.seed, 1)
    batch = layout.collator(tokenizer.pad_token_id)(kwise_memory.select(data.train, order, budget, 0.9))
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = create_critic_model(
        model_path, tokenizer, dtype=torch_dtype, attn_implementation="sdpa", head_seed=config.seed
    )
    segment_attention.use_segment_attention(model)
    model.train()
    return model, batch, layout, config


def measure(data_path: str, budget: int, dtype: str, max_seq_len: int, rounds: int) -> dict:
    import torch

    from model_utils import segment_attention
    from training.trainer import compute_loss

    model, batch, layout, config = segment_row(data_path, budget, dtype, max_seq_len)
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}

    def step(fused: bool, count_saved: bool = False) -> tuple[float, int]:
        storages = {}

        def keep(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        applies = segment_attention.cpu_kernel_applies if fused else (lambda *args: False)
        hooks = torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor) if count_saved else None
        start = time.perf_counter()
        with mock.patch.object(segment_attention, "cpu_kernel_applies", applies):
            if hooks is not None:
                with hooks:
                    loss, _ = compute_loss(model, batch, layout, config)
            else:
                loss, _ = compute_loss(model, batch, layout, config)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, sum(storages.values())

    tokens = batch["input_ids"].numel()
    saved = {
        name: step(fused, count_saved=True)[1] / tokens / 1024
        for name, fused in (("fused", True), ("sdpa", False))
    }
    times = {"fused": [], "sdpa": []}
    for round_index in range(rounds):
        for name in ("fused", "sdpa") if round_index % 2 == 0 else ("sdpa", "fused"):
            times[name].append(step(name == "fused")[0])
    ratios = [fused / sdpa for fused, sdpa in zip(times["fused"], times["sdpa"], strict=True)]
    return {
        "tokens": tokens,
        "seconds": {name: [round(value, 2) for value in values] for name, values in times.items()},
        "fused_over_sdpa_median": round(statistics.median(ratios), 3),
        "saved_kib_per_token": {name: round(value, 1) for name, value in saved.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(BENCH_DIR / "results" / "segment-function.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = {
        "kwise bf16 128": (str(Path(args.data_dir) / "train_kwise.jsonl"), "bf16", 128),
        "expanded bf16 128": (str(Path(args.data_dir) / "train_expanded.jsonl"), "bf16", 128),
        "hh bf16 512": (str(bench_rm.HH_PATH), "bf16", 512),
        "hh fp32 512": (str(bench_rm.HH_PATH), "fp32", 512),
    }
    results = {}
    for name, (path, dtype, max_seq_len) in rows.items():
        results[name] = measure(path, args.tokens, dtype, max_seq_len, args.rounds)
        print(name, results[name], flush=True)
    report = {
        "command": "python benchmarks/bench_segment_function.py " + " ".join(sys.argv[1:]),
        "rows": results,
    }
    Path(args.output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
