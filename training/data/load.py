"""Loading preference data for one training phase: rows (read, validate, split) -> tokenise -> store.

    data = load_preference_data(["Anthropic/hh-rlhf", "pairs.jsonl"], tokenizer, max_seq_len=512)
    data.train, data.eval, data.stats   # two `ExampleStore`s (flat token arrays, `store.py`) and counts

Which rows are training and evaluation rows, and how invalid rows are reported or skipped, is `rows.py`. With
`cache_dir` (training passes `--data_cache_dir`) the stores are memory-mapped from a cache folder keyed by
everything the tokens depend on (`cache_material`), tokenised once per node by its ranks together (`cache.py`);
a resumed or repeated run opens them without reading or tokenising a row, and logs the same statistics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from training.data.records import DataError, ListwiseOptions, PreferenceData
from training.data.rows import DataOptions, PhaseRows, choose_phase_sources, read_phase_rows
from training.data.sources import ChosenSource
from training.data.splits import DEFAULT_DATA_SPLIT, REWARD_PHASE, parse_data_split
from training.data.store import ExampleStore, IncompletePart, open_part, write_part
from training.data.tokenize import TRUNCATION_COUNTS, tokenize_chunks

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval")


def _data(
    read_stats: dict[str, Any], stores: dict[str, ExampleStore], counts: dict[str, Counter]
) -> PreferenceData:
    """`PreferenceData` with its statistics (the same whether tokenised now or opened from the cache)."""
    read = dict(read_stats)
    stats = {
        "rows_read": read.pop("rows_read"),
        "train_pairs_per_source": read.pop("train_pairs_per_source"),
        **{f"{split}_examples": len(stores[split]) for split in SPLITS},
        **{f"{split}_pairs": stores[split].num_comparisons for split in SPLITS},
        **{name: {split: counts[split][name] for split in SPLITS} for name in TRUNCATION_COUNTS},
        **read,
    }
    return PreferenceData(train=stores["train"], eval=stores["eval"], stats=stats)


def _tokenised_chunks(
    chunks: Iterable[tuple[list[dict], Counter]], counts: Counter, progress
) -> Iterator[list[dict]]:
    for examples, chunk_counts in chunks:
        counts.update(chunk_counts)
        progress.update(len(examples))
        yield examples


def _tokenise_shard(
    phase: PhaseRows,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    folder: Path | None,
    shard: int = 0,
    shards: int = 1,
    progress: bool = True,
) -> tuple[dict[str, ExampleStore], dict[str, Counter]]:
    """Tokenise shard `shard` of `shards` (contiguous rows of each split) into one part per split, written into
    `folder` (`<split>-<shard>`) or kept in memory, with a progress bar when `progress`."""
    from tqdm import tqdm

    split_rows = dict(zip(SPLITS, (phase.train, phase.eval), strict=True))
    bounds = {
        split: (len(rows) * shard // shards, len(rows) * (shard + 1) // shards)
        for split, rows in split_rows.items()
    }
    total = sum(stop - start for start, stop in bounds.values())
    stores, counts = {}, {}
    with tqdm(
        total=total, desc="tokenising", unit="rows", disable=not progress, dynamic_ncols=True
    ) as progress:
        for split, rows in split_rows.items():
            start, stop = bounds[split]
            counts[split] = Counter(dict.fromkeys(TRUNCATION_COUNTS, 0))
            chunks = tokenize_chunks(tokenizer, rows[start:stop], max_seq_len)
            part = write_part(
                folder / f"{split}-{shard}" if folder else None,
                _tokenised_chunks(chunks, counts[split], progress),
            )
            stores[split] = ExampleStore([part])
    return stores, counts


def cache_material(
    data_paths: list[str],
    eval_data_paths: list[str],
    tokenizer: PreTrainedTokenizerBase,
    options: DataOptions,
) -> tuple[dict[str, Any], list[ChosenSource]]:
    """Everything the tokenised data depends on (its cache key, `cache.py`): each source's choice (subset,
    splits, row range) and its files' bytes, the tokenizer, the library versions, the code, and the options;
    and the sources as resolved for it (`rows.choose_phase_sources`), for a build to read."""
    import tokenizers
    import transformers

    from training.data.cache import code_digest, files_digest, tokenizer_digest

    def source(chosen: ChosenSource) -> dict[str, Any]:
        rows = chosen.spec.row_range
        return {
            "source": chosen.spec.text,
            "subset": chosen.subset,
            "splits": [chosen.train_split, chosen.eval_split],
            "rows": [rows.start, rows.stop] if rows else None,
            "files": files_digest(chosen.files_read()),
        }

    chosen, described = [], []
    for resolved in choose_phase_sources(data_paths, eval_data_paths):
        chosen.append(resolved)
        described.append(source(resolved))
    material = {
        "sources": described[: len(data_paths)],
        "eval_sources": described[len(data_paths) :],
        "tokenizer": tokenizer_digest(tokenizer),
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "code": code_digest(),
        "options": {
            **dataclasses.asdict(options),
            "listwise": dataclasses.asdict(options.listwise or ListwiseOptions()),
        },
    }
    return material, chosen


def _open_cached(folder: Path) -> PreferenceData | None:
    """The data of a complete cache folder (None when a part is incomplete)."""
    from training.data.cache import read_manifest

    shards = read_manifest(folder)["shards"]
    try:
        stores = {
            split: ExampleStore([open_part(folder / shard["parts"][split]) for shard in shards])
            for split in SPLITS
        }
    except IncompletePart:
        return None
    counts = {
        split: sum((Counter(shard["counts"][split]) for shard in shards), Counter()) for split in SPLITS
    }
    return _data(shards[0]["read_stats"], stores, counts)


def _cached_data(
    cache_dir: Path,
    data_paths: list[str],
    eval_data_paths: list[str],
    tokenizer: PreTrainedTokenizerBase,
    options: DataOptions,
) -> PreferenceData:
    from training.data.cache import build_once_per_node, cache_key

    # Each source is resolved once: a build reads the very choices the key fingerprints.
    material, chosen = cache_material(data_paths, eval_data_paths, tokenizer, options)

    def build(staging: Path, group) -> dict:
        phase = read_phase_rows(data_paths, eval_data_paths, options, chosen)
        _, counts = _tokenise_shard(
            phase, tokenizer, options.max_seq_len, staging, group.index, group.size, progress=group.index == 0
        )
        return {
            "parts": {split: f"{split}-{group.index}" for split in SPLITS},
            "counts": {split: dict(counts[split]) for split in SPLITS},
            "read_stats": phase.stats,
        }

    return build_once_per_node(cache_dir / cache_key(material), build, _open_cached, description=material)


def load_preference_data(
    data_paths: list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    data_split: str = DEFAULT_DATA_SPLIT,
    phase_index: int = REWARD_PHASE,
    seed: int = 1234,
    eval_fraction: float = 0.1,
    column_map: dict[str, str] | None = None,
    skip_invalid_rows: bool = False,
    eval_data_paths: list[str] | None = None,
    listwise: ListwiseOptions | None = None,
    cache_dir: str | Path | None = None,
) -> PreferenceData:
    """Read, validate, blend, split and tokenise the preference data of one training phase.

    Args:
        data_paths: files, folders or hub names, blended (DeepSpeed-Chat `--data_path a b c`).
        tokenizer: its chat template renders message rows; its EOS ends every response.
        max_seq_len: longest prompt + response, in tokens.
        data_split: phase weights of each source's training rows (`--data_split`).
        phase_index: the portion to return (reward model: 1).
        seed: fixes the shuffle of every source, hence the held-out rows and the phase portions.
        eval_fraction: share of a source's rows held out for evaluation when it has no eval split.
        column_map: {field: column} for layouts that are not detected (see the module docstring).
        skip_invalid_rows: skip and count invalid rows instead of raising `DataError`.
        eval_data_paths: evaluation sources; when given nothing is held out of `data_paths`.
        listwise: how rows with several responses become comparisons (`listwise.py`).
        cache_dir: the tokenised-data cache folder (`cache.py`); collective then: every rank calls this
            together, and the ranks of a node share one tokenisation. None: tokenise into memory, this rank alone.

    Returns:
        `PreferenceData` whose `train` and `eval` are `ExampleStore`s (memory-mapped with `cache_dir`).

    Raises:
        DataError: before any tokenisation, listing every invalid row (file, line or row, field).
    """
    if not data_paths:
        raise DataError("no data paths given")
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    parse_data_split(data_split, phase_index)
    options = DataOptions(
        max_seq_len, data_split, phase_index, seed, eval_fraction, column_map, skip_invalid_rows, listwise
    )
    eval_data_paths = list(eval_data_paths or [])
    if cache_dir is not None:
        data = _cached_data(Path(cache_dir), list(data_paths), eval_data_paths, tokenizer, options)
    else:
        phase = read_phase_rows(list(data_paths), eval_data_paths, options)
        # every rank tokenises everything here: a progress bar on each node's first only
        progress = os.environ.get("LOCAL_RANK", "0") == "0"
        data = _data(phase.stats, *_tokenise_shard(phase, tokenizer, max_seq_len, None, progress=progress))
    logger.info("Preference data: %s", json.dumps(data.stats))
    return data
