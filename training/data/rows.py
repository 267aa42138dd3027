"""The validated rows of one training phase: read every source, validate, blend, hold out and split.

    phase = read_phase_rows(["Anthropic/hh-rlhf", "pairs.jsonl"], [], DataOptions(max_seq_len=512))
    phase.train, phase.eval, phase.stats   # PreferenceRow / RankedRow lists, and the counts of reading them

With `eval_data_paths` those sources (their eval split when they have one, else all rows) are the evaluation
rows, and nothing is held out of the training sources (splits.py says how rows are held out otherwise).
Invalid rows of every source are collected and reported in one `DataError` before any tokenisation, or skipped
and counted by reason in `stats["skipped_rows"]` with `skip_invalid_rows=True`. `read_preference_rows` reads one
source (evaluation, inspection).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from training.data.formats import describe_value, detect_format, normalise_record
from training.data.listwise import LISTWISE_FIELDS, detect_listwise, normalise_ranked
from training.data.records import (
    DataError,
    ListwiseOptions,
    PreferenceRow,
    RankedRow,
    RawRecord,
    RowError,
    RowFormat,
    RowSkipped,
    SourceRows,
)
from training.data.sources import ChosenSource, choose_source
from training.data.splits import DEFAULT_DATA_SPLIT, REWARD_PHASE, parse_data_split, split_indices

logger = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 20


def _normalise_split(
    records: list[RawRecord], row_format: RowFormat, source: SourceRows, options: ListwiseOptions
) -> list[PreferenceRow | RankedRow]:
    """Validate `records` into rows, consuming the list: each raw record is dropped once read, so the raw records
    and the rows are never both whole in memory."""
    rows = []
    for index, record in enumerate(records):
        records[index] = None
        try:
            if row_format.listwise:
                row, dropped = normalise_ranked(record, row_format, options)
                source.responses_dropped.update({reason: n for reason, n in dropped.items() if n})
            else:
                row = normalise_record(record, row_format)
        except RowError as error:
            source.skipped[error.reason] += 1
            source.problems.append(f"{record.origin}: {error}")
            continue
        except RowSkipped as skipped:
            source.skipped_by_rule[skipped.reason] += 1
            source.responses_dropped.update(
                {reason: n for reason, n in skipped.responses_dropped.items() if n}
            )
            continue
        if row is None:
            source.ties_skipped += 1
        else:
            rows.append(row)
    return rows


def row_format_of(source: str, column_names: set[str], column_map: dict[str, str] | None) -> RowFormat:
    """Pairs (`formats.detect_format`) when the columns or the map name a pair's fields, else a K-wise layout
    (`listwise.detect_listwise`) when they fit one, else `detect_format`'s error listing what it expects."""
    column_map = dict(column_map or {})
    pair_columns = {"chosen", "rejected"} <= column_names or {
        "output_1",
        "output_2",
        "preference",
    } <= column_names
    if not pair_columns and not column_map.keys() - {"prompt", *LISTWISE_FIELDS}:
        found = detect_listwise(column_names, column_map)
        if found is not None:
            layout, columns = found
            missing = [
                f"{column!r} ({name})"
                for name, column in columns.items()
                if name != "prompt" and column not in column_names
            ]
            if missing and column_names:
                raise DataError(
                    f"{source}: no column {', '.join(missing)}; its columns are {sorted(column_names)}"
                )
            return RowFormat(columns=columns, pairwise=False, listwise=layout)
    return detect_format(source, column_names, column_map)


def _column_names(records: list[RawRecord]) -> set[str]:
    return set().union(*(record.value.keys() for record in records if isinstance(record.value, dict)))


def read_source(
    chosen: ChosenSource,
    column_map: dict[str, str] | None = None,
    listwise: ListwiseOptions | None = None,
) -> SourceRows:
    """Read and validate one resolved source (`sources.choose_source`: its splits, hence whether its own
    evaluation split is read, are chosen there) without raising on invalid rows (they are listed in `problems`).
    """
    source = chosen.spec.text
    train_records, eval_records = chosen.records()
    all_records = train_records + (eval_records or [])
    if not all_records:
        raise DataError(f"{source}: no rows")
    if not any(isinstance(record.value, dict) for record in all_records):
        first = all_records[0]
        problem = first.json_error or f"expected a JSON object, got {describe_value(first.value)}"
        raise DataError(f"{first.origin}: {problem}; no row of {source} is a JSON object")
    row_format = row_format_of(source, _column_names(all_records), column_map)
    options = listwise or ListwiseOptions()
    rows = SourceRows(source, [], None, rows_read=len(all_records))
    del all_records
    rows.rows = _normalise_split(train_records, row_format, rows, options)
    if eval_records is not None:
        rows.eval_rows = _normalise_split(eval_records, row_format, rows, options)
    return rows


def raise_on_problems(sources: Sequence[SourceRows], skip_invalid_rows: bool) -> None:
    """One `DataError` listing the invalid rows of all sources, unless they may be skipped."""
    problems = [problem for source in sources for problem in source.problems]
    if not problems or skip_invalid_rows:
        return
    listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
    more = (
        f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more"
        if len(problems) > MAX_LISTED_PROBLEMS
        else ""
    )
    raise DataError(
        f"{len(problems)} invalid preference row(s); fix them or pass skip_invalid_rows=True to skip and "
        f"count them:\n  {listed}{more}"
    )


def read_preference_rows(
    path: str,
    column_map: dict[str, str] | None = None,
    skip_invalid_rows: bool = False,
    listwise: ListwiseOptions | None = None,
) -> SourceRows:
    """Normalised text rows of one source (for evaluation and inspection); raises `DataError` on invalid rows.

    Returns:
        `SourceRows`: `.rows` (all rows of a file, the train split of a folder or hub dataset) and `.eval_rows`
        (the source's own evaluation split, or None), with the counts of skipped rows and ties.
    """
    source = read_source(choose_source(path), column_map, listwise)
    raise_on_problems([source], skip_invalid_rows)
    if source.problems:
        logger.warning("%s: skipped %d invalid rows %s", path, len(source.problems), dict(source.skipped))
    return source


def _phase_rows(
    rows: list, weights: list[float], phase_index: int, seed: int, eval_fraction: float
) -> tuple[list, list]:
    """(training rows of the phase, held-out evaluation rows) of one source's rows."""
    train_indices, eval_indices = split_indices(len(rows), weights, phase_index, seed, eval_fraction)
    return [rows[index] for index in train_indices], [rows[index] for index in eval_indices]


@dataclass(frozen=True)
class DataOptions:
    """What `load_preference_data` does to the rows besides reading them (its arguments; see there)."""

    max_seq_len: int
    data_split: str = DEFAULT_DATA_SPLIT
    phase_index: int = REWARD_PHASE
    seed: int = 1234
    eval_fraction: float = 0.1
    column_map: dict[str, str] | None = None
    skip_invalid_rows: bool = False
    listwise: ListwiseOptions | None = None


@dataclass(frozen=True)
class PhaseRows:
    """The validated rows of one phase before tokenisation, and the counts of reading them."""

    train: list[PreferenceRow | RankedRow]
    eval: list[PreferenceRow | RankedRow]
    stats: dict[str, Any]


def choose_phase_sources(data_paths: list[str], eval_data_paths: list[str]) -> Iterator[ChosenSource]:
    """The sources of one phase resolved (`sources.choose_source`) one at a time as they are asked for: the
    training sources, then the evaluation sources. A training source's own evaluation split is chosen (and read)
    only when no evaluation sources are given; an evaluation source's always."""
    for path in data_paths:
        yield choose_source(path, with_eval=not eval_data_paths)
    for path in eval_data_paths:
        yield choose_source(path)


def read_phase_rows(
    data_paths: list[str],
    eval_data_paths: list[str],
    options: DataOptions,
    chosen: Iterable[ChosenSource] | None = None,
) -> PhaseRows:
    """Read, validate, blend and split the rows of one phase (every step of `load_preference_data` but
    tokenisation). `chosen`: the sources already resolved (`choose_phase_sources` of the same paths); None:
    each is resolved just before it is read. Raises `DataError` as `load_preference_data` does."""
    weights = parse_data_split(options.data_split, options.phase_index)
    if chosen is None:
        chosen = choose_phase_sources(data_paths, eval_data_paths)
    read = [read_source(source, options.column_map, options.listwise) for source in chosen]
    sources, eval_sources = read[: len(data_paths)], read[len(data_paths) :]
    raise_on_problems(sources + eval_sources, options.skip_invalid_rows)

    train_rows, eval_rows, train_pairs_per_source = [], [], {}
    for source in sources:
        hold_out = not eval_data_paths and source.eval_rows is None
        source_train, held_out = _phase_rows(
            source.rows,
            weights,
            options.phase_index,
            options.seed,
            options.eval_fraction if hold_out else 0.0,
        )
        train_rows += source_train
        train_pairs_per_source[source.source] = len(source_train)
        if not eval_data_paths:
            eval_rows += held_out if hold_out else source.eval_rows
    for source in eval_sources:
        eval_rows += source.eval_rows if source.eval_rows is not None else source.rows
    if not train_rows:
        raise DataError(
            f"no training rows for phase {options.phase_index} of data_split {options.data_split!r} in "
            f"{data_paths}"
        )
    all_sources = sources + eval_sources
    stats = {
        "rows_read": {source.source: source.rows_read for source in all_sources},
        "train_pairs_per_source": train_pairs_per_source,
        "skipped_rows": dict(sum((source.skipped for source in all_sources), Counter())),
        "ties_skipped": sum(source.ties_skipped for source in all_sources),
        "skipped_by_rule": dict(sum((source.skipped_by_rule for source in all_sources), Counter())),
        "responses_dropped": dict(sum((source.responses_dropped for source in all_sources), Counter())),
    }
    return PhaseRows(train_rows, eval_rows, stats)
