"""Saved reward models: the three layouts, reading, ZeRO gathering, writing.

names.py    file and key names, SAVE_FORMATS
errors.py   CheckpointError
layouts.py  what each layout (hf, auto_map, dschat) is: key renames, classes, configs, vocabulary rows
load.py     read weights from a folder, check keys, load into a (partitioned) RewardModel
zero.py     ZeRO-3 gathering and DeepSpeed engine checkpoints (weights-only reads)
save.py     write a layout: weights, config.json, tokenizer, model card; collective save
"""

from model_utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "model_utils.checkpoint.errors": ("CheckpointError",),
        "model_utils.checkpoint.names": ("SAVE_FORMATS",),
        "model_utils.checkpoint.layouts": ("check_save_format",),
        "model_utils.checkpoint.load": ("read_config", "read_state_dict", "load_reward_model_weights"),
        "model_utils.checkpoint.zero": ("gathered_state_dict", "read_zero_checkpoint"),
        "model_utils.checkpoint.save": ("save_reward_model", "write_reward_model"),
    },
)
