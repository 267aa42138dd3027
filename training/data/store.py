"""Tokenised examples in flat integer arrays: `ExampleStore`, a read-only `Sequence[dict]` that every rank of a node
can memory-map from one copy on disk.

Python lists of token ids cost a pointer and an int object per token (~40 bytes); here a token is 4 bytes of an
int32 array, and an example is built as the usual dict (`records.py`) only when it is indexed:

    chunks = (examples for examples, _ in tokenize_chunks(tokenizer, rows, max_seq_len))
    store = ExampleStore([write_part(folder, chunks)])  # folder None: in memory
    store[0]  # {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...], "margin": None}

A store is an ordered list of parts (one per rank that tokenised a shard of the rows); a part is these arrays,
one file each on disk (raw little-endian, sizes in `part.json`, written last), or in memory:

    tokens             int32[T]    every span's token ids end to end; per example its prompt, then its responses
    span_ends          int64[S]    where each span ends in `tokens` (it starts where the previous one ended)
    example_span_ends  int64[N]    where each example's spans end (its first span is its prompt)
    scores             float64[R]  each response's score (R = S - N; the response of span s of example i is
                                   s - i - 1); NaN for a pair's
    comparisons        int32[2C]   (better, worse) response indices within the example, flattened
    comparison_ends    int64[N]    where each example's comparisons end
    margins            float64[C]  each comparison's margin; NaN for none (real margins are finite)
    kinds              int8[N]     PAIR, GROUP, or GROUP_WITH_MARGINS (a group whose dict has "margins")
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data.records import example_comparisons, example_margins, example_responses

ARRAYS = {
    "tokens": np.dtype("<i4"),
    "span_ends": np.dtype("<i8"),
    "example_span_ends": np.dtype("<i8"),
    "scores": np.dtype("<f8"),
    "comparisons": np.dtype("<i4"),
    "comparison_ends": np.dtype("<i8"),
    "margins": np.dtype("<f8"),
    "kinds": np.dtype("i1"),
}
PAIR, GROUP, GROUP_WITH_MARGINS = 0, 1, 2
PART_FILE = "part.json"


def _optional(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass(frozen=True)
class StorePart:
    """The arrays of one part (see the module docstring): numpy arrays in memory or read-only memory maps."""

    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.arrays["kinds"])

    def example(self, index: int) -> dict:
        """Example `index` of this part as `tokenize_rows` returns it (lists of Python ints and floats)."""
        arrays = self.arrays
        first_span = int(arrays["example_span_ends"][index - 1]) if index else 0
        last_span = int(arrays["example_span_ends"][index])
        ends = arrays["span_ends"][max(first_span - 1, 0) : last_span].tolist()
        bounds = ([0] if first_span == 0 else []) + ends
        spans = [arrays["tokens"][start:end].tolist() for start, end in itertools.pairwise(bounds)]
        first_comparison = int(arrays["comparison_ends"][index - 1]) if index else 0
        last_comparison = int(arrays["comparison_ends"][index])
        margins = [_optional(m) for m in arrays["margins"][first_comparison:last_comparison].tolist()]
        kind = int(arrays["kinds"][index])
        if kind == PAIR:
            prompt_ids, chosen_ids, rejected_ids = spans
            return {
                "prompt_ids": prompt_ids,
                "chosen_ids": chosen_ids,
                "rejected_ids": rejected_ids,
                "margin": margins[0],
            }
        flat = arrays["comparisons"][2 * first_comparison : 2 * last_comparison].tolist()
        example = {
            "prompt_ids": spans[0],
            "response_ids": spans[1:],
            "scores": arrays["scores"][first_span - index : last_span - index - 1].tolist(),
            "comparisons": [flat[i : i + 2] for i in range(0, len(flat), 2)],
        }
        if kind == GROUP_WITH_MARGINS:
            example["margins"] = margins
        return example

    def sequence_lengths(self) -> np.ndarray:
        """int64[N]: each example's tokens with its prompt once per response, `K * P + R_1 + ... + R_K` (a pair
        has K = 2), from the span arrays alone; `ExampleStore.sequence_lengths` says more."""
        arrays = self.arrays
        example_span_ends = arrays["example_span_ends"]
        span_lengths = np.diff(arrays["span_ends"], prepend=0)
        spans = np.diff(example_span_ends, prepend=0)  # the prompt's and the K responses'
        prompt_lengths = span_lengths[example_span_ends - spans]
        example_tokens = np.diff(arrays["span_ends"][example_span_ends - 1], prepend=0)
        return example_tokens + (spans - 2) * prompt_lengths


class PartWriter:
    """Appends tokenised examples to the arrays of one part: to files in `folder` (bounded memory), or, without a
    folder, to memory. `close()` returns the finished part."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.sizes = dict.fromkeys(ARRAYS, 0)
        self.chunks: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
        self.files = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.files = {name: open(folder / name, "wb") for name in ARRAYS}  # noqa: SIM115 (closed in close())

    def add(self, examples: Sequence[dict]) -> None:
        """Append `examples` (pairs or groups, the dicts of `records.py`)."""
        spans, kinds, scores, comparisons, margins, span_counts, comparison_counts = (
            [],
            [],
            [],
            [],
            [],
            [],
            [],
        )
        for example in examples:
            prompt_ids, response_ids = example_responses(example)
            spans += [prompt_ids, *response_ids]
            span_counts.append(1 + len(response_ids))
            pairs = example_comparisons(example)
            comparisons += itertools.chain.from_iterable(pairs)
            comparison_counts.append(len(pairs))
            margins += [math.nan if margin is None else margin for margin in example_margins(example)]
            if "response_ids" in example:
                kinds.append(GROUP_WITH_MARGINS if "margins" in example else GROUP)
                scores += example["scores"]
            else:
                kinds.append(PAIR)
                scores += [math.nan] * len(response_ids)
        lengths = np.fromiter(map(len, spans), dtype=np.int64, count=len(spans))
        self._append(
            tokens=np.fromiter(
                itertools.chain.from_iterable(spans), dtype=np.int32, count=int(lengths.sum())
            ),
            span_ends=self.sizes["tokens"] + np.cumsum(lengths),
            example_span_ends=self.sizes["span_ends"] + np.cumsum(np.asarray(span_counts, dtype=np.int64)),
            scores=np.asarray(scores, dtype=np.float64),
            comparisons=np.asarray(comparisons, dtype=np.int32),
            comparison_ends=self.sizes["margins"] + np.cumsum(np.asarray(comparison_counts, dtype=np.int64)),
            margins=np.asarray(margins, dtype=np.float64),
            kinds=np.asarray(kinds, dtype=np.int8),
        )

    def _append(self, **arrays: np.ndarray) -> None:
        for name, array in arrays.items():
            array = array.astype(ARRAYS[name], copy=False)
            if self.folder is None:
                self.chunks[name].append(array)
            else:
                self.files[name].write(array.tobytes())
            self.sizes[name] += len(array)

    def close(self) -> StorePart:
        """Finish the part. On disk the arrays are flushed to the device before `part.json` (their sizes) is
        written: a part whose `part.json` exists is complete."""
        if self.folder is None:
            return StorePart(
                {
                    name: np.concatenate(chunks) if chunks else np.empty(0, ARRAYS[name])
                    for name, chunks in self.chunks.items()
                }
            )
        for file in self.files.values():
            file.flush()
            os.fsync(file.fileno())
            file.close()
        (self.folder / PART_FILE).write_text(json.dumps({"sizes": self.sizes}), encoding="utf-8")
        return open_part(self.folder)


def write_part(folder: Path | None, chunks: Iterable[Sequence[dict]]) -> StorePart:
    """Write every chunk of examples to one part (in `folder`, or in memory when None)."""
    writer = PartWriter(folder)
    for examples in chunks:
        writer.add(examples)
    return writer.close()


class IncompletePart(Exception):
    """A part folder without its `part.json`, or with an array file of the wrong size (a build that was cut)."""


def open_part(folder: Path) -> StorePart:
    """Memory-map the arrays of a part written by `PartWriter` (read-only).

    Raises:
        IncompletePart: `part.json` missing or unreadable, or an array file whose size is not what it records.
    """
    try:
        sizes = json.loads((folder / PART_FILE).read_text(encoding="utf-8"))["sizes"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise IncompletePart(f"{folder}: no readable {PART_FILE} ({error})") from None
    arrays = {}
    for name, dtype in ARRAYS.items():
        path, size = folder / name, sizes.get(name)
        if not isinstance(size, int) or not path.is_file() or path.stat().st_size != size * dtype.itemsize:
            raise IncompletePart(f"{path}: missing or not {size} values of {dtype}")
        # numpy cannot map an empty file
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=(size,)) if size else np.empty(0, dtype)
    return StorePart(arrays)


class ExampleStore(Sequence):
    """Read-only sequence of tokenised examples over the parts' flat arrays; `store[i]` is the dict of
    `records.py` (pair or group), equal to what `tokenize_rows` returns for the same row.

    >>> store = ExampleStore.from_examples([
    ...     {"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 2], "margin": None},
    ...     {"prompt_ids": [1], "response_ids": [[4, 2], [2], [9, 2]], "scores": [2.0, 0.0, 1.0],
    ...      "comparisons": [[0, 1], [0, 2], [2, 1]]}])
    >>> len(store), store[0]["rejected_ids"], store[1]["response_ids"], store.num_comparisons
    (2, [7, 2], [[4, 2], [2], [9, 2]], 4)
    """

    def __init__(self, parts: Sequence[StorePart]) -> None:
        self.parts = list(parts)
        self._part_ends = np.cumsum([len(part) for part in self.parts], dtype=np.int64)

    @classmethod
    def from_examples(cls, examples: Sequence[dict]) -> ExampleStore:
        """An in-memory store of example dicts (tests, small data)."""
        return cls([write_part(None, [examples])])

    def __len__(self) -> int:
        return int(self._part_ends[-1]) if self.parts else 0

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of a store of {len(self)}")
        part = int(np.searchsorted(self._part_ends, index, side="right"))
        start = int(self._part_ends[part - 1]) if part else 0
        return self.parts[part].example(index - start)

    def sequence_lengths(self) -> np.ndarray:
        """int64[len(self)]: the tokens each example costs unpacked, its prompt once per response:
        `sum(collate.example_sequence_lengths(store[i], share_prompt=False))` for every `i`, without building
        the examples (what `--group_by_length` sorts by).

        >>> ExampleStore.from_examples([
        ...     {"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 7, 2], "margin": None},
        ...     {"prompt_ids": [1], "response_ids": [[4, 2], [2], [9, 2]], "scores": [2.0, 0.0, 1.0],
        ...      "comparisons": [[0, 1]]}]).sequence_lengths().tolist()
        [9, 8]
        """
        if not self.parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([part.sequence_lengths() for part in self.parts])

    @property
    def num_comparisons(self) -> int:
        """Comparisons of all examples (a pair is one)."""
        return sum(len(part.arrays["margins"]) for part in self.parts)

    @property
    def num_tokens(self) -> int:
        """Tokens stored (every prompt once)."""
        return sum(len(part.arrays["tokens"]) for part in self.parts)

    @property
    def has_groups(self) -> bool:
        """Whether some example has K responses rather than chosen/rejected."""
        return any(bool((part.arrays["kinds"] != PAIR).any()) for part in self.parts)

    @property
    def has_margins(self) -> bool:
        """Whether some comparison has a margin (a pair's margin column or a group's score-gap margins)."""
        return any(not np.isnan(part.arrays["margins"]).all() for part in self.parts)
