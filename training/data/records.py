"""The types preference data passes through: raw records -> normalised rows -> tokenised examples, and errors.

`RawRecord` (sources.py reads them) -> `PreferenceRow` (a pair; formats.py validates it) or `RankedRow` (K scored
responses to one prompt; listwise.py) -> a tokenised example (tokenize.py): a pair
`{"prompt_ids", "chosen_ids", "rejected_ids", "margin"}` or a group `{"prompt_ids", "response_ids": [K lists],
"scores": [K], "comparisons": [[better, worse], ...]}` -> a batch (collate.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
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
class RankedRow:
    """K >= 2 distinct responses to one prompt with a score each (higher is better) before tokenisation, and the
    comparisons they give: `(better, worse)` response indices whose scores differ by at least the minimum gap."""

    prompt: Content
    responses: list[Content]
    scores: list[float]
    comparisons: list[tuple[int, int]]
    origin: str
    margins: list[float] | None = None  # per comparison, when asked for (`ListwiseOptions.score_gap_margin`)


class RowSkipped(Exception):
    """A valid row that gives no comparison (a tie, too few distinct responses); counted by `reason`."""

    def __init__(self, reason: str, responses_dropped: dict[str, int] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.responses_dropped = responses_dropped or {}


@dataclass(frozen=True)
class ListwiseOptions:
    """How rows with several responses become comparisons.

    Attributes:
        min_score_gap: two responses are compared only when their scores differ by at least this (and by more
            than 0): near-ties of a judge are noise, not preferences.
        ultrafeedback_score: which score of an UltraFeedback completion ranks it: `overall_score`,
            `fine-grained_score`, or one annotation aspect's rating (`helpfulness`, `honesty`,
            `instruction_following`, `truthfulness`).
        score_gap_margin: when positive, each comparison's margin is this times its score gap (the Llama-2
            style margin: a clearer preference must be won by more); 0 gives no margin.
    """

    min_score_gap: float = 0.0
    ultrafeedback_score: str = "overall_score"
    score_gap_margin: float = 0.0


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
    listwise: str | None = None  # a layout of listwise.LISTWISE_LAYOUTS: K scored responses per row


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
        skipped_by_rule: valid rows that give no comparison, by reason (ties, too few distinct responses).
        responses_dropped: responses removed from K-wise rows, by reason (empty, duplicate, unrated).
        problems: one message per invalid row, "<file> line <n>: field '<column>': <problem>".
    """

    source: str
    rows: list[PreferenceRow | RankedRow]
    eval_rows: list[PreferenceRow | RankedRow] | None
    rows_read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    ties_skipped: int = 0
    skipped_by_rule: Counter[str] = field(default_factory=Counter)
    responses_dropped: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


@dataclass
class PreferenceData:
    """Tokenised examples for one training phase.

    Attributes:
        train: examples (pairs or groups, see the module docstring), in source order (`training/sampling.py`
            orders them per epoch): an `ExampleStore` (`store.py`) from `load_preference_data`, or a list.
        eval: examples of the same shapes.
        stats: counts: `rows_read` and `train_pairs_per_source` per source, `train_examples`, `eval_examples`,
            `train_pairs` and `eval_pairs` (comparisons), `truncated_rows` and `truncated_responses` per split,
            `skipped_rows` by reason, `ties_skipped`, `skipped_by_rule`.
    """

    train: Sequence[dict]
    eval: Sequence[dict]
    stats: dict[str, Any]


# Tokenised examples: a pair (`chosen_ids`, `rejected_ids`, `margin`) or a group (`response_ids`, `scores`,
# `comparisons`); these read either.


def example_responses(example: dict) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, response ids) of a tokenised example: a pair's are `[chosen, rejected]`."""
    if "response_ids" in example:
        return example["prompt_ids"], example["response_ids"]
    return example["prompt_ids"], [example["chosen_ids"], example["rejected_ids"]]


def example_comparisons(example: dict) -> list[tuple[int, int]]:
    """`(better, worse)` response indices of a tokenised example: a pair's is `(0, 1)`."""
    return [tuple(pair) for pair in example["comparisons"]] if "comparisons" in example else [(0, 1)]


def example_margins(example: dict) -> list[float | None]:
    """The margin of each comparison: a pair's margin column; a group's score-gap margins, when computed."""
    if "comparisons" not in example:
        return [example.get("margin")]
    return list(example.get("margins") or [None] * len(example["comparisons"]))


def num_comparisons(example: dict) -> int:
    return len(example["comparisons"]) if "comparisons" in example else 1
