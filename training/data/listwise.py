"""Rows with several responses to one prompt (K-wise data), told apart by their columns, and their comparisons.

Layouts (`LISTWISE_LAYOUTS`; the prompt is text or chat messages, each response text or messages):
    - `scored`: `{"prompt", "responses": [...], "scores": [...]}`, one number per response, higher is better.
    - `ranking`: `{"prompt", "ranking": [best, second, ...]}`; an element that is a list holds tied responses.
    - `ultrafeedback` (openbmb/UltraFeedback): `instruction`, `completions[].response`, scored by
      `ListwiseOptions.ultrafeedback_score`: `overall_score`, `fine-grained_score`, or an aspect's
      `annotations.<aspect>.Rating` ("1".."5"; a completion rated "N/A" is dropped and counted).
    - `nectar` (berkeley-nest/Nectar): `prompt` (an hh-style "\\n\\nHuman: ...\\n\\nAssistant:" text) and
      `answers[].answer` ranked by `answers[].rank` (1 is best); each answer is joined to the prompt after a space.

Two responses give a comparison `(better, worse)` when the better one's score exceeds the other's by at least
`min_score_gap` (and by more than 0), up to the rounding of decimal scores (`clears_gap`, the one definition:
both losses and the evaluation read the comparisons it makes, and nothing else): ties and near-ties give
none. Empty and repeated responses are dropped from their row
and counted (a response is its own turns: one that repeats the prompt's turns is the same response without
them); a response given twice with different scores is dropped, every copy, and counted as `conflicting_scores`.
A row left without a comparison (all scores tied, fewer than two distinct responses) is skipped and counted, never
an error. Malformed rows raise `RowError` naming the field, as pairs do.
"""

from __future__ import annotations

import math
from typing import Any

from training.data.formats import as_messages, content_field, is_empty, response_messages
from training.data.records import (
    Content,
    ListwiseOptions,
    RankedRow,
    RawRecord,
    RowError,
    RowFormat,
    RowSkipped,
)

LISTWISE_LAYOUTS = ("scored", "ranking", "ultrafeedback", "nectar")
LISTWISE_FIELDS = ("responses", "scores", "ranking")
ULTRAFEEDBACK_SCORES = (
    "overall_score",
    "fine-grained_score",
    "helpfulness",
    "honesty",
    "instruction_following",
    "truthfulness",
)


def detect_listwise(column_names: set[str], column_map: dict[str, str]) -> tuple[str, dict[str, str]] | None:
    """(layout, {field: column}) of a K-wise source, or None when its columns are not one of `LISTWISE_LAYOUTS`."""
    columns = {"prompt": "prompt", "responses": "responses", "scores": "scores", "ranking": "ranking"}
    columns.update(column_map)
    if "scores" in column_map or {columns["responses"], columns["scores"]} <= column_names:
        return "scored", {name: columns[name] for name in ("prompt", "responses", "scores")}
    if "ranking" in column_map or columns["ranking"] in column_names:
        return "ranking", {name: columns[name] for name in ("prompt", "ranking")}
    if {"instruction", "completions"} <= column_names:
        return "ultrafeedback", {
            "prompt": column_map.get("prompt", "instruction"),
            "responses": "completions",
        }
    if {"prompt", "answers"} <= column_names:
        return "nectar", {"prompt": columns["prompt"], "responses": "answers"}
    return None


def _number(value: Any, column: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError(
            "invalid_type", column, f"{where}expected a number, got {type(value).__name__} {value!r:.40}"
        )
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise RowError("invalid_score", column, f"{where}expected a finite number, got {value!r:.40}")
    return number


def _list(value: dict, column: str) -> list:
    if column not in value:
        raise RowError("missing_field", column, "missing")
    if not isinstance(value[column], list):
        raise RowError("invalid_type", column, f"expected a list, got {type(value[column]).__name__}")
    return value[column]


def _ultrafeedback_score(completion: dict, key: str, column: str, where: str) -> float | None:
    """A completion's score by `key`; None when an aspect is unrated (no rating, or "N/A")."""
    if key in ("overall_score", "fine-grained_score"):
        if key not in completion:
            raise RowError("missing_field", column, f"{where}no {key!r}")
        return _number(completion[key], column, where)
    annotations = completion.get("annotations")
    if annotations is not None and not isinstance(annotations, dict):
        raise RowError(
            "invalid_type",
            column,
            f"{where}annotations: expected an object, got {type(annotations).__name__}",
        )
    aspect = (annotations or {}).get(key)
    if aspect is not None and not isinstance(aspect, dict):
        raise RowError(
            "invalid_type",
            column,
            f"{where}annotations.{key}: expected an object, got {type(aspect).__name__}",
        )
    rating = (aspect or {}).get("Rating")
    if rating is None or isinstance(rating, str) and rating.strip() == "N/A":
        return None
    if isinstance(rating, str):
        try:
            rating = float(rating)
        except ValueError:
            raise RowError(
                "invalid_score", column, f"{where}annotations.{key}.Rating is {rating!r}"
            ) from None
    return _number(rating, column, f"{where}annotations.{key}.Rating: ")


def _scored_responses(
    value: dict, layout: str, columns: dict[str, str], options: ListwiseOptions
) -> tuple[list[Any], list[float | None]]:
    """(responses as stored, scores; None for an unrated response) of one row."""
    if layout == "scored":
        responses, scores = _list(value, columns["responses"]), _list(value, columns["scores"])
        if len(scores) != len(responses):
            raise RowError(
                "invalid_scores",
                columns["scores"],
                f"expected {len(responses)} numbers (one per response), got {len(scores)}",
            )
        return responses, [
            _number(score, columns["scores"], f"score {i}: ") for i, score in enumerate(scores)
        ]
    if layout == "ranking":
        responses, scores = [], []
        for place, entry in enumerate(_list(value, columns["ranking"])):
            tied = entry if isinstance(entry, list) and not _is_messages(entry) else [entry]
            responses += tied
            scores += [-float(place)] * len(tied)
        return responses, scores
    items = _list(value, columns["responses"])
    key, text = ("answer", "rank") if layout == "nectar" else ("response", options.ultrafeedback_score)
    responses, scores = [], []
    for index, item in enumerate(items):
        where = f"item {index}: "
        if not isinstance(item, dict) or key not in item:
            raise RowError("invalid_type", columns["responses"], f"{where}expected an object with {key!r}")
        responses.append(item[key])
        if layout == "nectar":
            scores.append(-_number(item.get("rank"), columns["responses"], f"{where}rank: "))
        else:
            scores.append(_ultrafeedback_score(item, text, columns["responses"], where))
    return responses, scores


def _is_messages(value: list) -> bool:
    return bool(value) and all(isinstance(item, dict) and "role" in item for item in value)


# Scores are decimals written in binary: 0.3 - 0.2 is 0.09999999999999998. A difference within this share of
# the scores' size is rounding, not preference.
GAP_TOLERANCE = 1e-9


def clears_gap(high: float, low: float, min_score_gap: float) -> bool:
    """Whether score `high` beats `low` by at least `min_score_gap` (and by more than rounding): the one rule for
    comparisons (`comparisons_of`), which training (both losses) and the evaluation use.

    >>> clears_gap(0.3, 0.2, 0.1), clears_gap(0.3, 0.25, 0.1), clears_gap(0.1 + 0.2, 0.3, 0.0)
    (True, False, False)
    """
    tolerance = GAP_TOLERANCE * max(1.0, abs(high), abs(low))
    return high - low > tolerance and high - low >= min_score_gap - tolerance


def comparisons_of(scores: list[float], min_score_gap: float) -> list[tuple[int, int]]:
    """Every `(better, worse)` pair of response indices whose scores clear the gap (`clears_gap`).

    >>> comparisons_of([1.0, 3.0, 1.05, 3.0], min_score_gap=0.1)
    [(1, 0), (1, 2), (3, 0), (3, 2)]
    """
    return [
        (better, worse)
        for better, high in enumerate(scores)
        for worse, low in enumerate(scores)
        if clears_gap(high, low, min_score_gap)
    ]


def _prompt(value: dict, layout: str, columns: dict[str, str], stored: list[Any]) -> Any:
    """The row's prompt (`stored`: its responses as `_scored_responses` reads them). A ranking may go without one
    only when its entries are whole conversations (messages); a ranking of texts without its prompt (or beside a
    `responses` column it would silently ignore) is refused."""
    if layout == "ranking":
        if "responses" in value and columns["ranking"] != "responses":
            raise RowError(
                "ambiguous_ranking",
                columns["ranking"],
                "the row also has 'responses': a ranking lists the responses themselves, best first (texts or "
                "messages; a list holds ties), not indices into 'responses'; for scored responses give 'scores'",
            )
        if columns["prompt"] not in value:
            if stored and all(isinstance(entry, list) and _is_messages(entry) for entry in stored):
                return ""
            raise RowError(
                "missing_field",
                columns["prompt"],
                "missing: the ranking holds texts, which need their prompt "
                "(--column_map prompt=COLUMN names another column)",
            )
    return content_field(value, columns["prompt"])


def _response_key(prompt: Any, response: Content) -> Content:
    """What a response is, for emptiness and repeats: a text beside a text prompt as it is; otherwise its own
    messages (`response_messages`: prompt turns it repeats removed), as it is rendered for training."""
    if isinstance(prompt, str) and isinstance(response, str):
        return response
    return response_messages(as_messages(prompt, "user"), response)


def normalise_ranked(
    record: RawRecord, row_format: RowFormat, options: ListwiseOptions
) -> tuple[RankedRow, dict[str, int]]:
    """Validate one K-wise record into a `RankedRow`; also returns how many responses were dropped, by reason.

    Raises:
        RowError: a malformed field. RowSkipped: a valid row without a comparison.
    """
    if record.json_error:
        raise RowError("invalid_json", None, record.json_error)
    value, layout, columns = record.value, row_format.listwise, row_format.columns
    if not isinstance(value, dict):
        raise RowError("invalid_json", None, f"expected a JSON object, got {type(value).__name__}")
    stored, scores = _scored_responses(value, layout, columns, options)
    prompt = _prompt(value, layout, columns, stored)
    dropped = {"empty": 0, "duplicate": 0, "unrated": 0, "conflicting_scores": 0}
    distinct: list[Content] = []  # each distinct response (first copy), its key and every copy's score
    keys: list[Content] = []
    copy_scores: list[list[float]] = []
    for index, (response, score) in enumerate(zip(stored, scores, strict=True)):
        column = columns.get("responses") or columns.get("ranking")
        try:
            content = content_field({column: response}, column)
        except RowError as error:
            raise RowError(
                error.reason, column, f"response {index}: {str(error).split(': ', 1)[-1]}"
            ) from None
        if layout == "nectar" and isinstance(content, str) and not content[:1].isspace():
            content = " " + content
        key = _response_key(prompt, content)
        if score is None:
            dropped["unrated"] += 1
        elif is_empty(key):
            dropped["empty"] += 1
        elif key in keys:
            copy_scores[keys.index(key)].append(score)
        else:
            distinct.append(content)
            keys.append(key)
            copy_scores.append([score])
    responses: list[Content] = []
    kept_scores: list[float] = []
    for content, copies in zip(distinct, copy_scores, strict=True):
        if len(set(copies)) > 1:
            dropped["conflicting_scores"] += len(copies)
        else:
            dropped["duplicate"] += len(copies) - 1
            responses.append(content)
            kept_scores.append(copies[0])
    if len(responses) < 2:
        raise RowSkipped("fewer_than_two_responses", dropped)
    comparisons = comparisons_of(kept_scores, options.min_score_gap)
    if not comparisons:
        raise RowSkipped("no_score_gap", dropped)
    margins = None
    if options.score_gap_margin > 0:
        margins = [options.score_gap_margin * (kept_scores[b] - kept_scores[w]) for b, w in comparisons]
    return RankedRow(prompt, responses, kept_scores, comparisons, record.origin, margins), dropped
