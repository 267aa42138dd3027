"""Accuracy and reward statistics of a saved reward model on a preference set.

Usage:
    python -m training.evaluate --model_name_or_path output/rm --data_path pairs.jsonl
    python -m training.evaluate --model_name_or_path output/rm --data_path hh/ --plot rm.png \
        --training_output output/rm
    python -m training.evaluate --model_name_or_path output/rm --score --prompt "Hi" --response " Hello!"
    python -m training.evaluate --model_name_or_path output/rm --score \
        --messages '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]'
    python -m training.evaluate --model_name_or_path output/rm --score --score_file to_score.jsonl

The model folder may be in any saved layout (hf, auto_map, dschat); it is loaded as a critic
(`create_critic_model(rlhf_training=True)`), in one process, without DeepSpeed.

Which rows: a source with an evaluation split (a folder with `train*` and `test*` files, `DIR:train_prefs` with
`test_prefs`, see `training/data/dataset_splits.py`) is evaluated on that split; a source without one (a single
file, `DIR:test_prefs`) on all its rows. Training with `--eval_data_path` unset holds out a seeded share of such a
file instead, so to reproduce the trainer's numbers pass the same evaluation file to both. Rows are tokenised
exactly as in training (`tokenize_rows`).

`--score` scores single responses the way training reads a reward (`tokenize_response`: rendered with the saved
chat template when given messages, one EOS, the same truncation): `--prompt`/`--response` texts, `--messages`
conversations (JSON; the response is the final assistant turn), or `--score_file` JSON lines, each
`{"prompt": ..., "response": ...}` (texts or messages) or `{"messages": [...]}`. Each prints its input with its
`reward`.

The last line printed is one JSON object: `accuracy` over every comparison (ties count as wrong), `chosen_mean`,
`rejected_mean`, `margin_mean`, `reward_mean`, `reward_std`, `num_pairs` (comparisons), `num_prompts`,
`top1_accuracy` and `kendall_tau` (`training/metrics.py::ranking_statistics`; rows with several scored responses
give every comparison of their prompt). Bad input (a missing file, an invalid row, a folder
that is not a reward model) prints one line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from training.data.listwise import ULTRAFEEDBACK_SCORES


def evaluation_rows(data_paths: Sequence[str], listwise=None) -> list:
    """Each source's own evaluation split when it has one, else all its rows (see the module docstring)."""
    from training.data.rows import read_preference_rows

    rows = []
    for path in data_paths:
        source = read_preference_rows(path, listwise=listwise)
        rows += source.eval_rows if source.eval_rows is not None else source.rows
    return rows


@torch.no_grad()
def example_rewards(
    reward_model: torch.nn.Module,
    examples: Sequence[dict],
    pad_token_id: int,
    batch_size: int,
    padding_side: str = "right",
):
    """A `metrics.RewardTable` of tokenised examples (pairs or groups): every response scored in one padded
    row (`PaddedCollator`), float32 on the CPU."""
    from training.data.collate import PaddedCollator
    from training.metrics import RewardTable

    loader = DataLoader(
        list(examples),
        batch_size=batch_size,
        collate_fn=PaddedCollator(pad_token_id, padding_side=padding_side),
    )
    device = next(reward_model.parameters()).device
    table = RewardTable()
    for batch in loader:
        table.add(reward_model(batch["input_ids"].to(device), batch["attention_mask"].to(device)), batch)
    return table


def conversation_parts(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(prompt, response) of a conversation: the response is its final assistant turn(s). Raises `RowError`."""
    from training.data.records import RowError

    start = len(messages)
    while start > 0 and messages[start - 1]["role"] == "assistant":
        start -= 1
    if start == len(messages):
        raise RowError(
            "empty_response", "messages", "must end with an assistant turn (the response to score)"
        )
    return messages[:start], messages[start:]


def score_item(value: Any, origin: str) -> tuple[dict, Any, Any]:
    """(as given, prompt, response) of one `{"messages": [...]}` or `{"prompt", "response"}` object."""
    from training.data.formats import content_field
    from training.data.records import DataError, RowError

    if not isinstance(value, dict):
        raise DataError(f"{origin}: expected a JSON object with messages, or prompt and response")
    try:
        if "messages" in value:
            messages = content_field(value, "messages")
            if not isinstance(messages, list):
                raise RowError("invalid_type", "messages", "expected a list of messages")
            prompt, response = conversation_parts(messages)
        else:
            prompt, response = content_field(value, "prompt"), content_field(value, "response")
    except RowError as error:
        raise DataError(f"{origin}: {error}") from None
    return value, prompt, response


def score_inputs(args: argparse.Namespace) -> list[tuple[dict, Any, Any]]:
    """Everything `--score` was given, in order: `--prompt`/`--response`, `--messages`, `--score_file` lines."""
    from pathlib import Path

    from training.data.records import DataError
    from training.data.sources import file_records

    prompts = args.prompt * len(args.response) if len(args.prompt) == 1 else args.prompt
    items = [
        ({"prompt": prompt, "response": response}, prompt, response)
        for prompt, response in zip(prompts, args.response, strict=True)
    ]
    for index, text in enumerate(args.messages, start=1):
        try:
            messages = json.loads(text)
        except ValueError as error:
            raise DataError(f"--messages {index}: not valid JSON ({error})") from None
        items.append(score_item({"messages": messages}, f"--messages {index}"))
    for record in file_records(Path(args.score_file)) if args.score_file else []:
        if record.json_error:
            raise DataError(f"{record.origin}: {record.json_error}")
        items.append(score_item(record.value, record.origin))
    if not items:
        raise DataError(f"{args.score_file}: nothing to score (no lines)")
    return items


@torch.no_grad()
def score_responses(
    reward_model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Any],
    responses: Sequence[Any],
    max_seq_len: int,
) -> list[float]:
    """Reward of each `prompt + response` (texts or messages), tokenised and truncated as in training
    (`tokenize_response`)."""
    from training.data.tokenize import tokenize_response

    device = next(reward_model.parameters()).device
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        input_ids = torch.tensor([tokenize_response(tokenizer, prompt, response, max_seq_len)], device=device)
        scores.append(reward_model(input_ids, torch.ones_like(input_ids)).float().item())
    return scores


def read_metrics(training_output: str) -> list[dict[str, Any]]:
    """The records of `<training_output>/metrics.jsonl` (one JSON object per line)."""
    path = os.path.join(training_output, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected the training run's metrics)")
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def plot_rewards(
    path: str,
    chosen_rewards: torch.Tensor | None,
    rejected_rewards: torch.Tensor | None,
    metrics: list[dict[str, Any]] | None = None,
) -> None:
    """Histograms of chosen/rejected rewards, and (given training metrics) loss and eval-accuracy curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (chosen_rewards is not None) + 2 * bool(metrics)
    figure, axes = plt.subplots(1, max(panels, 1), figsize=(5 * max(panels, 1), 4), squeeze=False)
    axes = list(axes[0])
    if chosen_rewards is not None:
        axis = axes.pop(0)
        axis.hist(chosen_rewards.numpy(), bins=30, alpha=0.6, label="chosen")
        axis.hist(rejected_rewards.numpy(), bins=30, alpha=0.6, label="rejected")
        axis.set(title="Rewards", xlabel="reward", ylabel="pairs")
        axis.legend()
    if metrics:
        train = [record for record in metrics if "loss" in record]
        evaluation = [record for record in metrics if "eval_accuracy" in record]
        loss_axis, accuracy_axis = axes
        loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train])
        loss_axis.set(title="Training loss", xlabel="step", ylabel="loss")
        accuracy_axis.plot(
            [r["step"] for r in evaluation], [r["eval_accuracy"] for r in evaluation], marker="o"
        )
        accuracy_axis.set(title="Eval accuracy", xlabel="step", ylabel="accuracy")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rewardspeed-evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="saved reward model (any layout)")
    parser.add_argument("--tokenizer_name_or_path", default=None, help="default: the model folder")
    parser.add_argument("--data_path", nargs="*", default=[], help="preference files, folders or hub names")
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=8)
    parser.add_argument("--padding_side", choices=["left", "right"], default="right")
    parser.add_argument("--num_padding_at_beginning", type=int, default=0)
    parser.add_argument(
        "--min_score_gap", type=float, default=0.0, help="rows with scored responses: as in training"
    )
    parser.add_argument(
        "--ultrafeedback_score",
        default="overall_score",
        choices=ULTRAFEEDBACK_SCORES,
        help="UltraFeedback rows: which score ranks",
    )
    parser.add_argument("--score", action="store_true", help="print the rewards of the inputs below")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt to score (repeatable)")
    parser.add_argument("--response", action="append", default=[], help="a response to score (repeatable)")
    parser.add_argument(
        "--messages", action="append", default=[], help="a JSON conversation to score, ending in the response"
    )
    parser.add_argument(
        "--score_file",
        default=None,
        help='JSON lines: {"prompt", "response"} (texts or messages) or {"messages"}',
    )
    parser.add_argument("--plot", default=None, help="PNG file for reward histograms (+ training curves)")
    parser.add_argument("--training_output", default=None, help="training --output_dir with metrics.jsonl")
    args = parser.parse_args(argv)
    if not args.data_path and not args.score and not (args.plot and args.training_output):
        parser.error("give --data_path, --score, or --plot with --training_output")
    if args.score and not (args.response or args.messages or args.score_file):
        parser.error("--score needs --prompt/--response, --messages or --score_file")
    if (args.prompt or args.response) and (
        not args.response or len(args.prompt) not in (1, len(args.response))
    ):
        parser.error("--response(s) need one --prompt, or one --prompt per --response")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate / score / plot as asked; returns the final JSON record."""
    from model_utils.model_factory import load_reward_model
    from model_utils.packed_attention import rope_batch_dependence
    from training.data.records import DataError, ListwiseOptions
    from training.data.sources import looks_local, parse_source
    from training.data.tokenize import tokenize_rows
    from training.metrics import ranking_statistics

    for path in args.data_path:  # before the model loads: a mistyped path fails fast
        location = parse_source(path).location
        if looks_local(location) and not os.path.exists(location):
            raise FileNotFoundError(f"{path}: no such data file or folder")
    metrics = read_metrics(args.training_output) if args.training_output else None
    if not args.data_path and not args.score:
        plot_rewards(args.plot, None, None, metrics)
        return {"plot": args.plot}
    inputs = score_inputs(args) if args.score else []  # bad input fails before the model loads
    if not os.path.exists(args.model_name_or_path):
        raise FileNotFoundError(f"{args.model_name_or_path}: no such model folder")
    reward_model, tokenizer = load_reward_model(
        args.model_name_or_path, args.tokenizer_name_or_path, args.num_padding_at_beginning
    )
    record: dict[str, Any] = {}
    if args.score:
        given, prompts, responses = zip(*inputs, strict=True)
        record["scores"] = score_responses(reward_model, tokenizer, prompts, responses, args.max_seq_len)
        for item, score in zip(given, record["scores"], strict=True):
            print(json.dumps({**item, "reward": score}))
    chosen = rejected = None
    if args.data_path:
        listwise = ListwiseOptions(args.min_score_gap, args.ultrafeedback_score)
        examples, _ = tokenize_rows(tokenizer, evaluation_rows(args.data_path, listwise), args.max_seq_len)
        if not examples:  # e.g. every row a tie
            raise DataError(f"{', '.join(args.data_path)}: no preference pairs to evaluate")
        if dependence := rope_batch_dependence(reward_model.config, args.max_seq_len):
            print(f"rewardspeed-evaluate: warning: {dependence}", file=sys.stderr)
        table = example_rewards(
            reward_model, examples, tokenizer.pad_token_id, args.per_device_eval_batch_size, args.padding_side
        )
        record.update(ranking_statistics(table))
        rewards = torch.tensor(table.rewards)
        chosen, rejected = rewards[torch.tensor(table.better)], rewards[torch.tensor(table.worse)]
    if args.plot:
        plot_rewards(args.plot, chosen, rejected, metrics)
        record["plot"] = args.plot
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; print the final JSON line; return 0, or 2 with a one-line error on stderr."""
    from model_utils.checkpoint.errors import CheckpointError
    from training.data.records import DataError

    args = parse_args(argv)
    try:
        record = run(args)
    except (DataError, CheckpointError, OSError, ValueError) as error:
        print(f"rewardspeed-evaluate: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    return 0


def cli() -> None:
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
