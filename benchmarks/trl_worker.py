"""One TRL `RewardTrainer` configuration for benchmarks/bench_rm.py; runs inside a venv that has TRL.

    ~/.cache/rewardspeed/venvs/trl019/bin/python benchmarks/trl_worker.py JOB.json

Imports nothing from this project (its venv has its own transformers). JOB.json (written by bench_rm.py) names
the model folder, the pre-tokenised pairs (the project's token ids, so TRL trains on exactly the same
sequences) and the settings; the per-step seconds go to `result_path`. The pairs reach TRL as its documented
pre-tokenised columns (`input_ids_chosen`, `attention_mask_chosen`, `input_ids_rejected`,
`attention_mask_rejected`; TRL >= 1: `chosen_ids`, `rejected_ids`), which `RewardTrainer` trains on without
re-tokenising. TRL 0.x pads chosen and rejected separately and runs two forward passes per step; TRL 1.x pads
both to one batch maximum and runs one forward. Under `torchrun` (benchmarks/bench_e2e.py's 2-process rows) the
Trainer runs DDP over gloo and rank 0 writes the result.

Modes: `trl` = matched settings (AdamW, the job's precision, pairs per step, threads, no gradient
checkpointing); `trl-defaults` = `RewardConfig` defaults for precision (bf16 autocast) with gradient
checkpointing on, as TRL's reward-modelling recipe trains.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import trl
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from trl import RewardConfig, RewardTrainer

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class StepTimer(TrainerCallback):
    """Wall-clock seconds of every optimizer step: from the previous step's end (or train begin) to this end."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.threads = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())
        self.threads = torch.get_num_threads()

    @property
    def step_seconds(self) -> list[float]:
        return [end - start for start, end in zip(self.marks[:-1], self.marks[1:], strict=True)]


class InOrderRewardTrainer(RewardTrainer):
    """RewardTrainer taking the pairs in file order, so step i trains the same pairs as every other config."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def load_tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer; a folder saved by transformers 5 (class `TokenizersBackend`, unknown to 4.x) is
    read from its `tokenizer.json` with the special tokens of its `tokenizer_config.json`."""
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except ValueError:
        config = json.loads((Path(model_path) / "tokenizer_config.json").read_text())
        special = {key: config[key] for key in SPECIAL_TOKENS if isinstance(config.get(key), str)}
        return PreTrainedTokenizerFast(tokenizer_file=str(Path(model_path) / "tokenizer.json"), **special)


def build_model(job: dict, tokenizer):
    config = AutoConfig.from_pretrained(job["model_path"], num_labels=1)
    # The folder was written by transformers 5, which keeps rope_theta under rope_parameters.
    rope_parameters = getattr(config, "rope_parameters", None)
    if isinstance(rope_parameters, dict) and "rope_theta" in rope_parameters:
        config.rope_theta = rope_parameters["rope_theta"]
    model = AutoModelForSequenceClassification.from_pretrained(
        job["model_path"], config=config, torch_dtype=torch.float32
    )
    model.resize_token_embeddings(job["vocab_size"], mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    tokenizer = load_tokenizer(job["model_path"])
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": job["pad_token"]})  # as the project's load_tokenizer
    if tokenizer.pad_token_id != job["pad_token_id"]:
        raise RuntimeError(
            f"pad token id {tokenizer.pad_token_id} != {job['pad_token_id']} of the prepared data"
        )
    if job["vocab_size"] != 8 * math.ceil(len(tokenizer) / 8):
        raise RuntimeError(f"vocabulary {len(tokenizer)} does not pad to the project's {job['vocab_size']}")

    trl_1 = int(trl.__version__.split(".")[0]) >= 1
    rows = []
    for line in Path(job["pairs_path"]).read_text().splitlines():
        pair = json.loads(line)
        chosen = pair["prompt_ids"] + pair["chosen_ids"]
        rejected = pair["prompt_ids"] + pair["rejected_ids"]
        if trl_1:  # TRL 1.x: the processed columns; masks come from its collator
            rows.append({"chosen_ids": chosen, "rejected_ids": rejected})
            continue
        rows.append(
            {
                "input_ids_chosen": chosen,
                "attention_mask_chosen": [1] * len(chosen),
                "input_ids_rejected": rejected,
                "attention_mask_rejected": [1] * len(rejected),
            }
        )
    dataset = Dataset.from_list(rows)

    torch.manual_seed(1234)
    model = build_model(job, tokenizer)
    defaults = job["mode"] == "trl-defaults"
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="rewardspeed-trl-") as output_dir:
        args = RewardConfig(
            output_dir=output_dir,
            per_device_train_batch_size=job.get("per_device_pairs", job["pairs_per_step"]),
            gradient_accumulation_steps=1,
            max_steps=job["warmup"] + job["steps"],
            learning_rate=job["learning_rate"],
            optim="adamw_torch",
            max_grad_norm=1.0,
            max_length=job["max_seq_len"],
            bf16=True if defaults else job["dtype"] == "bf16",
            gradient_checkpointing=defaults,
            use_cpu=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            save_strategy="no",
            logging_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            seed=1234,
        )
        trainer = InOrderRewardTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
        )
        if len(trainer.train_dataset) != len(rows):
            raise RuntimeError(
                "RewardTrainer dropped pairs (max_length filter): the step contents would differ"
            )
        trainer.train()
    if os.environ.get("RANK", "0") != "0":
        return
    Path(job["result_path"]).write_text(
        json.dumps(
            {
                "step_seconds": timer.step_seconds,
                "threads": timer.threads,
                "attn_implementation": model.config._attn_implementation,
                "bf16": args.bf16,
                "gradient_checkpointing": args.gradient_checkpointing,
                "trl": trl.__version__,
                "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
