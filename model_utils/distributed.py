"""Process-group start-up that works the same under `deepspeed`, `torchrun`, a plain process, GPU or CPU.

Handles the CPU traps seen on machines without a GPU (see README, "Running on CPU"):
- DeepSpeed picks its accelerator from `DS_ACCELERATOR`; without CUDA we set it to `cpu` (gloo backend).
- DeepSpeed's CPU communication op is compiled on first use into `TORCH_EXTENSIONS_DIR`; by default every
  Python environment shares `~/.cache/torch_extensions` and they rebuild each other's ops. We give each
  environment (interpreter prefix + torch version) its own folder unless the user set one.
- A plain `python -m ...` run has no `RANK`/`WORLD_SIZE`; DeepSpeed would then try MPI discovery. We fill in a
  single-process world.
- A lost peer (a node that died) must not leave the others waiting 30 minutes in a collective:
  `REWARDSPEED_DIST_TIMEOUT_S` (or `init_distributed(timeout_minutes=...)`) bounds every collective.
- glibc's malloc hands freed activations back to the kernel, which zeroes them again at the next step's page
  faults; on CPU we make it keep them (`keep_freed_memory`; `REWARDSPEED_CPU_MALLOC=0` turns it off).
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import logging
import os
import platform
import socket
import sys

import torch

TIMEOUT_ENV = "REWARDSPEED_DIST_TIMEOUT_S"
CPU_MALLOC_ENV = "REWARDSPEED_CPU_MALLOC"

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def per_environment_extensions_dir() -> str:
    """`~/.cache/torch_extensions/<env key>`: one compiled-op cache per interpreter prefix and torch build."""
    key = hashlib.sha1(f"{sys.prefix}|{torch.__version__}".encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions", f"rewardspeed-{key}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# A CPU step frees and allocates again hundreds of MB of activations. glibc's malloc serves blocks above its mmap
# threshold (dynamic, at most 32 MiB) from fresh mappings and returns a free heap top above its trim threshold to the
# kernel, so every step page-faults that memory in again and the kernel zeroes it: a K-wise run of SmolLM2-135M at
# max_seq_len 512 took ~3M minor faults and 12% of its CPU time in the kernel, TRL's 20%. These settings (mallopt,
# glibc's malloc.h numbering) keep freed memory in the process: blocks up to 32 MiB come from the heap, and up to
# 1 GiB of free heap top is kept. The heap's high-water mark stays mapped, which a step reaches anyway.
CPU_MALLOC_SETTINGS = {
    "M_MMAP_THRESHOLD": (-3, 32 << 20),
    "M_TRIM_THRESHOLD": (-1, 1 << 30),
    "M_TOP_PAD": (-2, 64 << 20),
}


def keep_freed_memory() -> str:
    """Apply `CPU_MALLOC_SETTINGS` on a glibc CPU host; returns what was done, or why not, in one line.

    Not applied with a GPU, on another C library, with another allocator preloaded, when the user tunes glibc's
    malloc already (`MALLOC_*` variables, `GLIBC_TUNABLES`), or with `REWARDSPEED_CPU_MALLOC=0`."""
    reason = None
    if cuda_available():
        reason = "a GPU is used"
    elif os.environ.get(CPU_MALLOC_ENV, "1").strip() == "0":
        reason = f"{CPU_MALLOC_ENV}=0"
    elif platform.libc_ver()[0] != "glibc":
        reason = "the C library is not glibc"
    elif any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        reason = "another allocator is preloaded"
    elif any(name.startswith("MALLOC_") for name in os.environ) or "malloc" in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        reason = "glibc's malloc is tuned by the environment"
    if reason is not None:
        return f"malloc left as it is ({reason})"
    libc = ctypes.CDLL("libc.so.6")
    refused = [
        name for name, (option, value) in CPU_MALLOC_SETTINGS.items() if libc.mallopt(option, value) != 1
    ]
    settings = ", ".join(f"{name}={value >> 20} MiB" for name, (_, value) in CPU_MALLOC_SETTINGS.items())
    if refused:
        return f"glibc refused mallopt {', '.join(refused)} (of {settings})"
    return f"CPU: glibc malloc keeps freed memory ({settings}; {CPU_MALLOC_ENV}=0 turns it off)"


def configure_environment() -> None:
    """Set the environment variables DeepSpeed needs before it is imported (user settings win); on CPU, keep freed
    memory in the process (`keep_freed_memory`)."""
    if not cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        logger.info(keep_freed_memory())
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", per_environment_extensions_dir())
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
            MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )


def process_group_timeout(timeout_minutes: float | None = None) -> datetime.timedelta | None:
    """How long a collective may wait for a peer: the argument, else `REWARDSPEED_DIST_TIMEOUT_S` (seconds),
    else None (DeepSpeed's default, 30 minutes).

    With a bounded timeout a rank whose peer died (a lost node) fails with an error instead of waiting in a
    collective for half an hour.
    """
    if timeout_minutes is not None:
        seconds = float(timeout_minutes) * 60
        source = f"timeout_minutes={timeout_minutes!r}"
    elif os.environ.get(TIMEOUT_ENV, "").strip():
        source = f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}"
        try:
            seconds = float(os.environ[TIMEOUT_ENV])
        except ValueError:
            raise ValueError(f"{source}: expected a number of seconds") from None
    else:
        return None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{source}: the process-group timeout must be a positive, finite time")
    return datetime.timedelta(seconds=seconds)


def init_distributed(timeout_minutes: float | None = None) -> None:
    """Start the process group through DeepSpeed (nccl on GPU, gloo on CPU); no-op when already started.

    Args:
        timeout_minutes: collective timeout; default `REWARDSPEED_DIST_TIMEOUT_S` seconds when set, else
            DeepSpeed's 30 minutes (see `process_group_timeout`).
    """
    configure_environment()
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    kwargs = {}
    timeout = process_group_timeout(timeout_minutes)
    if timeout is not None:
        kwargs["timeout"] = timeout
    deepspeed.init_distributed(dist_backend="nccl" if cuda_available() else "gloo", **kwargs)
    if cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _initialized() -> bool:
    """A process group is running (a torch built without distributed support has none)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def destroy_distributed() -> None:
    if _initialized():
        torch.distributed.destroy_process_group()


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def device() -> torch.device:
    if cuda_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def exit_process(code: int = 0) -> None:
    """Leave the process with `code` once the work is done, skipping interpreter teardown.

    With DeepSpeed on CPU, some runs abort at interpreter exit ("terminate called without an active exception",
    exit -6) after every result was written: a native thread is destroyed during teardown. The launcher then
    reports a failed job. Flushing, destroying the process group and calling `os._exit` ends the process with
    the code the work earned.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    destroy_distributed()
    os._exit(code)
