"""The reward server's engine: requests queue into micro-batches; responses that share a prompt are scored with
its computation done once.

    engine = load_engine("output/rm", max_batch_tokens=8192, max_wait_ms=5)
    engine.start()
    future = engine.submit([ScoreGroup("Hello", [" Hi!", " Go away."])])   # concurrent.futures.Future
    future.result()                                                        # [[r_1, r_2]]: raw rewards
    engine.stop()                                                          # scores what was queued, then ends

Two threads, each with one job, so an HTTP handler never blocks: a tokenizer thread renders and tokenises a
request exactly as `evaluate --score` does (`training/data/tokenize.py::tokenize_responses`: the same chat
rendering, EOS and truncation; one tokenizer call per prompt) and queues its responses; the model thread takes
queued responses into a micro-batch (up to `max_batch_tokens` computed tokens, waiting at most `max_wait_ms`
after the oldest arrived for more), lays them out with the training collators and runs ONE forward
(`training/layout.py::batch_rewards`). Responses in a micro-batch with the same prompt, from one request or
several (OpenRLHF >= 0.9 sends each sample alone), become one K-branch group: their shared token prefix is
computed once. A response cut to `max_seq_len` keeps its own truncated prompt and is scored alone, so no reward
depends on which other responses arrived with it (up to float rounding of the batch shape).

Admission is bounded: at most `max_queue` responses may be waiting or in progress; beyond that `submit` raises
`QueueFull` at once (the server answers 503) instead of queueing without end.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from training.data.collate import example_sequence_lengths, response_order
from training.data.records import Content
from training.data.tokenize import shared_prefix_length, split_shared_prefix, tokenize_responses
from training.layout import BatchLayout, batch_rewards

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """`max_queue` responses are already waiting or in progress; try again later (HTTP 503)."""


class EngineStopped(RuntimeError):
    """The engine is draining or stopped and takes no new work (HTTP 503)."""


@dataclass(frozen=True)
class ScoreGroup:
    """Responses to one prompt (texts, or chat messages as in a preference row)."""

    prompt: Content
    responses: list[Content]


@dataclass
class Job:
    """One `submit` call: its groups' rewards fill in as micro-batches finish; `future` gets them all."""

    groups: list[ScoreGroup]
    future: Future
    rewards: list[list[float | None]] = field(init=False)
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.rewards = [[None] * len(group.responses) for group in self.groups]
        self.remaining = sum(len(group.responses) for group in self.groups)


@dataclass
class Item:
    """Queued responses of one group that may share a prompt: `sequences[i]` is response `positions[i]` of
    group `group` of `job`. Items with equal `sharing_key` (same prompt, not truncated) are merged into one
    K-branch group when they land in one micro-batch; exactness never depends on the key (the shared part is
    the actual common token prefix). `tokens`: what it computes as the first of its sharing group in a micro-batch,
    counted once when it is queued (`RewardEngine._own_tokens`)."""

    job: Job
    group: int
    positions: list[int]
    sequences: list[list[int]]
    sharing_key: object
    enqueued_at: float
    tokens: int


def sharing_key(prompt: Content) -> tuple[str, str]:
    return (
        ("text", prompt)
        if isinstance(prompt, str)
        else ("messages", json.dumps(prompt, sort_keys=True, default=str))
    )


class RewardEngine:
    """Micro-batched, prompt-sharing scoring of a loaded reward model (see the module docstring).

    Args:
        reward_model: a `RewardModel` in eval mode, already on its device, with `layout` chosen for it
            (`training/probe.py::choose_layout`, which switches sdpa backbones to segment attention).
        tokenizer: the model's tokenizer (real pad token).
        layout: the batch layout; its collator builds every micro-batch.
        max_seq_len: longest prompt + response; longer ones are truncated as in training.
        max_batch_tokens: computed tokens per micro-batch (a prompt shared by K responses counts once); a single
            group larger than this runs alone.
        max_wait_ms: how long the oldest queued response may wait for the micro-batch to fill.
        max_queue: responses waiting or in progress at most.
    """

    def __init__(
        self,
        reward_model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        layout: BatchLayout,
        max_seq_len: int,
        max_batch_tokens: int = 8192,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
    ) -> None:
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_queue", max_queue)):
            if value < 1:
                raise ValueError(f"--{name} must be positive, got {value}")
        if max_wait_ms < 0:
            raise ValueError(f"--max_wait_ms must not be negative, got {max_wait_ms}")
        self.reward_model, self.tokenizer, self.layout = reward_model, tokenizer, layout
        self.max_seq_len, self.max_batch_tokens, self.max_queue = max_seq_len, max_batch_tokens, max_queue
        self.max_wait_s = max_wait_ms / 1000
        self.collator = layout.collator(tokenizer.pad_token_id)
        self.device = next(reward_model.parameters()).device
        self._condition = threading.Condition()
        self._queue: collections.deque[Item] = collections.deque()
        self._queued_tokens = 0
        self._outstanding = 0  # responses admitted and not yet scored, skipped or failed
        self._accepting = False
        self._stopping = False
        self._hurry = False  # shutting down: micro-batches no longer wait to fill
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="rewardspeed-tokenizer")
        self._model_thread = threading.Thread(target=self._run, name="rewardspeed-model", daemon=True)
        self.counts = collections.Counter(responses=0, micro_batches=0, computed_tokens=0, truncated=0)

    # --- the caller's side ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._accepting = True
        self._model_thread.start()

    def submit(self, groups: Sequence[ScoreGroup]) -> Future:
        """Queue `groups`; the future's result is their raw rewards, `[[float] * len(group.responses)]`.

        Raises (at once): `QueueFull`, `EngineStopped`. The future may fail with `DataError` (a chat template
        that fails on the conversation) or the model's error. Cancelling the future before its micro-batch
        starts drops its queued responses.
        """
        job = Job(list(groups), Future())
        with self._condition:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            if self._outstanding + job.remaining > self.max_queue:
                raise QueueFull(
                    f"{self._outstanding} responses already queued; {job.remaining} more would exceed "
                    f"--max_queue {self.max_queue}"
                )
            if job.remaining == 0:
                job.future.set_result(job.rewards)
                return job.future
            self._outstanding += job.remaining
            # Under the lock: `stop` cannot shut the tokenizer thread down between the check and this.
            self._tokenizer_thread.submit(self._enqueue, job)
        return job.future

    def score(self, groups: Sequence[ScoreGroup], timeout: float | None = None) -> list[list[float]]:
        """`submit(groups).result(timeout)`: the rewards, for in-process callers."""
        return self.submit(groups).result(timeout)

    def hurry(self) -> None:
        """From now on run micro-batches without waiting for them to fill (a shutdown has begun)."""
        with self._condition:
            self._hurry = True
            self._condition.notify_all()

    def stop(self) -> None:
        """Take no new work, score everything already admitted, then end both threads."""
        with self._condition:
            self._accepting = False
        self._tokenizer_thread.shutdown(wait=True)  # what it holds lands in the queue first
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._model_thread.is_alive():
            self._model_thread.join()

    @property
    def outstanding(self) -> int:
        """Responses admitted and not yet answered."""
        return self._outstanding

    # --- the tokenizer thread ---------------------------------------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        """Tokenise a job (as `evaluate --score`) and queue it as items; truncated responses go alone."""
        try:
            if job.future.cancelled():
                raise _Skipped
            items = []
            now = time.monotonic()
            for index, group in enumerate(job.groups):
                sequences, truncated = tokenize_responses(
                    self.tokenizer, group.prompt, group.responses, self.max_seq_len, origin=f"group {index}"
                )
                self.counts["truncated"] += sum(truncated)
                whole = [position for position, cut in enumerate(truncated) if not cut]
                if whole:
                    shared = [sequences[position] for position in whole]
                    key = sharing_key(group.prompt)
                    items.append(Item(job, index, whole, shared, key, now, self._own_tokens(shared)))
                for position in (position for position, cut in enumerate(truncated) if cut):
                    alone = [sequences[position]]
                    items.append(Item(job, index, [position], alone, object(), now, self._own_tokens(alone)))
        except Exception as error:  # a failing chat template (DataError) or anything else: this job only
            self._release(job.remaining)
            if not isinstance(error, _Skipped) and job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
            return
        with self._condition:
            self._queue.extend(items)
            self._queued_tokens += sum(item.tokens for item in items)
            self._condition.notify_all()

    # --- the model thread -------------------------------------------------------------------------------------

    def _own_tokens(self, sequences: list[list[int]]) -> int:
        """Tokens computed for an item's `sequences` when no other item of its sharing group is in the micro-batch:
        their common prefix once and each remainder when sharing, every sequence whole otherwise."""
        if not self.layout.share_prompt:
            return sum(map(len, sequences))
        prompt, responses = split_shared_prefix(sequences)
        return sum(example_sequence_lengths({"prompt_ids": prompt, "response_ids": responses}, True))

    def _item_tokens(self, item: Item, prefix: int | None = None) -> int:
        """Tokens computed for an item: its responses after the prompt prefix when sharing (`prefix`: the
        prefix of the group it joins), its own count (`item.tokens`) otherwise."""
        if prefix is None or not self.layout.share_prompt:
            return item.tokens
        return sum(len(sequence) - prefix for sequence in item.sequences)

    def _release(self, responses: int) -> None:
        with self._condition:
            self._outstanding -= responses

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            if batch:  # empty when every item taken belonged to a cancelled request
                self._score_batch(batch)

    def _take_batch(self) -> list[Item] | None:
        """The next micro-batch (None once stopping with nothing queued; empty when every item it took belonged to
        a cancelled request): wait for work, then up to `max_wait_s` after the oldest item for the token budget to
        fill, then take items in arrival order."""
        with self._condition:
            while not self._queue and not self._stopping:
                self._condition.wait()
            if not self._queue:
                return None
            deadline = self._queue[0].enqueued_at + self.max_wait_s
            while not (self._stopping or self._hurry) and self._queued_tokens < self.max_batch_tokens:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            batch, prefixes, tokens, skipped = [], {}, 0, 0
            while self._queue:
                item = self._queue[0]
                if item.job.future.done():  # cancelled (timed out) or failed: drop its responses
                    self._queue.popleft()
                    self._queued_tokens -= item.tokens
                    skipped += len(item.sequences)
                    continue
                cost = self._item_tokens(item, prefixes.get(item.sharing_key))
                if batch and tokens + cost > self.max_batch_tokens:
                    break
                self._queue.popleft()
                self._queued_tokens -= item.tokens
                if item.job.future.running() or item.job.future.set_running_or_notify_cancel():
                    batch.append(item)
                    tokens += cost
                    if item.sharing_key not in prefixes:
                        prefixes[item.sharing_key] = shared_prefix_length(item.sequences)
                else:
                    skipped += len(item.sequences)
            self._outstanding -= skipped
            return batch

    @torch.inference_mode()
    def _score_batch(self, batch: list[Item]) -> None:
        """One forward for the batch; every response's reward goes to its job."""
        members: dict[object, list[tuple[Item, int]]] = {}
        for item in batch:
            members.setdefault(item.sharing_key, []).extend((item, i) for i in range(len(item.sequences)))
        examples, owners = [], []
        for group in members.values():
            prompt, responses = split_shared_prefix([item.sequences[i] for item, i in group])
            # A group with no comparisons: the record shape the collators take (records.py).
            examples.append(
                {
                    "prompt_ids": prompt,
                    "response_ids": responses,
                    "scores": [0.0] * len(group),
                    "comparisons": [],
                }
            )
            owners.append(group)
        try:
            tensors = {key: value.to(self.device) for key, value in self.collator(examples).items()}
            rewards = batch_rewards(self.reward_model, tensors, self.layout).cpu().tolist()
        except Exception as error:  # the model's failure fails these jobs, not the server
            logger.exception("scoring a micro-batch of %d groups failed", len(examples))
            for item in batch:
                if not item.job.future.done():
                    item.job.future.set_exception(error)
            self._release(sum(len(item.sequences) for item in batch))
            return
        self.counts["micro_batches"] += 1
        self.counts["responses"] += len(rewards)
        self.counts["computed_tokens"] += sum(
            sum(example_sequence_lengths(example, self.layout.share_prompt)) for example in examples
        )
        for (example, k), reward in zip(response_order(examples), rewards, strict=True):
            item, i = owners[example][k]
            job = item.job
            job.rewards[item.group][item.positions[i]] = reward
            job.remaining -= 1
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(job.rewards)
        self._release(len(rewards))


class _Skipped(Exception):
    """A job cancelled before it was tokenised."""


def load_engine(
    model_name_or_path: str,
    dtype: str = "auto",
    max_seq_len: int = 2048,
    packing: str = "auto",
    share_prompt: str = "auto",
    attn_implementation: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    **engine_options,
) -> RewardEngine:
    """A `RewardEngine` (not started) for a saved reward model folder (any layout), loaded with
    `load_reward_model` and laid out by the training code: `training/probe.py::choose_layout` keeps the fastest
    layout `--packing`/`--share_prompt` allow that it proves exact on the model itself, else padded.
    `dtype`: auto (bf16 on a GPU that has it, else fp32), fp32 or bf16; `device`: default cuda when available.
    """
    from model_utils.model_factory import load_reward_model
    from training.arguments import TrainConfig
    from training.ds_config import resolve_attention, resolve_dtype, torch_dtype
    from training.probe import choose_layout

    config = TrainConfig(
        max_seq_len=max_seq_len,
        packing=packing,
        share_prompt=share_prompt,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    reward_model, tokenizer = load_reward_model(
        model_name_or_path,
        dtype=torch_dtype(resolve_dtype(dtype)),
        trust_remote_code=trust_remote_code,
        attn_implementation=resolve_attention(attn_implementation),
    )
    reward_model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layout = choose_layout(config, reward_model, tokenizer.pad_token_id)
    return RewardEngine(reward_model, tokenizer, layout, max_seq_len, **engine_options)
