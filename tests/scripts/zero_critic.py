"""2-process worker: build a critic under ZeRO stage N, train a few steps, round-trip it into a fresh critic.

    torchrun --nproc_per_node 2 tests/scripts/zero_critic.py --model_dir D --tokenizer_dir T --stage 3 --out O

Each rank writes `O/rank{r}.json` with what the test asserts on.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model_utils.distributed import exit_process, init_distributed, rank

init_distributed()

import deepspeed  # noqa: E402
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled  # noqa: E402

from model_utils import create_critic_model, load_tokenizer  # noqa: E402
from model_utils.checkpoint import CheckpointError, gathered_state_dict  # noqa: E402


def ds_config(stage: int, dtype: str) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def batch_for(step: int, world_rank: int, vocab: int) -> torch.Tensor:
    """Chosen rows then rejected rows, `[4, 8]` token ids, the same on every run for (step, rank)."""
    generator = torch.Generator().manual_seed(1000 * step + world_rank)
    return torch.randint(3, vocab, (4, 8), generator=generator)


def save_weights(state_dict: dict | None, folder: str, config, tokenizer) -> None:
    if rank() == 0:
        os.makedirs(folder, exist_ok=True)
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        save_file(
            {name: tensor.contiguous() for name, tensor in state_dict.items()}, f"{folder}/model.safetensors"
        )
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--tokenizer_dir", required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = ds_config(args.stage, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    reward_model = create_critic_model(args.model_dir, tokenizer, config, dropout=0.0, dtype=dtype)
    # The head is created outside zero.Init: seed it the same on every rank and stage.
    torch.manual_seed(1)
    torch.nn.init.normal_(reward_model.v_head.weight, std=0.1)
    results = {
        "zero3_context_left_alive": is_deepspeed_zero3_enabled(),
        "backbone_partitioned": all(
            hasattr(p, "ds_id") and p.numel() == 0 for p in reward_model.backbone.parameters()
        ),
        "unpartitioned": [
            n
            for n, p in reward_model.backbone.named_parameters()
            if not (hasattr(p, "ds_id") and p.numel() == 0)
        ],
        "local_elements": sum(
            p.ds_tensor.numel() for p in reward_model.backbone.parameters() if hasattr(p, "ds_tensor")
        ),
        "full_elements": sum(getattr(p, "ds_numel", p.numel()) for p in reward_model.backbone.parameters()),
        "head_dtype": str(reward_model.v_head.weight.dtype),
    }

    optimizer = torch.optim.AdamW(reward_model.parameters(), lr=1e-3, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=reward_model, optimizer=optimizer, config=config)
    vocab = len(tokenizer) - 1
    losses = []
    for step in range(args.steps):
        input_ids = batch_for(step, rank(), vocab).to(engine.device)
        rewards = engine(input_ids, torch.ones_like(input_ids))
        chosen, rejected = rewards.float().chunk(2)
        loss = -F.logsigmoid(chosen - rejected).mean()
        engine.backward(loss)
        engine.step()
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)
        losses.append(mean_loss.item() / torch.distributed.get_world_size())
    results["losses"] = losses

    probe = batch_for(999, 0, vocab)
    engine.eval()
    with torch.no_grad():
        trained_rewards = engine(probe, torch.ones_like(probe)).float()
    results["trained_rewards"] = trained_rewards.tolist()

    # Round trip: gather on rank 0, save, build a fresh partitioned critic, load, compare.
    saved = os.path.join(args.out, "critic")
    state_dict = gathered_state_dict(engine.module)
    if rank() == 0:
        results["saved_empty_tensors"] = [name for name, tensor in state_dict.items() if tensor.numel() == 0]
    save_weights(state_dict, saved, reward_model.config, tokenizer)
    critic = create_critic_model(saved, tokenizer, config, rlhf_training=True, dropout=0.0, dtype=dtype)
    results["critic_partitioned"] = (
        all(hasattr(p, "ds_id") for p in critic.backbone.parameters()) if args.stage == 3 else None
    )
    # Inference engines need no optimizer: ZeRO 1/2 only shard optimizer state, so they run as stage 0.
    inference_stage = 3 if args.stage == 3 else 0
    inference_config = {
        **config,
        "zero_optimization": {**config["zero_optimization"], "stage": inference_stage},
    }
    critic_engine, *_ = deepspeed.initialize(model=critic, config=inference_config)
    critic_engine.eval()
    with torch.no_grad():
        critic_rewards = critic_engine(probe, torch.ones_like(probe)).float()
        values = critic_engine.module.forward_value(probe, torch.ones_like(probe), prompt_length=3)
    results["critic_rewards"] = critic_rewards.tolist()
    results["critic_values_shape"] = list(values["values"].shape)

    # A state dict without the head must fail on every rank, naming the key.
    broken = os.path.join(args.out, "broken")
    if rank() == 0:
        state_dict.pop("v_head.weight")
    save_weights(state_dict, broken, reward_model.config, tokenizer)
    try:
        create_critic_model(broken, tokenizer, config, rlhf_training=True, dtype=dtype)
        results["missing_head_error"] = None
    except CheckpointError as error:
        results["missing_head_error"] = str(error)

    with open(os.path.join(args.out, f"rank{rank()}.json"), "w", encoding="utf-8") as file:
        json.dump(results, file)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    exit_process(0)  # skip the teardown that can abort after the work is done
