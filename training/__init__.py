"""Everything about a training run. The file list is the path a run takes:

    arguments.py      one typed config (`TrainConfig`), DeepSpeed-Chat flag names, the embedded default run
    preflight.py      every failure that would come late, checked before data and model load
    ds_config.py      DeepSpeed JSON configs, their "auto" fields filled from the flags
    data/             preference data: sources -> formats -> splits -> rows -> tokenize -> store -> collate
    layout.py         the batch layout (padded, packed, prompt-shared): what the config allows; the forward
    probe.py          the start-up probe: the fastest layout proved exact on the model itself (choose_layout)
    sampling.py       the epoch order
    losses.py         pairwise losses as pure functions
    trainer.py        the loop and evaluation
    preemption.py     SIGTERM/SIGINT/SIGUSR1: checkpoint at the next step boundary, exit 128 + signal
    checkpointing.py  engine checkpoints for --resume (atomic; train_state.json; pruning by run)
    resume.py         --resume on any world size and ZeRO stage (universal conversion, per-parameter restore)
    metrics.py        reward statistics, metrics.jsonl, TensorBoard
    lora.py           LoRA through PEFT
    train_rm.py       python -m training.train_rm: the recipe, top to bottom
    evaluate.py       python -m training.evaluate: accuracy and reward statistics of a saved model
    serve.py          python -m training.serve: a saved model over HTTP for the RL stage (FastAPI app, flags)
    serve_requests.py what a request may hold: JSON read within limits, validated into groups
    serve_engine.py   the server's engine: micro-batches across requests, each prompt computed once
    serve_client.py   RewardClient: a TRL reward function (or plain scorer) calling the server

Names resolve lazily (importing `training` imports neither DeepSpeed nor transformers).
"""

from model_utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "training.arguments": ("TrainConfig", "parse_args"),
        "training.errors": ("ConfigError", "TrainingError"),
        "training.data.load": ("load_preference_data",),
        "training.layout": ("BatchLayout", "layout_candidates", "batch_rewards"),
        "training.probe": ("choose_layout",),
        "training.losses": ("pairwise_loss",),
        "training.metrics": ("ranking_statistics", "reward_statistics"),
        "training.trainer": ("train", "run_evaluation"),
        "training.serve_engine": ("RewardEngine", "ScoreGroup", "load_engine"),
        "training.serve_client": ("RewardClient",),
    },
)
