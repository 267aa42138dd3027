"""Process set-up on CPU (`model_utils/distributed.py`): glibc's malloc keeps freed memory."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from model_utils import distributed

REPO = Path(__file__).resolve().parents[1]

# A fresh process writes a 24 MiB block from glibc's malloc, frees it, and writes one again: the page faults of
# the second (torch's allocator adds alignment, so a tensor may not fit its own freed block exactly).
REUSE = """
import ctypes, resource
from model_utils.distributed import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
size = 24 << 20
def written():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    return block
libc.free(written())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc.free(written())
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_a_reused_block(setting: str) -> tuple[str, int]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    env.update({distributed.CPU_MALLOC_ENV: setting, "CUDA_VISIBLE_DEVICES": ""})
    result = subprocess.run(
        [sys.executable, "-c", REUSE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    line, faults = result.stdout.strip().splitlines()[-2:]
    return line, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults_on_cpu():
    """With the settings a freed 24 MiB block is reused as it is; glibc's default maps it again (the kernel
    zeroes every page at its fault), which is what a training step would pay for each large activation."""
    line, faults = faults_of_a_reused_block("1")
    assert line.startswith("CPU: glibc malloc keeps freed memory"), line
    assert faults < 100, faults
    line, faults = faults_of_a_reused_block("0")
    assert line == f"malloc left as it is ({distributed.CPU_MALLOC_ENV}=0)"
    assert faults > 24 * 1024 // 4 // 2, faults  # at least half the block's 4 KiB pages


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("REWARDSPEED_CPU_MALLOC", "0", "REWARDSPEED_CPU_MALLOC=0"),
        ("MALLOC_ARENA_MAX", "2", "glibc's malloc is tuned by the environment"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1", "glibc's malloc is tuned by the environment"),
        ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2", "another allocator is preloaded"),
    ],
)
def test_malloc_is_left_alone_where_the_user_chose(monkeypatch, variable, value, reason):
    if platform.libc_ver()[0] != "glibc":
        reason = "the C library is not glibc"
    monkeypatch.setenv(variable, value)
    assert distributed.keep_freed_memory() == f"malloc left as it is ({reason})"


def test_malloc_is_left_alone_with_a_gpu(monkeypatch):
    monkeypatch.setattr(distributed, "cuda_available", lambda: True)
    assert distributed.keep_freed_memory() == "malloc left as it is (a GPU is used)"
