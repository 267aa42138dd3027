"""Reward-model training speed on this machine: rewardspeed vs DeepSpeed-Chat step-2 semantics vs TRL.

    python benchmarks/bench_rm.py                                   # bounded default (~20 min on 2 cores)
    python benchmarks/bench_rm.py --name smoke --rounds 1 --warmup 1 --steps 1 --max_seq_len 64
    python benchmarks/bench_rm.py --rounds 3 --warmup 3 --steps 5   # longer, less noisy

One model (SmolLM2-135M, the project's default model) and the same tokenised pairs go through every
configuration; each configuration runs in its own subprocess (so its peak RSS is its own), for `--warmup`
untimed and `--steps` timed optimizer steps of `--pairs_per_step` pairs (forward + backward + grad clipping
+ AdamW). Every round runs every configuration once (the order rotates between rounds), so per-round ratios
compare runs that saw the same background load; the report gives medians of those ratios.

Configurations, per precision (fp32, bf16) and data set:
    plain / pack / share / pack+share  this project: `PaddedCollator`, or `PackedCollator` with packing
                                       and/or prompt sharing, rewards from one forward (`batch_rewards`)
    dschat                             DeepSpeed-Chat step 2: every sequence padded to `--max_seq_len`,
                                       chosen + rejected in one forward, per-token values, divergence-span loss
    trl                                TRL `RewardTrainer` at matched settings (AdamW, precision, pairs per
                                       step, threads, no gradient checkpointing), in its own venv
    trl-defaults (bf16 only)           TRL `RewardTrainer` as TRL recommends: bf16 + gradient checkpointing

The project configurations run in a plain torch loop in one process (no DeepSpeed engine: single-process
throughput is what is measured, and ZeRO stage 0 on one process adds no work to a step). bf16 here means
bf16 weights and activations with an fp32 master copy for AdamW (what DeepSpeed's bf16 mode does); TRL's bf16
is the Trainer's autocast over fp32 weights.

Effective MFU = 6 * (non-embedding parameters) * (real tokens of chosen and rejected, prompt counted twice)
/ step time / matmul peak; the "+attn" variant adds causal attention 6 * layers * attention width * T^2 per
sequence. The peak is the best of large square matmuls (fp32 or bf16) timed on the same threads in each
round. Sharing and packing skip work that the formula still counts, so effective MFU can exceed what the
hardware does.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
TRL_WORKER = BENCH_DIR / "trl_worker.py"
RESULTS_DIR = BENCH_DIR / "results"
if str(REPO_ROOT) not in sys.path:  # the project's packages, also when it is not pip-installed
    sys.path.insert(0, str(REPO_ROOT))
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
HH_PATH = SHARED_DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz"
ALPACA_PATH = SHARED_DATA / "alpaca-eval-gpt4" / "annotations.json"
HH_TRAIN_ROWS = 2012  # the shared split convention: the first 2,012 lines are the training split
VENV_ROOT = Path.home() / ".cache" / "rewardspeed" / "venvs"
PROJECT_MODES = ("plain", "pack", "share", "pack+share", "dschat")
TRL_MODES = ("trl", "trl-defaults")
ALL_MODES = PROJECT_MODES + TRL_MODES


# --- worker: one project configuration in this process ----------------------------------------------------


def mode_layout(mode: str):
    """The batch layout a mode trains with (as `training.layout.choose_layout` picks it for an sdpa backbone)."""
    from training.layout import MASK, SEGMENTS, BatchLayout

    layouts = {
        "plain": BatchLayout(),
        "dschat": BatchLayout(),
        "pack": BatchLayout(packing=True, attention=SEGMENTS),
        "share": BatchLayout(
            share_prompt=True, attention=MASK
        ),  # one sequence per row, padded to the longest
        "pack+share": BatchLayout(packing=True, share_prompt=True, attention=SEGMENTS),
    }
    if mode not in layouts:
        raise ValueError(f"not a project mode: {mode}")
    return layouts[mode]


def make_collator(mode: str, pad_token_id: int, max_seq_len: int):
    """The collator a mode trains with; DeepSpeed-Chat pads every sequence to max_seq_len."""
    from training.data.collate import PaddedCollator

    if mode == "dschat":
        return PaddedCollator(pad_token_id, pad_to_multiple_of=max_seq_len)
    return mode_layout(mode).collator(pad_token_id)


def step_loss(reward_model, batch: dict, mode: str):
    """The training loss of one collated batch, as the project's trainer computes it for that mode."""
    from training.layout import batch_rewards
    from training.losses import divergence_span_loss, pairwise_loss

    if mode == "dschat":
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        values = reward_model(input_ids, attention_mask, return_values=True).float()
        chosen_values, rejected_values = values.chunk(2)
        chosen_ids, rejected_ids = input_ids.chunk(2)
        chosen_mask, rejected_mask = attention_mask.chunk(2)
        return divergence_span_loss(
            chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_mask, rejected_mask
        )
    return pairwise_loss(*batch_rewards(reward_model, batch, mode_layout(mode)).chunk(2))


def run_project_worker(job: dict) -> dict:
    """Train `warmup + steps` optimizer steps of one project configuration; returns per-step seconds."""
    import torch

    torch.set_num_threads(job["threads"])
    from model_utils import create_critic_model, load_tokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
    pairs = [json.loads(line) for line in Path(job["pairs_path"]).read_text().splitlines()]
    tokenizer = load_tokenizer(job["model_path"])
    if tokenizer.pad_token_id != job["pad_token_id"]:
        raise RuntimeError(
            f"pad token id {tokenizer.pad_token_id} != {job['pad_token_id']} of the prepared data"
        )
    torch.manual_seed(1234)
    reward_model = create_critic_model(job["model_path"], tokenizer, dtype=dtype)
    torch.nn.init.normal_(reward_model.v_head.weight, std=1.0 / (reward_model.v_head.in_features + 1) ** 0.5)
    reward_model.train()
    attention = reward_model.config._attn_implementation
    if job["mode"] in ("pack", "pack+share"):
        from model_utils.segment_attention import use_segment_attention

        use_segment_attention(reward_model)
    parameters = [parameter for parameter in reward_model.parameters() if parameter.requires_grad]
    # bf16: an fp32 master copy holds the optimizer's state and update, as DeepSpeed's bf16 mode does.
    master = (
        [parameter.detach().float().requires_grad_() for parameter in parameters]
        if dtype != torch.float32
        else None
    )
    # As the trainer builds it (training.train_rm.build_optimizer): torch's fused AdamW.
    optimizer = torch.optim.AdamW(master or parameters, lr=job["learning_rate"], fused=True)
    collator = make_collator(job["mode"], tokenizer.pad_token_id, job["max_seq_len"])
    per_step = job["pairs_per_step"]
    step_seconds, computed_tokens, losses = [], [], []
    for step in range(job["warmup"] + job["steps"]):
        start = time.perf_counter()
        batch = collator(pairs[step * per_step : (step + 1) * per_step])
        loss = step_loss(reward_model, batch, job["mode"])
        loss.backward()
        if master is None:
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        else:
            for master_parameter, parameter in zip(master, parameters, strict=True):
                master_parameter.grad = parameter.grad.float()
                parameter.grad = None
            torch.nn.utils.clip_grad_norm_(master, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if master is not None:
            with torch.no_grad():
                for master_parameter, parameter in zip(master, parameters, strict=True):
                    parameter.copy_(master_parameter)
        step_seconds.append(time.perf_counter() - start)
        computed_tokens.append(batch["input_ids"].numel())
        losses.append(loss.item())
    return {
        "step_seconds": step_seconds,
        "computed_tokens": computed_tokens,
        "losses": losses,
        "threads": torch.get_num_threads(),
        "attn_implementation": attention,
    }


def run_matmul_peak(threads: int, size: int, repeats: int) -> dict:
    """Best achieved GFLOP/s of `size x size` matmuls in fp32 and bf16 on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        left, right = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(left, right)  # warm-up (oneDNN kernels, page faults)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(left, right)
            best = min(best, time.perf_counter() - start)
        peaks[name] = 2 * size**3 / best / 1e9
    return {"gflops": peaks, "size": size, "threads": torch.get_num_threads()}


# --- preparation: the pairs every configuration trains on ---------------------------------------------------


def load_pairs(dataset: str, tokenizer, max_seq_len: int) -> tuple[list[dict], str]:
    """All tokenised pairs of a data set (the project's `tokenize_rows`) and a description of the source."""
    from training.data import read_preference_rows, tokenize_rows

    if dataset == "hh":
        source = f"{HH_PATH}[:{HH_TRAIN_ROWS}]"
    elif dataset == "alpaca":
        source = str(ALPACA_PATH)
    elif dataset == "default":
        from training.data.default_data import write_default_dataset

        folder = tempfile.mkdtemp(prefix="rewardspeed-bench-default-")
        source = write_default_dataset(folder)["train"]
    else:
        raise ValueError(f"unknown data set {dataset!r}")
    rows = read_preference_rows(source, skip_invalid_rows=True).rows
    pairs, _ = tokenize_rows(tokenizer, rows, max_seq_len)
    return pairs, source


def pair_stats(pairs: list[dict]) -> dict:
    prompt = [len(pair["prompt_ids"]) for pair in pairs]
    chosen = [len(pair["chosen_ids"]) for pair in pairs]
    rejected = [len(pair["rejected_ids"]) for pair in pairs]
    real = sum(2 * p + c + r for p, c, r in zip(prompt, chosen, rejected, strict=True))
    return {
        "pairs": len(pairs),
        "mean_prompt_tokens": round(statistics.mean(prompt), 1),
        "mean_chosen_tokens": round(statistics.mean(chosen), 1),
        "mean_rejected_tokens": round(statistics.mean(rejected), 1),
        "real_tokens": real,
        "shared_tokens": sum(p + c + r for p, c, r in zip(prompt, chosen, rejected, strict=True)),
        "prompt_share_saving": round(
            1 - sum(p + c + r for p, c, r in zip(prompt, chosen, rejected, strict=True)) / real, 3
        ),
    }


def sequence_lengths(pair: dict) -> tuple[int, int]:
    prompt = len(pair["prompt_ids"])
    return prompt + len(pair["chosen_ids"]), prompt + len(pair["rejected_ids"])


def step_flops(pairs: list[dict], flop_parameters: int, layers: int, attention_width: int) -> tuple[int, int]:
    """(6N FLOPs, causal attention FLOPs) of the unpadded, unshared work of a step's pairs (fwd + bwd)."""
    lengths = [length for pair in pairs for length in sequence_lengths(pair)]
    dense = 6 * flop_parameters * sum(lengths)
    attention = sum(6 * layers * attention_width * length * length for length in lengths)
    return dense, attention


def trl_computed_tokens(pairs: list[dict]) -> int:
    """Token positions TRL's collator computes: chosen and rejected each padded to their own batch maximum."""
    chosen, rejected = zip(*(sequence_lengths(pair) for pair in pairs), strict=True)
    return len(pairs) * (max(chosen) + max(rejected))


def model_shape(model_path: str, vocab_size: int) -> dict:
    """Parameter counts (on the meta device: nothing allocated) and attention sizes of the reward model."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        backbone = AutoModel.from_config(config)
    backbone.resize_token_embeddings(vocab_size, mean_resizing=False)
    total = sum(parameter.numel() for parameter in backbone.parameters()) + config.hidden_size  # + v_head
    embedding = backbone.get_input_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "parameters": total,
        "embedding_parameters": embedding,
        "flop_parameters": total - embedding,  # the embedding is a lookup, not a matmul
        "layers": config.num_hidden_layers,
        "attention_width": config.num_attention_heads * head_dim,
        "vocab_size": vocab_size,
    }


# --- TRL venv ----------------------------------------------------------------------------------------------


def trl_versions(python: str) -> dict | None:
    """Versions in a venv whose `trl.RewardTrainer` imports, or None."""
    code = (
        "import json, torch, transformers, trl, accelerate; from trl import RewardTrainer, RewardConfig; "
        "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, "
        "'trl': trl.__version__, 'accelerate': accelerate.__version__}))"
    )
    try:
        result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def find_trl_python(explicit: str | None) -> tuple[str, dict]:
    candidates = [explicit] if explicit else sorted(glob.glob(str(VENV_ROOT / "*" / "bin" / "python")))
    for python in candidates:
        versions = trl_versions(python)
        if versions:
            return python, versions
    raise SystemExit(
        f"no venv with a working trl.RewardTrainer among {candidates}; create one (see benchmarks/README.md) "
        "and pass --trl_python, or run with --modes without trl"
    )


# --- orchestration -----------------------------------------------------------------------------------------


def run_subprocess(command: list[str], env: dict, timeout: float, log_path: Path) -> tuple[int, float, float]:
    """Run a worker; returns (exit code, peak RSS in MiB from wait4, wall seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.2)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start


def worker_env(threads: int, omp_wait_policy: str) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    return env


def configurations(args: argparse.Namespace) -> list[dict]:
    configs = []
    for dataset in args.datasets:
        primary = dataset == args.datasets[0]
        for dtype in args.dtypes if primary else args.other_dtypes:
            for mode in args.modes if primary else args.other_modes:
                if mode == "trl-defaults" and dtype != "bf16":
                    continue  # TRL's defaults are bf16
                configs.append({"dataset": dataset, "dtype": dtype, "mode": mode})
    for config in configs:
        config["id"] = f"{config['dataset']}/{config['dtype']}/{config['mode']}"
    return configs


def run_config(config: dict, args: argparse.Namespace, prepared: dict, work: Path, round_index: int) -> dict:
    dataset = prepared["datasets"][config["dataset"]]
    job = {
        "mode": config["mode"],
        "dtype": config["dtype"],
        "pairs_path": dataset["pairs_path"],
        "model_path": prepared["model_path"],
        "pad_token_id": prepared["pad_token_id"],
        "vocab_size": prepared["model"]["vocab_size"],
        "pad_token": prepared["pad_token"],
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "pairs_per_step": args.pairs_per_step,
        "max_seq_len": args.max_seq_len,
        "learning_rate": 1e-5,
    }
    tag = f"r{round_index}-{config['id'].replace('/', '-')}"
    job_path, result_path, log_path = work / f"{tag}.job.json", work / f"{tag}.out.json", work / f"{tag}.log"
    if result_path.exists() and "peak_rss_mib" in (done := json.loads(result_path.read_text())):
        return done  # measured by an earlier, interrupted invocation with this --work_dir
    job["result_path"] = str(result_path)
    job_path.write_text(json.dumps(job))
    if config["mode"] in TRL_MODES:
        command = [prepared["trl_python"], str(TRL_WORKER), str(job_path)]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path)]
    code, peak_rss_mib, wall = run_subprocess(
        command, worker_env(args.threads, args.omp_wait_policy), args.timeout, log_path
    )
    if code != 0 or not result_path.exists():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{config['id']} (round {round_index}) failed with exit code {code}:\n{tail}")
    result = json.loads(result_path.read_text())
    result.update(peak_rss_mib=round(peak_rss_mib, 1), wall_s=round(wall, 1))
    result_path.write_text(json.dumps(result))
    return result


def measure_peak(args: argparse.Namespace, work: Path, round_index: int) -> dict:
    """Measure the matmul peak now (a few seconds), never from a file of an earlier invocation: the peak moves
    with the machine, and a stale one was once reported beside new times."""
    out = work / f"r{round_index}-matmul.json"
    out.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--matmul",
        str(out),
        "--threads",
        str(args.threads),
    ]
    command += ["--matmul_size", str(args.matmul_size)]
    code, _, _ = run_subprocess(
        command, worker_env(args.threads, args.omp_wait_policy), 600, work / f"r{round_index}-matmul.log"
    )
    if code != 0:
        raise RuntimeError(
            f"matmul peak measurement failed:\n{(work / f'r{round_index}-matmul.log').read_text()}"
        )
    return json.loads(out.read_text())


def prepare(args: argparse.Namespace, work: Path) -> dict:
    """Tokenise the data sets once (project tokenizer) and pick the pairs every configuration trains on."""
    from model_utils import load_tokenizer, padded_vocab_size
    from model_utils.default_model import default_model_path

    model_path = default_model_path()
    tokenizer = load_tokenizer(model_path)
    prepared = {
        "model_path": model_path,
        "pad_token_id": tokenizer.pad_token_id,
        "pad_token": tokenizer.pad_token,
        "model": model_shape(model_path, padded_vocab_size(tokenizer)),
        "datasets": {},
    }
    needed = (args.warmup + args.steps) * args.pairs_per_step
    for dataset in args.datasets:
        pairs, source = load_pairs(dataset, tokenizer, args.max_seq_len)
        if len(pairs) < needed:
            raise SystemExit(f"{dataset}: {len(pairs)} pairs, fewer than the {needed} a run needs")
        chosen = random.Random(args.seed).sample(pairs, needed)
        pairs_path = work / f"{dataset}.pairs.jsonl"
        pairs_path.write_text("".join(json.dumps(pair) + "\n" for pair in chosen))
        timed = chosen[args.warmup * args.pairs_per_step :]
        shape = prepared["model"]
        steps = [timed[i : i + args.pairs_per_step] for i in range(0, len(timed), args.pairs_per_step)]
        flops = [
            step_flops(step, shape["flop_parameters"], shape["layers"], shape["attention_width"])
            for step in steps
        ]
        prepared["datasets"][dataset] = {
            "source": source.replace(str(REPO_ROOT.parent), ".."),
            "pairs_path": str(pairs_path),
            "all_pairs": pair_stats(pairs),
            "timed_pairs": pair_stats(timed),
            "timed_real_tokens": pair_stats(timed)["real_tokens"],
            "timed_dense_flops": sum(dense for dense, _ in flops),
            "timed_attention_flops": sum(attention for _, attention in flops),
            "trl_computed_tokens": sum(trl_computed_tokens(step) for step in steps),
        }
    return prepared


def summarise(config: dict, result: dict, prepared: dict, peak: dict, args: argparse.Namespace) -> dict:
    dataset = prepared["datasets"][config["dataset"]]
    timed_seconds = sum(result["step_seconds"][args.warmup :])
    pairs = args.steps * args.pairs_per_step
    peak_flops = peak["gflops"][config["dtype"]] * 1e9
    if config["mode"] in TRL_MODES:
        computed = dataset["trl_computed_tokens"]
    else:
        computed = sum(result["computed_tokens"][args.warmup :])
    dense, attention = dataset["timed_dense_flops"], dataset["timed_attention_flops"]
    return {
        "pairs_per_s": pairs / timed_seconds,
        "real_tokens_per_s": dataset["timed_real_tokens"] / timed_seconds,
        "computed_tokens_per_s": computed / timed_seconds,
        "padding_or_sharing_ratio": computed / dataset["timed_real_tokens"],
        "mfu": dense / timed_seconds / peak_flops,
        "mfu_with_attention": (dense + attention) / timed_seconds / peak_flops,
        "step_seconds": [round(seconds, 3) for seconds in result["step_seconds"]],
        "peak_rss_mib": result["peak_rss_mib"],
        "threads": result.get("threads"),
        "attn_implementation": result.get("attn_implementation"),
    }


def median(values: list[float]) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def median_ratio(
    config: dict, rounds: list[dict], reference_mode: str, dtype: str | None = None
) -> float | None:
    """Median over rounds of this configuration's pairs/s over the reference's in the same round."""
    reference = f"{config['dataset']}/{dtype or config['dtype']}/{reference_mode}"
    both = [r["results"] for r in rounds if config["id"] in r["results"] and reference in r["results"]]
    return median(
        [results[config["id"]]["pairs_per_s"] / results[reference]["pairs_per_s"] for results in both]
    )


def rss_ratio(
    config: dict, rounds: list[dict], reference_mode: str, dtype: str | None = None
) -> float | None:
    """Peak RSS (max over rounds) over the reference's."""
    reference = f"{config['dataset']}/{dtype or config['dtype']}/{reference_mode}"
    own = [r["results"][config["id"]]["peak_rss_mib"] for r in rounds if config["id"] in r["results"]]
    theirs = [r["results"][reference]["peak_rss_mib"] for r in rounds if reference in r["results"]]
    return max(own) / max(theirs) if own and theirs else None


def aggregate(configs: list[dict], rounds: list[dict]) -> list[dict]:
    """Per configuration: medians over rounds, and medians of per-round ratios against the references."""
    rows = []
    for config in configs:
        per_round = [
            round_["results"][config["id"]] for round_ in rounds if config["id"] in round_["results"]
        ]
        if not per_round:
            continue
        rows.append(
            {
                **config,
                "pairs_per_s": median([r["pairs_per_s"] for r in per_round]),
                "real_tokens_per_s": median([r["real_tokens_per_s"] for r in per_round]),
                "computed_tokens_per_s": median([r["computed_tokens_per_s"] for r in per_round]),
                "computed_over_real_tokens": per_round[0]["padding_or_sharing_ratio"],
                "mfu": median([r["mfu"] for r in per_round]),
                "mfu_with_attention": median([r["mfu_with_attention"] for r in per_round]),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in per_round),
                "speedup_vs_trl": median_ratio(config, rounds, "trl"),
                "speedup_vs_dschat": median_ratio(config, rounds, "dschat"),
                "speedup_vs_trl_defaults": median_ratio(config, rounds, "trl-defaults", "bf16"),
                "rss_vs_trl": rss_ratio(config, rounds, "trl"),
                "rss_vs_trl_defaults": rss_ratio(config, rounds, "trl-defaults", "bf16"),
                "rounds_measured": len(per_round),
                "per_round_pairs_per_s": [round(r["pairs_per_s"], 4) for r in per_round],
            }
        )
    return rows


def format_number(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = [
        f"# Reward-model training speed: {report['name']}",
        "",
        f"{report['date']}, {report['machine']['cpu']} ({settings['threads']} threads, shared machine), "
        f"torch {report['versions']['project']['torch']}. Model: SmolLM2-135M "
        f"({report['model']['parameters'] / 1e6:.1f}M parameters, "
        f"{report['model']['flop_parameters'] / 1e6:.1f}M non-embedding). "
        f"{settings['pairs_per_step']} pairs per step, max_seq_len {settings['max_seq_len']}, "
        f"{settings['rounds']} round(s) of {settings['warmup']} warm-up + {settings['steps']} timed steps per "
        f"configuration, each configuration in its own process.",
        "",
        "Matmul peak (GFLOP/s, best per round): "
        + "; ".join(
            f"{dtype} " + ", ".join(f"{r['peak']['gflops'][dtype]:.0f}" for r in report["rounds"])
            for dtype in ("fp32", "bf16")
        )
        + ". MFU uses the best of all rounds.",
        "",
        "| data | dtype | configuration | pairs/s | real tok/s | computed/real tok | MFU (6N) | MFU (+attn) "
        "| peak RSS MiB | x TRL matched | x DS-Chat mode | x TRL defaults | RSS / TRL | RSS / TRL defaults | rounds |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["table"]:
        lines.append(
            f"| {row['dataset']} | {row['dtype']} | {row['mode']} | {format_number(row['pairs_per_s'], 3)} "
            f"| {format_number(row['real_tokens_per_s'], 0)} | {format_number(row['computed_over_real_tokens'])} "
            f"| {format_number(row['mfu'])} | {format_number(row['mfu_with_attention'])} "
            f"| {row['peak_rss_mib']:.0f} | {format_number(row['speedup_vs_trl'], 2, 'x')} "
            f"| {format_number(row['speedup_vs_dschat'], 2, 'x')} "
            f"| {format_number(row['speedup_vs_trl_defaults'], 2, 'x')} | {format_number(row['rss_vs_trl'])} "
            f"| {format_number(row['rss_vs_trl_defaults'])} | {row['rounds_measured']} |"
        )
    lines += ["", "Data (timed pairs):", ""]
    for name, dataset in report["datasets"].items():
        stats = dataset["timed_pairs"]
        lines.append(
            f"- {name}: `{dataset['source']}`; mean prompt {stats['mean_prompt_tokens']}, chosen "
            f"{stats['mean_chosen_tokens']}, rejected {stats['mean_rejected_tokens']} tokens; prompt sharing "
            f"removes {stats['prompt_share_saving']:.0%} of the real tokens."
        )
    versions = report["versions"]
    lines += [
        "",
        f"Versions: project transformers {versions['project']['transformers']}; TRL venv "
        f"`{versions.get('trl_python', '-')}`: "
        + ", ".join(f"{k} {v}" for k, v in versions.get("trl", {}).items()),
        "",
        "Ratios are medians of per-round ratios (same round, same background load). MFU (6N) = "
        "6 x non-embedding parameters x real tokens (both sequences of a pair, prompt counted twice) / time "
        "/ matmul peak of the same dtype; (+attn) adds causal attention. computed/real tok: token positions "
        "the backbone runs per real token (padding > 1, prompt sharing < 1). Project rows: plain torch loop, "
        "no DeepSpeed engine; bf16 = bf16 weights with an fp32 AdamW master copy. TRL bf16 = Trainer "
        "autocast over fp32 weights; trl-defaults = bf16 + gradient checkpointing.",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="cpu-2threads", help="results/<name>.json and results/<name>.md")
    parser.add_argument("--rounds", type=int, default=2, help="every configuration runs once per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per run")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per run")
    parser.add_argument("--pairs_per_step", type=int, default=4)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--datasets", nargs="+", default=["hh", "alpaca"], choices=["hh", "alpaca", "default"]
    )
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["plain", "pack", "share", "pack+share", "dschat", "trl", "trl-defaults"],
        choices=list(ALL_MODES),
        help="configurations on the first data set",
    )
    parser.add_argument(
        "--other_modes",
        nargs="+",
        default=["plain", "pack+share", "trl"],
        choices=list(ALL_MODES),
        help="configurations on the other data sets (kept short so the default run stays ~20 min)",
    )
    parser.add_argument("--other_dtypes", nargs="+", default=["bf16"], choices=["fp32", "bf16"])
    parser.add_argument(
        "--trl_python", default=None, help="python of a venv with TRL (default: search venvs)"
    )
    parser.add_argument("--seed", type=int, default=0, help="which pairs are drawn")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one configuration may take")
    parser.add_argument(
        "--omp_wait_policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of every worker ('' leaves it unset): on a shared machine spinning OpenMP "
        "threads that lose their core stall every parallel region (a 135M forward was 5-7x slower)",
    )
    parser.add_argument("--matmul_size", type=int, default=2048)
    parser.add_argument("--output_dir", default=str(RESULTS_DIR))
    parser.add_argument(
        "--work_dir",
        default=None,
        help="keep pairs, logs and per-run results here (default: a temporary folder, removed); rerunning "
        "with the same folder and settings resumes: runs already measured there are not repeated",
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="with --work_dir: write the report from the runs the folder holds (an interrupted run), "
        "leaving out what was not measured",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--matmul", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1 or args.rounds < 1:
        parser.error("need --steps >= 1, --rounds >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        Path(job["result_path"]).write_text(json.dumps(run_project_worker(job)))
        return
    if args.matmul:
        Path(args.matmul).write_text(json.dumps(run_matmul_peak(args.threads, args.matmul_size, repeats=5)))
        return

    started = time.time()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="rewardspeed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    configs = configurations(args)
    versions = {"project": {}}
    import torch
    import transformers

    versions["project"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    prepared = prepare(args, work)
    if any(config["mode"] in TRL_MODES for config in configs):
        prepared["trl_python"], versions["trl"] = find_trl_python(args.trl_python)
        versions["trl_python"] = prepared["trl_python"].replace(str(Path.home()), "~")
    print(f"{len(configs)} configurations x {args.rounds} rounds; work dir {work}", flush=True)

    rounds = []
    if args.report_only:
        for round_index in range(args.rounds):
            peak_path = work / f"r{round_index}-matmul.json"
            if not peak_path.exists():
                continue
            raw = {}
            for config in configs:
                path = work / f"r{round_index}-{config['id'].replace('/', '-')}.out.json"
                if path.exists() and "peak_rss_mib" in (result := json.loads(path.read_text())):
                    raw[config["id"]] = result
            rounds.append({"peak": json.loads(peak_path.read_text()), "raw": raw})
    try:
        for round_index in range(0 if args.report_only else args.rounds):
            peak = measure_peak(args, work, round_index)
            print(f"round {round_index}: matmul peak {peak['gflops']}", flush=True)
            shift = round_index * len(configs) // args.rounds
            order = configs[shift:] + configs[:shift]
            results = {}
            for config in order:
                result = run_config(config, args, prepared, work, round_index)
                results[config["id"]] = result
                print(
                    f"  {config['id']:28s} steps {[round(s, 2) for s in result['step_seconds']]} "
                    f"rss {result['peak_rss_mib']:.0f} MiB wall {result['wall_s']:.0f}s",
                    flush=True,
                )
            rounds.append({"peak": peak, "raw": results})
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    best_peak = {dtype: max(r["peak"]["gflops"][dtype] for r in rounds) for dtype in ("fp32", "bf16")}
    for round_ in rounds:
        round_["results"] = {
            config["id"]: summarise(
                config, round_["raw"][config["id"]], prepared, {"gflops": best_peak}, args
            )
            for config in configs
            if config["id"] in round_["raw"]
        }
    for dataset in prepared["datasets"].values():
        dataset.pop("pairs_path")
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    report = {
        "name": args.name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_rm.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            key: value for key, value in vars(args).items() if key not in ("worker", "matmul", "work_dir")
        },
        "machine": {"cpu": cpu, "logical_cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "versions": versions,
        "model": prepared["model"],
        "matmul_peak_gflops": best_peak,
        "datasets": prepared["datasets"],
        "table": aggregate(configs, rounds),
        "rounds": [{"peak": r["peak"], "results": r["results"]} for r in rounds],
        "wall_s": round(time.time() - started, 1),
    }
    report["settings"].pop("output_dir")
    report["settings"]["trl_python"] = versions.get("trl_python")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (output / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {output / args.name}.json and .md in {report['wall_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
