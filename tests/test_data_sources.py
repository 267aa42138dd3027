"""Data as users download it: hub layouts (files, folders, dataset cards), `save_to_disk` folders, hub names.

Every multi-split or multi-subset layout is refused with the list of its choices unless one is chosen
(`training/data/dataset_splits.py`); chosen splits train and evaluate on exactly their own rows.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as parquet
import pytest
from test_data import build_tokenizer

from training.data import (
    DataError,
    finish_sequence,
    load_preference_data,
    read_preference_rows,
    tokenize_response,
    tokenize_rows,
)
from training.data.dataset_splits import choose_splits, discover_splits, split_role
from training.data.sources import load_records, parse_source

UF_SPLITS = {"train_prefs": 5, "train_sft": 4, "train_gen": 3, "test_prefs": 3, "test_sft": 2, "test_gen": 1}
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HS3_SUBSETS = ("preference", "feedback", "edit", "edit_quality")
HS3_PREFERENCES = [-3, -1, 0, 2, 3, 0, -2]  # negative: response1 is better; 0: a tie


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    parquet.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl_gz(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def uf_rows(split: str, count: int) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized rows: `prompt` ends in a newline its conversation's turn lacks."""
    rows = []
    for index in range(count):
        question = f"Question {split} {index}?"
        chosen = [user(question), assistant(f"good {index}")]
        rows.append(
            {
                "prompt": question + "\n",
                "prompt_id": f"{split}-{index}",
                "chosen": chosen,
                "rejected": [user(question), assistant(f"bad {index}")],
                "messages": chosen,
                "score_chosen": 8.0,
                "score_rejected": 3.0,
            }
        )
    return rows


def write_ultrafeedback(root: Path, card: bool = False, shard_hash: bool = False) -> Path:
    """`data/{split}-00000-of-00001[-<hash>].parquet` for the six splits, optionally with the hub's dataset card."""
    for split, count in UF_SPLITS.items():
        suffix = "-4ad8b0a2c5e1f3d7" if shard_hash else ""
        write_parquet(root / "data" / f"{split}-00000-of-00001{suffix}.parquet", uf_rows(split, count))
    if card:
        entries = "".join(f"  - split: {split}\n    path: data/{split}-*\n" for split in UF_SPLITS)
        (root / "README.md").write_text(
            f"---\nconfigs:\n- config_name: default\n  data_files:\n{entries}---\n# UF\n"
        )
    return root


def hh_rows(subset: str, split: str, count: int) -> list[dict]:
    return [
        {
            "chosen": f"\n\nHuman: {subset} {split} {index}?\n\nAssistant: yes {index}",
            "rejected": f"\n\nHuman: {subset} {split} {index}?\n\nAssistant: no {index}",
        }
        for index in range(count)
    ]


def write_hh_rlhf(root: Path) -> Path:
    """Anthropic/hh-rlhf: four subsets with {train,test}.jsonl.gz, and red-team transcripts (not pairs)."""
    for offset, subset in enumerate(HH_SUBSETS):
        write_jsonl_gz(root / subset / "train.jsonl.gz", hh_rows(subset, "train", 4 + offset))
        write_jsonl_gz(root / subset / "test.jsonl.gz", hh_rows(subset, "test", 2))
    write_jsonl_gz(root / "red-team-attempts" / "red_team_attempts.jsonl.gz", [{"transcript": "x"}])
    (root / "README.md").write_text("---\nlicense: mit\n---\n# hh-rlhf\n")
    return root


def hs3_rows(split: str) -> list[dict]:
    return [
        {
            "domain": "general",
            "language": "english",
            "context": [user(f"hello {split} {index}"), assistant("hi"), user(f"question {split} {index}?")],
            "response1": f"first {index}",
            "response2": f"second {index}",
            "overall_preference": preference,
            "individual_preference": [{"score": preference, "reasoning": "because"}],
        }
        for index, preference in enumerate(HS3_PREFERENCES)
    ]


def write_helpsteer3(root: Path, card: bool = False) -> Path:
    """nvidia/HelpSteer3: one folder per config with {train,validation}.jsonl.gz; optionally its dataset card."""
    for subset in HS3_SUBSETS:
        for split in ("train", "validation"):
            rows = hs3_rows(split) if subset == "preference" else [{"domain": "general", "x": 1}]
            write_jsonl_gz(root / subset / f"{split}.jsonl.gz", rows)
    if card:
        configs = "".join(
            f"- config_name: {subset}\n"
            + ("  default: true\n" if subset == "preference" else "")
            + f"  data_files:\n  - split: train\n    path: {subset}/train.jsonl.gz\n"
            f"  - split: validation\n    path: {subset}/validation.jsonl.gz\n"
            for subset in HS3_SUBSETS
        )
        (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# HelpSteer3\n")
    return root


# --- discovery and choice on file lists -------------------------------------------------------------------


def test_split_names_from_file_names_and_folders():
    assert split_role("train") == ("train", "train", "{}")
    assert split_role("test_prefs") == ("eval", "test", "{}_prefs")
    assert split_role("validation") == ("eval", "validation", "{}")
    assert split_role("my_train") == ("train", "train", "my_{}")
    assert split_role("red_team_attempts") is None and split_role("contest") is None
    files = [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/test_prefs-00000-of-00001-4ad8b0a2c5e1f3d7.parquet",  # older hub shard names
        "default/validation/0000.jsonl",  # a folder named by its split
        "LICENSE",
        ".gitattributes",
    ]
    layout = discover_splits("repo", files)
    assert layout.subsets == {
        "": {"train": files[:2], "test_prefs": files[2:3]},
        "default": {"validation": files[3:4]},
    }


def test_a_folder_whose_files_name_no_split_trains_on_all_of_them():
    layout = discover_splits("raw", ["flan.jsonl", "sharegpt.jsonl"])
    assert layout.subsets == {"": {"train": ["flan.jsonl", "sharegpt.jsonl"]}}
    assert choose_splits("raw", layout, (), with_eval=True) == ("", "train", None)


@pytest.mark.parametrize(
    ("files", "selectors", "expected"),
    [
        (["train.jsonl", "test.jsonl", "validation.jsonl"], (), ("", "train", "test")),
        (["train.jsonl", "validation.jsonl"], (), ("", "train", "validation")),
        (["train.jsonl", "test_other.jsonl"], (), ("", "train", "test_other")),  # the only evaluation split
        (["train_a.jsonl", "test_a.jsonl", "test_b.jsonl"], (), ("", "train_a", "test_a")),
        (["train_a.jsonl", "train_b.jsonl", "test_b.jsonl"], ("train_a",), ("", "train_a", None)),
        (["train.jsonl", "test.jsonl"], ("test",), ("", "test", None)),  # an evaluation source
        (["test.jsonl"], (), ("", None, "test")),
    ],
)
def test_choosing_the_training_and_evaluation_splits(files, selectors, expected):
    assert choose_splits("d", discover_splits("d", files), selectors, with_eval=True) == expected


@pytest.mark.parametrize(
    ("files", "selectors", "message"),
    [
        (
            ["train_a.jsonl", "train_b.jsonl"],
            (),
            r"several training splits \(train_a, train_b\); name one as d:SPLIT",
        ),
        (["a/train.jsonl", "b/train.jsonl"], (), r"several subsets \(a, b\); name one as d:SUBSET"),
        (
            ["a/train.jsonl", "b/train.jsonl"],
            ("train",),
            r"several subsets \(a, b\); name one as d:SUBSET:train",
        ),
        (
            ["train.jsonl", "test_a.jsonl", "test_b.jsonl"],
            (),
            r"several evaluation splits \(test_a, test_b\)",
        ),
        (["train.jsonl"], ("trian",), r"no subset or split 'trian' \(splits: train\)"),
        (
            ["a/train.jsonl", "b/train.jsonl"],
            ("a", "test"),
            r"no split 'test' \(subsets: a, b; splits: train\)",
        ),
    ],
)
def test_ambiguous_or_unknown_choices_are_refused_with_the_list(files, selectors, message):
    with pytest.raises(DataError, match=message):
        choose_splits("d", discover_splits("d", files), selectors, with_eval=True)


def test_no_evaluation_split_is_chosen_when_none_is_wanted():
    layout = discover_splits("d", ["train.jsonl", "test_a.jsonl", "test_b.jsonl"])
    assert choose_splits("d", layout, (), with_eval=False) == ("", "train", None)


def test_source_syntax(tmp_path):
    assert parse_source("org/name:config:split[2:5]").selectors == ("config", "split")
    assert parse_source("org/name:config:split[2:5]").row_range == slice(2, 5)
    odd = tmp_path / "a:b.jsonl"  # a colon in an existing name is part of the name
    odd.write_text('{"chosen": "x", "rejected": "y"}\n')
    assert parse_source(f"{odd}[:1]").location == str(odd)
    for bad in ("org/name:a:b:c", "org/name::split"):
        with pytest.raises(DataError, match="expected LOCATION"):
            parse_source(bad)
    with pytest.raises(DataError, match="is a file; it has no subsets or splits"):
        load_records(f"{odd}:train")


# --- the hub layouts, as downloaded ----------------------------------------------------------------------


@pytest.mark.parametrize(("card", "shard_hash"), [(False, False), (True, False), (False, True)])
def test_ultrafeedback_binarized_splits_are_never_blended(tmp_path, tokenizer, card, shard_hash):
    folder = str(write_ultrafeedback(tmp_path / "uf", card, shard_hash))
    with pytest.raises(DataError, match=r"several training splits \(train_gen, train_prefs, train_sft\)"):
        load_preference_data([folder], tokenizer, 64)
    data = load_preference_data([f"{folder}:train_prefs"], tokenizer, 64)
    assert (data.stats["train_pairs"], data.stats["eval_pairs"]) == (5, 3)  # test_prefs evaluates
    source = read_preference_rows(f"{folder}:train_prefs[1:3]")
    assert [row.prompt for row in source.rows] == [
        [user(f"Question train_prefs {index}?")] for index in (1, 2)
    ]
    assert [row.prompt for row in source.eval_rows][0] == [user("Question test_prefs 0?")]
    explicit = load_preference_data(
        [f"{folder}:train_sft"], tokenizer, 64, eval_data_paths=[f"{folder}:test_prefs"]
    )
    assert (explicit.stats["train_pairs"], explicit.stats["eval_pairs"]) == (4, 3)


def test_ultrafeedback_prompt_is_not_duplicated_by_a_trailing_newline(tmp_path, tokenizer):
    """`prompt` is "question\\n", the conversation's user turn "question": the model must see it once."""
    folder = str(write_ultrafeedback(tmp_path / "uf"))
    row = read_preference_rows(f"{folder}:train_prefs").rows[0]
    assert (row.prompt, row.chosen, row.rejected) == (
        [user("Question train_prefs 0?")],  # the conversation's own turn, as consumers render `chosen`
        [assistant("good 0")],
        [assistant("bad 0")],
    )
    (pair,), _ = tokenize_rows(tokenizer, [row], 64)
    text = tokenizer.decode(pair["prompt_ids"] + pair["chosen_ids"])
    assert text.count("Question train_prefs 0?") == 1
    conversation = uf_rows("train_prefs", 1)[0]["chosen"]  # what RewardBench and TRL render
    expected = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False).rstrip())["input_ids"]
    assert pair["prompt_ids"] + pair["chosen_ids"] == finish_sequence(expected, 1, tokenizer.eos_token_id)


def test_hh_rlhf_download_needs_a_subset(tmp_path, tokenizer, caplog):
    folder = write_hh_rlhf(tmp_path / "hh-rlhf")
    with pytest.raises(
        DataError, match=r"several subsets \(harmless-base, helpful-base, helpful-online, help"
    ):
        load_preference_data([str(folder)], tokenizer, 64)
    with caplog.at_level(logging.WARNING):
        data = load_preference_data([f"{folder}:harmless-base"], tokenizer, 64)
    assert "red_team_attempts.jsonl.gz" in caplog.text  # not preference data: ignored, and said so
    assert (data.stats["train_pairs"], data.stats["eval_pairs"]) == (4, 2)
    by_folder = load_preference_data([str(folder / "helpful-base")], tokenizer, 64)  # today's simple case
    assert (by_folder.stats["train_pairs"], by_folder.stats["eval_pairs"]) == (5, 2)
    test_only = read_preference_rows(f"{folder}:helpful-online:test")
    assert len(test_only.rows) == 2 and test_only.eval_rows is None


@pytest.mark.parametrize("card", [False, True])
def test_helpsteer3_preference_rows(tmp_path, tokenizer, card):
    folder = str(write_helpsteer3(tmp_path / "HelpSteer3", card))
    if not card:  # a dataset card's default config is used, as datasets does; without one, choose
        with pytest.raises(DataError, match=r"several subsets \(edit, edit_quality, feedback, preference\)"):
            read_preference_rows(folder)
    source = read_preference_rows(folder if card else f"{folder}:preference")
    ties = HS3_PREFERENCES.count(0)
    assert (len(source.rows), source.ties_skipped) == (len(HS3_PREFERENCES) - ties, 2 * ties)
    context = [user("hello train 0"), assistant("hi"), user("question train 0?")]
    first = source.rows[0]  # preference -3: response1 is better
    assert (first.prompt, first.chosen, first.rejected, first.margin) == (
        context,
        [assistant("first 0")],
        [assistant("second 0")],
        None,
    )
    assert (source.rows[2].chosen, source.rows[2].rejected) == (
        [assistant("second 3")],
        [assistant("first 3")],
    )
    with_margin = read_preference_rows(f"{folder}:preference", column_map={"margin": "overall_preference"})
    assert [row.margin for row in with_margin.rows] == [3.0, 1.0, 2.0, 3.0, 2.0]  # the size of the preference
    data = load_preference_data([f"{folder}:preference"], tokenizer, 96)
    assert (data.stats["train_pairs"], data.stats["eval_pairs"], data.stats["ties_skipped"]) == (5, 5, 4)


def test_helpsteer3_preference_out_of_range_names_row_and_field(tmp_path):
    rows = hs3_rows("train")
    rows[1]["overall_preference"] = 5
    path = write_jsonl_gz(tmp_path / "train.jsonl.gz", rows)
    with pytest.raises(
        DataError, match=r"train\.jsonl\.gz line 2: field 'overall_preference': expected -3\.\.3"
    ):
        read_preference_rows(str(path))


def test_skywork_preference_trains_and_holds_out(tmp_path, tokenizer):
    rows = [
        {"chosen": [user(f"q{index}"), assistant("good")], "rejected": [user(f"q{index}"), assistant("bad")],
         "source": "helpsteer2"}
        for index in range(20)
    ]  # fmt: skip
    folder = write_parquet(tmp_path / "skywork" / "data" / "train-00000-of-00001.parquet", rows).parents[1]
    data = load_preference_data([str(folder)], tokenizer, 64, eval_fraction=0.1)
    assert (data.stats["train_pairs"], data.stats["eval_pairs"]) == (18, 2)


# --- save_to_disk folders ----------------------------------------------------------------------------------


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = uf_rows("train_prefs", 6)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "dataset"))
    dataset = read_preference_rows(str(tmp_path / "dataset"))
    assert len(dataset.rows) == 6 and dataset.eval_rows is None
    assert dataset.rows[0].prompt == [user("Question train_prefs 0?")]
    assert dataset.rows[2].origin == f"{tmp_path / 'dataset'}[train] row 2"
    splits = {
        "train_prefs": rows,
        "test_prefs": uf_rows("test_prefs", 2),
        "train_sft": uf_rows("train_sft", 3),
    }
    saved = datasets.DatasetDict({name: datasets.Dataset.from_list(value) for name, value in splits.items()})
    saved.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"several training splits \(train_prefs, train_sft\)"):
        read_preference_rows(str(tmp_path / "dict"))
    data = load_preference_data([f"{tmp_path / 'dict'}:train_prefs[:4]"], tokenizer, 64)
    assert (data.stats["train_pairs"], data.stats["eval_pairs"]) == (4, 2)


# --- hub names ---------------------------------------------------------------------------------------------


class FakeHub:
    """`huggingface_hub`'s listing and downloads, served from local folders; records what was downloaded."""

    def __init__(self, monkeypatch, repositories: dict[str, Path]) -> None:
        import huggingface_hub

        self.repositories, self.downloaded = repositories, []
        monkeypatch.setattr(huggingface_hub, "list_repo_files", self.list_repo_files)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)

    def root(self, name: str, repo_type: str) -> Path:
        assert repo_type == "dataset"
        if name not in self.repositories:
            raise FileNotFoundError(
                f"404 Repository Not Found for url https://huggingface.co/api/datasets/{name}"
            )
        return self.repositories[name]

    def list_repo_files(self, name, repo_type=None):
        root = self.root(name, repo_type)
        return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())

    def hf_hub_download(self, name, filename, repo_type=None):
        self.downloaded.append(filename)
        return str(self.root(name, repo_type) / filename)

    def snapshot_download(self, name, repo_type=None, allow_patterns=None):
        self.downloaded += list(allow_patterns)
        return str(self.root(name, repo_type))


def test_hub_names_choose_like_a_download_and_fetch_only_the_chosen_files(tmp_path, monkeypatch, tokenizer):
    hub = FakeHub(
        monkeypatch,
        {
            "HuggingFaceH4/ultrafeedback_binarized": write_ultrafeedback(tmp_path / "uf", card=True),
            "Anthropic/hh-rlhf": write_hh_rlhf(tmp_path / "hh"),
            "nvidia/HelpSteer3": write_helpsteer3(tmp_path / "hs3", card=True),
        },
    )
    with pytest.raises(DataError, match=r"HuggingFaceH4/ultrafeedback_binarized: several training splits"):
        read_preference_rows("HuggingFaceH4/ultrafeedback_binarized")
    data = load_preference_data(["HuggingFaceH4/ultrafeedback_binarized:train_prefs"], tokenizer, 64)
    assert (data.stats["train_pairs"], data.stats["eval_pairs"]) == (5, 3)
    assert hub.downloaded == [
        "README.md",
        "README.md",
        "data/train_prefs-00000-of-00001.parquet",
        "data/test_prefs-00000-of-00001.parquet",
    ]
    with pytest.raises(DataError, match=r"Anthropic/hh-rlhf: several subsets"):
        read_preference_rows("Anthropic/hh-rlhf")
    source = read_preference_rows("Anthropic/hh-rlhf:harmless-base[:3]")
    assert (len(source.rows), len(source.eval_rows)) == (3, 2)
    assert source.rows[0].origin.endswith("harmless-base/train.jsonl.gz line 1")
    assert len(read_preference_rows("nvidia/HelpSteer3:preference:validation").rows) == 5
    with pytest.raises(
        DataError, match=r"org/absent: not a local file or folder, and listing it .*404 Repository"
    ):
        read_preference_rows("org/absent")


def test_scoring_a_prompt_with_other_whitespace_uses_the_conversations_turn(tokenizer):
    conversation = [user("Question 0?"), assistant("good 0")]
    expected = tokenize_response(tokenizer, conversation[:1], conversation[1:], 64)
    assert tokenize_response(tokenizer, "Question 0?\n", conversation, 64) == expected
    assert tokenizer.decode(expected).count("Question 0?") == 1
