"""Write the K-wise, binarized and expanded-pairs variants of alpaca-eval-multi for issue 14's experiment.

    python benchmarks/alpaca_multi_variants.py --out_dir /tmp/kwise-data [--min_score_gap 0.1 --eval_prompts 100]

`../shared/data/alpaca-eval-multi/responses.jsonl.gz` has 805 prompts with 5-12 judged responses each. A seeded
permutation holds out `--eval_prompts` prompts (the first of the permutation) and trains on the rest; the files:

    train_kwise.jsonl      {"prompt", "responses", "scores"}: every training prompt (the project's K-wise rows;
                           train with --min_score_gap G, which drops comparisons closer than G)
    train_binarized.jsonl  {"prompt", "chosen", "rejected"}: the best- against the worst-scored response per prompt
                           (what UltraFeedback-binarized does), kept when their gap is at least G
    train_expanded.jsonl   every pair of a prompt's responses whose scores differ by at least G, better first,
                           in prompt order (the pairs the K-wise rows compare, one row each)
    eval_kwise.jsonl       the held-out prompts as K-wise rows: every run is evaluated on these
                           (`--eval_data_path eval_kwise.jsonl --min_score_gap G`: accuracy over comparisons,
                           top-1, Kendall tau)

Near-ties are the reason for G: the judge's probabilities saturate, so half of the within-prompt pairs differ by
less than 0.05 (the data's README). Data is written under `--out_dir`, never into the repository.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from itertools import combinations
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca-eval-multi" / "responses.jsonl.gz"


def expanded_pairs(row: dict, gap: float) -> list[tuple[int, int]]:
    """(better, worse) indices of every pair of `row`'s responses whose scores differ by at least `gap` (> 0)."""
    scores = row["scores"]
    pairs = []
    for first, second in combinations(range(len(scores)), 2):
        better, worse = (first, second) if scores[first] >= scores[second] else (second, first)
        if scores[better] - scores[worse] >= gap and scores[better] > scores[worse]:
            pairs.append((better, worse))
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> int:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--min_score_gap", type=float, default=0.1)
    parser.add_argument("--eval_prompts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with gzip.open(args.data, "rt", encoding="utf-8") as file:
        rows = [json.loads(line) for line in file]
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    held_out, train = order[: args.eval_prompts], sorted(order[args.eval_prompts :])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwise = lambda index: {key: rows[index][key] for key in ("prompt", "responses", "scores")}  # noqa: E731
    binarized, expanded = [], []
    for index in train:
        row = rows[index]
        pairs = expanded_pairs(row, args.min_score_gap)
        expanded += [
            {"prompt": row["prompt"], "chosen": row["responses"][b], "rejected": row["responses"][w]}
            for b, w in pairs
        ]
        best = max(range(len(row["scores"])), key=lambda i: row["scores"][i])
        worst = min(range(len(row["scores"])), key=lambda i: row["scores"][i])
        if row["scores"][best] - row["scores"][worst] >= args.min_score_gap:
            binarized.append(
                {
                    "prompt": row["prompt"],
                    "chosen": row["responses"][best],
                    "rejected": row["responses"][worst],
                }
            )
    counts = {
        "train_kwise": write_jsonl(out / "train_kwise.jsonl", [kwise(index) for index in train]),
        "train_binarized": write_jsonl(out / "train_binarized.jsonl", binarized),
        "train_expanded": write_jsonl(out / "train_expanded.jsonl", expanded),
        "eval_kwise": write_jsonl(out / "eval_kwise.jsonl", [kwise(index) for index in sorted(held_out)]),
        "min_score_gap": args.min_score_gap,
        "seed": args.seed,
    }
    (out / "counts.json").write_text(json.dumps(counts, indent=1))
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
