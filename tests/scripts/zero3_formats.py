"""2-process worker: save a ZeRO-3 partitioned reward model in every format, reload each as a PPO critic.

    torchrun --nproc_per_node 2 tests/scripts/zero3_formats.py --model_dir D --tokenizer_dir T --out O

Writes `O/{hf,auto_map,dschat}` (collective saves), `O/checkpoints` (engine checkpoint), `O/reference.safetensors`
(the gathered state dict) and `O/rank{r}.json` with what the test asserts on.
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

from model_utils import create_critic_model, load_tokenizer  # noqa: E402
from model_utils.checkpoint import SAVE_FORMATS, gathered_state_dict, save_reward_model  # noqa: E402

CLIP_RANGE_VALUE = 0.2


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 3},
    }


def batch(seed: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (4, 8), generator=generator)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """DeepSpeed-Chat's critic loss: `0.5 * max((v - R)^2, (clip(v, old +- eps) - R)^2)`, masked mean."""
    clipped = torch.max(torch.min(values, old_values + CLIP_RANGE_VALUE), old_values - CLIP_RANGE_VALUE)
    loss = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / mask.sum()


def ppo_value_step(folder: str, tokenizer, vocab: int) -> dict:
    """Load a critic (partitioned) from `folder`, run one clipped value-loss step; report what it did."""
    critic = create_critic_model(folder, tokenizer, ds_config(), rlhf_training=True, dropout=0.0)
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in critic.backbone.parameters())
    optimizer = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=critic, optimizer=optimizer, config=ds_config())
    input_ids = batch(100 + rank(), vocab)
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        probe = engine.module.forward_value(batch(999, vocab), torch.ones_like(input_ids), prompt_length=3)
    values = engine.module.forward_value(input_ids, mask, return_value_only=True)[:, :-1]
    old_values = values.detach() + 0.1
    returns = torch.randn(values.shape, generator=torch.Generator().manual_seed(7))
    loss = clipped_value_loss(values, old_values, returns, mask[:, 1:].float())
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        after = engine.module.forward_value(batch(999, vocab), torch.ones_like(input_ids), prompt_length=3)
    return {
        "partitioned": partitioned,
        "end_scores": probe["chosen_end_scores"].tolist(),
        "value_loss": loss.item(),
        "values_changed": not torch.equal(after["values"], probe["values"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--tokenizer_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    vocab = len(tokenizer) - 1
    reward_model = create_critic_model(args.model_dir, tokenizer, ds_config(), dropout=0.0)
    torch.manual_seed(1)
    torch.nn.init.normal_(reward_model.v_head.weight, std=0.1)
    optimizer = torch.optim.AdamW(reward_model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=reward_model, optimizer=optimizer, config=ds_config())
    chosen, rejected = engine(batch(rank(), vocab), torch.ones(4, 8, dtype=torch.long)).chunk(2)
    engine.backward(-F.logsigmoid(chosen - rejected).mean())
    engine.step()
    engine.save_checkpoint(os.path.join(args.out, "checkpoints"))

    results = {}
    with torch.no_grad():
        results["trained_end_scores"] = engine.module.forward_value(
            batch(999, vocab), torch.ones(4, 8, dtype=torch.long), prompt_length=3
        )["chosen_end_scores"].tolist()
    reference = gathered_state_dict(engine.module)
    if rank() == 0:
        save_file(reference, os.path.join(args.out, "reference.safetensors"))
    results["returned"] = {
        save_format: save_reward_model(
            engine.module, tokenizer, os.path.join(args.out, save_format), save_format, {"steps": 1}
        )
        for save_format in SAVE_FORMATS
    }
    results["critics"] = {
        save_format: ppo_value_step(os.path.join(args.out, save_format), tokenizer, vocab)
        for save_format in SAVE_FORMATS
    }
    with open(os.path.join(args.out, f"rank{rank()}.json"), "w", encoding="utf-8") as file:
        json.dump(results, file)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    exit_process(0)  # skip the teardown that can abort after the work is done
