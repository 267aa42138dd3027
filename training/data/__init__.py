"""Preference data, in the order it flows: sources -> formats -> splits -> rows -> tokenize -> store -> collate.

    records.py       the types a row passes through, and `DataError`
    sources.py       raw records from a file, a folder, a save_to_disk folder or a hub dataset
    dataset_splits.py  the subsets and splits such a dataset offers, and the ones a source chooses
    formats.py       which column holds which field; one record validated into a `PreferenceRow`
    listwise.py      rows with several scored or ranked responses per prompt -> `RankedRow` + comparisons
    splits.py        DeepSpeed-Chat phase splits and held-out evaluation rows
    rows.py          every source of a phase read, validated, blended and split into training/evaluation rows
    tokenize.py      rows -> token ids (the one path for training, evaluation and scoring)
    store.py         token ids in flat arrays: `ExampleStore`, a memory-mappable sequence of examples
    cache.py         the tokenised-data cache: its key, and one build per node shared by its ranks
    load.py          all of it for one training phase: `load_preference_data`
    collate.py       token ids -> the tensors of a micro-batch, padded or packed
    default_data.py  the generated preference set of the embedded default run

Names resolve lazily: `from training.data import DataError` imports neither transformers nor torch.
"""

from model_utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "training.data.records": ("DataError", "PreferenceData", "PreferenceRow"),
        "training.data.sources": ("load_records", "parse_source", "split_row_range"),
        "training.data.formats": ("detect_format", "parse_column_map"),
        "training.data.splits": ("DEFAULT_DATA_SPLIT", "split_indices"),
        "training.data.tokenize": ("finish_sequence", "tokenize_pair", "tokenize_response", "tokenize_rows"),
        "training.data.rows": ("read_preference_rows",),
        "training.data.store": ("ExampleStore",),
        "training.data.load": ("load_preference_data",),
        "training.data.collate": ("PaddedCollator", "PackedCollator"),
    },
)
