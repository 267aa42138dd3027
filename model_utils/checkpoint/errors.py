"""The one error type of checkpoint reading and writing, and how a wrapped cause is shown."""

from __future__ import annotations

import pickle


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as it is: absent, unreadable, or with keys/shapes that do not fit."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """`"<ErrorType>: <message>"` on one line, cut to `limit` characters (for error messages that wrap a cause)."""
    message = str(error)
    if isinstance(
        error, pickle.UnpicklingError
    ):  # torch's weights-only refusal: keep the line naming the culprit
        culprit = [line.strip() for line in message.splitlines() if "GLOBAL" in line or "Unsupported" in line]
        message = f"the weights-only unpickler refused it: {culprit[0]}" if culprit else message
    text = f"{type(error).__name__}: {' '.join(message.split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
