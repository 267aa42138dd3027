"""Data loading at scale: time to the first batch and peak RSS per rank, this project against TRL's `datasets.map`.

    python benchmarks/bench_data.py                                  # 10k, 100k, 500k pairs; 1 and 2 ranks
    python benchmarks/bench_data.py --sizes 2000 --name smoke        # a quick check of the harness

The data: hh-rlhf harmless-base test rows (`../shared/data`, the valid ones), repeated to N pairs, row i with
"i: " written after its first "Human: " so that no two rows are the same text. The tokenizer: SmolLM2-135M's
(the project's default model), max_seq_len 512.

Paths, each run as 1 process or as 2 ranks of one node (torchrun, a gloo process group), each twice: `cold`
(empty cache) then `warm` (the same command again, its cache kept):
    project        `load_preference_data(..., cache_dir=...)`: the ranks of the node share one tokenisation into
                   the memory-mapped cache (`training/data/cache.py`); then the first micro-batch is collated
                   (the trainer's packed, prompt-shared collator on this rank's first micro-batch of 8)
    trl            what TRL's `RewardTrainer` does to a dataset before training, in its own venv
                   (`trl_data_worker.py`): `datasets.load_dataset("json")`, `RewardTrainer._prepare_dataset`
                   (add EOS, tokenise with `datasets.map`, drop pairs over max_length), collate 8 pairs; 2 ranks:
                   under TRL's own `global_then_local_main_first`, the datasets cache is its reuse
    baseline       (`--baseline_code DIR`, e.g. `git archive main`) the same project worker on older code

Per rank: `data_s` = the data step (read, validate, split, tokenise or open the cache); `first_batch_s` = from
launching the command to this rank's first collated micro-batch (interpreter start and imports included);
`peak_rss` = the process's `ru_maxrss` then (imports and the tokenizer included); `bytes_per_token` =
peak RSS / tokens of the data set (prompt + chosen + rejected, prompt once, after truncation: the same count for
every path). Tables give the slowest rank and the largest RSS. A configuration running past `--timeout_s` is
stopped and reported as such. The tokenizer's own thread pool is held to one thread per rank
(`RAYON_NUM_THREADS=1`, as `OMP_NUM_THREADS`): on this 2-core machine the 2-rank runs then use a core per rank,
and the 1-rank run one core, so the ratio measures the sharing, not the tokenizer's threads.

Results: `results/<name>.json` (every rank of every run) and `results/<name>.md` (the table); `--work_dir` keeps
the data and per-run results, so rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
TRL_WORKER = BENCH_DIR / "trl_data_worker.py"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
HH_PATH = SHARED_DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz"
TRL_PYTHON = Path.home() / ".cache" / "rewardspeed" / "venvs" / "trl116" / "bin" / "python"
MICRO_BATCH = 8
SEED = 1234
GIB = 1 << 30


# --- worker: one rank of one project configuration -------------------------------------------------------------


def run_project_worker(job: dict) -> None:
    """Load the data as the trainer does, collate this rank's first micro-batch, write `rank<r>.json`."""
    started_at = time.time()
    sys.path.insert(0, job["code_dir"])
    import inspect
    import resource

    import torch.distributed as dist

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if ranks > 1 else 0

    from transformers import AutoTokenizer

    from training.data import load
    from training.data.collate import PackedCollator
    from training.sampling import epoch_batches

    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer_dir"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    phases = {"start_s": started_at - job["launched_at"], "ready_s": time.time() - job["launched_at"]}
    if hasattr(load, "_tokenise_shard"):  # time the tokenisation itself (this project's code only)
        tokenise_shard = load._tokenise_shard

        def timed(*args, **kwargs):
            start, cpu_start = time.time(), time.process_time()
            try:
                return tokenise_shard(*args, **kwargs)
            finally:
                phases["tokenise_s"] = phases.get("tokenise_s", 0.0) + time.time() - start
                phases["tokenise_cpu_s"] = phases.get("tokenise_cpu_s", 0.0) + time.process_time() - cpu_start

        load._tokenise_shard = timed
    kwargs = {"skip_invalid_rows": True}
    if "cache_dir" in inspect.signature(load.load_preference_data).parameters:
        kwargs["cache_dir"] = job["cache_dir"]
    start, cpu_start = time.time(), time.process_time()
    data = load.load_preference_data([job["data_path"]], tokenizer, job["max_seq_len"], seed=SEED, **kwargs)
    data_s, data_cpu_s = time.time() - start, time.process_time() - cpu_start
    indices = epoch_batches(len(data.train), 0, SEED, MICRO_BATCH, 1, rank, ranks)[0]
    collate = PackedCollator(tokenizer.pad_token_id, None, share_prompt=True, segment_attention=True)
    batch = collate([data.train[index] for index in indices])
    first_batch_at = time.time()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    examples = [*data.train, *data.eval] if isinstance(data.train, list) else None
    tokens = (
        data.train.num_tokens + data.eval.num_tokens
        if examples is None
        else sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    )
    result = {
        "rank": rank,
        "data_s": data_s,
        "data_cpu_s": data_cpu_s,
        "first_batch_s": first_batch_at - job["launched_at"],
        "peak_rss": peak_rss,
        "rss_before_data": rss_before,
        "tokens": tokens,
        "pairs": len(data.train) + len(data.eval),
        "batch_tokens": int(batch["input_ids"].numel()),
        **phases,
    }
    Path(job["out_dir"], f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    if ranks > 1:
        dist.destroy_process_group()


# --- the data ---------------------------------------------------------------------------------------------------


def valid_hh_lines() -> list[dict]:
    """The hh-rlhf harmless-base test rows this project accepts (a few have an empty chosen response)."""
    sys.path.insert(0, str(REPO_ROOT))
    from training.data.rows import read_preference_rows

    source = read_preference_rows(str(HH_PATH), skip_invalid_rows=True)
    valid = {int(row.origin.rsplit(" line ", 1)[1]) for row in source.rows}
    with gzip.open(HH_PATH, "rt", encoding="utf-8") as file:
        return [json.loads(line) for number, line in enumerate(file, start=1) if number in valid]


def synthesise(num_pairs: int, path: Path) -> Path:
    """`num_pairs` hh-shaped pairs: the valid rows repeated, row i with "i: " after its first "Human: "."""
    if path.exists():
        return path
    rows = valid_hh_lines()
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as file:
        for index in range(num_pairs):
            row = rows[index % len(rows)]
            marked = {
                key: row[key].replace("Human: ", f"Human: {index}: ", 1) for key in ("chosen", "rejected")
            }
            file.write(json.dumps(marked) + "\n")
    partial.rename(path)
    return path


def save_tokenizer(folder: Path) -> Path:
    """SmolLM2-135M's tokenizer with the project's pad token, saved where both environments can read it."""
    if not (folder / "tokenizer_config.json").exists():
        sys.path.insert(0, str(REPO_ROOT))
        from model_utils.default_model import default_model_path
        from model_utils.tokenizer import load_tokenizer

        load_tokenizer(default_model_path()).save_pretrained(folder)
    return folder


# --- running configurations ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def launch(path: str, ranks: int, job: dict, environment: dict, timeout_s: int) -> dict:
    """Run one configuration; returns {"ranks": [...per-rank results], "wall_s", "load": [before, after]}."""
    out_dir = Path(job["out_dir"])
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    job_path = out_dir / "job.json"
    job = {**job, "launched_at": time.time()}
    job_path.write_text(json.dumps(job), encoding="utf-8")
    python = str(TRL_PYTHON) if path == "trl" else sys.executable
    script = [str(TRL_WORKER)] if path == "trl" else [str(Path(__file__).resolve()), "--worker"]
    command = [python, *script, str(job_path)]
    if ranks > 1:
        port = f"--master_port={free_port()}"
        command = [python, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", port, *command[1:]]
    load_before = load_average()
    started = time.time()
    try:
        completed = subprocess.run(
            command, env=environment, capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT
        )
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "wall_s": time.time() - started, "load": [load_before, load_average()]}
    (out_dir / "log.txt").write_text(completed.stdout + completed.stderr, encoding="utf-8")
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {completed.returncode}:\n{completed.stderr[-4000:]}")
    results = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(ranks)]
    return {"ranks": results, "wall_s": time.time() - started, "load": [load_before, load_average()]}


def environment_for(path: str, cache_dir: Path, tokenizer_threads: int) -> dict:
    environment = dict(os.environ)
    environment.update(
        OMP_NUM_THREADS="1",
        RAYON_NUM_THREADS=str(tokenizer_threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH="" if path == "trl" else str(REPO_ROOT),
        HF_DATASETS_CACHE=str(cache_dir),  # TRL's cache (datasets'); the project's is in the job
    )
    return environment


def run_configuration(args, work: Path, size: int, path: str, ranks: int, tokenizer_dir: Path) -> dict:
    """Cold then warm run of one (size, path, ranks); each result kept in `work` (rerunning resumes)."""
    name = f"{size}-{path}-{ranks}"
    cache_dir = work / "caches" / name
    results = {}
    for run in ("cold", "warm") if path != "baseline" else ("cold",):
        saved = work / "results" / f"{name}-{run}.json"
        if saved.exists():
            results[run] = json.loads(saved.read_text())
            continue
        if run == "cold":
            shutil.rmtree(cache_dir, ignore_errors=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        job = {
            "code_dir": str(args.baseline_code if path == "baseline" else REPO_ROOT),
            "data_path": str(synthesise(size, work / f"hh-{size}.jsonl")),
            "tokenizer_dir": str(tokenizer_dir),
            "max_seq_len": args.max_seq_len,
            "cache_dir": str(cache_dir),
            "out_dir": str(work / "runs" / f"{name}-{run}"),
        }
        print(f"{name} {run} (load {load_average()}) ...", flush=True)
        result = launch(
            path, ranks, job, environment_for(path, cache_dir, args.tokenizer_threads), args.timeout_s
        )
        result.update(size=size, path=path, num_ranks=ranks, run=run)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(result), encoding="utf-8")
        results[run] = result
        print(f"  {summary_line(result)}", flush=True)
        if result.get("timed_out"):
            break
    if not args.keep_caches:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return results


# --- report ------------------------------------------------------------------------------------------------------


def worst(result: dict, tokens: int | None = None) -> dict:
    """The slowest rank's times and the largest RSS of a run; `tokens`: the data set's (prompt once), which a
    TRL run does not count."""
    ranks = result["ranks"]
    return {
        "ready_s": max(rank["ready_s"] for rank in ranks),
        "data_s": max(rank["data_s"] for rank in ranks),
        "data_cpu_s": max(rank["data_cpu_s"] for rank in ranks),
        "first_batch_s": max(rank["first_batch_s"] for rank in ranks),
        "peak_rss": max(rank["peak_rss"] for rank in ranks),
        "tokens": ranks[0].get("tokens", tokens),
        "pairs": ranks[0]["pairs"],
    }


def summary_line(result: dict) -> str:
    if result.get("timed_out"):
        return f"stopped after {result['wall_s']:.0f} s (load {result['load']})"
    summary = worst(result)
    return (
        f"data {summary['data_s']:.1f} s, first batch {summary['first_batch_s']:.1f} s, peak RSS "
        f"{summary['peak_rss'] / GIB:.2f} GiB (load {result['load']})"
    )


def report(runs: list[dict], args) -> str:
    lines = [
        f"# Data loading: {args.name}",
        "",
        f"`{' '.join([Path(sys.executable).name, 'benchmarks/bench_data.py', *sys.argv[1:]])}` on "
        f"{platform.node()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}. SmolLM2-135M tokenizer, "
        f"max_seq_len {args.max_seq_len}, hh-rlhf harmless-base rows repeated (`benchmarks/bench_data.py`).",
        "",
        "| pairs | tokens | path | ranks | run | start-up s | data step s | data CPU s / rank | first batch s | "
        "peak RSS / rank | bytes / token | load avg |",
        "| ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    tokens = {
        result["size"]: result["ranks"][0]["tokens"]
        for result in runs
        if "ranks" in result and "tokens" in result["ranks"][0]
    }
    for result in runs:
        label = [f"{result['size']:,}", "", result["path"], str(result["num_ranks"]), result["run"]]
        load = f"{result['load'][0]:.1f}-{result['load'][1]:.1f}"
        if result.get("timed_out"):
            stopped = f"stopped at {result['wall_s']:.0f} s"
            lines.append("| " + " | ".join([*label, "", stopped, "", "", "", "", load]) + " |")
            continue
        summary = worst(result, tokens.get(result["size"]))
        label[1] = f"{summary['tokens'] / 1e6:.1f}M" if summary["tokens"] else "?"
        cells = [
            f"{summary['ready_s']:.1f}",
            f"{summary['data_s']:.1f}",
            f"{summary['data_cpu_s']:.1f}",
            f"{summary['first_batch_s']:.1f}",
            f"{summary['peak_rss'] / GIB:.2f} GiB",
            f"{summary['peak_rss'] / summary['tokens']:.0f}" if summary["tokens"] else "",
            load,
        ]
        lines.append("| " + " | ".join([*label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--paths", nargs="+", default=["project", "trl"], choices=["project", "trl", "baseline"]
    )
    parser.add_argument("--baseline_code", type=Path, help="a checkout of older code for the baseline path")
    parser.add_argument("--baseline_sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--tokenizer_threads", type=int, default=1)
    parser.add_argument("--timeout_s", type=int, default=900, help="stop a configuration after this long")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/rewardspeed-bench-data"))
    parser.add_argument("--keep_caches", action="store_true")
    parser.add_argument("--name", default="data-cpu")
    args = parser.parse_args(argv)
    if "baseline" in args.paths and args.baseline_code is None:
        parser.error("--paths baseline needs --baseline_code")
    if "trl" in args.paths and not TRL_PYTHON.exists():
        parser.error(f"no TRL venv at {TRL_PYTHON}")
    work = args.work_dir / args.name
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = save_tokenizer(work / "tokenizer")
    runs = []
    for size in args.sizes:
        for path in args.paths:
            if path == "baseline" and size not in args.baseline_sizes:
                continue
            for ranks in args.ranks if path != "baseline" else [1]:
                results = run_configuration(args, work, size, path, ranks, tokenizer_dir)
                runs += results.values()
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / f"{args.name}.json").write_text(json.dumps(runs, indent=1), encoding="utf-8")
        (RESULTS_DIR / f"{args.name}.md").write_text(report(runs, args), encoding="utf-8")
    print(report(runs, args))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        run_project_worker(json.loads(Path(sys.argv[2]).read_text(encoding="utf-8")))
    else:
        main()
