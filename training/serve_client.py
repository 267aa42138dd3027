"""A client of the reward server (`python -m training.serve`): a TRL reward function, or a plain scorer.

    from trl import GRPOTrainer
    from training.serve_client import RewardClient

    trainer = GRPOTrainer(model=..., reward_funcs=RewardClient("http://127.0.0.1:8000"), ...)
    RewardClient(url).score([{"prompt": "Hi", "responses": [" Hello!", " Go away."]}])   # [[r_1, r_2]]

TRL calls a reward function as `f(prompts=[...], completions=[...], completion_ids=[...], **dataset_columns)`
and wants one float per completion. GRPO/RLOO put the G completions of a prompt next to each other, the prompt
repeated: consecutive equal prompts go to the server as one group, so the server computes that prompt once.
Prompts and completions may be texts or message lists (conversational datasets); they are scored as
`training.evaluate --score` scores them (the server re-tokenises: `completion_ids` are not used).

Standard library only (urllib), so it imports anywhere TRL runs.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

# Statuses worth another try: the queue is full, a proxy or the server timed out.
RETRY_STATUSES = (502, 503, 504)


class RewardServerError(RuntimeError):
    """The server refused a request (4xx, or 5xx after every try); the message is the server's."""


class RewardClient:
    """Calls POST /score of a reward server; an instance is a TRL reward function.

    Args:
        url: the server, e.g. "http://127.0.0.1:8000".
        normalized: return rewards normalised with the mean/std training saved (the server's
            `normalized_rewards`; an error when the model has none) instead of raw ones.
        timeout_s: per HTTP request (OpenRLHF's client uses 180 s).
        retries: tries per request on a connection error, a timeout or a 502/503/504 (OpenRLHF's: 5).
        retry_wait_s: pause between tries, doubled after each.
        name: the reward's name in TRL's logs (`rewards/<name>/mean`).
    """

    def __init__(
        self,
        url: str,
        normalized: bool = False,
        timeout_s: float = 180.0,
        retries: int = 5,
        retry_wait_s: float = 1.0,
        name: str = "rewardspeed",
    ) -> None:
        if retries < 1:
            raise ValueError(f"retries must be at least 1, got {retries}")
        self.url = url.rstrip("/")
        self.key = "normalized_rewards" if normalized else "rewards"
        self.timeout_s, self.retries, self.retry_wait_s = timeout_s, retries, retry_wait_s
        self.__name__ = name  # TRL names a reward function by its __name__

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        """One reward per completion, in order (TRL's reward-function call)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        groups: list[dict[str, Any]] = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if not groups or groups[-1]["prompt"] != prompt:
                groups.append({"prompt": prompt, "responses": []})
            groups[-1]["responses"].append(completion)
        return [reward for rewards in self.score(groups) for reward in rewards]

    def score(self, groups: Sequence[dict[str, Any]]) -> list[list[float]]:
        """Rewards of `[{"prompt", "responses"}, ...]`, one list per group."""
        if not groups:
            return []
        answers = self._post("/score", list(groups))
        try:
            return [[float(reward) for reward in answer[self.key]] for answer in answers]
        except (KeyError, TypeError) as error:
            raise RewardServerError(f"{self.url}/score: no {self.key!r} in the answer ({error})") from None

    def _post(self, path: str, body: Any) -> Any:
        data = json.dumps(body).encode("utf-8")
        wait, problem = self.retry_wait_s, ""
        for attempt in range(self.retries):
            if attempt:
                time.sleep(wait)
                wait *= 2
            request = urllib.request.Request(
                self.url + path, data=data, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if error.code not in RETRY_STATUSES:
                    raise RewardServerError(f"{self.url}{path}: HTTP {error.code}: {message}") from None
                problem = f"HTTP {error.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                problem = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
        raise RewardServerError(f"{self.url}{path}: failed {self.retries} times, last: {problem}")


def _error_message(error: urllib.error.HTTPError) -> str:
    """The server's `{"error": ...}` message, or the raw body."""
    body = error.read().decode("utf-8", "replace")
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:500]
