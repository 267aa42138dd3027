"""Everything about a training run. The file list is the path a run takes:

    arguments.py      one typed config (`TrainConfig`), DeepSpeed-Chat flag names, the embedded default run
    ds_config.py      DeepSpeed JSON configs, their "auto" fields filled from the flags
    data/             preference data: sources -> formats -> splits -> rows -> tokenize -> store -> collate
    layout.py         the batch layout (padded, packed, prompt-shared), decided once; the forward it needs
    sampling.py       the epoch order
    losses.py         pairwise losses as pure functions
    trainer.py        the loop and evaluation
    checkpointing.py  engine checkpoints for --resume
    metrics.py        reward statistics, metrics.jsonl, TensorBoard
    lora.py           LoRA through PEFT
    train_rm.py       python -m training.train_rm: the recipe, top to bottom
    evaluate.py       python -m training.evaluate: accuracy and reward statistics of a saved model

Names resolve lazily (importing `training` imports neither DeepSpeed nor transformers).
"""

from model_utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "training.arguments": ("TrainConfig", "parse_args"),
        "training.errors": ("ConfigError", "TrainingError"),
        "training.data.load": ("load_preference_data",),
        "training.layout": ("BatchLayout", "choose_layout", "batch_rewards"),
        "training.losses": ("pairwise_loss",),
        "training.metrics": ("ranking_statistics", "reward_statistics"),
        "training.trainer": ("train", "run_evaluation"),
    },
)
