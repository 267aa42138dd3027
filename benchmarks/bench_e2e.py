"""End-to-end training speed as a user runs it: `python -m training.train_rm` against TRL's `RewardTrainer`.

    python benchmarks/bench_e2e.py                                   # 1 process, fp32 + bf16, 3 rounds
    python benchmarks/bench_e2e.py --name e2e-more --rounds 1 --rows zero2 zero3 qwen3 gemma2 --dtypes bf16
    python benchmarks/bench_e2e.py --name e2e-families --rows smollm2 qwen3:bf16 mistral:bf16 phi3:bf16 olmo2:bf16
    python benchmarks/bench_e2e.py --name smoke --rounds 1 --max_steps 3 --timed_from 1 --max_seq_len 64

Every configuration is a whole program in its own subprocess: the project's `train_rm` (DeepSpeed engine, the
start-up probe, the trainer's loop; ZeRO-0 on 1 process, `--zero_stage 2/3` on 2 processes under torchrun) and
`benchmarks/trl_worker.py` in the TRL venv (`RewardTrainer`, AdamW, the same precision, pairs per step, threads,
max_grad_norm 1.0, no gradient checkpointing; DDP over gloo on 2 processes). Both train the same pairs in the same
steps: TRL is given the project's token ids in the order the project's sampler trains them
(`training.sampling.epoch_order`). Speed = pairs per second over optimizer steps `--timed_from`+1 ..
`--max_steps` (the project's `elapsed_s` in metrics.jsonl; TRL's per-step wall time), so start-up, the probe,
the final evaluation and saving are outside it (their wall time is recorded too).

Rows (`--rows`): `smollm2` (the packaged SmolLM2-135M, 1 process), `zero2` and `zero3` (SmolLM2-135M, 2
processes of `--threads`/2 threads each, 2 pairs per process), `qwen3`, `gemma2`, `mistral`, `phi3`, `olmo2`
(random weights at SmolLM2-135M's size: 30 layers, hidden 576, 9 heads of 64, 3 KV heads, SmolLM2's tokenizer;
the released models' sliding windows). `ROW:DTYPE` runs a row in that dtype only. Rounds run every
configuration once (the order rotates); the report gives medians of per-round ratios, the matmul peaks
(`bench_rm.run_matmul_peak`) and the 1-minute load average before each run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import bench_rm  # noqa: E402  (the shared helpers: venv lookup, subprocess runner, matmul peak)

REPO_ROOT = bench_rm.REPO_ROOT
HH_SOURCE = f"{bench_rm.HH_PATH}[:{bench_rm.HH_TRAIN_ROWS}]"
HH_EVAL = f"{bench_rm.HH_PATH}[{bench_rm.HH_TRAIN_ROWS}:{bench_rm.HH_TRAIN_ROWS + 8}]"
ROWS = {  # name: (backbone, processes, ZeRO stage)
    "smollm2": ("smollm2", 1, 0),
    "zero2": ("smollm2", 2, 2),
    "zero3": ("smollm2", 2, 3),
    "qwen3": ("qwen3", 1, 0),
    "gemma2": ("gemma2", 1, 0),
    "mistral": ("mistral", 1, 0),
    "phi3": ("phi3", 1, 0),
    "olmo2": ("olmo2", 1, 0),
}
# SmolLM2-135M's shape, for the random-weight backbones of other families.
SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
}
# The released models' windows (Mistral-7B-v0.1 4096, Phi-3-mini 2047): wider than any packed sequence here, which
# the start-up checks must see (a narrower one would send the run to the plain layout).
RANDOM_SETTINGS = {
    "qwen3": {},
    "gemma2": {"query_pre_attn_scalar": 64},
    "mistral": {"sliding_window": 4096},
    "phi3": {"sliding_window": 2047},
    "olmo2": {},
}


def random_backbone(model_type: str, folder: Path, tokenizer_path: str) -> str:
    """A random-weight `model_type` backbone of SmolLM2-135M's size with SmolLM2's tokenizer, saved once."""
    if (folder / "config.json").exists():
        return str(folder)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer_files = [Path(tokenizer_path) / name for name in ("tokenizer.json", "tokenizer_config.json")]
    special = json.loads((Path(tokenizer_path) / "config.json").read_text())
    config = AutoConfig.for_model(
        model_type,
        vocab_size=special["vocab_size"],
        bos_token_id=special["bos_token_id"],
        eos_token_id=special["eos_token_id"],
        pad_token_id=None,
        **SMOLLM2_SHAPE,
        **RANDOM_SETTINGS[model_type],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for path in tokenizer_files + [Path(tokenizer_path) / "chat_template.jinja"]:
        if path.exists():
            shutil.copy(path, folder / path.name)
    return str(folder)


def train_rm_flags(args: argparse.Namespace, model_path: str, dtype: str, processes: int, stage: int) -> list:
    return [
        "--model_name_or_path", model_path, "--data_path", HH_SOURCE, "--eval_data_path", HH_EVAL,
        "--skip_invalid_rows", "--per_device_train_batch_size", str(args.pairs_per_step // processes),
        "--max_seq_len", str(args.max_seq_len), "--dtype", dtype, "--max_steps", str(args.max_steps),
        "--zero_stage", str(stage), "--learning_rate", "1e-5", "--overwrite_output_dir",
        "--allow_prompt_truncation",  # the smoke's short --max_seq_len; TRL trains the same token ids
    ]  # fmt: skip


def prepare(args: argparse.Namespace, work: Path) -> dict:
    """The packaged model's path, the random backbones, and the pairs TRL trains: the project's tokenisation of
    the same source, in the order the project's sampler trains them."""
    from model_utils import load_tokenizer, padded_vocab_size
    from model_utils.default_model import default_model_path
    from training.arguments import parse_args
    from training.sampling import epoch_order
    from training.train_rm import load_data

    smollm2 = default_model_path()
    models = {"smollm2": smollm2}
    for row in args.row_dtypes:
        backbone = ROWS[row][0]
        if backbone != "smollm2":
            models[backbone] = random_backbone(backbone, work / f"model-{backbone}", smollm2)
    tokenizer = load_tokenizer(smollm2)
    config = parse_args([*train_rm_flags(args, smollm2, "fp32", 1, 0), "--output_dir", str(work / "unused")])
    data = load_data(config, tokenizer)
    needed = args.max_steps * args.pairs_per_step
    order = epoch_order(len(data.train), 0, config.seed, args.pairs_per_step)[:needed]
    pairs_path = work / "hh.pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(data.train[index]) + "\n" for index in order))
    timed = [data.train[index] for index in order[args.timed_from * args.pairs_per_step :]]
    return {
        "models": models,
        "pairs_path": str(pairs_path),
        "pad_token_id": tokenizer.pad_token_id,
        "pad_token": tokenizer.pad_token,
        "vocab_size": padded_vocab_size(tokenizer),
        "timed_pairs": bench_rm.pair_stats(timed),
    }


def row_dtypes(entries: list[str], dtypes: list[str]) -> dict[str, list[str]]:
    """`--rows` entries `ROW` (every `--dtypes`) or `ROW:DTYPE` (that one), in order. Raises ValueError naming an
    entry that is neither."""
    rows: dict[str, list[str]] = {}
    for entry in entries:
        row, _, dtype = entry.partition(":")
        if row not in ROWS or dtype not in ("", "fp32", "bf16"):
            raise ValueError(f"--rows {entry}: expected ROW or ROW:fp32/bf16, ROW one of {', '.join(ROWS)}")
        rows.setdefault(row, [])
        rows[row] += [d for d in ([dtype] if dtype else dtypes) if d not in rows[row]]
    return rows


def configurations(args: argparse.Namespace) -> list[dict]:
    configs = []
    for row, dtypes in args.row_dtypes.items():
        for dtype in dtypes:
            for program in ("train_rm", "trl"):
                configs.append(
                    {"row": row, "dtype": dtype, "program": program, "id": f"{row}/{dtype}/{program}"}
                )
    return configs


def clean_shm(before: set[str]) -> None:
    """Remove the /dev/shm files DeepSpeed's CPU all-reduce left (~66 MB per rank)."""
    for leftover in set(glob.glob("/dev/shm/deepspeed*")) - before:
        with contextlib.suppress(OSError):
            os.remove(leftover)


def run_config(config: dict, args: argparse.Namespace, prepared: dict, work: Path, round_index: int) -> dict:
    backbone, processes, stage = ROWS[config["row"]]
    model_path = prepared["models"][backbone]
    tag = f"r{round_index}-{config['id'].replace('/', '-')}"
    result_path, log_path = work / f"{tag}.out.json", work / f"{tag}.log"
    if result_path.exists():
        return json.loads(result_path.read_text())  # measured by an earlier, interrupted invocation
    threads = max(1, args.threads // processes)
    env = bench_rm.worker_env(threads, args.omp_wait_policy)
    env.update(DS_ACCELERATOR="cpu")
    launcher = []
    if processes > 1:
        port = str(29500 + 10 * round_index + len(tag) % 10)
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={port}"]
    load = os.getloadavg()[0]
    before = set(glob.glob("/dev/shm/deepspeed*"))
    if config["program"] == "train_rm":
        output = work / tag
        flags = train_rm_flags(args, model_path, config["dtype"], processes, stage)
        command = [sys.executable, *launcher, "-m", "training.train_rm", *flags, "--output_dir", str(output)]
    else:
        job = {
            "mode": "trl",
            "dtype": config["dtype"],
            "pairs_path": prepared["pairs_path"],
            "model_path": model_path,
            "pad_token_id": prepared["pad_token_id"],
            "vocab_size": prepared["vocab_size"],
            "pad_token": prepared["pad_token"],
            "threads": threads,
            "warmup": 0,
            "steps": args.max_steps,
            "pairs_per_step": args.pairs_per_step,
            "per_device_pairs": args.pairs_per_step // processes,
            "max_seq_len": args.max_seq_len,
            "learning_rate": 1e-5,
            "result_path": str(work / f"{tag}.trl.json"),
        }
        job_path = work / f"{tag}.job.json"
        job_path.write_text(json.dumps(job))
        command = [prepared["trl_python"], *launcher, str(bench_rm.TRL_WORKER), str(job_path)]
    code, peak_rss_mib, wall = bench_rm.run_subprocess(command, env, args.timeout, log_path)
    clean_shm(before)
    if code != 0:
        raise RuntimeError(
            f"{config['id']} (round {round_index}) exited {code}:\n{log_path.read_text()[-3000:]}"
        )
    if config["program"] == "train_rm":
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        elapsed = {record["step"]: record["elapsed_s"] for record in records if "loss" in record}
        timed_s = elapsed[args.max_steps] - (elapsed[args.timed_from] if args.timed_from else 0.0)
        layout = [line for line in log_path.read_text().splitlines() if "layout" in line.lower()][:1]
        extra = {"layout_line": layout[0][-300:] if layout else None}
        for weights in output.glob("*.safetensors"):
            weights.unlink()  # 0.5 GB a run; the metrics are what is kept
    else:
        steps = json.loads(Path(job["result_path"]).read_text())["step_seconds"]
        timed_s = sum(steps[args.timed_from : args.max_steps])
        extra = {"step_seconds": [round(step, 3) for step in steps]}
    timed_pairs = (args.max_steps - args.timed_from) * args.pairs_per_step
    result = {
        "pairs_per_s": timed_pairs / timed_s,
        "timed_s": round(timed_s, 2),
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_rss_mib, 1),
        "load_before": load,
        **extra,
    }
    result_path.write_text(json.dumps(result))
    return result


def measure_peak(args: argparse.Namespace, work: Path, round_index: int) -> dict:
    return bench_rm.measure_peak(args, work, round_index)


def aggregate(configs: list[dict], rounds: list[dict], rows: dict[str, list[str]]) -> list[dict]:
    table = []
    for row, dtypes in rows.items():
        for dtype in dtypes:
            ours = [r["results"].get(f"{row}/{dtype}/train_rm") for r in rounds]
            trl = [r["results"].get(f"{row}/{dtype}/trl") for r in rounds]
            ratios = [a["pairs_per_s"] / b["pairs_per_s"] for a, b in zip(ours, trl, strict=True) if a and b]
            if not ratios:
                continue
            table.append(
                {
                    "row": row,
                    "dtype": dtype,
                    "train_rm_pairs_per_s": [round(a["pairs_per_s"], 3) for a in ours if a],
                    "trl_pairs_per_s": [round(b["pairs_per_s"], 3) for b in trl if b],
                    "ratios": [round(ratio, 2) for ratio in ratios],
                    "median_ratio": round(statistics.median(ratios), 2),
                    "train_rm_peak_rss_mib": max(a["peak_rss_mib"] for a in ours if a),
                    "trl_peak_rss_mib": max(b["peak_rss_mib"] for b in trl if b),
                }
            )
    return table


def markdown(report: dict) -> str:
    args = report["args"]
    lines = [
        f"# End-to-end train_rm vs TRL {report['trl_versions']['trl']} ({report['name']})",
        "",
        f"`{report['command']}`  ",
        f"{report['date']}, {report['machine']}; hh-rlhf harmless-base (first 2,012 lines), "
        f"{args['pairs_per_step']} pairs per step, max_seq_len {args['max_seq_len']}, {args['threads']} threads "
        f"in all, steps {args['timed_from'] + 1}-{args['max_steps']} timed, {len(report['rounds'])} round(s).",
        "",
        "| row | dtype | train_rm pairs/s (per round) | TRL pairs/s (per round) | ratio per round | median ratio |"
        " peak RSS MiB train_rm / TRL |",
        "| --- | --- | --- | --- | --- | ---: | --- |",
    ]
    for entry in report["table"]:
        lines.append(
            f"| {entry['row']} | {entry['dtype']} | {', '.join(map(str, entry['train_rm_pairs_per_s']))} | "
            f"{', '.join(map(str, entry['trl_pairs_per_s']))} | {', '.join(map(str, entry['ratios']))} | "
            f"**{entry['median_ratio']}x** | {entry['train_rm_peak_rss_mib']:.0f} / {entry['trl_peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        "| round | matmul peak fp32 / bf16 GFLOP/s | 1-min load before each run |",
        "| --- | --- | --- |",
    ]
    for index, round_ in enumerate(report["rounds"], 1):
        peak = round_["peak"]["gflops"]
        loads = ", ".join(f"{r['load_before']:.1f}" for r in round_["results"].values())
        lines.append(f"| {index} | {peak['fp32']:.0f} / {peak['bf16']:.0f} | {loads} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", default="e2e-cpu-2threads")
    parser.add_argument(
        "--rows", nargs="+", default=["smollm2"], help=f"ROW or ROW:DTYPE; rows: {', '.join(ROWS)}"
    )
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max_steps", type=int, default=14)
    parser.add_argument("--timed_from", type=int, default=4, help="Steps after this one are timed.")
    parser.add_argument("--pairs_per_step", type=int, default=4)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="Threads in all (split over processes).")
    parser.add_argument("--omp_wait_policy", default="PASSIVE")
    parser.add_argument("--matmul_size", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--trl_python", default=str(bench_rm.VENV_ROOT / "trl116" / "bin" / "python"))
    parser.add_argument("--work_dir", default=None, help="Keep runs here; rerunning resumes.")
    parser.add_argument("--output_dir", default=str(bench_rm.RESULTS_DIR))
    args = parser.parse_args(argv)
    try:
        args.row_dtypes = row_dtypes(args.rows, args.dtypes)
    except ValueError as error:
        parser.error(str(error))
    if args.pairs_per_step % 2:
        parser.error("--pairs_per_step must be even (the 2-process rows split it)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir or f"/tmp/rewardspeed-{args.name}")
    work.mkdir(parents=True, exist_ok=True)
    trl_python, versions = bench_rm.find_trl_python(args.trl_python)
    prepared = prepare(args, work)
    prepared["trl_python"] = trl_python
    configs = configurations(args)
    rounds = []
    for round_index in range(1, args.rounds + 1):
        shift = (round_index - 1) % len(configs)
        ordered = configs[shift:] + configs[:shift]  # rotate: no configuration always runs first
        results = {}
        for config in ordered:
            results[config["id"]] = run_config(config, args, prepared, work, round_index)
            print(f"round {round_index} {config['id']}: {results[config['id']]['pairs_per_s']:.3f} pairs/s "
                  f"(load {results[config['id']]['load_before']:.1f})", flush=True)  # fmt: skip
        rounds.append({"peak": measure_peak(args, work, round_index), "results": results})
    report = {
        "name": args.name,
        "command": "python benchmarks/bench_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "trl_versions": versions,
        "args": vars(args),
        "timed_pairs": prepared["timed_pairs"],
        "rounds": rounds,
        "table": aggregate(configs, rounds, args.row_dtypes),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
