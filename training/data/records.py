"""The types preference data passes through: raw records -> normalised rows -> tokenised pairs, and its errors.

`RawRecord` (sources.py reads them) -> `PreferenceRow` (formats.py validates them) -> a tokenised pair dict
`{"prompt_ids", "chosen_ids", "rejected_ids", "margin"}` (tokenize.py) -> a batch (collate.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
Content = str | list[Message]


class DataError(ValueError):
    """Unusable preference data. The message names the source, row and field; print it without a traceback."""


class RowError(Exception):
    """One invalid row (internal): `reason` is the stats key, `column` the offending column."""

    def __init__(self, reason: str, column: str | None, problem: str) -> None:
        super().__init__(f"field {column!r}: {problem}" if column else problem)
        self.reason = reason


@dataclass(frozen=True)
class PreferenceRow:
    """One preference pair before tokenisation: texts, or chat messages (prompt `[]` when it has none)."""

    prompt: Content
    chosen: Content
    rejected: Content
    margin: float | None
    origin: str


@dataclass(frozen=True)
class RawRecord:
    """One record as read from a source; `json_error` is set for a line that is not JSON."""

    origin: str
    value: Any
    json_error: str | None = None


@dataclass(frozen=True)
class RowFormat:
    """Which column holds each field. `pairwise`: response_1/response_2/preference instead of chosen/rejected;
    `signed_preference`: that preference runs -3..3 (HelpSteer3) instead of 1/2 (AlpacaEval)."""

    columns: dict[str, str]
    pairwise: bool
    signed_preference: bool = False


@dataclass
class SourceRows:
    """The normalised rows of one source.

    Attributes:
        source: the path or hub name as given.
        rows: the training split (all rows of a single file).
        eval_rows: the source's own evaluation split; None when it has none.
        rows_read: records read, valid or not (both splits).
        skipped: invalid rows by reason (filled whether or not they are later allowed to be skipped).
        ties_skipped: pairwise rows with a tie preference.
        problems: one message per invalid row, "<file> line <n>: field '<column>': <problem>".
    """

    source: str
    rows: list[PreferenceRow]
    eval_rows: list[PreferenceRow] | None
    rows_read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    ties_skipped: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class PreferenceData:
    """Tokenised pairs for one training phase.

    Attributes:
        train: pairs `{"prompt_ids": list[int], "chosen_ids": list[int], "rejected_ids": list[int],
            "margin": float | None}`, in source order (`training/sampling.py` orders them per epoch).
        eval: pairs of the same shape.
        stats: counts: `rows_read` and `train_pairs_per_source` per source, `train_pairs`, `eval_pairs`,
            `truncated_rows` and `truncated_responses` per split, `skipped_rows` by reason, `ties_skipped`.
    """

    train: list[dict]
    eval: list[dict]
    stats: dict[str, Any]
