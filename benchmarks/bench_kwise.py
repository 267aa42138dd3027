"""Issue 14's measurements on alpaca-eval-multi: K-wise throughput, and K-wise vs binarized vs expanded pairs.

    python benchmarks/alpaca_multi_variants.py --out_dir /tmp/kwise-data           # the data variants first
    python benchmarks/bench_kwise.py throughput --data_dir /tmp/kwise-data --rounds 2
    python benchmarks/bench_kwise.py experiment --data_dir /tmp/kwise-data --kwise_steps 40

`throughput`: comparisons per second of `python -m training.train_rm` (end to end; `elapsed_s` of optimizer steps
`--timed_from`+1 .. `--max_steps`) on the K-wise rows (`--listwise_loss pairs` and `plackett_luce`, `--kwise_groups`
prompts' groups per step), on the expanded pairs (`--pairwise_pairs` pairs per step; the defaults, 2 groups and 9
pairs, hold 2,440 and 2,000 tokens per micro-batch on average at `--max_seq_len 128`: groups vary in size, so peak
memory at equal tokens is `kwise_memory.py`'s measurement, not this one's) and TRL's `RewardTrainer`
(benchmarks/trl_worker.py, TRL venv) on the same expanded pairs in the project's order. The expanded pairs are
those of the groups the K-wise runs time (every gap-filtered pair of those prompts, shuffled by the project's
sampler), so both sides' comparisons per token come from the same prompts and responses; each pairwise run times
a sample of them. Comparisons of a K-wise step = the gap-filtered pairs of its groups (counted from the project's
own tokenised data and sampler order). Peak RSS is each process's `ru_maxrss`; tokens per micro-batch are
reported beside it.

`experiment`: trains SmolLM2-135M on the 705 training prompts in four ways and evaluates every run on the 100
held-out prompts (K-wise rows: accuracy over gap-filtered comparisons, top-1, Kendall tau): K-wise with both
losses for `--kwise_steps` steps; binarized and expanded pairs with an evaluation at the same step and at the
end of `--pairwise_steps` steps (default: as many as fit the K-wise run's training time, from its measured
step time), constant learning rate so an intermediate evaluation is comparable. `--seeds` repeats every run with
each seed (data order and the reward head's initialisation); the summary gives each metric per seed and its mean,
and every K-wise run's per-seed difference from the other runs (paired by seed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import bench_e2e  # noqa: E402
import bench_rm  # noqa: E402


def common_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--max_seq_len", str(args.max_seq_len), "--dtype", args.dtype, "--min_score_gap", str(args.min_score_gap),
        "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "constant", "--overwrite_output_dir",
        "--allow_prompt_truncation", "--skip_invalid_rows", "--per_device_eval_batch_size", "4",
    ]  # fmt: skip


def variant_flags(args: argparse.Namespace, variant: str, data_path: Path | None = None) -> list[str]:
    """train_rm's flags of one variant; a pairs variant reads `data_path` when given (else its file of `--data_dir`)."""
    data = Path(args.data_dir)
    if variant.startswith("kwise"):
        loss = "plackett_luce" if variant == "kwise-pl" else "pairs"
        return [
            "--data_path", str(data / "train_kwise.jsonl"), "--listwise_loss", loss,
            "--per_device_train_batch_size", str(args.kwise_groups),
        ]  # fmt: skip
    return [
        "--data_path", str(data_path or data / f"train_{variant}.jsonl"),
        "--per_device_train_batch_size", str(args.pairwise_pairs),
    ]  # fmt: skip


def run_train_rm(args: argparse.Namespace, flags: list[str], output: Path, log: Path) -> dict:
    env = bench_rm.worker_env(args.threads, "PASSIVE")
    env.update(DS_ACCELERATOR="cpu")
    load = os.getloadavg()[0]
    command = [sys.executable, "-m", "training.train_rm", *flags, "--output_dir", str(output)]
    code, peak_rss_mib, wall = bench_rm.run_subprocess(command, env, args.timeout, log)
    for weights in output.glob("*.safetensors"):
        weights.unlink()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited {code}:\n{log.read_text()[-3000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {
        "train": [r for r in records if "loss" in r],
        "eval": [r for r in records if "eval_accuracy" in r],
        "peak_rss_mib": round(peak_rss_mib, 1),
        "wall_s": round(wall, 1),
        "load_before": load,
    }


def step_contents(args: argparse.Namespace, flags: list[str], steps: int) -> dict:
    """Comparisons and tokens (responses with their prompt, as the project computes them) of each of the first
    `steps` optimizer steps of a run with `flags`, from the project's tokenisation and sampler order."""
    from model_utils import load_tokenizer
    from model_utils.default_model import default_model_path
    from training.arguments import parse_args
    from training.data.records import example_responses, num_comparisons
    from training.sampling import epoch_order
    from training.train_rm import load_data

    config = parse_args([*flags, "--output_dir", "/tmp/unused-bench-kwise"])
    data = load_data(config, load_tokenizer(default_model_path()))
    per_step = config.per_device_train_batch_size
    order = epoch_order(len(data.train), 0, config.seed, per_step)[: steps * per_step]
    examples = [data.train[index] for index in order]
    steps_of = [examples[i : i + per_step] for i in range(0, len(examples), per_step)]

    def tokens(example: dict) -> int:
        prompt, responses = example_responses(example)
        return len(prompt) + sum(len(response) for response in responses)  # the prompt once (shared)

    return {
        "order": order,
        "comparisons": [sum(num_comparisons(example) for example in step) for step in steps_of],
        "responses": [sum(len(example_responses(example)[1]) for example in step) for step in steps_of],
        "tokens": [sum(tokens(example) for example in step) for step in steps_of],
        "examples": examples,
        "data": data,
    }


def expanded_pairs_of(args: argparse.Namespace, data, groups: list[int]) -> str:
    """JSONL of every pair with a score gap >= `--min_score_gap` of the K-wise training rows `groups` (indices into
    the project's training examples, which are train_kwise.jsonl's rows in file order), better first, written as
    alpaca_multi_variants.py writes train_expanded.jsonl."""
    from alpaca_multi_variants import expanded_pairs

    path = Path(args.data_dir) / "train_kwise.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if len(rows) != len(data.train):
        raise RuntimeError(
            f"{path}: {len(rows)} rows but {len(data.train)} training examples; cannot match them"
        )
    lines = []
    for group in groups:
        row = rows[group]
        if len(data.train[group]["response_ids"]) != sum(bool(r.strip()) for r in row["responses"]):
            raise RuntimeError(f"{path} row {group + 1}: its responses do not match training example {group}")
        lines += [
            json.dumps(
                {"prompt": row["prompt"], "chosen": row["responses"][b], "rejected": row["responses"][w]}
            )
            + "\n"
            for b, w in expanded_pairs(row, args.min_score_gap)
        ]
    return "".join(lines)


def throughput(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    eval_flags = ["--eval_data_path", str(Path(args.data_dir) / "eval_kwise.jsonl[:2]")]
    run_flags = [*common_flags(args), *eval_flags, "--max_steps", str(args.max_steps)]
    flags = {name: [*variant_flags(args, name), *run_flags] for name in ("kwise", "kwise-pl")}
    # The pairwise runs (this project's and TRL's) train on the expanded pairs of exactly the groups the K-wise
    # runs time, shuffled: the comparisons per token of both sides then come from the same prompts and responses.
    kwise = step_contents(args, flags["kwise"], args.max_steps)
    timed_groups = kwise["order"][args.timed_from * args.kwise_groups :]
    pairs_path = work / "expanded-pairs-of-timed-groups.jsonl"
    pairs_path.write_text(expanded_pairs_of(args, kwise["data"], timed_groups))
    flags["pairwise"] = [*variant_flags(args, "expanded", pairs_path), *run_flags]
    contents = {  # the two K-wise runs differ only in their loss: the same data, order and steps
        "kwise": kwise,
        "kwise-pl": kwise,
        "pairwise": step_contents(args, flags["pairwise"], args.max_steps),
    }
    trl_pairs = work / "expanded.pairs.jsonl"
    trl_pairs.write_text("".join(json.dumps(pair) + "\n" for pair in contents["pairwise"]["examples"]))
    from model_utils import load_tokenizer, padded_vocab_size
    from model_utils.default_model import default_model_path

    model_path = default_model_path()
    tokenizer = load_tokenizer(model_path)
    trl_python, versions = bench_rm.find_trl_python(args.trl_python)
    names = [*flags, "trl"]
    rounds = []
    for round_index in range(1, args.rounds + 1):
        shift = (round_index - 1) % len(names)
        results = {}
        for name in names[shift:] + names[:shift]:
            tag = f"r{round_index}-{name}"
            if name == "trl":
                job = {
                    "mode": "trl", "dtype": args.dtype, "pairs_path": str(trl_pairs), "model_path": model_path,
                    "pad_token_id": tokenizer.pad_token_id, "vocab_size": padded_vocab_size(tokenizer),
                    "pad_token": tokenizer.pad_token, "threads": args.threads, "warmup": 0,
                    "steps": args.max_steps, "pairs_per_step": args.pairwise_pairs,
                    "max_seq_len": args.max_seq_len, "learning_rate": args.learning_rate,
                    "result_path": str(work / f"{tag}.trl.json"),
                }  # fmt: skip
                (work / f"{tag}.job.json").write_text(json.dumps(job))
                load = os.getloadavg()[0]
                code, rss, wall = bench_rm.run_subprocess(
                    [trl_python, str(bench_rm.TRL_WORKER), str(work / f"{tag}.job.json")],
                    bench_rm.worker_env(args.threads, "PASSIVE"),
                    args.timeout,
                    work / f"{tag}.log",
                )
                if code != 0:
                    raise RuntimeError(f"TRL exited {code}:\n{(work / f'{tag}.log').read_text()[-3000:]}")
                seconds = json.loads((work / f"{tag}.trl.json").read_text())["step_seconds"]
                timed_s = sum(seconds[args.timed_from : args.max_steps])
                content = contents["pairwise"]
                result = {"peak_rss_mib": round(rss, 1), "wall_s": round(wall, 1), "load_before": load}
            else:
                result = run_train_rm(args, flags[name], work / tag, work / f"{tag}.log")
                elapsed = {r["step"]: r["elapsed_s"] for r in result.pop("train")}
                result.pop("eval")
                timed_s = elapsed[args.max_steps] - elapsed[args.timed_from]
                content = contents[name]
            timed = slice(args.timed_from, args.max_steps)
            result.update(
                timed_s=round(timed_s, 2),
                comparisons_per_s=sum(content["comparisons"][timed]) / timed_s,
                tokens_per_s=sum(content["tokens"][timed]) / timed_s,
            )
            results[name] = result
            print(f"round {round_index} {name}: {result}", flush=True)
        rounds.append({"peak": bench_e2e.measure_peak(args, work, round_index), "results": results})
    summary = {}
    for name in names:
        summary[name] = {
            "comparisons_per_s": [round(r["results"][name]["comparisons_per_s"], 2) for r in rounds],
            "peak_rss_mib": max(r["results"][name]["peak_rss_mib"] for r in rounds),
        }
        if name != "pairwise":
            ratios = [
                r["results"][name]["comparisons_per_s"] / r["results"]["pairwise"]["comparisons_per_s"]
                for r in rounds
            ]
            summary[name]["vs_pairwise_median"] = round(statistics.median(ratios), 2)
        if name.startswith("kwise"):
            ratios = [
                r["results"][name]["comparisons_per_s"] / r["results"]["trl"]["comparisons_per_s"]
                for r in rounds
            ]
            summary[name]["vs_trl_median"] = round(statistics.median(ratios), 2)
    timed = slice(args.timed_from, args.max_steps)
    per_step = {
        name: {
            "mean_comparisons": statistics.mean(contents[name]["comparisons"][timed]),
            "mean_responses": statistics.mean(contents[name]["responses"][timed]),
            "mean_tokens": statistics.mean(contents[name]["tokens"][timed]),
            "max_tokens": max(contents[name]["tokens"][timed]),
        }
        for name in flags
    }
    return {"trl_versions": versions, "per_step": per_step, "summary": summary, "rounds": rounds}


def equal_time_steps(args: argparse.Namespace, variant: str, kwise_runs: list[dict], work: Path) -> int:
    """The steps of a pairwise variant whose training time matches the K-wise runs': their mean seconds per step
    times `--kwise_steps`, over this variant's own step time measured in a short probe run (its first 3 steps cost
    what the rest do). Measured once per `--work_dir` (`steps-<variant>.json`), so every seed trains as long."""
    done = work / f"steps-{variant}.json"
    if done.exists():
        return json.loads(done.read_text())
    step_s = statistics.mean(train[-1]["elapsed_s"] / train[-1]["step"] for train in kwise_runs)
    probe = run_train_rm(
        args,
        [
            *variant_flags(args, variant),
            *common_flags(args),
            "--eval_data_path",
            str(Path(args.data_dir) / "eval_kwise.jsonl[:2]"),
            "--max_steps",
            "4",
        ],  # fmt: skip
        work / f"probe-{variant}",
        work / f"probe-{variant}.log",
    )
    own = (probe["train"][-1]["elapsed_s"] - probe["train"][0]["elapsed_s"]) / 3
    steps = max(args.kwise_steps, round(step_s * args.kwise_steps / own))
    done.write_text(json.dumps(steps))
    return steps


def experiment(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    eval_flags = ["--eval_data_path", str(Path(args.data_dir) / f"eval_kwise.jsonl[:{args.eval_rows}]")]
    runs, commands, table = {}, {}, []
    for seed in args.seeds:
        for variant in args.variants:
            name = f"{variant}-seed{seed}"
            extra = ["--seed", str(seed)]
            steps = args.kwise_steps
            if not variant.startswith("kwise"):
                kwise_runs = [run["train"] for key, run in runs.items() if key.startswith("kwise")]
                steps = args.pairwise_steps or equal_time_steps(args, variant, kwise_runs, work)
                extra += ["--eval_interval", str(args.kwise_steps)]
            flags = [
                *variant_flags(args, variant),
                *common_flags(args),
                *eval_flags,
                "--max_steps",
                str(steps),
                *extra,
            ]
            commands[name] = "python -m training.train_rm " + " ".join(flags) + f" --output_dir {work / name}"
            print(commands[name], flush=True)
            done = work / f"{name}.json"
            if done.exists():  # finished by an earlier, interrupted invocation with this --work_dir
                runs[name] = json.loads(done.read_text())
            else:
                runs[name] = run_train_rm(args, flags, work / name, work / f"{name}.log")
                done.write_text(json.dumps(runs[name]))
            print(name, runs[name]["eval"], flush=True)
            train = runs[name]["train"]
            for record in runs[name]["eval"]:
                row = next(r for r in train if r["step"] == record["step"])
                table.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "step": record["step"],
                        "train_s": row["elapsed_s"],
                        "examples_seen": row["pairs_seen"],
                        **{key: record[f"eval_{key}"] for key in (*METRICS, "num_pairs")},
                    }
                )
    return {
        "commands": commands,
        "table": table,
        "summary": experiment_summary(table, args.kwise_steps),
        "runs": {k: {**v, "train": v["train"][-1:]} for k, v in runs.items()},
    }


METRICS = ("accuracy", "top1_accuracy", "kendall_tau")


def experiment_summary(table: list[dict], kwise_steps: int) -> dict:
    """Per variant and evaluation point (`equal_steps`: step `kwise_steps`; `end`: the run's last step, equal
    training time for the pairwise runs) each metric's per-seed values and mean; and per K-wise variant, its
    per-seed difference from every other variant at each point (K-wise minus other, paired by seed)."""
    points: dict[str, dict[str, dict[int, dict]]] = {}
    for variant in dict.fromkeys(row["variant"] for row in table):
        rows = [row for row in table if row["variant"] == variant]
        last = max(row["step"] for row in rows)
        points[variant] = {
            point: {row["seed"]: row for row in rows if row["step"] == step}
            for point, step in (("equal_steps", kwise_steps), ("end", last))
            if point == "equal_steps" or last != kwise_steps
        }
    summary = {}
    for variant, by_point in points.items():
        for point, by_seed in by_point.items():
            entry = {"steps": sorted({row["step"] for row in by_seed.values()}), "seeds": sorted(by_seed)}
            for metric in METRICS:
                values = [by_seed[seed][metric] for seed in sorted(by_seed)]
                entry[metric] = {
                    "per_seed": [round(v, 4) for v in values],
                    "mean": round(statistics.mean(values), 4),
                }
            summary[f"{variant} {point}"] = entry
    for kwise in (variant for variant in points if variant.startswith("kwise")):
        for other in (variant for variant in points if variant != kwise):
            for point, by_seed in points[other].items():
                seeds = sorted(set(by_seed) & set(points[kwise]["equal_steps"]))
                if not seeds:
                    continue
                entry = {"seeds": seeds}
                for metric in METRICS:
                    diffs = [
                        points[kwise]["equal_steps"][seed][metric] - by_seed[seed][metric] for seed in seeds
                    ]
                    entry[metric] = {
                        "per_seed": [round(d, 4) for d in diffs],
                        "mean": round(statistics.mean(diffs), 4),
                        "seeds_at_least": sum(d >= 0 for d in diffs),
                    }
                summary[f"{kwise} minus {other} {point}"] = entry
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["throughput", "experiment"])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--output_dir", default=str(bench_rm.RESULTS_DIR))
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--min_score_gap", type=float, default=0.1)
    parser.add_argument("--learning_rate", type=float, default=2e-5)
    parser.add_argument("--kwise_groups", type=int, default=2, help="Prompts' groups per K-wise step.")
    parser.add_argument("--pairwise_pairs", type=int, default=9, help="Pairs per step of the pairwise runs.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=8)
    parser.add_argument("--timed_from", type=int, default=2)
    parser.add_argument("--kwise_steps", type=int, default=40)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["kwise", "kwise-pl", "binarized", "expanded"],
        choices=["kwise", "kwise-pl", "binarized", "expanded"],
        help="experiment: the runs, K-wise first (the pairwise runs match their training time)",
    )
    parser.add_argument("--eval_rows", type=int, default=100, help="Held-out prompts evaluated (all 100).")
    parser.add_argument("--pairwise_steps", type=int, default=0, help="0: equal training time (see above).")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1234], help="experiment: train_rm's --seed of each repeat."
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--omp_wait_policy", default="PASSIVE")
    parser.add_argument("--matmul_size", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--trl_python", default=str(bench_rm.VENV_ROOT / "trl116" / "bin" / "python"))
    args = parser.parse_args(argv)
    kwise_runs = [v for v in args.variants if v.startswith("kwise")]
    if args.what == "experiment" and (not kwise_runs or args.variants[: len(kwise_runs)] != kwise_runs):
        parser.error(
            "--variants: at least one K-wise run, the K-wise runs first (the others match their time)"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.name = args.name or f"kwise-{args.what}"
    args.work_dir = args.work_dir or f"/tmp/rewardspeed-{args.name}"
    report = throughput(args) if args.what == "throughput" else experiment(args)
    report = {
        "command": "python benchmarks/bench_kwise.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        **report,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k in ("summary", "per_step", "table")}, indent=1))


if __name__ == "__main__":
    main()
