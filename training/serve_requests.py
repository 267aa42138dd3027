"""What a request to the reward server may hold: its JSON read within limits, validated into `ScoreGroup`s.

Every refusal is a `RequestError` with an HTTP status and a message naming the field (`prompt`,
`[2].responses[3]`, `query[0]`, ...): 400 not JSON, 413 too large, 422 a missing, unknown or mistyped field.
Texts and message lists are validated as preference rows' fields are (`training/data/formats.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from training.data.formats import content_field
from training.data.records import RowError
from training.serve_engine import ScoreGroup

SCORE_FIELDS = ("prompt", "responses")


class RequestError(Exception):
    """A request the server refuses: `status` (4xx/5xx) and a message naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold: body bytes, characters per text, responses (a request larger than the queue
    could never be admitted)."""

    max_request_bytes: int = 16 << 20
    max_text_chars: int = 200_000
    max_responses: int = 4096


def _content(value: Any, path: str, limits: RequestLimits) -> Any:
    """A text or message list at `path`, validated as a preference row's field (`formats.content_field`)."""
    try:
        content = content_field({path: value}, path)
    except RowError as error:
        raise RequestError(422, str(error)) from None
    length = len(content) if isinstance(content, str) else sum(len(message["content"]) for message in content)
    if length > limits.max_text_chars:
        raise RequestError(
            413, f"field {path!r}: {length} characters, more than --max_text_chars {limits.max_text_chars}"
        )
    return content


def _score_group(value: Any, where: str, limits: RequestLimits):
    name = where.rstrip(".") or "the body"
    if not isinstance(value, dict):
        raise RequestError(
            422, f"{name}: expected an object {{'prompt', 'responses'}}, got {type(value).__name__}"
        )
    unknown = sorted(set(value) - set(SCORE_FIELDS))
    if unknown:
        raise RequestError(422, f"field {where + unknown[0]!r}: unknown (expected 'prompt' and 'responses')")
    for key in SCORE_FIELDS:
        if key not in value:
            raise RequestError(422, f"field {where + key!r}: missing")
    responses = value["responses"]
    if not isinstance(responses, list):
        raise RequestError(
            422,
            f"field {where + 'responses'!r}: expected a list of texts or message lists, got {type(responses).__name__}",
        )
    return ScoreGroup(
        _content(value["prompt"], f"{where}prompt", limits),
        [_content(response, f"{where}responses[{i}]", limits) for i, response in enumerate(responses)],
    )


def parse_score_request(value: Any, limits: RequestLimits) -> tuple[list, bool]:
    """(the groups of a POST /score body, whether it was a list). Raises `RequestError` naming the field."""
    if isinstance(value, list):
        groups, is_list = [_score_group(item, f"[{i}].", limits) for i, item in enumerate(value)], True
    else:
        groups, is_list = [_score_group(value, "", limits)], False
    _check_size(sum(len(group.responses) for group in groups), "responses", limits)
    return groups, is_list


def _check_size(count: int, field: str, limits: RequestLimits) -> None:
    if count > limits.max_responses:
        raise RequestError(
            413,
            f"field {field!r}: {count} responses in one request, more than --max_queue {limits.max_responses}",
        )


def parse_get_reward_request(
    value: Any, limits: RequestLimits
) -> tuple[list, list[tuple[int, int]], list[int]]:
    """OpenRLHF's body -> (groups, (group, response) of each query, indices of queries scored whole).

    A query is prompt + response text; the prompt is `prompts[i]` when the query starts with it (queries with
    the same prompt form one group), else the whole query is the response to an empty prompt.
    """
    if not isinstance(value, dict):
        raise RequestError(422, f"the body: expected an object with 'query', got {type(value).__name__}")
    if "query" not in value:
        raise RequestError(422, "field 'query': missing")
    queries, prompts = value["query"], value.get("prompts")
    for name, texts in (("query", queries), ("prompts", prompts)):
        if texts is not None and not isinstance(texts, list):
            raise RequestError(422, f"field {name!r}: expected a list of texts, got {type(texts).__name__}")
    if prompts is not None and len(prompts) != len(queries):
        raise RequestError(422, f"field 'prompts': {len(prompts)} prompts for {len(queries)} queries")
    _check_size(len(queries), "query", limits)
    group_of: dict[str, int] = {}  # prompt -> its group, in order of first appearance
    groups, where, whole = [], [], []
    for index, query in enumerate(queries):
        query = _text(query, f"query[{index}]", limits)
        prompt = "" if prompts is None else _text(prompts[index], f"prompts[{index}]", limits)
        if not query.startswith(prompt):
            whole.append(index)
            prompt = ""
        if prompt not in group_of:
            group_of[prompt] = len(groups)
            groups.append(ScoreGroup(prompt, []))
        group = groups[group_of[prompt]]
        where.append((group_of[prompt], len(group.responses)))
        group.responses.append(query[len(prompt) :])
    return groups, where, whole


def _text(value: Any, path: str, limits: RequestLimits) -> str:
    if not isinstance(value, str):
        raise RequestError(422, f"field {path!r}: expected text, got {type(value).__name__}")
    return _content(value, path, limits)


async def read_json(request, limits: RequestLimits) -> Any:
    """The request body as JSON, read up to `max_request_bytes` (413 beyond, 400 when not JSON)."""
    too_large = RequestError(
        413, f"the body is larger than --max_request_mb ({limits.max_request_bytes} bytes)"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_request_bytes:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(400, f"malformed JSON: {error}") from None
