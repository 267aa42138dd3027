"""Tokenisation: the one path from a row to token ids, for training, evaluation and scoring alike.

prompt + response is rendered and tokenised as one text (`add_special_tokens=True`; a double BOS from a chat
template that writes its own BOS is collapsed to one), then `tokenizer.eos_token_id` is appended unless the
sequence already ends with it (chat renderings have trailing whitespace removed first, so a template ending
"<|im_end|>\\n" ends on its EOS). `prompt_ids` is the token prefix the chosen and rejected sequences share (each
response keeps at least its EOS); `chosen_ids`/`rejected_ids` are the rest. Sequences whose prompt + longest
response exceed `max_seq_len` lose prompt tokens from the left (BOS kept); a response longer than the room left
by BOS is cut from the right, keeping its final EOS (`truncate_responses`). Nothing is dropped; truncations are
counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from training.data.formats import as_messages, content_field, margin_field, response_messages, split_prompt
from training.data.records import Content, DataError, PreferenceRow, RankedRow, RowError


def render_conversations(
    tokenizer: PreTrainedTokenizerBase, prompt: Content, responses: Sequence[Content]
) -> list[str]:
    """One text per response: `prompt + response`, or the chat template applied to the conversation."""
    if isinstance(prompt, str) and all(isinstance(response, str) for response in responses):
        return [prompt + response for response in responses]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat-message rows need a tokenizer with a chat template; this tokenizer has none")
    prompt_messages = as_messages(prompt, "user")
    return [
        tokenizer.apply_chat_template(
            prompt_messages + response_messages(prompt_messages, response), tokenize=False
        ).rstrip()
        for response in responses
    ]


def _render_row(
    tokenizer: PreTrainedTokenizerBase, origin: str, prompt: Content, responses: list[Content]
) -> list[str]:
    """`render_conversations` for one row; a chat template that fails on it is a `DataError` naming the row."""
    try:
        return render_conversations(tokenizer, prompt, responses)
    except DataError:
        raise
    except Exception as error:  # the template is user-supplied Jinja code: it may raise anything on odd rows
        raise DataError(
            f"{origin}: the tokenizer's chat template failed on this row ({type(error).__name__}: {error})"
        ) from None


def finish_sequence(token_ids: list[int], bos_token_id: int | None, eos_token_id: int) -> list[int]:
    """Collapse a leading double BOS and end the sequence with exactly one appended EOS (if not already there).

    >>> finish_sequence([1, 1, 7, 8], bos_token_id=1, eos_token_id=2)
    [1, 7, 8, 2]
    >>> finish_sequence([7, 8, 2], bos_token_id=None, eos_token_id=2)
    [7, 8, 2]
    """
    if bos_token_id is not None and token_ids[:2] == [bos_token_id, bos_token_id]:
        token_ids = token_ids[1:]
    return token_ids if token_ids[-1:] == [eos_token_id] else [*token_ids, eos_token_id]


def shared_prefix_length(sequences: Sequence[list[int]]) -> int:
    """Length of the token prefix all `sequences` share, capped so that each keeps at least one token (its EOS).

    >>> shared_prefix_length([[1, 5, 6, 2], [1, 5, 7, 2], [1, 5, 6, 8, 2]])
    2
    """
    length = min(len(sequence) for sequence in sequences)
    first = np.asarray(sequences[0][:length])
    shared = length
    for sequence in sequences[1:]:
        differs = np.flatnonzero(first[:shared] != np.asarray(sequence[:shared]))
        shared = int(differs[0]) if differs.size else shared
    return min(shared, length - 1)


def split_shared_prefix(sequences: Sequence[list[int]]) -> tuple[list[int], list[list[int]]]:
    """(the prefix all `sequences` share, the rest of each): a group's prompt and responses, each response
    keeping at least one token (`shared_prefix_length`).

    >>> split_shared_prefix([[1, 5, 6, 2], [1, 5, 7, 2]])
    ([1, 5], [[6, 2], [7, 2]])
    """
    shared = shared_prefix_length(sequences)
    return list(sequences[0][:shared]), [list(sequence[shared:]) for sequence in sequences]


def _clip_response(response_ids: list[int], budget: int) -> list[int]:
    """Cut a response from the right to `budget` tokens, keeping its final token (the EOS)."""
    return response_ids if len(response_ids) <= budget else [*response_ids[: budget - 1], response_ids[-1]]


def truncate_responses(
    prompt_ids: list[int], responses: Sequence[list[int]], max_seq_len: int, bos_token_id: int | None
) -> tuple[list[int], list[list[int]], bool]:
    """Fit prompt + longest response into `max_seq_len`: drop prompt tokens from the left (BOS kept), then cut
    responses that alone do not fit from the right (EOS kept). Returns the prompt, the responses and whether a
    response was cut. The same rule for training pairs, K-response rows and scoring one response.

    >>> truncate_responses([1, 5, 6, 7], [[8, 2], [9, 9, 2]], max_seq_len=5, bos_token_id=1)
    ([1, 7], [[8, 2], [9, 9, 2]], False)
    """
    keep = 1 if bos_token_id is not None and prompt_ids[:1] == [bos_token_id] else 0
    response_budget = max_seq_len - keep
    clipped = [_clip_response(response, response_budget) for response in responses]
    prompt_budget = response_budget - max(len(response) for response in clipped)
    body = prompt_ids[keep:]
    prompt_ids = prompt_ids[:keep] + body[max(0, len(body) - prompt_budget) :]
    return prompt_ids, clipped, clipped != list(responses)


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> None:
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no EOS token; every response must end with one (the reward is read there)"
        )
    if max_seq_len < 3:
        raise DataError(f"max_seq_len must be at least 3 (BOS, one response token, EOS), got {max_seq_len}")


# What tokenisation counts per data set (reported in the data statistics, per split).
TRUNCATION_COUNTS = ("truncated_rows", "truncated_responses", "prompts_cut_to_first_token")

# Rows per tokenizer call when tokenising a whole data set: large enough for the fast tokenizers' batch
# encoding to amortise its call, small enough that a chunk's texts and Python token lists stay a few MB.
CHUNK_ROWS = 1024


def _tokenize_chunk(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[PreferenceRow | RankedRow], max_seq_len: int
) -> tuple[list[dict], Counter[str]]:
    responses_of = [
        row.responses if isinstance(row, RankedRow) else [row.chosen, row.rejected] for row in rows
    ]
    texts = [
        text
        for row, responses in zip(rows, responses_of, strict=True)
        for text in _render_row(tokenizer, row.origin, row.prompt, responses)
    ]
    encoded = iter(tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"])
    bos_token_id, eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    examples, counts = [], Counter(dict.fromkeys(TRUNCATION_COUNTS, 0))
    for row, responses in zip(rows, responses_of, strict=True):
        full = [finish_sequence(next(encoded), bos_token_id, eos_token_id) for _ in responses]
        prompt_ids, response_ids = split_shared_prefix(full)
        shared = len(prompt_ids)
        if shared + max(len(response) for response in response_ids) > max_seq_len:
            prompt_ids, response_ids, response_cut = truncate_responses(
                prompt_ids, response_ids, max_seq_len, bos_token_id
            )
            counts["truncated_rows"] += 1
            counts["truncated_responses"] += response_cut
            counts["prompts_cut_to_first_token"] += len(prompt_ids) <= 1 < shared
        if isinstance(row, RankedRow):
            example = {
                "prompt_ids": prompt_ids,
                "response_ids": response_ids,
                "scores": list(row.scores),
                "comparisons": [list(pair) for pair in row.comparisons],
            }
            if row.margins is not None:
                example["margins"] = list(row.margins)
        else:
            chosen_ids, rejected_ids = response_ids
            example = {
                "prompt_ids": prompt_ids,
                "chosen_ids": chosen_ids,
                "rejected_ids": rejected_ids,
                "margin": row.margin,
            }
        examples.append(example)
    return examples, counts


def tokenize_chunks(
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[PreferenceRow | RankedRow],
    max_seq_len: int,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[tuple[list[dict], Counter[str]]]:
    """`tokenize_rows`, `chunk_rows` rows per tokenizer call: (examples, counts) of each chunk in row order.

    What builds an `ExampleStore` (`store.py`) in bounded memory: only one chunk's token ids exist as Python lists.
    """
    _check_tokenizer(tokenizer, max_seq_len)
    for start in range(0, len(rows), chunk_rows):
        yield _tokenize_chunk(tokenizer, rows[start : start + chunk_rows], max_seq_len)


def tokenize_rows(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[PreferenceRow | RankedRow], max_seq_len: int
) -> tuple[list[dict], Counter[str]]:
    """Tokenise rows (batched tokenizer calls); the one function for training and evaluation.

    Returns:
        examples: for a `PreferenceRow` a pair `{"prompt_ids", "chosen_ids", "rejected_ids", "margin"}`, for a
        `RankedRow` a group `{"prompt_ids", "response_ids", "scores", "comparisons"}` (+ `"margins"` when the
        row has them), each with `len(prompt_ids) + longest response <= max_seq_len`; and counts
        `{"truncated_rows": n, "truncated_responses": n, "prompts_cut_to_first_token": n}` (the last: prompts of
        two or more tokens that kept at most one).
    """
    examples, counts = [], Counter(dict.fromkeys(TRUNCATION_COUNTS, 0))
    for chunk, chunk_counts in tokenize_chunks(tokenizer, rows, max_seq_len):
        examples += chunk
        counts.update(chunk_counts)
    return examples, counts


def tokenize_responses(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Content,
    responses: Sequence[Content],
    max_seq_len: int,
    origin: str = "tokenize_responses",
) -> tuple[list[list[int]], list[bool]]:
    """The token ids of each `prompt + response` (texts or messages), as training would see them: rendered,
    tokenised (one batched call), ended with one EOS and, when too long, truncated by `truncate_responses` on its
    own (prompt cut from the left after its BOS, the response from the right before its EOS), so a response's
    tokens never depend on the other responses. What `evaluate --score` and the reward server score.

    Returns:
        (token ids per response, whether each was truncated).

    Raises:
        DataError: a field that is neither text nor a list of `{"role", "content"}` texts (named with `origin`),
            or a chat template that fails on the conversation.
    """
    _check_tokenizer(tokenizer, max_seq_len)
    fields = {
        "prompt": prompt,
        **{f"responses[{index}]": response for index, response in enumerate(responses)},
    }
    try:
        prompt, *responses = (content_field(fields, name) for name in fields)
        # As for a training row: a response repeating the prompt's turns (up to whitespace) keeps its own.
        conversations = [
            split_prompt(prompt, response, response, {"rejected": name})[:2]
            for name, response in zip(list(fields)[1:], responses, strict=True)
        ]
    except RowError as error:
        raise DataError(f"{origin}: {error}") from None
    if not responses:
        return [], []
    texts = [_render_row(tokenizer, origin, prompt, [response])[0] for prompt, response in conversations]
    bos_token_id, eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    sequences = [finish_sequence(token_ids, bos_token_id, eos_token_id) for token_ids in encoded]
    too_long = [len(sequence) > max_seq_len for sequence in sequences]
    for index in (index for index, cut in enumerate(too_long) if cut):
        # Where the prompt ends: the prefix the sequence shares with its prompt rendered alone.
        prompt, response = conversations[index]
        if isinstance(prompt, str) and isinstance(response, str):
            prompt_text = prompt
        else:
            prompt_text = tokenizer.apply_chat_template(as_messages(prompt, "user"), tokenize=False)
        prompt_alone = [*tokenizer(prompt_text, add_special_tokens=True, verbose=False)["input_ids"], -1]
        full = sequences[index]
        shared = shared_prefix_length([full, prompt_alone])
        prompt_ids, (response_ids,), _ = truncate_responses(
            full[:shared], [full[shared:]], max_seq_len, bos_token_id
        )
        sequences[index] = prompt_ids + response_ids
    return sequences, too_long


def tokenize_response(
    tokenizer: PreTrainedTokenizerBase, prompt: Content, response: Content, max_seq_len: int
) -> list[int]:
    """The token ids of one `prompt + response` (`tokenize_responses` of one response): what
    `evaluate --score` scores."""
    (token_ids,), _ = tokenize_responses(
        tokenizer, prompt, [response], max_seq_len, origin="tokenize_response"
    )
    return token_ids


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Content,
    chosen: Content,
    rejected: Content,
    max_seq_len: int,
    margin: float | None = None,
) -> tuple[dict, bool]:
    """Tokenise one pair (texts or messages, as in `PreferenceRow`) exactly as `tokenize_rows` does.

    Returns:
        (`{"prompt_ids", "chosen_ids", "rejected_ids", "margin"}`, whether it was truncated).

    Raises:
        DataError: a field that is neither text nor a list of `{"role", "content"}` texts, invalid unicode,
            or a margin that is not a finite number.
    """
    fields = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin}
    try:
        prompt, chosen, rejected = (content_field(fields, name) for name in ("prompt", "chosen", "rejected"))
        margin = margin_field(fields, "margin")
    except RowError as error:
        raise DataError(f"tokenize_pair: {error}") from None
    row = PreferenceRow(prompt, chosen, rejected, margin, origin="tokenize_pair")
    pairs, counts = tokenize_rows(tokenizer, [row], max_seq_len)
    return pairs[0], counts["truncated_rows"] > 0
