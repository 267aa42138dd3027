"""Bad input at scale: property tests that throw malformed preference data at the data layer and the evaluate CLI.

Every case must end in a clean `DataError` (exit status 2 with one line naming file, line and field from
`python -m training.evaluate`) or a documented skip (`skip_invalid_rows`, pairwise ties), never another
exception, a traceback or a hang. Each test is bounded by a SIGALRM watchdog and a fixed example budget.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import signal
import tempfile
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tiny_models import make_tokenizer, save_tiny_backbone, tokenizer_dir

from model_utils import create_critic_model, load_tokenizer
from model_utils.checkpoint import save_reward_model
from training import evaluate
from training.data import DataError, load_preference_data, read_preference_rows, tokenize_pair

# Each test gets a bounded budget: few examples, a per-example deadline, and a hard watchdog for hangs.
FAST = settings(
    max_examples=100,
    deadline=2000,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SLOW = settings(FAST, max_examples=25, deadline=10_000)
WATCHDOG_SECONDS = 60

ODD_PIECES = [
    "the cat",
    " red",
    "\u202eevil\u202c",  # right-to-left override
    "\u05e9\u05dc\u05d5\u05dd",  # Hebrew (RTL)
    "\u0645\u0631\u062d\u0628\u0627",  # Arabic (RTL)
    "e\u0301\u0301\u0301",  # stacked combining marks
    "\u0000",  # NUL
    "\ud800",  # unpaired surrogates (written as JSON escapes)
    "\udfff",
    "\U0001f600",  # emoji
    "\U0001f469\u200d\U0001f469\u200d\U0001f467",  # ZWJ sequence
    "\ufeff",  # byte-order mark inside text
    "\u2028\u2029",  # JSON-legal line separators
    "\u200b",  # zero-width space
    "\U0010ffff",
    "\r",
    "\t",
    "   ",
    "",
    '"',
    "\\",
    "\n\nHuman: hi\n\nAssistant:",
]
odd_text = st.lists(st.one_of(st.sampled_from(ODD_PIECES), st.text(max_size=6)), max_size=5).map("".join)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    odd_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(odd_text, inner, max_size=3)),
    max_leaves=8,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": odd_text}
)
odd_message = st.one_of(message, st.dictionaries(st.sampled_from(["role", "content", "x"]), json_values))
field_value = st.one_of(
    odd_text, json_values, st.lists(message, max_size=3), st.lists(odd_message, max_size=3)
)
FIELDS = ("prompt", "chosen", "rejected", "margin")
row_values = st.fixed_dictionaries({}, optional={name: field_value for name in FIELDS}) | st.dictionaries(
    odd_text, json_values, max_size=4
)


@st.composite
def jsonl_lines(draw) -> str:
    """One line: a JSON object (maybe broken), a JSON non-object, garbage, or blank."""
    kind = draw(st.sampled_from(["row", "row", "row", "truncated", "scalar", "garbage", "blank"]))
    if kind == "row":
        return json.dumps(draw(row_values), ensure_ascii=draw(st.booleans()))
    if kind == "truncated":
        text = json.dumps(draw(row_values))
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if kind == "scalar":
        return json.dumps(draw(json_values))
    if kind == "garbage":
        return draw(odd_text).replace("\n", " ").replace("\ud800", "?").replace("\udfff", "?")
    return draw(st.sampled_from(["", "   ", "\t"]))


def good_row(index: int) -> dict:
    return {"prompt": f"the cat {index}", "chosen": " red yes", "rejected": " blue no"}


# Field-level defects: (field, value, words the message must contain besides file, line and field)
FIELD_DEFECTS = [
    ("chosen", None, "None"),
    ("chosen", 5, "int"),
    ("rejected", ["x"], "message 0"),
    ("rejected", {"role": "user"}, "dict"),
    ("prompt", [[1, 2]], "message 0"),
    ("chosen", "   ", "empty"),
    ("chosen", "", "empty"),
    ("chosen", "a\ud800", "unicode"),
    ("rejected", [{"role": "assistant", "content": "\udfff"}], "unicode"),
    ("margin", "big", "number"),
    ("margin", float("nan"), "finite"),
    ("margin", 10**400, "finite"),
    ("margin", [1.0], "number"),
]
LINE_DEFECTS = ['{"prompt": "a", "chosen": "b"', "[1, 2, 3]", "null", "17", "[" * 50_000 + "]" * 50_000]


@contextlib.contextmanager
def watchdog(seconds: int = WATCHDOG_SECONDS) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the body runs longer than `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"no result within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _no_hang():
    with watchdog():
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(with_pad=True)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="rs-property-") as folder:
        yield folder


def write_lines(folder: str, lines: list[str], name: str = "data.jsonl") -> str:
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as file:
        file.write("\n".join(lines) + "\n")
    return path


def check_valid_rows(source) -> None:
    """What `read_preference_rows` returns is well-formed: texts or message lists, non-empty responses."""
    for row in source.rows + (source.eval_rows or []):
        for content in (row.prompt, row.chosen, row.rejected):
            assert isinstance(content, str | list)
            if isinstance(content, list):
                assert all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in content)
        assert row.margin is None or isinstance(row.margin, float)


def check_pairs(pairs: list[dict], tokenizer, max_seq_len: int) -> None:
    for pair in pairs:
        assert (
            len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"])) <= max_seq_len
        )
        assert pair["chosen_ids"][-1] == tokenizer.eos_token_id
        assert pair["rejected_ids"][-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------------------
# Data layer


@FAST
@given(lines=st.lists(jsonl_lines(), min_size=1, max_size=8), skip=st.booleans())
def test_any_jsonl_file_reads_or_raises_data_error_naming_the_file(workdir, lines, skip):
    path = write_lines(workdir, lines)
    try:
        source = read_preference_rows(path, skip_invalid_rows=skip)
    except DataError as error:
        assert path in str(error) or "invalid preference row" in str(error)
        if "invalid preference row" in str(error):
            assert f"{path} line " in str(error)
        return
    check_valid_rows(source)
    skipped = sum(source.skipped.values())
    assert len(source.rows) + skipped + source.ties_skipped == source.rows_read
    assert skip or skipped == 0


@FAST
@given(
    position=st.integers(0, 5),
    defect=st.sampled_from(FIELD_DEFECTS),
    ensure_ascii=st.booleans(),
)
def test_one_bad_field_is_reported_with_file_line_and_field(workdir, position, defect, ensure_ascii):
    field, value, words = defect
    rows = [good_row(index) for index in range(6)]
    rows[position][field] = value
    lines = [json.dumps(row, ensure_ascii=ensure_ascii) for row in rows]
    path = write_lines(workdir, lines)
    with pytest.raises(DataError) as raised:
        read_preference_rows(path)
    message = str(raised.value)
    if (
        not ensure_ascii and "unicode" in words
    ):  # a raw unpaired surrogate is not UTF-8: the file is unreadable
        assert f"{path} line {position + 1}: not UTF-8 text" in message, message
        return
    assert f"{path} line {position + 1}: field '{field}'" in message, message
    assert words in message, message
    skipped = read_preference_rows(path, skip_invalid_rows=True)
    assert len(skipped.rows) == 5 and sum(skipped.skipped.values()) == 1


@FAST
@given(position=st.integers(0, 3), defect=st.sampled_from(LINE_DEFECTS))
def test_one_broken_line_is_reported_with_file_and_line(workdir, position, defect):
    lines = [json.dumps(good_row(index)) for index in range(4)]
    lines[position] = defect
    path = write_lines(workdir, lines)
    with pytest.raises(DataError) as raised:
        read_preference_rows(path)
    assert f"{path} line {position + 1}: " in str(raised.value)
    assert len(read_preference_rows(path, skip_invalid_rows=True).rows) == 3


@FAST
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {"prompt": odd_text, "chosen": odd_text, "rejected": odd_text},
            optional={"margin": st.floats(-5, 5)},
        ),
        min_size=1,
        max_size=6,
    ),
    max_seq_len=st.integers(3, 24),
)
@example(rows=[{"prompt": "the cat " * 5000, "chosen": " red" * 3000, "rejected": " no"}], max_seq_len=16)
def test_odd_unicode_rows_load_and_tokenize_within_bounds_or_raise_data_error(
    workdir, tokenizer, rows, max_seq_len
):
    path = write_lines(workdir, [json.dumps(row) for row in rows])
    try:
        data = load_preference_data(
            [path], tokenizer, max_seq_len, data_split="0,1", skip_invalid_rows=True, eval_fraction=0.0
        )
    except DataError as error:
        assert path in str(error)  # e.g. no training rows left after skipping
        return
    check_pairs([*data.train, *data.eval], tokenizer, max_seq_len)
    assert data.stats["train_pairs"] + sum(data.stats["skipped_rows"].values()) == len(rows)


@FAST
@given(
    prompt=field_value,
    chosen=field_value,
    rejected=field_value,
    margin=json_values,
    max_seq_len=st.integers(3, 16),
)
def test_tokenize_pair_accepts_texts_and_messages_and_rejects_the_rest_cleanly(
    tokenizer, prompt, chosen, rejected, margin, max_seq_len
):
    try:
        pair, _ = tokenize_pair(tokenizer, prompt, chosen, rejected, max_seq_len, margin=margin)
    except DataError as error:
        assert str(error).startswith("tokenize_pair: ")
        return
    check_pairs([pair], tokenizer, max_seq_len)


@FAST
@given(
    payload=st.one_of(st.binary(max_size=64), odd_text.map(lambda t: t.encode("utf-8", "surrogatepass"))),
    name=st.sampled_from(
        ["d.jsonl", "d.json", "d.parquet", "d.jsonl.gz", "d.json.gz", "d.txt", "d.csv", "d", "train.JSONL"]
    ),
    gzipped=st.booleans(),
)
@example(payload=b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage", name="d.jsonl.gz", gzipped=False)
@example(payload=b"\xef\xbb\xbf" + json.dumps(good_row(0)).encode(), name="d.jsonl", gzipped=False)
def test_any_bytes_under_any_extension_read_or_raise_data_error(workdir, payload, name, gzipped):
    path = os.path.join(workdir, name)
    with open(path, "wb") as file:
        file.write(gzip.compress(payload) if gzipped else payload)
    try:
        source = read_preference_rows(path, skip_invalid_rows=True)
    except DataError as error:
        assert path in str(error), str(error)
        return
    check_valid_rows(source)


def test_pairwise_rows_that_are_all_ties_are_a_documented_skip(workdir, tokenizer):
    rows = [{"instruction": "the cat", "output_1": " red", "output_2": " blue", "preference": 0}] * 3
    path = write_lines(workdir, [json.dumps(row) for row in rows], "ties.jsonl")
    source = read_preference_rows(path)
    assert source.rows == [] and source.ties_skipped == 3
    with pytest.raises(DataError, match="no training rows"):
        load_preference_data([path], tokenizer, max_seq_len=16)


# ---------------------------------------------------------------------------------------------------------
# The evaluate command


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("property-rm")
    base = save_tiny_backbone(str(root / "base"), "llama")
    tokenizer = load_tokenizer(tokenizer_dir(base))
    reward_model = create_critic_model(base, tokenizer, dropout=0.0).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(reward_model.v_head.weight)
    return save_reward_model(reward_model, tokenizer, str(root / "rm"))


def run_evaluate(arguments: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = evaluate.main(arguments)
    return status, out.getvalue(), err.getvalue()


def check_evaluate_outcome(status: int, out: str, err: str, path: str) -> None:
    assert "Traceback" not in err
    if status == 0:
        record = json.loads(out.strip().splitlines()[-1])
        assert record["num_pairs"] > 0 and 0.0 <= record["accuracy"] <= 1.0
        return
    assert status == 2, (status, err)
    assert err.startswith("rewardspeed-evaluate: error: "), err
    assert path in err, err


@SLOW
@given(lines=st.lists(jsonl_lines(), min_size=1, max_size=6))
@example(lines=[json.dumps({"instruction": "a", "output_1": "b", "output_2": "c", "preference": 0})])
@example(lines=["[" * 50_000 + "]" * 50_000])
@example(lines=[json.dumps({"chosen": "the cat " * 20_000, "rejected": "the dog " * 20_000})])
def test_evaluate_on_malformed_files_exits_0_or_2_without_traceback(reward_model_dir, workdir, lines):
    path = write_lines(workdir, lines, "eval.jsonl")
    status, out, err = run_evaluate(
        ["--model_name_or_path", reward_model_dir, "--data_path", path, "--max_seq_len", "16"]
    )
    check_evaluate_outcome(status, out, err, path)


@SLOW
@given(position=st.integers(0, 3), defect=st.sampled_from(FIELD_DEFECTS))
def test_evaluate_names_file_line_and_field_of_a_bad_row(reward_model_dir, workdir, position, defect):
    field, value, _ = defect
    rows = [good_row(index) for index in range(4)]
    rows[position][field] = value
    path = write_lines(workdir, [json.dumps(row) for row in rows], "eval.jsonl")
    status, _, err = run_evaluate(["--model_name_or_path", reward_model_dir, "--data_path", path])
    assert status == 2 and "Traceback" not in err
    assert f"{path} line {position + 1}: field '{field}'" in err, err


@pytest.mark.parametrize(
    "name, payload",
    [
        ("data.txt", b"hello"),
        ("data.csv", b"prompt,chosen,rejected\na,b,c\n"),
        ("data.parquet", json.dumps(good_row(0)).encode()),
        ("data.jsonl", b"\xff\xfe\x00garbage"),
        ("data.jsonl.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage"),
        ("data.json", b"[" * 50_000),
    ],
)
def test_evaluate_on_wrong_extensions_and_bytes_exits_2(reward_model_dir, tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    status, out, err = run_evaluate(["--model_name_or_path", reward_model_dir, "--data_path", str(path)])
    assert status == 2
    check_evaluate_outcome(status, out, err, str(path))
