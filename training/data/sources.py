"""Reading raw records from a local file, a folder or a hub dataset.

Sources: a local `.jsonl`, `.json` (a list of objects, or JSON lines), `.parquet`, any of them gzipped
(`.jsonl.gz`), a folder, or a hub dataset name (`datasets.load_dataset`). In a folder (searched
recursively) files whose names start with `train` are the training split and those starting with
`test`/`eval`/`validation`/`valid`/`dev` its evaluation split; a folder with neither has only training
rows. A trailing `[start:stop]` selects rows by position, like hub split slicing: `test.jsonl.gz[:2012]`
and `test.jsonl.gz[2012:]` give the shared hh-rlhf train/eval convention.

Each record keeps its origin (`<file> line <n>`, or `row <i>` for `.json` lists, `.parquet` files and hub
splits), so every later error can name it.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import zlib
from pathlib import Path

from training.data.records import DataError, RawRecord

logger = logging.getLogger(__name__)

TRAIN_SPLIT_PREFIXES = ("train",)
EVAL_SPLIT_PREFIXES = ("test", "eval", "validation", "valid", "dev")
ROW_RANGE = re.compile(r"^(?P<location>.+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def split_row_range(source: str) -> tuple[str, slice | None]:
    """Split a trailing `[start:stop]` off a source: `"a.jsonl[:10]" -> ("a.jsonl", slice(None, 10))`.

    A path that exists as written (brackets in a file name) is never split.
    """
    match = ROW_RANGE.match(source)
    if match is None or os.path.exists(source):
        return source, None
    start, stop = (int(match[name]) if match[name] else None for name in ("start", "stop"))
    return match["location"], slice(start, stop)


# What `json.loads` raises on bad input: a syntax error (JSONDecodeError, a ValueError), an integer literal
# beyond Python's digit limit (ValueError), or nesting deeper than the interpreter's recursion limit.
JSON_ERRORS = (ValueError, RecursionError)


def _json_error(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON ({error.msg} at column {error.colno})"
    if isinstance(error, RecursionError):
        return "not usable JSON (nested too deeply)"
    return f"not usable JSON ({error})"


def _jsonl_records(text: str, name: str) -> list[RawRecord]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        origin = f"{name} line {number}"
        try:
            records.append(RawRecord(origin, json.loads(line)))
        except JSON_ERRORS as error:
            records.append(RawRecord(origin, None, _json_error(error)))
    return records


def _json_records(text: str, name: str) -> list[RawRecord]:
    """A JSON list of objects, one pretty-printed object, or JSON lines."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            value = json.loads(text)
        except JSON_ERRORS as error:
            line = f" line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
            raise DataError(f"{name}{line}: {_json_error(error)}") from None
        return [RawRecord(f"{name} row {index}", row) for index, row in enumerate(value)]
    if stripped.startswith("{"):
        try:
            return [RawRecord(f"{name} row 0", json.loads(text))]
        except JSON_ERRORS:
            pass  # JSON lines
    return _jsonl_records(text, name)


def _read_text(path: Path) -> str:
    """The file's text; a UTF-8 byte-order mark (as some Windows tools write) is dropped."""
    try:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path} line {line}: not UTF-8 text (byte {data[error.start]:#04x}: {error.reason})"
        ) from None


def _parquet_records(path: Path) -> list[RawRecord]:
    import pyarrow.parquet as parquet

    try:
        rows = parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read parquet ({error})") from None
    return [RawRecord(f"{path} row {index}", row) for index, row in enumerate(rows)]


def _data_kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    return next((kind for kind in ("jsonl", "json", "parquet") if name.endswith(f".{kind}")), None)


def _file_records(path: Path) -> list[RawRecord]:
    kind = _data_kind(path)
    if kind == "parquet":
        return _parquet_records(path)
    if kind == "json":
        return _json_records(_read_text(path), str(path))
    if kind == "jsonl":
        return _jsonl_records(_read_text(path), str(path))
    raise DataError(f"{path}: unsupported file type (use .jsonl, .json, .parquet, optionally .gz)")


def _split_of(path: Path) -> str | None:
    stem = path.name.lower().split(".")[0]
    if stem.startswith(TRAIN_SPLIT_PREFIXES):
        return "train"
    if stem.startswith(EVAL_SPLIT_PREFIXES):
        return "eval"
    return None


def _folder_records(folder: Path) -> tuple[list[RawRecord], list[RawRecord] | None]:
    files = sorted(path for path in folder.rglob("*") if path.is_file() and _data_kind(path))
    if not files:
        raise DataError(f"{folder}: no .jsonl/.json/.parquet files in this folder")
    train_files = [path for path in files if _split_of(path) == "train"]
    eval_files = [path for path in files if _split_of(path) == "eval"]
    if not train_files and not eval_files:
        train_files = files
    ignored = sorted(set(files) - set(train_files) - set(eval_files))
    if ignored:
        logger.warning("%s: ignoring files that are neither train nor eval splits: %s", folder, ignored)
    train = [record for path in train_files for record in _file_records(path)]
    evaluation = [record for path in eval_files for record in _file_records(path)] if eval_files else None
    return train, evaluation


def _hub_records(name: str) -> tuple[list[RawRecord], list[RawRecord] | None]:
    """`datasets.load_dataset(name)`: its `train` split (or its only split) and first of test/eval/validation."""
    import datasets

    try:
        dataset_dict = datasets.load_dataset(name)
    except Exception as error:  # any loader failure becomes one clean message
        raise DataError(
            f"{name}: not a local file or folder, and loading it as a hub dataset failed ({error})"
        ) from None
    splits = dict(dataset_dict)
    train_split = "train" if "train" in splits else (next(iter(splits)) if len(splits) == 1 else None)
    if train_split is None:
        raise DataError(f"{name}: no 'train' split (splits: {sorted(splits)})")
    eval_split = next((split for split in EVAL_SPLIT_PREFIXES if split in splits), None)

    def records(split: str) -> list[RawRecord]:
        return [
            RawRecord(f"{name}[{split}] row {index}", row)
            for index, row in enumerate(splits[split].to_list())
        ]

    return records(train_split), records(eval_split) if eval_split else None


def _looks_local(location: str) -> bool:
    return location.startswith((".", "/", "~")) or _data_kind(Path(location)) is not None


def load_records(location: str) -> tuple[list[RawRecord], list[RawRecord] | None]:
    """Raw records of a file, folder or hub dataset: (training split, evaluation split or None)."""
    path = Path(location).expanduser()
    if path.is_dir():
        return _folder_records(path)
    if path.is_file():
        return _file_records(path), None
    if _looks_local(location):
        raise DataError(f"{location}: no such file or folder")
    return _hub_records(location)
