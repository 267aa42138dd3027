"""Train a reward model on preference pairs with DeepSpeed.

    # the embedded default (packaged SmolLM2-135M + the project's generated preference set):
    python -m training.train_rm
    # DeepSpeed-Chat step-2 style, 8 GPUs, ZeRO-3:
    deepspeed --num_gpus 8 -m training.train_rm --model_name_or_path Qwen/Qwen2.5-0.5B \
        --data_path Anthropic/hh-rlhf --zero_stage 3 --dtype bf16 --output_dir output/rm
    # CPU, 2 processes: DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m training.train_rm --zero_stage 2

The recipe, top to bottom: parse config -> preflight (every late failure checked first: output folder, earlier
checkpoints, model path, save format, static layout refusals) -> start the process group -> DeepSpeed config ->
tokenizer -> data -> model -> `deepspeed.initialize` -> batch layout (proved exact on the model) -> resume ->
`train` -> final evaluation -> save. SIGTERM, SIGINT and SIGUSR1 stop the run at the next step boundary after a
checkpoint (`preemption.py`, exit status 128 + the signal number).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import torch

from model_utils.checkpoint.errors import CheckpointError
from model_utils.distributed import destroy_distributed, exit_process, init_distributed, rank, world_size
from training.arguments import DEFAULT_DATA, DEFAULT_MODEL, TrainConfig, parse_args
from training.data.records import DataError, PreferenceData
from training.errors import ConfigError, TrainingError
from training.preemption import RunStopped, exit_status, install_stop_handlers, received_signal

logger = logging.getLogger("training.train_rm")


def resolve_model_path(config: TrainConfig) -> str:
    if config.model_name_or_path != DEFAULT_MODEL:
        return config.model_name_or_path
    from model_utils.default_model import default_model_path

    return default_model_path()


def resolve_data_paths(config: TrainConfig) -> list[str]:
    """'default' becomes the generated preference set (written once by rank 0 into output_dir/default_data)."""
    if DEFAULT_DATA not in config.data_path:
        return list(config.data_path)
    from training.data.default_data import write_default_dataset

    folder = os.path.join(config.output_dir, "default_data")
    if rank() == 0:
        write_default_dataset(folder)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return [folder if path == DEFAULT_DATA else path for path in config.data_path]


def load_data(config: TrainConfig, tokenizer) -> PreferenceData:
    """Tokenised once per node into the data cache (collective: every rank calls it), memory-mapped by each rank."""
    from training.data.cache import resolve_cache_dir
    from training.data.formats import parse_column_map
    from training.data.load import load_preference_data
    from training.data.records import ListwiseOptions

    data = load_preference_data(
        resolve_data_paths(config),
        tokenizer,
        max_seq_len=config.max_seq_len,
        data_split=config.data_split,
        seed=config.seed,
        eval_fraction=config.eval_fraction,
        column_map=parse_column_map(config.column_map) if config.column_map else None,
        skip_invalid_rows=config.skip_invalid_rows,
        eval_data_paths=config.eval_data_path or None,
        listwise=ListwiseOptions(config.min_score_gap, config.ultrafeedback_score, config.score_gap_margin),
        cache_dir=resolve_cache_dir(config.data_cache_dir),
    )
    if not data.eval:
        raise DataError("no evaluation pairs: give --eval_data_path or a positive --eval_fraction")
    if config.loss_type == "dschat" and (data.train.has_groups or data.eval.has_groups):
        raise ConfigError("--loss_type dschat takes pairs only; this data has rows with several responses")
    if config.listwise_loss == "plackett_luce" and data.train.has_margins:  # evaluation never uses margins
        logger.warning("the data's margins are not used: --listwise_loss plackett_luce has no margin")
    return data


def report_data(data: PreferenceData) -> None:
    stats = data.stats
    logger.info(
        "data: %d training examples (%d comparisons), %d evaluation examples (%d comparisons); truncated rows %s; "
        "skipped invalid rows %s; ties skipped %s; rows without a comparison %s; responses dropped %s",
        stats["train_examples"],
        stats["train_pairs"],
        stats["eval_examples"],
        stats["eval_pairs"],
        stats["truncated_rows"],
        stats["skipped_rows"],
        stats["ties_skipped"],
        stats["skipped_by_rule"],
        stats["responses_dropped"],
    )


def freeze_bottom_layers(reward_model, num_frozen_layers: int) -> None:
    """Freeze the input embeddings and the first N transformer blocks (the largest ModuleList)."""
    if num_frozen_layers == 0:
        return
    blocks = max(
        (module for module in reward_model.backbone.modules() if isinstance(module, torch.nn.ModuleList)),
        key=len,
    )
    if num_frozen_layers > len(blocks):
        raise ConfigError(f"--num_frozen_layers {num_frozen_layers}: the model has only {len(blocks)} layers")
    frozen = [reward_model.backbone.get_input_embeddings(), *blocks[:num_frozen_layers]]
    for module in frozen:
        module.requires_grad_(False)


def build_optimizer(reward_model, config: TrainConfig, ds_config: dict):
    """AdamW over trainable parameters, without weight decay on biases and norms (1-d parameters).

    A client `torch.optim.AdamW` everywhere (DeepSpeed's CPU builds of its own Adam were seen to abort at
    exit); with optimizer offload on a GPU, DeepSpeedCPUAdam, which is what offload is for.
    """
    trainable = [p for p in reward_model.parameters() if p.requires_grad]

    def is_matrix(parameter: torch.nn.Parameter) -> bool:
        # Under ZeRO-3 a parameter's own tensor is a flat shard: its full shape (`ds_shape`) decides, or every
        # partitioned weight would land in the group without decay.
        return len(getattr(parameter, "ds_shape", parameter.shape)) >= 2

    groups = [
        {"params": [p for p in trainable if is_matrix(p)], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if not is_matrix(p)], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    offloaded = "offload_optimizer" in ds_config.get("zero_optimization", {})
    if offloaded and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=config.learning_rate, betas=(0.9, 0.95))
    # fused: one kernel per parameter (CPU since torch 2.4, CUDA): the same AdamW, 2.6-2.8x faster per step
    # on CPU than the default multi-tensor form (`python benchmarks/bench_layouts.py`).
    try:
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95), fused=True)
    except RuntimeError as error:  # a device without torch's fused kernels
        logger.warning("fused AdamW unavailable (%s); using the multi-tensor AdamW", error)
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95))


def build_scheduler(optimizer, config: TrainConfig, num_training_steps: int):
    from transformers import get_scheduler

    return get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=config.num_warmup_steps,
        num_training_steps=num_training_steps,
    )


def main(argv: list[str] | None = None) -> dict:
    """Run training; returns the final evaluation results (also printed and written to metrics.jsonl)."""
    config = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from training.preflight import check_prompt_truncation, preflight

    model_path = resolve_model_path(config)
    preflight(config, model_path)
    init_distributed(timeout_minutes=config.dist_timeout_s / 60 if config.dist_timeout_s else None)
    import deepspeed

    from model_utils.checkpoint.save import save_reward_model
    from model_utils.model_factory import create_critic_model
    from model_utils.tokenizer import load_tokenizer
    from training.checkpointing import TrainState, latest_checkpoint, new_run_id, remove_checkpoints
    from training.ds_config import build_ds_config, resolve_attention, resolve_dtype, torch_dtype
    from training.lora import apply_lora, merge_lora
    from training.metrics import MetricsLog
    from training.preemption import stop_before_training
    from training.probe import choose_layout
    from training.resume import check_topology, resume_from_checkpoint
    from training.sampling import check_same_data_order, data_order, total_steps
    from training.trainer import run_evaluation, train

    torch.manual_seed(config.seed)
    ds_config = build_ds_config(config, world_size())
    attn_implementation = resolve_attention(config.attn_implementation)
    if config.overwrite_output_dir:
        remove_checkpoints(config)
    resume_from = latest_checkpoint(config) if config.resume else None
    if resume_from is not None:
        check_topology(resume_from, world_size(), ds_config["zero_optimization"].get("stage", 0))
    tokenizer = load_tokenizer(model_path, trust_remote_code=config.trust_remote_code)
    data = load_data(config, tokenizer)
    report_data(data)
    check_prompt_truncation(data.stats, config)
    order = data_order(len(data.train), config, world_size())
    if resume_from and resume_from.state:  # before the model loads (older checkpoints: after)
        check_same_data_order(resume_from.state.data_order, order, resume_from.path)
    stop_before_training(resume_from)  # a signal while the data loaded

    reward_model = create_critic_model(
        model_path,
        tokenizer,
        ds_config,
        num_padding_at_beginning=config.num_padding_at_beginning,
        dropout=config.dropout,
        dtype=torch_dtype(resolve_dtype(config.dtype)),
        trust_remote_code=config.trust_remote_code,
        head_seed=config.seed,
        attn_implementation=attn_implementation,
    )
    freeze_bottom_layers(reward_model, config.num_frozen_layers)
    torch.manual_seed(config.seed)  # LoRA's initialisation must not depend on how the backbone was built
    apply_lora(reward_model, config)
    if config.gradient_checkpointing:
        reward_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    num_steps = total_steps(len(data.train), config, world_size())
    optimizer = build_optimizer(reward_model, config, ds_config)
    scheduler = build_scheduler(optimizer, config, num_steps)
    engine, *_ = deepspeed.initialize(
        model=reward_model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    layout = choose_layout(config, engine, tokenizer.pad_token_id)

    if resume_from is not None:
        state = resume_from_checkpoint(engine, resume_from)
        check_same_data_order(state.data_order, order, resume_from.path)
        logger.info("resuming at step %d from %s", state.global_step, resume_from.path)
    else:
        if config.resume:
            logger.info("--resume: no checkpoint yet, starting")
        state = TrainState(data_order=order, run_id=new_run_id())
    metrics = MetricsLog(config, resumed_step=state.global_step if resume_from else None)
    collator = layout.collator(tokenizer.pad_token_id)
    try:
        state = train(engine, data.train, data.eval, collator, layout, config, state, metrics, num_steps)
    except RunStopped:
        metrics.close()
        raise

    results = run_evaluation(engine, data.eval, collator, layout, config.per_device_eval_batch_size)
    metrics.write({"step": state.global_step, **{f"eval_{key}": value for key, value in results.items()}})
    metrics.close()
    merge_lora(engine.module)
    save_reward_model(
        engine.module,
        tokenizer,
        config.output_dir,
        save_format=config.save_format,
        metadata={
            "base_model": config.model_name_or_path
            if config.model_name_or_path != DEFAULT_MODEL
            else model_path,
            "data": list(config.data_path),
            "steps": state.global_step,
            "pairs_seen": state.pairs_seen,
            "eval_accuracy": results["accuracy"],
            "eval_pairs": results["num_pairs"],
            "reward_mean": results["reward_mean"],
            "reward_std": results["reward_std"],
        },
    )
    if rank() == 0:
        print(
            f"held-out accuracy {results['accuracy']:.4f} on {results['num_pairs']} pairs after "
            f"{state.global_step} steps; reward model saved to {os.path.abspath(config.output_dir)}",
            flush=True,
        )
    return results


def cli() -> None:
    """Console entry: one-line errors for bad data, flags, checkpoints, faults; the process group always destroyed.

    A finished run leaves through `exit_process`, so DeepSpeed's occasional abort during interpreter teardown on
    CPU cannot turn a successful job into a failed one. A run stopped by a signal leaves with
    `preemption.exit_status` after its checkpoint; one signalled after its last step finishes and leaves with 0.
    """
    install_stop_handlers()
    try:
        main()
    except RunStopped as stopped:
        if rank() == 0:
            print(stopped, file=sys.stderr, flush=True)
        exit_process(exit_status(stopped.signal_number))
    except (DataError, ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        exit_process(2)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        exit_process(1)
    except torch.distributed.DistError as error:
        print(
            f"error: lost contact with another rank ({type(error).__name__}: {error})",
            file=sys.stderr,
            flush=True,
        )
        exit_process(1)
    except BaseException:
        destroy_distributed()
        raise
    if received_signal() is not None and rank() == 0:
        print(
            f"received {signal.Signals(received_signal()).name} after the last step: the run finished and the "
            "model is saved",
            file=sys.stderr,
            flush=True,
        )
    exit_process(0)


if __name__ == "__main__":
    cli()
