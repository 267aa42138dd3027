"""Reward-server throughput on this machine: `python -m training.serve` vs a transformers pipeline server loop vs
OpenRLHF-style per-request padding, under GRPO-shaped traffic on 127.0.0.1.

    python benchmarks/bench_serve.py                                  # bounded default (~20-30 min on 2 cores)
    python benchmarks/bench_serve.py --name smoke --concurrency 4 --requests_per_client 1 --rounds 1 --prompts 8

Traffic: hh-rlhf harmless-base test prompts (`--prompts`, the first rows of the file), each with G = 8
responses: its chosen and rejected final turns and 6 final turns of other conversations (seeded), one
POST /score `{"prompt", "responses"}` per group, as GRPO scores a rollout. C clients (`--concurrency`, default
16 and 64) start together and each sends `--requests_per_client` groups one after another (a rollout batch
scored as it arrives); no client sends a new request after `--max_seconds`. Throughput = responses answered /
wall time from the first request to the last answer; latency per request (p50, p99).

Servers (`serve_baselines.py` for the two baselines), each in its own process on 127.0.0.1, loaded once, idle
while the others run: the same model folder (the packaged SmolLM2-135M with a random value head, saved once in
the work folder), the same dtype and torch threads, requests answered by one model thread each:
    rewardspeed   python -m training.serve (micro-batches across requests, each prompt computed once, packed)
    pipeline      transformers pipeline("text-classification", function_to_apply="none"), once per request
    openrlhf      OpenRLHF serve_rm's recipe: a request's texts left-padded into one forward, no cross-request
                  batching
All three score the same token sequences (prompt + response + EOS); errors are non-200 answers or a wrong
number of rewards, and the rewards every server gave for the same requests are compared (max |difference|).
Rounds run every (server, concurrency) once, in rotated order; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
HH_PATH = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
GROUP_SIZE = 8
SERVERS = ("rewardspeed", "pipeline", "openrlhf")


def build_groups(count: int, seed: int) -> list[dict]:
    """`count` GRPO groups from hh-rlhf: a prompt, its chosen and rejected response and 6 others' responses."""
    from training.data import read_preference_rows

    rows = read_preference_rows(f"{HH_PATH}[:{max(count, 2 * GROUP_SIZE)}]", skip_invalid_rows=True).rows
    pool = [response for row in rows for response in (row.chosen, row.rejected)]
    rng = random.Random(seed)
    groups = []
    for row in rows[:count]:
        others = [
            response
            for response in rng.sample(pool, GROUP_SIZE + 2)
            if response not in (row.chosen, row.rejected)
        ]
        groups.append(
            {"prompt": row.prompt, "responses": [row.chosen, row.rejected, *others[: GROUP_SIZE - 2]]}
        )
    return groups


def save_model(work: Path) -> str:
    """The packaged SmolLM2-135M with a seeded random value head, saved (hf layout) once into the work folder."""
    folder = work / "model"
    if (folder / "config.json").exists():
        return str(folder)
    from model_utils import create_critic_model, load_tokenizer
    from model_utils.checkpoint import save_reward_model
    from model_utils.default_model import default_model_path

    path = default_model_path()
    tokenizer = load_tokenizer(path)
    reward_model = create_critic_model(path, tokenizer, dropout=0.0)
    return save_reward_model(reward_model, tokenizer, str(folder), "hf")


class ServerProcess:
    """One server in its own process; its log names the port."""

    def __init__(self, name: str, command: list[str], log: Path, environment: dict) -> None:
        self.name, self.log = name, log
        with open(log, "w") as output:
            self.process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT
            )
        self.port = None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited {self.process.returncode}: {self.log.read_text()[-3000:]}"
                )
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log.read_text(errors="replace"))
            if found:
                self.port = int(found.group(1))
                try:
                    if post(self.port, "GET", "/health", None, 30)[0] == 200:
                        return
                except OSError:
                    pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} not ready in {timeout} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()


def post(port: int, method: str, path: str, body: dict | None, timeout: float, connection=None):
    """(status, JSON answer) over a (kept-alive) connection to 127.0.0.1:port."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        if own:
            connection.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc): less sensitive than wall time to
    the other jobs of a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(
    port: int, groups: list[dict], concurrency: int, per_client: int, max_seconds: float, timeout: float
):
    """C clients, each sending `per_client` groups in turn (client i takes groups i, i + C, ...)."""
    latencies, errors, answers = [], [], {}
    lock = threading.Lock()
    start_barrier = threading.Barrier(concurrency)
    started = time.monotonic()

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        start_barrier.wait()
        for step in range(per_client):
            if time.monotonic() - started > max_seconds:
                break
            request = (index + step * concurrency) % len(groups)
            sent = time.monotonic()
            try:
                status, answer = post(port, "POST", "/score", groups[request], timeout, connection)
                ok = status == 200 and len(answer.get("rewards", [])) == len(groups[request]["responses"])
            except (OSError, ValueError) as error:
                status, answer, ok = None, {"error": repr(error)}, False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            with lock:
                latencies.append(time.monotonic() - sent)
                if ok:
                    answers[request] = answer["rewards"]
                else:
                    errors.append({"request": request, "status": status, "answer": str(answer)[:300]})
        connection.close()

    threads = [threading.Thread(target=client, args=(index,)) for index in range(concurrency)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - began
    responses = sum(len(groups[request]["responses"]) for request in answers)
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "responses": responses,
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": round(wall, 3),
        "responses_per_s": round(responses / wall, 3),
        "p50_latency_s": round(statistics.median(ordered), 3) if ordered else None,
        "p99_latency_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)
        if ordered
        else None,
        "answers": {str(request): rewards for request, rewards in answers.items()},
    }


def start_servers(args, model: str, work: Path) -> dict[str, ServerProcess]:
    environment = dict(
        os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    if args.omp_wait_policy:
        environment["OMP_WAIT_POLICY"] = args.omp_wait_policy
    common = [
        "--model_name_or_path",
        model,
        "--port",
        "0",
        "--num_threads",
        str(args.threads),
        "--dtype",
        args.dtype,
    ]
    commands = {
        "rewardspeed": [
            sys.executable,
            "-m",
            "training.serve",
            *common,
            "--max_seq_len",
            str(args.max_seq_len),
        ]
        + ["--max_batch_tokens", str(args.max_batch_tokens), "--max_wait_ms", str(args.max_wait_ms)]
        + [
            "--request_timeout_s",
            str(args.timeout),
            "--max_queue",
            str(max(4096, 8 * max(args.concurrency))),
        ],
        "pipeline": [sys.executable, str(BENCH_DIR / "serve_baselines.py"), "--mode", "pipeline", *common],
        "openrlhf": [sys.executable, str(BENCH_DIR / "serve_baselines.py"), "--mode", "openrlhf", *common]
        + ["--max_len", str(args.max_seq_len)],
    }
    servers = {}
    for name in args.servers:  # one at a time: start-up is mostly imports and loading
        servers[name] = ServerProcess(name, commands[name], work / f"{name}.log", environment)
        servers[name].wait_ready(args.start_timeout)
    return servers


def agreement(runs: list[dict]) -> dict:
    """Max |difference| between every server's rewards and rewardspeed's, over the requests both answered."""
    reference: dict[str, list[float]] = {}
    for run in runs:
        if run["server"] == "rewardspeed":
            reference.update(run["answers"])
    differences = {}
    for run in runs:
        shared = [key for key in run["answers"] if key in reference]
        if run["server"] != "rewardspeed" and shared:
            difference = max(
                abs(a - b) for key in shared for a, b in zip(run["answers"][key], reference[key], strict=True)
            )
            differences[run["server"]] = max(differences.get(run["server"], 0.0), difference)
    return differences


def per_round_ratios(
    runs: list[dict], name: str, concurrency: int, key: str, ours_over_theirs: bool
) -> list[float]:
    """rewardspeed's `key` over (or under) server `name`'s, round by round (runs that saw the same load)."""
    ratios = []
    for round_index in sorted({run["round"] for run in runs}):
        pair = {
            run["server"]: run[key]
            for run in runs
            if run["concurrency"] == concurrency and run["round"] == round_index
        }
        if "rewardspeed" in pair and name in pair:
            ours, theirs = pair["rewardspeed"], pair[name]
            ratios.append(ours / theirs if ours_over_theirs else theirs / ours)
    return ratios


def summarise(runs: list[dict], args) -> dict:
    """Per (server, concurrency): medians over rounds, and rewardspeed's per-round ratios against it."""
    table = {}
    for concurrency in args.concurrency:
        for name in args.servers:
            mine = [run for run in runs if run["server"] == name and run["concurrency"] == concurrency]
            row = {
                key: statistics.median(run[key] for run in mine)
                for key in ("responses_per_s", "p50_latency_s", "p99_latency_s", "server_cpu_s_per_response")
            }
            row.update(
                errors=sum(run["errors"] for run in mine), responses=sum(run["responses"] for run in mine)
            )
            if name != "rewardspeed":
                speedups = per_round_ratios(runs, name, concurrency, "responses_per_s", True)
                savings = per_round_ratios(runs, name, concurrency, "server_cpu_s_per_response", False)
                row.update(
                    rewardspeed_speedup=round(statistics.median(speedups), 2),
                    per_round_speedups=[round(ratio, 2) for ratio in speedups],
                    rewardspeed_cpu_saving=round(statistics.median(savings), 2),
                    per_round_cpu_savings=[round(ratio, 2) for ratio in savings],
                )
            table[f"{name}@{concurrency}"] = row
    return table


def markdown(result: dict) -> str:
    lines = [
        f"# Reward server, {result['args']['dtype']}, {result['args']['threads']} threads ({result['date']})",
        "",
        f"`{result['command']}`",
        "",
        "| server | clients | responses/s | p50 latency (s) | p99 latency (s) | errors | server CPU s / response "
        "| rewardspeed: x responses/s | rewardspeed: / CPU per response |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, row in result["table"].items():
        name, concurrency = key.split("@")
        speedup, saving = row.get("rewardspeed_speedup"), row.get("rewardspeed_cpu_saving")
        lines.append(
            f"| {name} | {concurrency} | {row['responses_per_s']:.2f} | {row['p50_latency_s']:.1f} | "
            f"{row['p99_latency_s']:.1f} | {row['errors']} | {row['server_cpu_s_per_response']:.3f} | "
            f"{'' if speedup is None else f'{speedup:.2f}x'} | {'' if saving is None else f'{saving:.2f}x'} |"
        )
    per_round = "; ".join(
        f"{key} {row['per_round_speedups']} / {row['per_round_cpu_savings']}"
        for key, row in result["table"].items()
        if "per_round_speedups" in row
    )
    lines += [
        "",
        f"Medians over rounds; ratios are medians of per-round ratios (per round: {per_round}).",
        f"Max |reward difference| from rewardspeed's on the same requests: {result['agreement']}.",
        f"Traffic: {result['traffic']}. Load average at the end: {result['machine']['load_average']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="serve-cpu")
    parser.add_argument("--work_dir", default="/tmp/rewardspeed-bench-serve")
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--requests_per_client", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=128, help="distinct GRPO groups (hh prompts)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max_seconds", type=float, default=120.0, help="no new request after this, per run")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="client (and server) timeout per request"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--max_seq_len", type=int, default=1024)
    parser.add_argument("--max_batch_tokens", type=int, default=4096)
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    parser.add_argument("--start_timeout", type=float, default=900.0)
    parser.add_argument(
        "--omp_wait_policy", default="PASSIVE", help="'' leaves it unset (see benchmarks/README)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not HH_PATH.exists():
        print(f"bench_serve: {HH_PATH} not found; nothing to measure", file=sys.stderr)
        sys.exit(0)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    groups = build_groups(args.prompts, args.seed)
    model = save_model(work)
    servers = start_servers(args, model, work)
    runs = []
    try:
        for server in servers.values():  # warm-up: first-call costs are not measured
            run_load(server.port, groups, 2, 1, args.max_seconds, args.timeout)
        configurations = [(name, c) for c in args.concurrency for name in args.servers]
        for round_index in range(args.rounds):
            shift = round_index % len(configurations)
            for name, concurrency in configurations[shift:] + configurations[:shift]:
                cpu_before = cpu_seconds(servers[name].process.pid)
                result = run_load(
                    servers[name].port,
                    groups,
                    concurrency,
                    args.requests_per_client,
                    args.max_seconds,
                    args.timeout,
                )
                cpu = cpu_seconds(servers[name].process.pid) - cpu_before
                result["server_cpu_s_per_response"] = round(cpu / max(result["responses"], 1), 4)
                runs.append({"server": name, "concurrency": concurrency, "round": round_index, **result})
                print(
                    f"round {round_index} {name:12s} C={concurrency:3d}: {result['responses_per_s']:.2f} responses/s, "
                    f"p50 {result['p50_latency_s']} s, p99 {result['p99_latency_s']} s, errors {result['errors']}, "
                    f"server CPU {result['server_cpu_s_per_response']} s/response",
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.stop()
    prompt_chars = statistics.mean(len(group["prompt"]) for group in groups)
    response_chars = statistics.mean(len(r) for group in groups for r in group["responses"])
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "args": vars(args),
        "traffic": f"{len(groups)} hh-rlhf harmless-base test prompts x {GROUP_SIZE} responses (prompt {prompt_chars:.0f}, "
        f"response {response_chars:.0f} characters on average)",
        "table": summarise(runs, args),
        "agreement": {name: f"{value:.2e}" for name, value in agreement(runs).items()},
        "runs": [{key: value for key, value in run.items() if key != "answers"} for run in runs],
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS_DIR / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
