"""Tokenised data in flat arrays (`training/data/store.py`) and its per-node cache (`training/data/cache.py`).

The store gives back exactly what `tokenize_rows` gives (every example shape); a second load opens the cache
without reading or tokenising a row; anything that changes the tokens misses it; a half-written folder is never
used; invalid rows fail before anything is cached; two ranks of a node build it once together (torchrun).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from launch_utils import SCRIPTS, read_rank_results, torchrun
from tiny_models import make_tokenizer, write_tiny_pairs, write_tiny_ranked

from training.data import load
from training.data.cache import CACHE_ENV, MANIFEST, OWNER, resolve_cache_dir
from training.data.collate import example_sequence_lengths
from training.data.records import DataError, ListwiseOptions, example_comparisons, example_responses
from training.data.rows import DataOptions, read_phase_rows
from training.data.store import ExampleStore, IncompletePart, open_part, write_part
from training.data.tokenize import tokenize_chunks, tokenize_rows

MAX_SEQ_LEN = 24


@pytest.fixture
def tokenizer():
    return make_tokenizer(with_pad=True)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def chat_rows(count: int, last: str = "yes") -> list[dict]:
    """Chat pairs (full conversations) in the tiny vocabulary; the last row's chosen answer is `last`."""
    rows = []
    for index in range(count):
        user = {"role": "user", "content": f"what color is the {('cat', 'dog')[index % 2]} ?"}
        answer = last if index == count - 1 else "red yes"
        rows.append(
            {
                "chosen": [user, {"role": "assistant", "content": answer}],
                "rejected": [user, {"role": "assistant", "content": "blue no" + " no" * (index % 3)}],
            }
        )
    return rows


@pytest.fixture
def every_shape(tmp_path) -> list[str]:
    """Sources giving pairs with and without margins, K-wise groups, chat pairs, and truncated rows."""
    pairs = [
        {"prompt": "the cat has a red hat " * (1 + index % 4), "chosen": " red yes", "rejected": " blue no"}
        | ({"margin": index / 4} if index % 2 else {})
        for index in range(12)
    ]
    return [
        write_jsonl(tmp_path / "pairs.jsonl", pairs),
        write_tiny_ranked(str(tmp_path / "ranked.jsonl"), 12),
        write_jsonl(tmp_path / "chat.jsonl", chat_rows(8)),
    ]


def counted_loads(monkeypatch) -> dict[str, int]:
    """Counts rows tokenised and data reads of `load_preference_data` from now on."""
    counts = {"rows_tokenised": 0, "reads": 0}
    real_chunks, real_read = load.tokenize_chunks, load.read_phase_rows

    def counting_chunks(tokenizer, rows, max_seq_len, *args, **kwargs):
        counts["rows_tokenised"] += len(rows)
        return real_chunks(tokenizer, rows, max_seq_len, *args, **kwargs)

    def counting_read(*args, **kwargs):
        counts["reads"] += 1
        return real_read(*args, **kwargs)

    monkeypatch.setattr(load, "tokenize_chunks", counting_chunks)
    monkeypatch.setattr(load, "read_phase_rows", counting_read)
    return counts


def key_folders(cache: Path) -> list[Path]:
    return sorted(path for path in cache.iterdir() if ".tmp-" not in path.name) if cache.exists() else []


# ---------------------------------------------------------------------------------------------------------
# The store


@pytest.mark.parametrize("score_gap_margin", [0.0, 0.5])
def test_store_gives_back_every_example_shape_exactly(tmp_path, tokenizer, every_shape, score_gap_margin):
    options = DataOptions(MAX_SEQ_LEN, listwise=ListwiseOptions(score_gap_margin=score_gap_margin))
    rows = read_phase_rows(every_shape, [], options).train
    expected, counts = tokenize_rows(tokenizer, rows, MAX_SEQ_LEN)
    shapes = {
        ("response_ids" in example, "margins" in example, example.get("margin") is not None)
        for example in expected
    }
    assert {(False, False, False), (False, False, True), (True, score_gap_margin > 0, False)} <= shapes
    assert counts["truncated_rows"] > 0

    for shards in (1, 3):  # one part, and three parts of uneven sizes (on disk)
        bounds = np.linspace(0, len(rows), shards + 1).astype(int)
        parts = [
            write_part(
                tmp_path / f"{shards}-{i}",
                (chunk for chunk, _ in tokenize_chunks(tokenizer, rows[a:b], MAX_SEQ_LEN, chunk_rows=5)),
            )
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        ]
        store = ExampleStore(parts)
        assert isinstance(parts[0].arrays["tokens"], np.memmap)
        assert list(store) == expected
        assert store[-1] == expected[-1] and store[3:7] == expected[3:7] and len(store) == len(expected)
        assert store.num_comparisons == sum(len(example_comparisons(example)) for example in expected)
        assert store.num_tokens == sum(
            len(prompt) + sum(map(len, responses)) for prompt, responses in map(example_responses, expected)
        )
        assert store.has_groups and not ExampleStore.from_examples(expected[:1]).has_groups
        assert store.sequence_lengths().tolist() == unshared_lengths(expected)
        with pytest.raises(IndexError):
            store[len(expected)]
    assert list(ExampleStore.from_examples(expected)) == expected


def unshared_lengths(examples: list[dict]) -> list[int]:
    """What `--group_by_length` sorts by, one example at a time."""
    return [sum(example_sequence_lengths(example, share_prompt=False)) for example in examples]


def test_sequence_lengths_equal_the_per_example_lengths(tmp_path):
    pair = {"prompt_ids": [1, 5, 8], "chosen_ids": [6, 2], "rejected_ids": [7, 7, 7, 2], "margin": 0.5}
    kwise = {
        "prompt_ids": [1, 9],
        "response_ids": [[4, 2], [2], [9, 9, 9, 2]],
        "scores": [2.0, 0.0, 1.0],
        "comparisons": [[0, 1], [0, 2], [2, 1]],
    }
    with_margins = {
        "prompt_ids": [3],
        "response_ids": [[4, 2], [5, 5, 2]],
        "scores": [1.0, 0.0],
        "comparisons": [[0, 1]],
        "margins": [1.0],
    }
    no_prompt = {"prompt_ids": [], "chosen_ids": [6, 2], "rejected_ids": [2], "margin": None}
    examples = [pair, kwise, with_margins, no_prompt, kwise, pair]
    assert unshared_lengths(examples) == [12, 13, 7, 3, 13, 12]  # K * P + R_1 + ... + R_K
    assert ExampleStore.from_examples(examples).sequence_lengths().tolist() == unshared_lengths(examples)
    # several parts on disk, one of them empty
    chunks = [examples[:2], [], examples[2:]]
    store = ExampleStore([write_part(tmp_path / str(i), [chunk]) for i, chunk in enumerate(chunks)])
    assert store.sequence_lengths().tolist() == unshared_lengths(examples)
    assert ExampleStore([]).sequence_lengths().tolist() == []


def test_loaded_stores_equal_the_in_memory_path_and_keep_the_statistics(tmp_path, tokenizer, every_shape):
    in_memory = load.load_preference_data(every_shape, tokenizer, MAX_SEQ_LEN)
    cached = load.load_preference_data(every_shape, tokenizer, MAX_SEQ_LEN, cache_dir=tmp_path / "cache")
    assert list(cached.train) == list(in_memory.train) and list(cached.eval) == list(in_memory.eval)
    assert cached.stats == in_memory.stats and cached.stats["truncated_rows"]["train"] > 0


def test_a_part_with_a_short_or_missing_file_does_not_open(tmp_path, tokenizer):
    examples = [{"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 2], "margin": None}] * 3
    folder = tmp_path / "part"
    write_part(folder, [examples])
    assert list(ExampleStore([open_part(folder)])) == examples
    with open(folder / "tokens", "r+b") as file:
        file.truncate(8)
    with pytest.raises(IncompletePart):
        open_part(folder)
    (folder / "part.json").unlink()
    with pytest.raises(IncompletePart):
        open_part(folder)


# ---------------------------------------------------------------------------------------------------------
# Hits and misses


def test_second_load_opens_the_cache_without_reading_or_tokenising(tmp_path, tokenizer, monkeypatch):
    data_path = write_tiny_pairs(str(tmp_path / "pairs.jsonl"), 40)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "", "rejected": " b"}])
    cache = tmp_path / "cache"
    counts = counted_loads(monkeypatch)
    kwargs = {"skip_invalid_rows": True, "cache_dir": cache}
    first = load.load_preference_data([data_path, bad], tokenizer, 16, **kwargs)
    assert counts == {"rows_tokenised": 40, "reads": 1}
    second = load.load_preference_data([data_path, bad], tokenizer, 16, **kwargs)
    assert counts == {"rows_tokenised": 40, "reads": 1}  # nothing read or tokenised again
    assert list(second.train) == list(first.train) and list(second.eval) == list(first.eval)
    assert second.stats == first.stats and second.stats["skipped_rows"] == {"empty_response": 1}
    assert isinstance(second.train.parts[0].arrays["tokens"], np.memmap)
    assert len(key_folders(cache)) == 1


def _change_a_data_byte(path: str) -> None:
    """Same size, same modification time, one word different: only a hash of the bytes sees it."""
    stat = os.stat(path)
    text = Path(path).read_text(encoding="utf-8")
    Path(path).write_text(text.replace("red", "dog", 1), encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size


CHANGES = {
    "max_seq_len": lambda path, tokenizer, kwargs: kwargs.update(max_seq_len=20),
    "a data byte": lambda path, tokenizer, kwargs: _change_a_data_byte(path),
    "an added token": lambda path, tokenizer, kwargs: tokenizer.add_tokens(["purple"]),
    "the chat template": lambda path, tokenizer, kwargs: setattr(
        tokenizer, "chat_template", "{{ messages }}"
    ),
    "the row range": lambda path, tokenizer, kwargs: kwargs.update(data_paths=[f"{path}[:30]"]),
    "the seed": lambda path, tokenizer, kwargs: kwargs.update(seed=7),
    "the eval fraction": lambda path, tokenizer, kwargs: kwargs.update(eval_fraction=0.2),
    "the listwise options": lambda path, tokenizer, kwargs: kwargs.update(listwise=ListwiseOptions(1.0)),
}


@pytest.mark.parametrize("change", CHANGES)
def test_anything_that_changes_the_tokens_misses_the_cache(tmp_path, tokenizer, monkeypatch, change):
    data_path = write_tiny_pairs(str(tmp_path / "pairs.jsonl"), 40)
    cache = tmp_path / "cache"
    kwargs = {"data_paths": [data_path], "max_seq_len": 16, "cache_dir": cache}
    before = load.load_preference_data(tokenizer=tokenizer, **kwargs)
    counts = counted_loads(monkeypatch)
    CHANGES[change](data_path, tokenizer, kwargs)
    after = load.load_preference_data(tokenizer=tokenizer, **kwargs)
    assert counts["rows_tokenised"] > 0 and len(key_folders(cache)) == 2
    if change in ("max_seq_len", "a data byte", "the row range"):
        assert list(after.train) != list(before.train)


def test_cache_folder_from_the_flag_the_environment_or_off(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_cache_dir("off") is None
    monkeypatch.delenv(CACHE_ENV)
    assert resolve_cache_dir(None) == Path("~/.cache/rewardspeed/data").expanduser()


# ---------------------------------------------------------------------------------------------------------
# Never a half-written folder; nothing cached from invalid data


def test_a_half_written_cache_folder_is_never_used(tmp_path, tokenizer, monkeypatch):
    data_path = write_tiny_pairs(str(tmp_path / "pairs.jsonl"), 40)
    cache = tmp_path / "cache"
    reference = list(load.load_preference_data([data_path], tokenizer, 16).train)
    load.load_preference_data([data_path], tokenizer, 16, cache_dir=cache)
    (folder,) = key_folders(cache)
    counts = counted_loads(monkeypatch)

    def damaged(damage) -> list[dict]:
        damage(folder)
        rows_before = counts["rows_tokenised"]
        data = list(load.load_preference_data([data_path], tokenizer, 16, cache_dir=cache).train)
        assert counts["rows_tokenised"] > rows_before  # rebuilt, not used
        return data

    def cut_tokens(folder: Path) -> None:
        with open(folder / "train-0" / "tokens", "r+b") as file:
            file.truncate(os.path.getsize(file.name) - 4)

    assert damaged(cut_tokens) == reference
    assert damaged(lambda folder: (folder / MANIFEST).unlink()) == reference
    assert damaged(lambda folder: (folder / MANIFEST).write_text("{", encoding="utf-8")) == reference

    # A build killed midway leaves only a staging folder (its parts, no manifest) beside no final folder: the
    # next load ignores it, builds its own, and removes the dead one.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    staging = folder.with_name(folder.name + ".tmp-0123456789ab-0")
    os.rename(folder, staging)
    (staging / MANIFEST).unlink()
    (staging / OWNER).write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout)}))
    assert damaged(lambda folder: None) == reference
    assert not staging.exists() and key_folders(cache) == [folder]


def test_invalid_rows_fail_naming_file_line_and_field_before_anything_is_cached(tmp_path, tokenizer):
    rows = [{"prompt": "the cat", "chosen": " red", "rejected": " blue"}] * 3
    rows[1] = {"prompt": "the cat", "chosen": 5, "rejected": " blue"}
    data_path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"pairs\.jsonl line 2: field 'chosen'"):
        load.load_preference_data([data_path], tokenizer, 16, cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_a_build_that_fails_midway_leaves_nothing(tmp_path, tokenizer):
    data_path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))
    cache = tmp_path / "cache"

    def disk_full_after_two_chunks(tokenizer, rows, max_seq_len):
        yield from itertools.islice(tokenize_chunks(tokenizer, rows, max_seq_len, chunk_rows=5), 2)
        raise OSError(28, "No space left on device")

    with (
        mock.patch.object(load, "tokenize_chunks", disk_full_after_two_chunks),
        pytest.raises(DataError, match=r"cannot write the data cache .* No space left on device"),
    ):
        load.load_preference_data([data_path], tokenizer, 16, cache_dir=cache)
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Two ranks of one node


@pytest.mark.distributed
def test_two_ranks_of_a_node_build_it_once_and_read_the_same_examples(tmp_path, tokenizer):
    data_path = write_tiny_pairs(str(tmp_path / "pairs.jsonl"), 61)
    eval_path = write_tiny_pairs(str(tmp_path / "eval.jsonl"), 9, seed=1)
    bad_path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20, last="boom"))
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    torchrun(
        [
            os.path.join(SCRIPTS, "data_cache.py"),
            *("--data", data_path, "--eval_data", eval_path, "--bad_data", bad_path),
            *("--cache", str(cache), "--out", str(out)),
        ],
        timeout=300,
    )
    ranks = read_rank_results(str(out))
    alone = load.load_preference_data([data_path], tokenizer, MAX_SEQ_LEN, eval_data_paths=[eval_path])
    for result in ranks:
        for run in ("first", "second"):
            assert result[run]["train"] == list(alone.train) and result[run]["eval"] == list(alone.eval)
            assert result[run]["stats"] == alone.stats and result[run]["memory_mapped"] == "memmap"
        assert result["second"]["rows_tokenised"] == 0 and not result["second"]["read"]
    # the 70 rows (61 training, 9 evaluation) were tokenised once, shared: 30 + 4 and 31 + 5
    assert [result["first"]["rows_tokenised"] for result in ranks] == [34, 36]
    (folder,) = key_folders(cache)
    assert {path.name for path in folder.iterdir()} == {MANIFEST, "train-0", "train-1", "eval-0", "eval-1"}
    # The failing row is the last training row, in rank 1's shard: both ranks fail, naming it; nothing is cached.
    assert f"{bad_path} line 20: the tokenizer's chat template failed" in ranks[1]["bad"]
    assert (
        ranks[0]["bad"].startswith("rank 1 could not prepare the data")
        and f"{bad_path} line 20" in ranks[0]["bad"]
    )
    assert key_folders(cache) == [folder] and not [path for path in cache.iterdir() if ".tmp-" in path.name]
