"""training.serve: the reward server on 127.0.0.1, its engine, and its clients (OpenRLHF's requests, TRL's calls).

    python -m pytest tests/test_serve.py -q            # live servers (python -m training.serve), tiny models
    python -m pytest tests/test_serve.py -m slow -q    # + the real OpenRLHF clients (0.8.11, 0.11.2) in a venv

Every reward is checked against `training.evaluate --score` (`score_responses`) on the same texts, fp32 1e-5.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from launch_utils import ROOT, launcher_environment
from test_formats import trained
from tiny_models import save_tiny_backbone
from transformers import AutoModelForSequenceClassification

from model_utils.checkpoint import save_reward_model
from model_utils.model_factory import load_reward_model
from training.arguments import TrainConfig
from training.data.records import DataError
from training.data.tokenize import tokenize_response, tokenize_responses
from training.evaluate import main as evaluate_main
from training.evaluate import score_responses
from training.layout import MASK, PADDED, SEGMENTS
from training.probe import choose_layout
from training.serve import build_parser
from training.serve import main as serve_main
from training.serve_client import RewardClient, RewardServerError
from training.serve_engine import QueueFull, RewardEngine, ScoreGroup
from training.serve_requests import RequestError, RequestLimits, parse_get_reward_request

MAX_SEQ_LEN = 32
TOLERANCE = 1e-5
NORMALIZATION = {"reward_mean": 0.25, "reward_std": 1.5}
PROMPT = "the cat has a red hat . what color is the hat of the cat ?"
LONG = " " + " ".join(["the dog sits on the box and the bird likes the green hat"] * 4)  # > MAX_SEQ_LEN
GROUPS = [
    (PROMPT, [" red yes", " blue no", " green", " the red one and not the blue one"]),
    (PROMPT, [LONG, " red", LONG + " yes"]),  # two truncated responses beside an untruncated one
    ("where is the box", [" on the dog"]),
    (
        [{"role": "user", "content": "who likes the bird"}],
        [" the cat", [{"role": "assistant", "content": "no"}]],
    ),
    ("", [" the cat has a hat"]),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(hf folder, reward model, tokenizer): a tiny llama reward model with a saved eval mean/std."""
    root = tmp_path_factory.mktemp("serve")
    reward_model, tokenizer = trained(save_tiny_backbone(str(root / "base"), "llama"))
    folder = save_reward_model(reward_model, tokenizer, str(root / "hf"), "hf", NORMALIZATION)
    reward_model, tokenizer = load_reward_model(folder)  # exactly what the server loads
    return folder, reward_model, tokenizer


def expected_rewards(saved, prompt, responses) -> list[float]:
    _, reward_model, tokenizer = saved
    return score_responses(reward_model, tokenizer, [prompt] * len(responses), responses, MAX_SEQ_LEN)


def assert_rewards(actual, expected) -> None:
    assert len(actual) == len(expected)
    assert max((abs(a - b) for a, b in zip(actual, expected, strict=True)), default=0.0) < TOLERANCE, (
        actual,
        expected,
    )


# --- a live server --------------------------------------------------------------------------------------------


class Server:
    """`python -m training.serve ... --port 0` in its own process; its log says where it listens."""

    def __init__(self, folder: str, log: Path, *flags: str) -> None:
        command = [sys.executable, "-m", "training.serve", "--model_name_or_path", folder, "--port", "0"]
        command += ["--num_threads", "1", "--max_seq_len", str(MAX_SEQ_LEN), *flags]
        self.log = log
        with open(log, "w") as output:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=launcher_environment(), stdout=output, stderr=subprocess.STDOUT
            )
        self.port = None

    def wait_ready(self, timeout: float = 300) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited {self.process.returncode}:\n{self.output()}"
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.output())
            if found and "Application startup complete" in self.output():
                self.port = int(found.group(1))
                return self
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 60):
        """(status, lower-cased headers, JSON body)."""
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data)
        finally:
            connection.close()

    def post(self, path: str, body, **options):
        return self.request("POST", path, body, **options)

    def outstanding(self) -> int:
        return self.request("GET", "/health")[2]["outstanding"]

    def wait_outstanding(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.outstanding() != count:
            assert time.monotonic() < deadline, f"outstanding never reached {count}"
            time.sleep(0.02)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


# The main server: small request limits (texts of 4,000 characters, bodies of 64 KiB, 256 responses queued).
SERVER_FLAGS = (
    "--max_wait_ms",
    "20",
    "--max_text_chars",
    "4000",
    "--max_request_mb",
    "0.0625",
    "--max_queue",
    "256",
)
# The overload server: 4 responses queued at most, a micro-batch waits 3 s to fill 16 tokens, requests time out
# after 1.5 s.
OVERLOAD_FLAGS = (
    "--max_queue",
    "4",
    "--max_wait_ms",
    "3000",
    "--max_batch_tokens",
    "16",
    "--request_timeout_s",
    "1.5",
)


@pytest.fixture(scope="module")
def servers(saved, tmp_path_factory):
    """{"main", "overload"}: both started at once (start-up is mostly imports); each must exit 0, cleanly."""
    root = tmp_path_factory.mktemp("servers")
    live = {
        "main": Server(saved[0], root / "main.log", *SERVER_FLAGS),
        "overload": Server(saved[0], root / "overload.log", *OVERLOAD_FLAGS),
    }
    try:
        yield {name: process.wait_ready() for name, process in live.items()}
    finally:
        returncodes = {name: process.stop() for name, process in live.items()}
    for name, process in live.items():
        assert returncodes[name] == 0 and "Traceback" not in process.output(), process.output()


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


# --- tokenisation ---------------------------------------------------------------------------------------------


def test_tokenize_responses_truncates_each_response_on_its_own(saved):
    _, _, tokenizer = saved
    for prompt, responses in GROUPS:
        sequences, truncated = tokenize_responses(tokenizer, prompt, responses, MAX_SEQ_LEN)
        assert sequences == [tokenize_response(tokenizer, prompt, r, MAX_SEQ_LEN) for r in responses]
        assert all(len(sequence) <= MAX_SEQ_LEN for sequence in sequences)
        assert truncated == [isinstance(r, str) and r.startswith(LONG) for r in responses]
    # A truncated response keeps the prompt's end and its own EOS; its neighbours are untouched by it.
    (short, long), _ = tokenize_responses(tokenizer, PROMPT, [" red", LONG], MAX_SEQ_LEN)
    assert long[-1] == tokenizer.eos_token_id and short == tokenize_response(tokenizer, PROMPT, " red", 512)


# --- /score and /get_reward -----------------------------------------------------------------------------------


def test_score_equals_evaluate_score_and_sequence_classification(server, saved, capsys):
    folder, _, tokenizer = saved
    status, headers, answer = server.post("/score", [{"prompt": p, "responses": r} for p, r in GROUPS])
    assert status == 200 and headers["content-type"] == "application/json", answer
    classifier = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    for (prompt, responses), group in zip(GROUPS, answer, strict=True):
        assert_rewards(group["rewards"], expected_rewards(saved, prompt, responses))
        mean, std = NORMALIZATION["reward_mean"], NORMALIZATION["reward_std"]
        assert_rewards(group["normalized_rewards"], [(r - mean) / std for r in group["rewards"]])
        with torch.no_grad():
            logits = [
                classifier(torch.tensor([tokenize_response(tokenizer, prompt, r, MAX_SEQ_LEN)])).logits[0, 0]
                for r in responses
            ]
        assert_rewards(group["rewards"], [float(logit) for logit in logits])
    # The CLI itself, on the text group with truncated responses.
    prompt, responses = GROUPS[1]
    arguments = [
        "--model_name_or_path",
        folder,
        "--score",
        "--prompt",
        prompt,
        "--max_seq_len",
        str(MAX_SEQ_LEN),
    ]
    assert evaluate_main(arguments + [a for r in responses for a in ("--response", r)]) == 0
    assert_rewards(answer[1]["rewards"], json.loads(capsys.readouterr().out.splitlines()[-1])["scores"])
    # One object in, one object out.
    status, _, single = server.post("/score", {"prompt": GROUPS[2][0], "responses": GROUPS[2][1]})
    assert status == 200 and set(single) == {"rewards", "normalized_rewards"}
    assert_rewards(single["rewards"], answer[2]["rewards"])


def test_get_reward_answers_openrlhf_clients_exactly(server, saved):
    prompts = [PROMPT, PROMPT, "where is the box", "no prompt here"]
    responses = [" red yes", " blue no", " on the dog", "the cat likes the box"]
    queries = [p + r for p, r in zip(prompts[:3], responses[:3], strict=True)] + [responses[3]]
    body = {"query": queries, "prompts": prompts, "labels": ["", "", "", ""]}
    # OpenRLHF 0.6-0.8: requests.post(url, json=body, headers={"Content-Type": "application/json"}): these bytes.
    requests_style = {
        "User-Agent": "python-requests/2.32.3",
        "Accept-Encoding": "gzip, deflate",
        "Accept": "*/*",
        "Connection": "keep-alive",
        "Content-Type": "application/json",
    }
    status, headers, answer = server.post("/get_reward", json.dumps(body).encode(), headers=requests_style)
    assert status == 200 and headers["content-type"] == "application/json"
    assert set(answer) == {"rewards", "scores"}  # an "extra_logs" would crash OpenRLHF 0.8's client
    expected = [expected_rewards(saved, p, [r])[0] for p, r in zip(prompts[:3], responses[:3], strict=True)]
    expected.append(expected_rewards(saved, "", [queries[3]])[0])  # prompt not a prefix: the query whole
    assert_rewards(answer["rewards"], expected)
    assert answer["scores"] == answer["rewards"]
    assert "do not start with their prompt" in server.output()
    # OpenRLHF 0.9-0.11: aiohttp, one sample per request; an empty batch goes to the other URLs.
    aiohttp_style = {"Content-Type": "application/json", "User-Agent": "Python/3.11 aiohttp/3.12.15"}
    one = {"query": queries[:1], "prompts": prompts[:1], "labels": [{"answer": 1}]}
    status, headers, answer = server.post("/get_reward", json.dumps(one).encode(), headers=aiohttp_style)
    assert status == 200 and headers["content-type"] == "application/json"
    assert_rewards(answer["rewards"], expected[:1])
    empty = {"query": [], "prompts": [], "labels": []}
    assert server.post("/get_reward", empty, headers=aiohttp_style)[::2] == (
        200,
        {"rewards": [], "scores": []},
    )


def test_get_reward_groups_queries_by_prompt():
    body = {"query": ["p a", "q b", "p c", "x"], "prompts": ["p", "q", "p", "y"]}
    groups, where, whole = parse_get_reward_request(body, RequestLimits())
    assert [(g.prompt, g.responses) for g in groups] == [("p", [" a", " c"]), ("q", [" b"]), ("", ["x"])]
    assert where == [(0, 0), (1, 0), (0, 1), (2, 0)] and whole == [3]
    groups, where, whole = parse_get_reward_request({"query": ["a", "b"]}, RequestLimits())
    assert [(g.prompt, g.responses) for g in groups] == [("", ["a", "b"])] and whole == []


MALFORMED = [
    (b'{"prompt": ', 400, "malformed JSON"),
    (b"\xff\xfe", 400, "malformed JSON"),
    (b"5", 422, "the body"),
    (b'{"responses": [" a"]}', 422, "'prompt': missing"),
    (b'{"prompt": "a"}', 422, "'responses': missing"),
    (b'{"prompt": "a", "respones": []}', 422, "'respones': unknown"),
    (b'{"prompt": "a", "responses": " b"}', 422, "'responses': expected a list"),
    (b'{"prompt": "a", "responses": [" b", 7]}', 422, "'responses[1]'"),
    (b'{"prompt": 3, "responses": [" b"]}', 422, "'prompt'"),
    (
        b'{"prompt": [{"role": "user"}], "responses": [" b"]}',
        422,
        "message 0 needs text 'role' and 'content'",
    ),
    (b'[{"prompt": "a", "responses": ["b"]}, 4]', 422, "[1]"),
    (b'{"prompt": "\\ud800", "responses": ["b"]}', 422, "invalid unicode"),
    (json.dumps({"prompt": "a" * 5000, "responses": ["b"]}).encode(), 413, "--max_text_chars"),
    (json.dumps({"prompt": "a", "responses": ["b"] * 257}).encode(), 413, "--max_queue"),
    (b"[" + b" " * 70000 + b"]", 413, "--max_request_mb"),
]
MALFORMED_GET_REWARD = [
    (b'{"prompts": ["a"]}', 422, "'query': missing"),
    (b'{"query": "a b"}', 422, "'query': expected a list"),
    (b'{"query": ["a b", 3]}', 422, "'query[1]'"),
    (b'{"query": ["a b"], "prompts": ["a", "b"]}', 422, "2 prompts for 1 queries"),
    (b'{"query": ["a b"], "prompts": [null]}', 422, "'prompts[0]'"),
    (b"[]", 422, "the body"),
]


@pytest.mark.parametrize(
    "path, body, status, message",
    [("/score", *case) for case in MALFORMED] + [("/get_reward", *case) for case in MALFORMED_GET_REWARD],
)
def test_malformed_requests_get_a_json_4xx_naming_the_field(server, path, body, status, message):
    got, headers, answer = server.post(path, body, headers={"Content-Type": "application/json"})
    assert (got, headers["content-type"]) == (status, "application/json"), answer
    assert message in answer["error"], answer
    assert server.post("/score", {"prompt": "a", "responses": [" b"]})[0] == 200  # still serving


def test_64_concurrent_clients_get_every_answer_right(server, saved):
    cases = [(p, r[i:] + r[:i]) for p, r in GROUPS for i in range(len(r))]  # 14 requests, rotated responses
    expected = {json.dumps(case): expected_rewards(saved, *case) for case in cases}
    before = server.request("GET", "/info")[2]["counts"]

    def client(index: int) -> list[str]:
        wrong = []
        for step in range(4):
            prompt, responses = cases[(index + 5 * step) % len(cases)]
            status, _, answer = server.post("/score", {"prompt": prompt, "responses": responses})
            rewards = answer.get("rewards", [])
            want = expected[json.dumps((prompt, responses))]
            if (
                status != 200
                or len(rewards) != len(want)
                or max(abs(a - b) for a, b in zip(rewards, want, strict=True)) > TOLERANCE
            ):
                wrong.append(f"client {index} step {step}: {status} {answer} != {want}")
        return wrong

    with ThreadPoolExecutor(64) as pool:
        wrong = [problem for problems in pool.map(client, range(64)) for problem in problems]
    assert wrong == []
    counts = server.request("GET", "/info")[2]["counts"]
    responses = sum(len(cases[(i + 5 * s) % len(cases)][1]) for i in range(64) for s in range(4))
    assert counts["responses"] - before["responses"] == responses
    assert counts["micro_batches"] - before["micro_batches"] < 64 * 4  # requests shared micro-batches
    assert server.outstanding() == 0


# --- clients --------------------------------------------------------------------------------------------------


def test_reward_client_as_a_trl_reward_function(server, saved):
    client = RewardClient(f"http://127.0.0.1:{server.port}")
    assert client.__name__ == "rewardspeed"
    # GRPO: the G completions of a prompt side by side, the prompt repeated; extra columns as keywords.
    prompts = [PROMPT] * 3 + ["where is the box"] * 2
    completions = [" red yes", " blue no", LONG, " on the dog", " no"]
    rewards = client(prompts=prompts, completions=completions, completion_ids=[[1]] * 5, solution=["x"] * 5)
    want = expected_rewards(saved, PROMPT, completions[:3]) + expected_rewards(
        saved, prompts[3], completions[3:]
    )
    assert_rewards(rewards, want)
    # Conversational: message-list prompts and [{"role": "assistant", ...}] completions.
    prompt = [{"role": "user", "content": "who likes the bird"}]
    completions = [[{"role": "assistant", "content": "the cat"}], [{"role": "assistant", "content": "no"}]]
    assert_rewards(
        client(prompts=[prompt, prompt], completions=completions),
        expected_rewards(saved, prompt, completions),
    )
    normalized = RewardClient(client.url, normalized=True)(prompts=[PROMPT], completions=[" red yes"])
    assert_rewards(normalized, [(want[0] - 0.25) / 1.5])
    with pytest.raises(RewardServerError, match=r"HTTP 422: field '\[0\]\.responses\[0\]'"):
        client(prompts=["a"], completions=[5])
    unreachable = RewardClient("http://127.0.0.1:9", retries=2, retry_wait_s=0.01)
    with pytest.raises(RewardServerError, match="failed 2 times"):
        unreachable(prompts=["a"], completions=["b"])


# --- overload, timeout, shutdown ------------------------------------------------------------------------------


def test_full_queue_timeout_and_sigterm_drain(servers, saved):
    """503 when the queue is full, 504 after the request timeout (its responses dropped), then SIGTERM: the
    request in flight is answered and the process exits 0 (`OVERLOAD_FLAGS`)."""
    live = servers["overload"]
    small = {"prompt": "the", "responses": [" cat", " dog", " bird"]}  # 7 tokens: waits for the batch to fill
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(live.post, "/score", small)
        live.wait_outstanding(3)
        status, headers, answer = live.post("/score", {"prompt": "the", "responses": [" a", " b"]})
        assert (status, headers["retry-after"]) == (503, "1") and "--max_queue 4" in answer["error"]
        status, _, answer = waiting.result()
        assert status == 504 and "--request_timeout_s 1.5" in answer["error"], answer
    live.wait_outstanding(0)  # the timed-out responses were dropped, not scored
    assert live.request("GET", "/info")[2]["counts"]["responses"] == 0
    full = (PROMPT, [" red yes", " blue no", " green", " the dog"])  # fills the batch: runs at once
    status, _, answer = live.post("/score", {"prompt": full[0], "responses": full[1]})
    assert status == 200, answer
    assert_rewards(answer["rewards"], expected_rewards(saved, *full))
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(live.post, "/score", {"prompt": "the", "responses": [" cat"]})
        live.wait_outstanding(1)
        live.process.send_signal(signal.SIGTERM)
        status, _, answer = in_flight.result()
    assert status == 200, answer
    assert_rewards(answer["rewards"], expected_rewards(saved, "the", [" cat"]))
    assert live.process.wait(60) == 0, live.output()
    assert "drained; 5 responses scored" in live.output() and "Traceback" not in live.output()


def test_readme_documents_every_serve_flag():
    readme = (Path(ROOT) / "README.md").read_text(encoding="utf-8")
    flags = [
        option for action in build_parser()._actions for option in action.option_strings if option != "-h"
    ]
    assert [flag for flag in flags if flag != "--help" and f"`{flag}`" not in readme] == []


def test_bad_flags_and_folders_exit_2(saved, capsys):
    folder = saved[0]
    assert serve_main(["--model_name_or_path", "/no/such/folder"]) == 2
    assert "/no/such/folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        serve_main(["--model_name_or_path", folder, "--max_batch_tokens", "0"])
    assert exited.value.code == 2 and "--max_batch_tokens must be positive" in capsys.readouterr().err
    unnormalised = save_reward_model(saved[1], saved[2], os.path.join(os.path.dirname(folder), "plain"), "hf")
    assert serve_main(["--model_name_or_path", unnormalised, "--normalize_reward"]) == 2
    assert "--normalize_reward" in capsys.readouterr().err.splitlines()[-1]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        assert serve_main(["--model_name_or_path", folder, "--port", port, "--max_seq_len", "32"]) == 2
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err.splitlines()[-1]


# --- the engine, in process -----------------------------------------------------------------------------------


def engine_for(reward_model, tokenizer, **options) -> RewardEngine:
    layout = choose_layout(TrainConfig(max_seq_len=MAX_SEQ_LEN), reward_model, tokenizer.pad_token_id)
    return RewardEngine(reward_model, tokenizer, layout, MAX_SEQ_LEN, **options)


@pytest.mark.parametrize(
    "architecture, attention, dtype, layout",
    [
        ("llama", "sdpa", torch.float32, SEGMENTS),
        ("llama", "eager", torch.float32, MASK),
        ("gpt2", "sdpa", torch.float32, SEGMENTS),  # absolute positions restart per branch
        ("bloom", "sdpa", torch.float32, PADDED),  # ALiBi: not packed
        ("qwen2", "sdpa", torch.bfloat16, SEGMENTS),
    ],
)
def test_engine_layouts_score_like_evaluate(tmp_path, architecture, attention, dtype, layout):
    reward_model, tokenizer = trained(save_tiny_backbone(str(tmp_path / "base"), architecture))
    folder = save_reward_model(reward_model, tokenizer, str(tmp_path / "hf"), "hf")
    reward_model, tokenizer = load_reward_model(folder, dtype=dtype)
    if attention == "eager":
        reward_model.backbone.set_attn_implementation("eager")
    expected = [
        score_responses(reward_model, tokenizer, [p] * len(r), r, MAX_SEQ_LEN) for p, r in GROUPS
    ]  # before the engine's layout switches the attention: one unpadded sequence at a time
    engine = engine_for(reward_model, tokenizer, max_wait_ms=50)
    assert engine.layout.attention == layout
    engine.start()
    try:
        futures = [engine.submit([ScoreGroup(p, r)]) for p, r in GROUPS]
        together = engine.score([ScoreGroup(p, r) for p, r in GROUPS])
    finally:
        engine.stop()
    tolerance = TOLERANCE if dtype == torch.float32 else 0.05  # bf16: another batch shape, other roundings
    for (result,), group, want in zip((f.result() for f in futures), together, expected, strict=True):
        for actual in (result, group):
            assert max(abs(a - b) for a, b in zip(actual, want, strict=True)) < tolerance, (actual, want)


def test_engine_shares_one_prompt_across_requests_and_bounds_its_queue(saved):
    _, reward_model, tokenizer = saved
    engine = engine_for(reward_model, tokenizer, max_wait_ms=2000, max_queue=4)
    responses = [" red yes", " blue no", " green"]
    engine.start()
    try:
        # OpenRLHF >= 0.9 sends each sample alone: they meet in one micro-batch (the first waits 2 s for more).
        futures = [engine.submit([ScoreGroup(PROMPT, [response])]) for response in responses]
        with pytest.raises(QueueFull, match="--max_queue 4"):
            engine.submit([ScoreGroup(PROMPT, [" a", " b"])])
        rewards = [future.result(60)[0][0] for future in futures]
    finally:
        engine.stop()
    assert_rewards(rewards, expected_rewards(saved, PROMPT, responses))
    sequences = [tokenize_response(tokenizer, PROMPT, response, MAX_SEQ_LEN) for response in responses]
    prompt_tokens = len(tokenize_response(tokenizer, PROMPT, " red", MAX_SEQ_LEN)) - 2  # the shared prefix
    assert engine.counts["micro_batches"] == 1
    assert engine.counts["computed_tokens"] == sum(map(len, sequences)) - 2 * prompt_tokens  # prompt once
    assert engine.outstanding == 0


def test_engine_drops_a_cancelled_request_and_survives_a_template_error(saved):
    _, reward_model, tokenizer = saved
    engine = engine_for(reward_model, tokenizer, max_wait_ms=300)
    engine.start()
    try:
        cancelled = engine.submit([ScoreGroup(PROMPT, [" red"])])
        assert cancelled.cancel()
        template, tokenizer.chat_template = tokenizer.chat_template, "{{ raise_exception('no') }}"
        try:
            broken = engine.submit([ScoreGroup([{"role": "user", "content": "a"}], [" b"])])
            with pytest.raises(DataError, match="group 0: the tokenizer's chat template failed"):
                broken.result(60)
        finally:
            tokenizer.chat_template = template
        assert_rewards(
            engine.score([ScoreGroup(PROMPT, [" blue"])], 60)[0], expected_rewards(saved, PROMPT, [" blue"])
        )
    finally:
        engine.stop()
    assert engine.counts["responses"] == 1 and engine.outstanding == 0


def test_request_limits_refuse_before_queueing():
    with pytest.raises(RequestError, match="--max_queue 2") as refused:
        parse_get_reward_request({"query": ["a", "b", "c"]}, RequestLimits(max_responses=2))
    assert refused.value.status == 413


# --- the real OpenRLHF clients (slow: they install OpenRLHF into a venv) -------------------------------------

OPENRLHF_CLIENT = r"""
import asyncio, importlib.util, json, os, sys, types
url, version, queries, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
# The client code needs neither a GPU nor OpenRLHF's package __init__ (which imports deepspeed, vllm, ...).
utils = types.ModuleType("openrlhf.utils")
utils.__path__ = [os.path.join(list(importlib.util.find_spec("openrlhf").submodule_search_locations)[0], "utils")]
sys.modules["openrlhf.utils"] = utils
if version.startswith("0.8"):  # one batched request through requests.post
    ray = types.ModuleType("ray")
    ray.remote = lambda o=None, **k: o or (lambda x: x)
    sys.modules["ray"] = ray
    from openrlhf.utils.remote_rm_utils import request_api_wrapper
    answer = request_api_wrapper(url, {"query": queries, "prompts": prompts, "labels": [""] * len(queries)})
    print(json.dumps({"rewards": answer["rewards"], "scores": answer.get("scores", answer["rewards"])}))
else:  # one sample per request through aiohttp, as a rollout sends it
    from openrlhf.utils.agent import SingleTurnAgentExecutor
    executor = SingleTurnAgentExecutor(url)
    answers = [asyncio.run(executor._fetch_rewards_via_http([q], [p], [""]))[0] for q, p in zip(queries, prompts)]
    print(json.dumps({key: [a[key][0] for a in answers] for key in ("rewards", "scores")}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.8.11", "0.11.2"])
def test_real_openrlhf_client(server, saved, version, tmp_path):
    """OpenRLHF's own remote-RM client code (installed without its GPU stack) against the live server."""
    from test_consumers import VENV_ROOT, file_lock, pip_install

    venv = VENV_ROOT / "openrlhf-client"
    python, target = venv / "bin" / "python", venv / f"openrlhf-{version}"
    with file_lock(VENV_ROOT / "openrlhf-client.lock"):
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
            pip_install(python, ("requests", "aiohttp"))
        if not target.exists():
            pip_install(python, ("--no-deps", "--target", str(target), f"openrlhf=={version}"))
    prompts = [PROMPT, PROMPT, "where is the box"]
    responses = [" red yes", " blue no", " on the dog"]
    queries = [p + r for p, r in zip(prompts, responses, strict=True)]
    script = tmp_path / "client.py"
    script.write_text(OPENRLHF_CLIENT)
    url = f"http://127.0.0.1:{server.port}/get_reward"
    completed = subprocess.run(
        [str(python), str(script), url, version, json.dumps(queries), json.dumps(prompts)],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(target), "HOME": os.environ.get("HOME", "/")},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    answer = json.loads(completed.stdout.strip().splitlines()[-1])
    want = [expected_rewards(saved, p, [r])[0] for p, r in zip(prompts, responses, strict=True)]
    assert_rewards(answer["rewards"], want)
    assert_rewards(answer["scores"], want)


TRL_GRPO = r"""
import json, sys, tempfile
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import GRPOConfig, GRPOTrainer
from training.serve_client import RewardClient

url, tokenizer_dir = sys.argv[1:3]
calls = []


class Recorded(RewardClient):  # what TRL asked and what the server answered
    def __call__(self, prompts, completions, **kwargs):
        rewards = super().__call__(prompts, completions, **kwargs)
        calls.append({"prompts": prompts, "completions": completions, "rewards": rewards})
        return rewards


tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
tokenizer.add_special_tokens({"pad_token": "<pad>"})
config = LlamaConfig(
    vocab_size=44, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=tokenizer.pad_token_id,
)
policy = LlamaForCausalLM(config)
prompts = Dataset.from_dict({"prompt": ["the cat has a red hat . what color", "where is the box"]})
arguments = GRPOConfig(
    output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
    max_steps=1, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
)
trainer = GRPOTrainer(
    model=policy, reward_funcs=Recorded(url), args=arguments, train_dataset=prompts, processing_class=tokenizer
)
trainer.train()
print(json.dumps({"calls": calls, "log": trainer.state.log_history}))
"""


@pytest.mark.slow
def test_real_trl_grpo_trainer_with_reward_client(server, saved, tmp_path):
    """One GRPO step of TRL 1.16 on a tiny policy with `reward_funcs=RewardClient(url)`: every completion it
    generated is scored by the server as `evaluate --score` scores it, and TRL logs the reward."""
    from test_consumers import VENV_ROOT, file_lock, pip_install

    venv = VENV_ROOT / "trl116-client"
    python = venv / "bin" / "python"
    with file_lock(VENV_ROOT / "trl116-client.lock"):
        if not (venv / "trl-installed").exists():
            # TRL 1.16 runs on this environment's torch, transformers 5, accelerate and datasets: only TRL is added.
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
            pip_install(python, ("--no-deps", "trl==1.16.0"))
            (venv / "trl-installed").write_text("trl==1.16.0\n")
    script = tmp_path / "grpo.py"
    script.write_text(TRL_GRPO)
    tokenizer_folder = str(Path(saved[0]).parent / "base" / "tokenizer")
    environment = {**launcher_environment(), "PYTHONPATH": ROOT, "WANDB_DISABLED": "true"}
    completed = subprocess.run(
        [str(python), str(script), f"http://127.0.0.1:{server.port}", tokenizer_folder],
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    answer = json.loads(completed.stdout.strip().splitlines()[-1])
    assert answer["calls"], "TRL never called the reward function"
    for call in answer["calls"]:
        assert len(call["rewards"]) == len(call["completions"]) == 4
        for prompt, completion, reward in zip(
            call["prompts"], call["completions"], call["rewards"], strict=True
        ):
            assert_rewards([reward], expected_rewards(saved, prompt, [completion]))
    logged = [record for record in answer["log"] if "rewards/rewardspeed/mean" in record]
    assert logged and all(
        record["rewards/rewardspeed/mean"] == record["rewards/rewardspeed/mean"] for record in logged
    )
