"""2-process worker: the ranks of one node load a data set through the tokenised-data cache, three times.

    torchrun --nproc_per_node 2 tests/scripts/data_cache.py --data D --eval_data E --bad_data B --cache C --out O

1. `D` into an empty cache: the ranks share the tokenisation (each counts the rows it tokenised itself);
2. `D` again: a hit, nothing read or tokenised;
3. `B`, whose last training row (in rank 1's shard) makes the chat template fail: both ranks must raise.
Each rank writes `O/rank{r}.json`: its examples and row counts of 1 and 2, and the error of 3. Plain gloo process
group, no DeepSpeed: what is tested is the cache's protocol.
"""

import argparse
import json
import os
import sys
from unittest import mock

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny_models import CHAT_TEMPLATE, make_tokenizer  # noqa: E402

from training.data import load  # noqa: E402
from training.data.records import DataError  # noqa: E402

# The tiny template, refusing a message whose content is "boom" (as a real template refuses an odd role order).
FAILING_TEMPLATE = "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('boom') }}{% endif %}{% endfor %}"


def counted_load(paths: list[str], eval_paths: list[str], tokenizer, cache: str) -> tuple[object, int, bool]:
    """(data, rows this rank tokenised, whether it read any row)."""
    tokenised, read = 0, False
    tokenize_chunks, read_phase_rows = load.tokenize_chunks, load.read_phase_rows

    def counting_chunks(tokenizer, rows, max_seq_len, *args, **kwargs):
        nonlocal tokenised
        tokenised += len(rows)
        return tokenize_chunks(tokenizer, rows, max_seq_len, *args, **kwargs)

    def noting_read(*args, **kwargs):
        nonlocal read
        read = True
        return read_phase_rows(*args, **kwargs)

    with (
        mock.patch.object(load, "tokenize_chunks", counting_chunks),
        mock.patch.object(load, "read_phase_rows", noting_read),
    ):
        data = load.load_preference_data(paths, tokenizer, 24, eval_data_paths=eval_paths, cache_dir=cache)
    return data, tokenised, read


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--data", "--eval_data", "--bad_data", "--cache", "--out"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = make_tokenizer(with_pad=True)
    result = {}
    for run in ("first", "second"):
        data, tokenised, read = counted_load([args.data], [args.eval_data], tokenizer, args.cache)
        result[run] = {
            "train": list(data.train),
            "eval": list(data.eval),
            "stats": data.stats,
            "rows_tokenised": tokenised,
            "read": read,
            "memory_mapped": type(data.train.parts[0].arrays["tokens"]).__name__,
        }
    tokenizer.chat_template = FAILING_TEMPLATE + CHAT_TEMPLATE
    try:
        load.load_preference_data(
            [args.bad_data], tokenizer, 24, eval_data_paths=[args.eval_data], cache_dir=args.cache
        )
        result["bad"] = None
    except DataError as error:
        result["bad"] = str(error)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w", encoding="utf-8") as file:
        json.dump(result, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
