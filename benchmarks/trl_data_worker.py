"""One rank of TRL's data path for benchmarks/bench_data.py; runs inside a venv that has TRL (1.16).

    ~/.cache/rewardspeed/venvs/trl116/bin/python benchmarks/trl_data_worker.py JOB.json
    ~/.cache/rewardspeed/venvs/trl116/bin/python -m torch.distributed.run --nproc_per_node 2 \
        benchmarks/trl_data_worker.py JOB.json

What `RewardTrainer` does to a training set before its first step, unchanged: the rows are read with
`datasets.load_dataset("json")` (as TRL's reward script does, on every rank), then `RewardTrainer._prepare_dataset`
runs (TRL's own code: add EOS to texts, tokenise prompt + response with `datasets.map`, drop pairs longer than
`max_length`, all under `global_then_local_main_first`, so with 2 ranks the first tokenises and the other reuses
the datasets cache), then its collator pads 8 pairs. Imports nothing from this project. Writes `rank<r>.json`
(the same fields as bench_data.py's project worker; `tokens` counted as the project counts them is not known
here, so the runner uses the project's count for bytes per token).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

MICRO_BATCH = 8


def main(job: dict) -> None:
    started_at = time.time()
    from accelerate import PartialState
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    state = PartialState()  # the process group under torchrun (gloo on CPU), as the Trainer starts it
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer_dir"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start, cpu_start = time.time(), time.process_time()
    ready_s = start - job["launched_at"]
    dataset = load_dataset("json", data_files=job["data_path"], split="train")
    with tempfile.TemporaryDirectory() as output_dir:
        args = RewardConfig(
            output_dir=output_dir, max_length=job["max_seq_len"], report_to="none", use_cpu=True
        )
        prepared = RewardTrainer._prepare_dataset(None, dataset, tokenizer, args, "train")
    data_s, data_cpu_s = time.time() - start, time.process_time() - cpu_start
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    batch = collate([prepared[index] for index in range(MICRO_BATCH)])
    first_batch_at = time.time()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import pyarrow.compute as compute

    table = prepared.data.table
    trl_tokens = sum(
        compute.sum(compute.list_value_length(table.column(column))).as_py()
        for column in ("chosen_ids", "rejected_ids")
    )
    result = {
        "rank": state.process_index,
        "data_s": data_s,
        "data_cpu_s": data_cpu_s,
        "first_batch_s": first_batch_at - job["launched_at"],
        "peak_rss": peak_rss,
        "rss_before_data": rss_before,
        "start_s": started_at - job["launched_at"],
        "ready_s": ready_s,
        "trl_tokens": trl_tokens,  # chosen and rejected sequences, the prompt in both
        "pairs": len(prepared),
        "batch_tokens": int(batch["input_ids"].numel()),
    }
    Path(job["out_dir"], f"rank{state.process_index}.json").write_text(json.dumps(result), encoding="utf-8")
    state.wait_for_everyone()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
