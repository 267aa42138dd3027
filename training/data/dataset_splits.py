"""The subsets and splits a dataset offers (a folder, a hub dataset's files, a saved `DatasetDict`), and the
ones a source uses. Names only: `sources.py` reads the chosen files.

Discovery (`discover_splits`, on relative file paths, so that a local folder and a hub repository follow one rule):
  1. A dataset card (`README.md`) whose YAML header lists `configs:`: each config is a subset; its `data_files`
     (a pattern, a list of them, or `{split, path}` entries, relative to its `data_dir`) name the splits; a config
     without `data_files` takes the files under its `data_dir` by rule 2. The config marked `default: true` (or
     the only one, or one named `default`) is used when none is chosen, as `datasets.load_dataset` does.
  2. Otherwise a data file's split is its name up to the first dot, less a shard mark
     (`data/train_prefs-00000-of-00001.parquet` -> `train_prefs`, older `...-of-00001-<hash>.parquet` too),
     when that name holds `train` or an evaluation word (`EVAL_WORDS`) at its start or between separators
     (`split_role`); else the name of the nearest enclosing folder that does (`train/0000.jsonl` -> `train`). The other folders around a file, `data/`
     aside, are its subset (`harmless-base/train.jsonl.gz` -> subset `harmless-base`). When some files have a
     split name, files without one are ignored with a warning (hh-rlhf's `red-team-attempts` is not
     preference data); when none has, all of them are the `train` split.

Choice (`choose_splits`), never a blend:
  - subset: the chosen one; else the only one or the card's default; else an error listing them.
  - training split: the chosen one; else the only split named `train...`; else the source's only split;
    several `train...` splits, or several splits and none `train...`, is an error listing them. A source with
    only evaluation splits has no training split.
  - evaluation split (when asked for): the split named like the training split with `train` replaced by an
    evaluation word, in `EVAL_WORDS` order (`train_prefs` -> `test_prefs`; `train` -> `test`, else
    `validation`, ...); else, when no split was chosen, the only evaluation split, and several unpaired ones are
    an error (name one with `--eval_data_path SOURCE:SPLIT`); else none (a share of the rows is held out).
    A chosen split that is not a training split (`DIR:test_prefs`) has no evaluation split.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from training.data.records import DataError

logger = logging.getLogger(__name__)

DATA_FILE_KINDS = ("jsonl", "json", "parquet")
TRAIN_WORD = "train"
# Evaluation words, in the order an evaluation split is preferred when several pair with the training split.
EVAL_WORDS = ("test", "evaluation", "eval", "validation", "valid", "val", "dev")
SHARD_MARK = re.compile(r"-\d+-of-\d+(-.*)?$")
DEFAULT_SUBSET = ""  # the subset of a dataset that has none
MAX_LISTED = 12


@dataclass(frozen=True)
class SplitLayout:
    """What a dataset offers.

    Attributes:
        name: the location, for messages.
        subsets: `{subset: {split: [relative file paths]}}`; a dataset without subsets has the one subset "".
        default_subset: the dataset card's default config, if any.
        ignored: data files that belong to no split.
    """

    name: str
    subsets: dict[str, dict[str, list[str]]]
    default_subset: str | None = None
    ignored: tuple[str, ...] = field(default=())


def data_file_kind(name: str) -> str | None:
    """The kind of a data file (jsonl, json or parquet, optionally `.gz`) from its name; None if none."""
    name = name.lower().removesuffix(".gz")
    return next((kind for kind in DATA_FILE_KINDS if name.endswith(f".{kind}")), None)


SPLIT_WORD = re.compile(
    "^(?P<first>{words})|[-_. ](?P<inner>{words})(?=[-_. ]|$)".format(
        words="|".join((TRAIN_WORD, *EVAL_WORDS))
    )
)


def split_role(name: str) -> tuple[str, str, str] | None:
    """`(role, word, pattern)` of a split name: role "train" or "eval", the split word it holds, and the name
    with that word replaced by `{}` (what pairs `train_prefs` with `test_prefs`); None for neither.

    A name holds a split word when it starts with one (`trainset`, `validation`) or has one between
    separators (`my_train`, `hh-test`), as `datasets` finds split names in file names.

    >>> split_role("train_prefs"), split_role("my-test"), split_role("harmless-base")
    (('train', 'train', '{}_prefs'), ('eval', 'test', 'my-{}'), None)
    """
    lowered = name.lower()
    match = SPLIT_WORD.search(lowered)
    if match is None:
        return None
    group = "first" if match["first"] else "inner"
    word = match[group]
    pattern = lowered[: match.start(group)] + "{}" + lowered[match.end(group) :]
    return ("train" if word == TRAIN_WORD else "eval"), word, pattern


def _eval_rank(name: str) -> int:
    return EVAL_WORDS.index(split_role(name)[1])


def _place(file: str) -> tuple[str, str] | None:
    """(subset, split) of a data file by rule 2 of the module docstring; None when it names no split."""
    path = PurePosixPath(file)
    stem = SHARD_MARK.sub("", path.name.split(".")[0])
    folders = list(path.parent.parts)
    if split_role(stem):
        split, around = stem, folders
    else:
        index = next((i for i in reversed(range(len(folders))) if split_role(folders[i])), None)
        if index is None:
            return None
        split, around = folders[index], folders[:index]
    return "/".join(part for part in around if part != "data"), split


def _files_by_name(files: list[str]) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """Rule 2: `({subset: {split: files}}, files without a split name)`."""
    subsets: dict[str, dict[str, list[str]]] = {}
    unplaced = []
    for file in files:
        place = _place(file)
        if place is None:
            unplaced.append(file)
        else:
            subsets.setdefault(place[0], {}).setdefault(place[1], []).append(file)
    if not subsets:
        return {DEFAULT_SUBSET: {TRAIN_WORD: files}}, []
    return subsets, unplaced


def _glob(pattern: str) -> re.Pattern:
    """A `datasets` data-files pattern as a regex: `*` and `?` within a folder, `**` across folders."""
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.removeprefix("./"))
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(part, re.escape(part)) for part in parts) + r"\Z")


def _card_patterns(name: str, config: str, data_files: Any) -> dict[str, list[str]]:
    """`{split: [patterns]}` from a config's `data_files` (a pattern, a list, `{split, path}` entries or a dict)."""
    if isinstance(data_files, str):
        return {TRAIN_WORD: [data_files]}
    if isinstance(data_files, dict):
        entries = [{"split": split, "path": path} for split, path in data_files.items()]
    elif isinstance(data_files, list) and all(isinstance(entry, str) for entry in data_files):
        return {TRAIN_WORD: list(data_files)}
    elif isinstance(data_files, list) and all(isinstance(entry, dict) for entry in data_files):
        entries = data_files
    else:
        raise DataError(
            f"{name}: README.md config {config!r}: data_files must be patterns or split/path entries"
        )
    patterns: dict[str, list[str]] = {}
    for entry in entries:
        paths = entry.get("path")
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(entry.get("split", TRAIN_WORD), str) or not isinstance(paths, list):
            raise DataError(
                f"{name}: README.md config {config!r}: each data_files entry needs a split and path"
            )
        patterns.setdefault(entry.get("split", TRAIN_WORD), []).extend(map(str, paths))
    return patterns


def _card_layout(name: str, files: list[str], configs: Any) -> SplitLayout:
    """Rule 1: one subset per config of the dataset card."""
    if not isinstance(configs, list) or not all(isinstance(config, dict) for config in configs):
        raise DataError(f"{name}: README.md 'configs' must be a list of mappings")
    subsets, defaults = {}, []
    for config in configs:
        config_name = str(config.get("config_name", "default"))
        data_dir = str(config.get("data_dir") or "").strip("/")
        prefix = f"{data_dir}/" if data_dir else ""
        inside = [file.removeprefix(prefix) for file in files if file.startswith(prefix)]
        if config.get("data_files") is None:
            by_name, _ = _files_by_name(inside)
            splits: dict[str, list[str]] = {}
            for subset_splits in by_name.values():  # datasets reads a data_dir whole
                for split, split_files in subset_splits.items():
                    splits.setdefault(split, []).extend(split_files)
        else:
            patterns = _card_patterns(name, config_name, config["data_files"])
            splits = {
                split: [
                    file for file in inside if any(_glob(pattern).match(file) for pattern in split_patterns)
                ]
                for split, split_patterns in patterns.items()
            }
        subsets[config_name] = {
            split: [prefix + file for file in split_files]
            for split, split_files in splits.items()
            if split_files
        }
        if config.get("default"):
            defaults.append(config_name)
    if not defaults and (len(subsets) == 1 or "default" in subsets):
        defaults = [next(iter(subsets))] if len(subsets) == 1 else ["default"]
    return SplitLayout(name, subsets, defaults[0] if len(defaults) == 1 else None)


def read_card_metadata(path: Path) -> dict | None:
    """The YAML header of a dataset card; None (with a warning) when it has none or cannot be parsed."""
    from huggingface_hub.repocard import metadata_load

    try:
        metadata = metadata_load(path)
    except Exception as error:  # a malformed header: YAML errors of several kinds
        logger.warning("%s: ignoring its YAML header (%s)", path, error)
        return None
    return metadata if isinstance(metadata, dict) else None


def discover_splits(name: str, files: list[str], card: dict | None = None) -> SplitLayout:
    """The subsets and splits of a dataset's files (relative POSIX paths), by the module docstring's rules.

    >>> layout = discover_splits("hh", ["harmless-base/train.jsonl.gz", "harmless-base/test.jsonl.gz"])
    >>> layout.subsets
    {'harmless-base': {'test': ['harmless-base/test.jsonl.gz'], 'train': ['harmless-base/train.jsonl.gz']}}
    """
    data_files = sorted(file for file in files if data_file_kind(file))
    if not data_files:
        kinds = ", ".join(f".{kind}" for kind in DATA_FILE_KINDS)
        raise DataError(f"{name}: no data files ({kinds}, optionally .gz)")
    if card and card.get("configs"):
        return _card_layout(name, data_files, card["configs"])
    subsets, ignored = _files_by_name(data_files)
    if ignored:
        logger.warning("%s: ignoring files that belong to no split: %s", name, _listed(ignored))
    return SplitLayout(name, subsets, ignored=tuple(ignored))


def _listed(names) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _eval_split(
    source: str, layout: SplitLayout, subset: str, train_split: str | None, chosen: bool
) -> str | None:
    """The evaluation split that goes with `train_split` (module docstring, "evaluation split")."""
    roles = {split: split_role(split) for split in layout.subsets[subset]}
    evaluation = sorted(
        (split for split, role in roles.items() if role and role[0] == "eval"), key=_eval_rank
    )
    train_role = roles.get(train_split) if train_split is not None else ("train", TRAIN_WORD, "{}")
    if train_role is None or train_role[0] != "train":
        return None
    paired = [split for split in evaluation if roles[split][2] == train_role[2]]
    if paired:
        return paired[0]
    if chosen or not evaluation:
        return None
    if len(evaluation) == 1:
        return evaluation[0]
    raise DataError(
        f"{source}: several evaluation splits ({_listed(evaluation)}) and none pairs with {train_split!r}; "
        f"name one with --eval_data_path {layout.name}:SPLIT"
    )


def choose_splits(
    source: str, layout: SplitLayout, selectors: tuple[str, ...], with_eval: bool
) -> tuple[str, str | None, str | None]:
    """(subset, training split or None, evaluation split or None) of a source; `DataError` when ambiguous."""
    subsets = layout.subsets
    subset = split = None
    if len(selectors) == 2:
        subset, split = selectors
    elif len(selectors) == 1 and selectors[0] in subsets:
        subset = selectors[0]
    elif len(selectors) == 1:
        split = selectors[0]
    names = sorted(subsets)
    if subset is None:
        subset = names[0] if len(names) == 1 else layout.default_subset
    if subset is None:
        example = f"{layout.name}:SUBSET" + (f":{split}" if split else "")
        raise DataError(f"{source}: several subsets ({_listed(names)}); name one as {example}")
    if subset not in subsets:
        raise DataError(f"{source}: no subset {subset!r} (subsets: {_listed(names)})")
    splits = subsets[subset]
    if not splits:
        raise DataError(f"{source}: subset {subset!r} has no data files")
    if split is not None and split not in splits:
        what = "subset or split" if len(selectors) == 1 else "split"
        listing = f"subsets: {_listed(names)}; " if len(names) > 1 else ""
        raise DataError(f"{source}: no {what} {split!r} ({listing}splits: {_listed(splits)})")
    chosen = split is not None
    if not chosen:
        roles = {name: split_role(name) for name in splits}
        training = [name for name, role in roles.items() if role and role[0] == "train"]
        others = [name for name, role in roles.items() if role is None]
        candidates = training or others
        if len(candidates) > 1:
            where = f"{layout.name}:{subset}:SPLIT" if len(names) > 1 else f"{layout.name}:SPLIT"
            kind = "training splits" if training else "splits and none is a training split"
            raise DataError(
                f"{source}: several {kind} ({_listed(candidates)}); name one as {where} (splits: {_listed(splits)})"
            )
        split = candidates[0] if candidates else None
    eval_split = _eval_split(source, layout, subset, split, chosen) if with_eval else None
    return subset, split, eval_split


def describe_choice(layout: SplitLayout, subset: str, train_split: str | None, eval_split: str | None) -> str:
    """One line saying what was chosen among what, when there was a choice; "" when there was none."""
    splits = layout.subsets[subset]
    if len(layout.subsets) == 1 and len(splits) <= 1:
        return ""
    parts = [f"subset {subset!r} of {_listed(layout.subsets)}"] if len(layout.subsets) > 1 else []
    parts.append(f"training split {train_split!r}" if train_split else "no training split")
    parts.append(f"evaluation split {eval_split!r}" if eval_split else "no evaluation split")
    return ", ".join(parts) + f" (splits: {_listed(splits)})"
