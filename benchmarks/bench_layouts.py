"""Packed-row layouts and the optimizer, timed against each other in one process (interleaved, median ratios).

    python benchmarks/bench_layouts.py                         # default data, 16 pairs, max_seq_len 64, bf16
    python benchmarks/bench_layouts.py --dataset hh --pairs_per_step 4 --max_seq_len 512 --dtype fp32

Layouts (forward + backward of SmolLM2-135M on the same pairs, prompt sharing on): `mask`, rows of at most
2 x max_seq_len tokens with a block-diagonal 4D mask; `segments-N`, one unpadded row with segment attention
and blocks of up to N tokens (0: one SDPA call per sequence). Optimizer: one `torch.optim.AdamW` step over
the model's parameters, multi-tensor (torch's default) vs `fused=True` (what the trainer uses).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def median_ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
    return {
        name: round(statistics.median(b / t for b, t in zip(times[base], values, strict=True)), 3)
        for name, values in times.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="default", choices=["default", "hh", "alpaca"])
    parser.add_argument("--pairs_per_step", type=int, default=16)
    parser.add_argument("--max_seq_len", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--blocks", default="0,128", help="segment block sizes to time")
    parser.add_argument("--steps", type=int, default=6, help="timed rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from benchmarks.bench_rm import load_pairs
    from model_utils import create_critic_model, load_tokenizer, segment_attention
    from model_utils.default_model import default_model_path
    from training.data.collate import PackedCollator
    from training.layout import MASK, SEGMENTS, BatchLayout, batch_rewards
    from training.losses import pairwise_loss

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    path = default_model_path()
    tokenizer = load_tokenizer(path)
    pairs, source = load_pairs(args.dataset, tokenizer, args.max_seq_len)
    random.Random(0).shuffle(pairs)
    model = create_critic_model(path, tokenizer, dtype=dtype).train()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]

    segment_attention.use_segment_attention(model)
    layouts = {"mask": (PackedCollator(tokenizer.pad_token_id, 2 * args.max_seq_len, True), None)}
    segment_collator = PackedCollator(tokenizer.pad_token_id, None, share_prompt=True, segment_attention=True)
    for block in (int(b) for b in args.blocks.split(",")):
        layouts[f"segments-{block}"] = (segment_collator, block)
    layout_times = {name: [] for name in layouts}
    for step in range(args.steps + 1):
        batch_pairs = pairs[step * args.pairs_per_step : (step + 1) * args.pairs_per_step]
        names = list(layouts) if step % 2 else list(layouts)[::-1]  # alternate the order
        for name in names:
            collator, block = layouts[name]
            start = time.perf_counter()
            batch = collator(batch_pairs)
            layout = BatchLayout(
                packing=True, share_prompt=True, attention=MASK if name == "mask" else SEGMENTS
            )
            with mock.patch.object(segment_attention, "SEGMENT_BLOCK_TOKENS", block or 0):
                chosen, rejected = batch_rewards(model, batch, layout).chunk(2)
            pairwise_loss(chosen.float(), rejected.float()).backward()
            model.zero_grad(set_to_none=True)
            if step:
                layout_times[name].append(time.perf_counter() - start)

    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    optimizers = {
        "adamw": torch.optim.AdamW(parameters, lr=1e-9),
        "adamw-fused": torch.optim.AdamW(parameters, lr=1e-9, fused=True),
    }
    optimizer_times = {name: [] for name in optimizers}
    for step in range(args.steps + 1):
        for name in list(optimizers) if step % 2 else list(optimizers)[::-1]:
            start = time.perf_counter()
            optimizers[name].step()
            if step:
                optimizer_times[name].append(time.perf_counter() - start)

    print(
        f"{source}: {args.pairs_per_step} pairs/step, max_seq_len {args.max_seq_len}, {args.dtype}, "
        f"{torch.get_num_threads()} threads, {args.steps} timed rounds"
    )
    print("layout fwd+bwd s (median):", {k: round(statistics.median(v), 3) for k, v in layout_times.items()})
    print("speed vs mask (median of per-round ratios):", median_ratios(layout_times, "mask"))
    print("AdamW step s (median):", {k: round(statistics.median(v), 3) for k, v in optimizer_times.items()})
    print("speed vs multi-tensor AdamW:", median_ratios(optimizer_times, "adamw"))


if __name__ == "__main__":
    main()
