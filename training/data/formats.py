"""Which column holds which field, and one record validated into a `PreferenceRow`.

Formats (told apart per source from its columns; every row of a source has the same format):
    - hh-rlhf transcripts: `chosen`/`rejected` are whole "\\n\\nHuman: ...\\n\\nAssistant: ..." texts. The prompt
      is their shared prefix up to and including the last "\\n\\nAssistant:" inside it; the responses are the
      rest. Without such a marker (plain `chosen`/`rejected` texts) the prompt is empty.
    - `prompt`/`chosen`/`rejected` texts, joined as `prompt + response` with nothing added between them.
    - chat messages: `chosen`/`rejected` (and optionally `prompt`) are lists of `{"role", "content"}` dicts,
      rendered with the tokenizer's chat template. Without `prompt` the shared leading messages are the
      prompt. A text `prompt` becomes one user message, a text response one assistant message, and a response
      that repeats the prompt messages (UltraFeedback style; compared up to whitespace) has them removed.
    - pairwise judgements (AlpacaEval, detected from `output_1`/`output_2`/`preference`, prompt `instruction`):
      preference 1 (or in [1, 1.5)) makes `output_1` the chosen response, 2 (or in (1.5, 2]) `output_2`;
      0 or 1.5 is a tie: the row is skipped and counted in `ties_skipped`, never an error.
    - signed pairwise judgements (HelpSteer3 preference, detected from `context`/`response1`/`response2`/
      `overall_preference`): the preference runs from -3 to 3, negative making `response1` the chosen response,
      positive `response2`; 0 is a tie (skipped and counted). `margin=overall_preference` in the column map
      makes its size (|preference|) the margin.
    - other layouts through `column_map` ({field: column}), e.g. `parse_column_map("prompt=question,
      chosen=good,rejected=bad")`; the fields are prompt, chosen, rejected, margin (or response_1,
      response_2, preference for pairwise rows). One map applies to every source of a call.
    An optional numeric `margin` column is carried through (None means no margin, collated as 0.0).

Errors: invalid rows (missing field, a None or non-text field, an empty response, identical chosen and
rejected, text with an unpaired surrogate, a line that is not JSON or nests too deeply) raise `RowError`;
`load.py` collects them into one `DataError`, each as "<file> line <n>: field '<column>': <problem>".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from training.data.records import Content, DataError, Message, PreferenceRow, RawRecord, RowError, RowFormat

HH_ASSISTANT = "\n\nAssistant:"
PAIR_FIELDS = ("prompt", "chosen", "rejected", "margin")
PAIRWISE_FIELDS = ("prompt", "response_1", "response_2", "preference", "margin")
PAIRWISE_KEYS = ("response_1", "response_2", "preference")
# Pairwise judgement layouts, told apart by their columns; HelpSteer3's preference is signed (-3..3).
ALPACA_EVAL_COLUMNS = {
    "prompt": "instruction",
    "response_1": "output_1",
    "response_2": "output_2",
    "preference": "preference",
}
HELPSTEER3_COLUMNS = {
    "prompt": "context",
    "response_1": "response1",
    "response_2": "response2",
    "preference": "overall_preference",
}
SIGNED_PREFERENCE_LIMIT = 3


def parse_column_map(text: str) -> dict[str, str]:
    """`"prompt=question,chosen=good,rejected=bad" -> {"prompt": "question", ...}` (the CLI's form).

    >>> parse_column_map("prompt=question, chosen=good,rejected=bad")
    {'prompt': 'question', 'chosen': 'good', 'rejected': 'bad'}
    """
    column_map = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, separator, column = (part.strip() for part in item.partition("="))
        if not separator or not name or not column:
            raise DataError(f"column map entries must look like field=column, got {item!r}")
        column_map[name] = column
    return column_map


def detect_format(source: str, column_names: set[str], column_map: dict[str, str] | None = None) -> RowFormat:
    """Decide which column holds each field, from the columns a source has and the user's map."""
    column_map = dict(column_map or {})
    unknown = set(column_map) - set(PAIR_FIELDS) - set(PAIRWISE_FIELDS)
    if unknown:
        raise DataError(
            f"column map: unknown fields {sorted(unknown)} (known: {sorted({*PAIR_FIELDS, *PAIRWISE_FIELDS})})"
        )
    signed = {HELPSTEER3_COLUMNS[key] for key in PAIRWISE_KEYS} <= column_names
    judged = signed or {ALPACA_EVAL_COLUMNS[key] for key in PAIRWISE_KEYS} <= column_names
    if column_map.keys() & set(PAIRWISE_KEYS) or (judged and not column_map.keys() & {"chosen", "rejected"}):
        defaults = {**(HELPSTEER3_COLUMNS if signed else ALPACA_EVAL_COLUMNS), "margin": "margin"}
        required, pairwise = PAIRWISE_KEYS, True
    elif column_map or {"chosen", "rejected"} <= column_names:
        defaults = {name: name for name in PAIR_FIELDS}
        required, pairwise, signed = ("chosen", "rejected"), False, False
    else:
        raise DataError(
            f"{source}: cannot tell the preference format from its columns {sorted(column_names)}; expected "
            "chosen/rejected (+ optional prompt, margin), instruction/output_1/output_2/preference or "
            "context/response1/response2/overall_preference; "
            "map other columns with a column map such as prompt=question,chosen=good,rejected=bad"
        )
    columns = {**defaults, **column_map}
    missing = [f"{columns[name]!r} ({name})" for name in required if columns[name] not in column_names]
    if missing and column_names:
        raise DataError(f"{source}: no column {', '.join(missing)}; its columns are {sorted(column_names)}")
    optional = {
        name: column for name, column in columns.items() if name in column_map or column in column_names
    }
    return RowFormat(
        columns={**optional, **{name: columns[name] for name in required}},
        pairwise=pairwise,
        signed_preference=signed,
    )


def describe_value(value: Any) -> str:
    return "None" if value is None else f"{type(value).__name__} {value!r:.40}"


def _text(text: str, column: str, where: str = "") -> str:
    """`text`, unless it holds an unpaired surrogate (JSON "\\ud800"): no tokenizer can encode that."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RowError(
            "invalid_text", column, f"{where}invalid unicode (unpaired surrogate at character {error.start})"
        ) from None
    return text


def _messages(value: list, column: str) -> list[Message]:
    for index, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise RowError("invalid_type", column, f"message {index} needs text 'role' and 'content'")
        _text(message["role"], column, f"message {index} role: ")
        _text(message["content"], column, f"message {index} content: ")
    return value


def content_field(value: dict, column: str) -> Content:
    """A text or message-list field of a row."""
    if column not in value:
        raise RowError("missing_field", column, "missing")
    content = value[column]
    if isinstance(content, str):
        return _text(content, column)
    if isinstance(content, list):
        return _messages(content, column)
    raise RowError(
        "invalid_type", column, f"expected text or a list of messages, got {describe_value(content)}"
    )


def margin_field(value: dict, column: str) -> float | None:
    margin = value.get(column)
    if margin is None:
        return None
    if isinstance(margin, bool) or not isinstance(margin, int | float):
        raise RowError("invalid_type", column, f"expected a number, got {describe_value(margin)}")
    try:
        margin = float(margin)  # a JSON integer may be too large for a float
    except OverflowError:
        margin = math.inf
    if not math.isfinite(margin):
        raise RowError(
            "invalid_margin", column, f"expected a finite number, got {describe_value(value[column])}"
        )
    return margin


def _preferred_response(value: dict, column: str, signed: bool) -> int | None:
    """1 or 2: which response the judge preferred; None for a tie (0 or 1.5; signed: 0)."""
    if column not in value:
        raise RowError("missing_field", column, "missing")
    preference = value[column]
    expected = (
        f"-{SIGNED_PREFERENCE_LIMIT}..{SIGNED_PREFERENCE_LIMIT} (0: tie)" if signed else "1, 2 or 0 (tie)"
    )
    if isinstance(preference, bool) or not isinstance(preference, int | float):
        raise RowError("invalid_type", column, f"expected {expected}, got {describe_value(preference)}")
    if signed:
        if not -SIGNED_PREFERENCE_LIMIT <= preference <= SIGNED_PREFERENCE_LIMIT:
            raise RowError("invalid_preference", column, f"expected {expected}, got {preference!r}")
        return None if preference == 0 else 1 if preference < 0 else 2
    if preference in (0, 1.5):
        return None
    if 1 <= preference <= 2:
        return 1 if preference < 1.5 else 2
    raise RowError("invalid_preference", column, f"expected {expected}, got {preference!r}")


def _common_length(first: Sequence, second: Sequence) -> int:
    """Length of the common prefix of two sequences (strings, message lists), by bisection on slices."""
    low, high = 0, min(len(first), len(second))
    while low < high:  # first[:low] == second[:low]
        middle = (low + high + 1) // 2
        if first[:middle] == second[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """hh-rlhf: the prompt ends with the last "\\n\\nAssistant:" inside the shared prefix."""
    cut = chosen.rfind(HH_ASSISTANT, 0, _common_length(chosen, rejected))
    if cut < 0:
        return "", chosen, rejected
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def as_messages(content: Content, role: str) -> list[Message]:
    return [{"role": role, "content": content}] if isinstance(content, str) else content


def _same_turns(first: list[Message], second: list[Message]) -> bool:
    """Equal roles, and contents equal up to whitespace (UltraFeedback's `prompt` may end in a newline that the
    conversation's first turn lacks)."""
    return len(first) == len(second) and all(
        a["role"] == b["role"] and a["content"].split() == b["content"].split()
        for a, b in zip(first, second, strict=True)
    )


def repeats_prompt(prompt: list[Message], response: Content) -> bool:
    """Whether a message response starts with the prompt's turns (UltraFeedback style), up to whitespace."""
    return bool(prompt) and isinstance(response, list) and _same_turns(response[: len(prompt)], prompt)


def response_messages(prompt: list[Message], response: Content) -> list[Message]:
    """The response's own messages: a text as one assistant message, prompt turns it repeats removed."""
    messages = as_messages(response, "assistant")
    return messages[len(prompt) :] if repeats_prompt(prompt, messages) else messages


def split_prompt(
    prompt: Content | None, chosen: Content, rejected: Content, columns: dict[str, str]
) -> tuple[Content, Content, Content]:
    """(prompt, chosen response, rejected response) of one row, all texts or all message lists.

    When the responses repeat the prompt's turns (up to whitespace), the prompt is those turns as the
    conversation has them: what a consumer rendering the `chosen` conversation sees.
    """
    if prompt is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            return _split_transcripts(chosen, rejected)
        if isinstance(chosen, list) and isinstance(rejected, list):
            shared = _common_length(chosen, rejected)
            return chosen[:shared], chosen[shared:], rejected[shared:]
        raise RowError(
            "invalid_type", columns["rejected"], "chosen and rejected must both be texts or both messages"
        )
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return prompt, chosen, rejected
    prompt_messages = as_messages(prompt, "user")
    repeated = next(
        (response for response in (chosen, rejected) if repeats_prompt(prompt_messages, response)), None
    )
    if repeated is not None:
        prompt_messages = repeated[: len(prompt_messages)]
    return (
        prompt_messages,
        response_messages(prompt_messages, chosen),
        response_messages(prompt_messages, rejected),
    )


def is_empty(response: Content) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return not any(message["content"].strip() for message in response)


def normalise_record(record: RawRecord, row_format: RowFormat) -> PreferenceRow | None:
    """Validate one record and bring it to a `PreferenceRow`; None for a tie. Raises `RowError`."""
    if record.json_error:
        raise RowError("invalid_json", None, record.json_error)
    value = record.value
    if not isinstance(value, dict):
        raise RowError("invalid_json", None, f"expected a JSON object, got {type(value).__name__}")
    columns = dict(row_format.columns)
    if row_format.pairwise:
        preferred = _preferred_response(value, columns["preference"], row_format.signed_preference)
        if preferred is None:
            return None
        first, second = columns["response_1"], columns["response_2"]
        columns["chosen"], columns["rejected"] = (first, second) if preferred == 1 else (second, first)
    chosen, rejected = content_field(value, columns["chosen"]), content_field(value, columns["rejected"])
    prompt = content_field(value, columns["prompt"]) if "prompt" in columns else None
    margin = margin_field(value, columns["margin"]) if "margin" in columns else None
    if margin is not None and row_format.pairwise and columns["margin"] == columns["preference"]:
        margin = abs(margin)  # the strength of the judgement, whichever response it favours
    if chosen == rejected:
        raise RowError("identical_responses", columns["chosen"], f"identical to {columns['rejected']!r}")
    prompt, chosen, rejected = split_prompt(prompt, chosen, rejected, columns)
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if is_empty(response):
            raise RowError("empty_response", columns[name], "empty response")
    return PreferenceRow(prompt, chosen, rejected, margin, record.origin)
