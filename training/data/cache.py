"""The tokenised-data cache: a data set is tokenised once per node, and reused by its ranks, resumed and repeated runs.

Where: `--data_cache_dir`, else `$REWARDSPEED_DATA_CACHE`, else `~/.cache/rewardspeed/data`; `off` turns it off
(every rank then tokenises everything into memory). One folder per key, `<cache dir>/<key>/`, holding
`manifest.json` and the parts of each split's `ExampleStore` (`store.py`). Nothing is ever evicted: delete
folders that are no longer wanted (the startup log names the one a run uses).

The key (`cache_key`) is a hash of everything the tokens depend on; `load.py` lists it. Data files enter by a
hash of their bytes (`files_digest`), not by (path, size, mtime): a file rewritten in place within the file
system's timestamp granularity, or restored with its old timestamp (`cp -p`, `rsync -a`, a tarball), keeps its
size and mtime but not its rows, and a stale hit would train on the old rows without a word. Hashing reads the
bytes once (about 0.5 GB/s here; 1.3 s for 500k hh-rlhf pairs) against minutes of tokenisation. The tokenizer
enters by the files `save_pretrained` writes (vocabulary, merges, normalisation, special and added tokens, chat
template), and the code by the source of the `training/data` modules, so that no change of validation,
truncation or layout can reuse tokens made by older code (a forgotten version bump would).

Building (`build_once_per_node`): the ranks of a node (same host, same launcher node: `RANK - LOCAL_RANK`) each
tokenise a contiguous shard of the rows into their own part of a staging folder `<key>.tmp-...`; the node's
first rank writes `manifest.json` last and renames the folder into place, so a killed build never leaves a folder
that could be mistaken for a complete one (a folder without a readable manifest and intact parts is rebuilt, and
staging folders of dead builds are removed). Whether to build is decided together (one gather of every rank's
view), and an error on any rank (invalid rows, a chat template failing on a row of one shard, a full disk) is
raised on every rank instead of leaving the others waiting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from training.data.records import DataError

logger = logging.getLogger(__name__)

CACHE_ENV = "REWARDSPEED_DATA_CACHE"
CACHE_OFF = "off"
MANIFEST = "manifest.json"
OWNER = "owner.json"
STAGING = ".tmp-"
STALE_UNOWNED_S = 24 * 3600  # a staging folder without an owner file is removed after this long
KEY_LENGTH = 32  # hex digits of sha256 in a cache folder name
HASH_BLOCK = 1 << 20

Opened = TypeVar("Opened")


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV, "").strip() or os.path.join("~", ".cache", "rewardspeed", "data")


def resolve_cache_dir(value: str | None) -> Path | None:
    """The cache folder for a `--data_cache_dir` value (None: the default); None when the cache is off."""
    value = value or default_cache_dir()
    return None if value.strip().lower() == CACHE_OFF else Path(value).expanduser()


def files_digest(paths: Iterable[Path]) -> str:
    """sha256 over each file's size and bytes, in the given order (see the module docstring for why bytes)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as file:
                digest.update(f"{os.fstat(file.fileno()).st_size}:".encode())
                while block := file.read(HASH_BLOCK):
                    digest.update(block)
        except OSError as error:
            raise DataError(f"{path}: cannot read ({error})") from None
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the files `tokenizer.save_pretrained` writes: what the tokens depend on, not where it was loaded
    from (the same tokenizer from two folders gives one digest)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        paths = sorted(Path(folder).rglob("*"))
        digest = hashlib.sha256()
        for path in paths:
            if path.is_file():
                digest.update(f"{path.relative_to(folder).as_posix()}\0".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def code_digest() -> str:
    """sha256 of the `training/data` modules' source: new code never reuses tokens made by old code."""
    folder = Path(__file__).resolve().parent
    return files_digest(sorted(folder.glob("*.py")))


def cache_key(material: dict[str, Any]) -> str:
    """The folder name for `material` (JSON-able: everything the cached tokens depend on)."""
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_LENGTH]


@dataclass(frozen=True)
class NodeGroup:
    """The ranks that share one build: `index` of this rank among `size` (shard `index` of `size`)."""

    index: int
    size: int


def _all_gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a one-process world: `[value]`)."""
    import torch.distributed as dist

    from model_utils import distributed

    ranks = distributed.world_size()
    if ranks == 1:
        return [value]
    gathered = [None] * ranks
    dist.all_gather_object(gathered, value)
    return gathered


def _node_id() -> str:
    """Same value on the ranks of one node: the host name and the global rank of the launcher node's first rank
    (two launchers on one host, as in tests, are two nodes). Without LOCAL_RANK a rank is a node of its own."""
    from model_utils import distributed

    this_rank = distributed.rank()
    local_rank = os.environ.get("LOCAL_RANK")
    first = this_rank - int(local_rank) if local_rank is not None and local_rank.isdigit() else this_rank
    return f"{socket.gethostname()}/{first}"


def _try_open(open_folder: Callable[[Path], Opened | None], folder: Path) -> Opened | None:
    if not (folder / MANIFEST).is_file():
        return None
    try:
        return open_folder(folder)
    except (OSError, ValueError, KeyError, TypeError):  # a damaged manifest or part: rebuilt
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_staging(folder: Path) -> None:
    """Staging folders of this key left by builds that died (same host, process gone; or unowned and old)."""
    for staging in folder.parent.glob(f"{folder.name}{STAGING}*"):
        dead = False
        try:
            owner = json.loads((staging / OWNER).read_text(encoding="utf-8"))
            dead = owner["host"] == socket.gethostname() and not _pid_alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            with contextlib.suppress(OSError):
                dead = time.time() - staging.stat().st_mtime > STALE_UNOWNED_S
        if dead:
            logger.info("removing %s (a data cache build that did not finish)", staging)
            shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, folder: Path, open_folder: Callable[[Path], Opened | None]) -> None:
    """Rename the finished staging folder into place; a complete folder already there (another run built the
    same data meanwhile) wins, an incomplete one is moved aside and removed."""
    with contextlib.suppress(OSError):
        os.rename(staging, folder)
        return
    if _try_open(open_folder, folder) is not None:
        shutil.rmtree(staging, ignore_errors=True)
        return
    aside = staging.with_name(staging.name.replace(STAGING, ".incomplete-", 1))
    os.rename(folder, aside)
    os.rename(staging, folder)
    shutil.rmtree(aside, ignore_errors=True)


def _cache_error(folder: Path, error: OSError) -> DataError:
    return DataError(
        f"cannot write the data cache {folder.parent} ({error}); free space there, or choose another folder "
        f"with --data_cache_dir (or {CACHE_ENV}), or 'off'"
    )


def build_once_per_node(
    folder: Path,
    build: Callable[[Path, NodeGroup], dict],
    open_folder: Callable[[Path], Opened | None],
    description: dict | None = None,
) -> Opened:
    """Open the cache folder `folder`, building it first (once per node, shared by its ranks) when incomplete.

    Collective: every rank of the job calls it at the same point (without a process group: one rank).

    Args:
        folder: `<cache dir>/<key>`.
        build: `(staging folder, group) -> summary`: writes this rank's part (shard `group.index` of
            `group.size`) into the staging folder; the summaries (JSON-able), in shard order, are the manifest's
            `"shards"`.
        open_folder: the complete folder -> what the caller wants from it; None when it is not complete.
        description: written into the manifest (what the folder was built from, for people).

    Raises:
        DataError: raised by `build` on any rank (re-raised on every rank), or the cache cannot be written.
    """
    from model_utils import distributed

    opened = _try_open(open_folder, folder)
    this_rank = distributed.rank()
    views = _all_gather((_node_id(), str(folder), opened is not None, secrets.token_hex(6)))
    node = views[this_rank][0]
    members = [rank for rank, view in enumerate(views) if view[0] == node]
    folders = {views[rank][1] for rank in members}
    if len(folders) > 1:  # e.g. different data files or tokenizers: the shards would not fit together
        raise DataError(
            f"the ranks of this node would tokenise different data (cache keys {sorted(folders)})"
        )
    if all(view[2] for view in views):
        logger.info("tokenised data: reusing %s", folder)
        return opened
    group = NodeGroup(members.index(this_rank), len(members))
    build_here = not all(views[rank][2] for rank in members)
    staging = folder.with_name(f"{folder.name}{STAGING}{views[0][3]}-{members[0]}")

    outcome, own_error = None, None
    if build_here:
        try:
            if group.index == 0:
                logger.info("tokenised data: building %s on %d rank(s) of this node", folder, group.size)
                folder.parent.mkdir(parents=True, exist_ok=True)
                _remove_dead_staging(folder)
            staging.mkdir(parents=True, exist_ok=True)
            if group.index == 0:
                owner = {"host": socket.gethostname(), "pid": os.getpid()}
                (staging / OWNER).write_text(json.dumps(owner), encoding="utf-8")
            outcome = ("built", build(staging, group))
        except OSError as error:
            own_error = _cache_error(folder, error)
        except Exception as error:  # raised again below, after every rank has heard of it
            own_error = error
        if own_error is not None:
            outcome = ("failed", f"{type(own_error).__name__}: {own_error}")
    outcomes = _all_gather(outcome)
    failed = [(rank, result[1]) for rank, result in enumerate(outcomes) if result and result[0] == "failed"]
    if failed:
        if build_here and group.index == 0:
            shutil.rmtree(staging, ignore_errors=True)
        if own_error is not None:
            raise own_error
        rank, message = failed[0]
        raise DataError(f"rank {rank} could not prepare the data: {message}")

    published = None
    if build_here and group.index == 0:
        manifest = {"shards": [outcomes[rank][1] for rank in members], "built_from": description or {}}
        try:
            (staging / OWNER).unlink()
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            _publish(staging, folder, open_folder)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            published = str(_cache_error(folder, error))
    problems = [message for message in _all_gather(published) if message]
    if problems:
        raise DataError(problems[0])
    opened = _try_open(open_folder, folder)
    if opened is None:
        raise DataError(f"{folder}: the data cache built just now cannot be opened")
    return opened


def read_manifest(folder: Path) -> dict:
    """The manifest of a complete cache folder (`build_once_per_node`)."""
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
