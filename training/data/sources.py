"""Reading raw records from a file, a folder, a `save_to_disk` folder or a hub dataset: one subset, one split.

A source is written `LOCATION[:SUBSET][:SPLIT][[START:STOP]]`:

    pairs.jsonl                               a file: all its rows are training rows
    downloads/ultrafeedback:train_prefs       a folder (e.g. a hub download) and one of its splits
    Anthropic/hh-rlhf:harmless-base           a hub dataset and one of its subsets
    nvidia/HelpSteer3:preference:train        a subset, then a split
    test.jsonl.gz[:2012]                      rows by position of the training split, like hub split slicing

One selector names a subset or a split, whichever the source has by that name. A location that exists as
written (a colon or brackets in a file name) is never split. Files: `.jsonl`, `.json` (a list of objects, one
object, or JSON lines), `.parquet`, any of them gzipped (`.jsonl.gz`).

Which files are which subset and split, and which ones a source uses, is `dataset_splits.py` (the same rules for
a local folder and a hub dataset's files): several subsets or several training splits and none chosen is an
error listing them, never a blend. A hub dataset is listed, then only the chosen files are downloaded
(`huggingface_hub`).

Each record keeps its origin (`<file> line <n>`, or `row <i>` for `.json` lists, `.parquet` files and
`save_to_disk` splits), so every later error can name it. JSON-lines files are read a line at a time (never the
whole text in memory beside its records). `choose_source` resolves a source without reading rows: the
tokenised-data cache fingerprints the files it names (`cache.py`).
"""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from training.data.dataset_splits import (
    DATA_FILE_KINDS,
    SplitLayout,
    choose_splits,
    data_file_kind,
    describe_choice,
    discover_splits,
    read_card_metadata,
)
from training.data.records import DataError, RawRecord

logger = logging.getLogger(__name__)

ROW_RANGE = re.compile(r"^(?P<location>.+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")
MAX_SELECTORS = 2  # subset, split
CARD_FILE = "README.md"
DATASET_DICT_FILE = "dataset_dict.json"  # `DatasetDict.save_to_disk`
DATASET_STATE_FILE = "state.json"  # `Dataset.save_to_disk`


@dataclass(frozen=True)
class SourceSpec:
    """One `--data_path` entry, parsed: where, which subset and split (0-2 selectors), which rows."""

    text: str
    location: str
    selectors: tuple[str, ...] = ()
    row_range: slice | None = None


def split_row_range(source: str) -> tuple[str, slice | None]:
    """Split a trailing `[start:stop]` off a source: `"a.jsonl[:10]" -> ("a.jsonl", slice(None, 10))`.

    A path that exists as written (brackets in a file name) is never split.
    """
    match = ROW_RANGE.match(source)
    if match is None or os.path.exists(source):
        return source, None
    start, stop = (int(match[name]) if match[name] else None for name in ("start", "stop"))
    return match["location"], slice(start, stop)


def parse_source(text: str) -> SourceSpec:
    """`"uf:train_prefs[:100]" -> SourceSpec(location="uf", selectors=("train_prefs",), row_range=slice(None, 100))`.

    The location is the longest colon-separated prefix that exists on disk (the first part when none does,
    as for hub names, which contain no colon).

    >>> parse_source("nvidia/HelpSteer3:preference:train[5:]").selectors
    ('preference', 'train')
    """
    rest, row_range = split_row_range(text)
    parts = rest.split(":")
    cut = next((index for index in range(len(parts), 0, -1) if os.path.exists(":".join(parts[:index]))), 1)
    location, selectors = ":".join(parts[:cut]), tuple(parts[cut:])
    if len(selectors) > MAX_SELECTORS or not all(selectors) or not location:
        raise DataError(f"{text}: expected LOCATION[:SUBSET][:SPLIT][[start:stop]]")
    return SourceSpec(text, location, selectors, row_range)


# What `json.loads` raises on bad input: a syntax error (JSONDecodeError, a ValueError), an integer literal
# beyond Python's digit limit (ValueError), or nesting deeper than the interpreter's recursion limit.
JSON_ERRORS = (ValueError, RecursionError)


def _json_error(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON ({error.msg} at column {error.colno})"
    if isinstance(error, RecursionError):
        return "not usable JSON (nested too deeply)"
    return f"not usable JSON ({error})"


def _jsonl_records(lines: Iterable[str], name: str) -> list[RawRecord]:
    records = []
    for number, line in enumerate(lines, start=1):
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
    return _jsonl_records(text.split("\n"), name)


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


def _text_lines(path: Path) -> Iterator[str]:
    """The lines of a (gzipped) text file, decoded one at a time (as `_read_text`, without the whole text)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            for number, line in enumerate(stream, start=1):
                if number == 1:
                    line = line.removeprefix(codecs.BOM_UTF8)
                try:
                    yield line.decode("utf-8").removesuffix("\n")
                except UnicodeDecodeError as error:
                    raise DataError(
                        f"{path} line {number}: not UTF-8 text (byte {line[error.start]:#04x}: {error.reason})"
                    ) from None
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot read ({error})") from None


def _parquet_records(path: Path) -> list[RawRecord]:
    import pyarrow.parquet as parquet

    try:
        rows = parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read parquet ({error})") from None
    return [RawRecord(f"{path} row {index}", row) for index, row in enumerate(rows)]


def file_records(path: Path) -> list[RawRecord]:
    """The records of one data file, each with its origin."""
    kind = data_file_kind(path.name)
    if kind == "parquet":
        return _parquet_records(path)
    if kind == "json":
        return _json_records(_read_text(path), str(path))
    if kind == "jsonl":
        return _jsonl_records(_text_lines(path), str(path))
    kinds = ", ".join(f".{kind}" for kind in DATA_FILE_KINDS)
    raise DataError(f"{path}: unsupported file type (use {kinds}, optionally .gz)")


# How a chosen source reads a split: `(subset, split) -> records`, and which files hold it.
ReadSplit = Callable[[str, str], list[RawRecord]]
SplitFiles = Callable[[str, str], list[Path]]


def _folder_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def _files_reader(root: Path, layout: SplitLayout) -> tuple[ReadSplit, SplitFiles]:
    def files(subset: str, split: str) -> list[Path]:
        return [root / name for name in layout.subsets[subset][split]]

    def read(subset: str, split: str) -> list[RawRecord]:
        return [record for path in files(subset, split) for record in file_records(path)]

    return read, files


def _folder_layout(folder: Path) -> SplitLayout:
    files = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    card = folder / CARD_FILE
    return discover_splits(str(folder), files, read_card_metadata(card) if card.is_file() else None)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / DATASET_DICT_FILE).is_file() or (folder / DATASET_STATE_FILE).is_file()


def _saved_dataset(folder: Path) -> tuple[SplitLayout, ReadSplit, SplitFiles]:
    """A `Dataset`/`DatasetDict.save_to_disk` folder: one split `train`, or the dict's splits."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(folder))
    except Exception as error:  # a damaged folder: any of datasets' or pyarrow's errors
        raise DataError(f"{folder}: cannot read this save_to_disk folder ({error})") from None
    is_dict = isinstance(saved, datasets.DatasetDict)
    splits = dict(saved) if is_dict else {"train": saved}

    def read(subset: str, split: str) -> list[RawRecord]:
        return [
            RawRecord(f"{folder}[{split}] row {index}", row)
            for index, row in enumerate(splits[split].to_list())
        ]

    def files(subset: str, split: str) -> list[Path]:
        return (
            [folder / DATASET_DICT_FILE, *_folder_files(folder / split)] if is_dict else _folder_files(folder)
        )

    return SplitLayout(str(folder), {"": {name: [] for name in splits}}), read, files


def _hub_dataset(name: str) -> tuple[SplitLayout, ReadSplit, SplitFiles]:
    """A hub dataset's file list (and dataset card), laid out like a folder; files download when read."""
    import huggingface_hub

    try:
        files = huggingface_hub.list_repo_files(name, repo_type="dataset")
        card = (
            huggingface_hub.hf_hub_download(name, CARD_FILE, repo_type="dataset")
            if CARD_FILE in files
            else None
        )
    except Exception as error:  # offline, unknown or gated repository: one clean message
        raise DataError(
            f"{name}: not a local file or folder, and listing it as a hub dataset failed ({error}); without hub "
            f"access, download it (hf download --repo-type dataset {name} --local-dir DIR) and pass DIR"
        ) from None
    layout = discover_splits(name, files, read_card_metadata(Path(card)) if card else None)

    def files(subset: str, split: str) -> list[Path]:
        wanted = layout.subsets[subset][split]
        try:
            root = huggingface_hub.snapshot_download(name, repo_type="dataset", allow_patterns=wanted)
        except Exception as error:  # network or disk: one clean message
            raise DataError(f"{name}: downloading {', '.join(wanted)} failed ({error})") from None
        return [Path(root) / file for file in wanted]

    def read(subset: str, split: str) -> list[RawRecord]:
        return [record for path in files(subset, split) for record in file_records(path)]

    return layout, read, files


def looks_local(location: str) -> bool:
    """A path rather than a hub name: it starts like one or names a data file."""
    return location.startswith((".", "/", "~")) or data_file_kind(location) is not None


@dataclass(frozen=True)
class ChosenSource:
    """One source resolved to what it reads: a subset, its training and evaluation split (None: not read; a
    file's one split is ""), and for each the records (`read`) or the files that hold them (`files`)."""

    spec: SourceSpec
    subset: str
    train_split: str | None
    eval_split: str | None
    read: Callable[[str], list[RawRecord]]
    files: Callable[[str], list[Path]]
    description: str = ""

    def files_read(self) -> list[Path]:
        """The files `records` reads for this choice (a hub dataset's are downloaded), in reading order."""
        splits = (self.train_split, self.eval_split)
        return [path for split in splits if split is not None for path in self.files(split)]

    def records(self) -> tuple[list[RawRecord], list[RawRecord] | None]:
        """Raw records of this choice: (the training split's, sliced by the row range; the evaluation split's, or
        None when none was chosen)."""
        if self.description:
            logger.info("%s: %s", self.spec.text, self.description)
        train = self.read(self.train_split) if self.train_split is not None else []
        if self.spec.row_range:
            train = train[self.spec.row_range]
        return train, self.read(self.eval_split) if self.eval_split is not None else None


def choose_source(source: str, with_eval: bool = True) -> ChosenSource:
    """Resolve `LOCATION[:SUBSET][:SPLIT][[start:stop]]` (see the module docstring) without reading any rows.

    Raises:
        DataError: no such file or folder, a selector on a file, an unknown or ambiguous subset or split, or a
            hub dataset that cannot be listed.
    """
    spec = parse_source(source)
    path = Path(spec.location).expanduser()
    if path.is_file():
        if spec.selectors:
            raise DataError(f"{source}: {spec.location} is a file; it has no subsets or splits to choose")
        return ChosenSource(spec, "", "", None, read=lambda _: file_records(path), files=lambda _: [path])
    if path.is_dir() and _is_saved_dataset(path):
        layout, read, files = _saved_dataset(path)
    elif path.is_dir():
        layout = _folder_layout(path)
        read, files = _files_reader(path, layout)
    elif looks_local(spec.location):
        raise DataError(f"{spec.location}: no such file or folder")
    else:
        layout, read, files = _hub_dataset(spec.location)
    subset, train_split, eval_split = choose_splits(source, layout, spec.selectors, with_eval)
    return ChosenSource(
        spec,
        subset,
        train_split,
        eval_split,
        read=lambda split: read(subset, split),
        files=lambda split: files(subset, split),
        description=describe_choice(layout, subset, train_split, eval_split),
    )


def load_records(source: str, with_eval: bool = True) -> tuple[list[RawRecord], list[RawRecord] | None]:
    """Raw records of one source (`LOCATION[:SUBSET][:SPLIT][[start:stop]]`, see the module docstring).

    Args:
        source: as given on the command line.
        with_eval: also choose and read the source's evaluation split (False: its eval split is not wanted).

    Returns:
        (records of the training split, sliced by the row range; records of the evaluation split, or None when
        the source has none or `with_eval` is False).
    """
    return choose_source(source, with_eval).records()
