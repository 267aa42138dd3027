"""2-process worker: the same training run with plain batches and with packed + prompt-shared batches.

    torchrun --nproc_per_node 2 tests/scripts/zero_packing.py --model_dir D --tokenizer_dir T --stage 3 --out O

Two engines start from the same weights (ZeRO stage N, gradient accumulation A): "plain" trains on
`PaddedCollator` batches, "packed_forward" on packed + prompt-shared rows with a 4D mask through
`batch_rewards(engine, ...)` (one `engine(...)` call with `reward_index`), "segments" on prompt-shared
batches in one row with segment attention (short sequences in blocks), "segments_alone" one SDPA per sequence,
"probed" in the layout the start-up probe picks after a segment forward that raised midway (segment attention
made to refuse a keyword the backbone passes, as it refuses `softcap`): the probe must fall back to mask rows and
ZeRO-3 must train on unharmed. Each rank writes `O/rank{r}.json` with every run's losses per micro-step.
"""

import argparse
import json
import os

import torch

from model_utils.distributed import exit_process, init_distributed, rank

init_distributed()

import deepspeed  # noqa: E402

from model_utils import create_critic_model, load_tokenizer, segment_attention  # noqa: E402
from model_utils.segment_attention import use_segment_attention  # noqa: E402
from training.arguments import TrainConfig  # noqa: E402
from training.layout import MASK, PADDED, SEGMENTS, BatchLayout, batch_rewards  # noqa: E402
from training.losses import pairwise_loss  # noqa: E402
from training.probe import probe_layout  # noqa: E402

MICRO_BATCH = 3


def ds_config(stage: int, accumulation: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": MICRO_BATCH * accumulation * 2,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage},
    }


def pairs_for(micro_step: int, world_rank: int, vocab: int) -> list[dict]:
    """MICRO_BATCH pairs of different lengths (one with an empty prompt), fixed per (micro-step, rank)."""
    generator = torch.Generator().manual_seed(1000 * micro_step + world_rank)

    def ids(length: int) -> list[int]:
        return torch.randint(3, vocab, (length,), generator=generator).tolist()

    shapes = [
        (int(torch.randint(0, 8, (1,), generator=generator)), 1 + index, 4 - index) for index in range(3)
    ]
    shapes[micro_step % MICRO_BATCH] = (0, 3, 2)
    return [
        {
            "prompt_ids": ids(prompt),
            "chosen_ids": ids(chosen) + [1],
            "rejected_ids": ids(rejected) + [2],
            "margin": None,
        }
        for prompt, chosen, rejected in shapes
    ]


def train(engine, layout: BatchLayout, micro_steps: int, vocab: int) -> list[float]:
    collate = layout.collator(pad_token_id=0)
    losses = []
    for micro_step in range(micro_steps):
        batch = {
            key: value.to(engine.device)
            for key, value in collate(pairs_for(micro_step, rank(), vocab)).items()
        }
        chosen_rewards, rejected_rewards = batch_rewards(engine, batch, layout).chunk(2)
        loss = pairwise_loss(chosen_rewards, rejected_rewards)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--tokenizer_dir", required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--micro_steps", type=int, default=6)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.tokenizer_dir)
    vocab = len(tokenizer)
    results = {}
    segments = BatchLayout(packing=True, share_prompt=True, attention=SEGMENTS)
    runs = {
        "plain": BatchLayout(attention=PADDED),
        "packed_forward": BatchLayout(packing=True, share_prompt=True, attention=MASK, max_tokens_per_row=16),
        "segments": segments,  # short sequences: attended in blocks
        "segments_alone": segments,  # one SDPA per sequence
        "probed": segments,  # the probe's choice, after segment attention refused midway
    }
    default_block_tokens = segment_attention.SEGMENT_BLOCK_TOKENS
    for name, layout in runs.items():
        segment_attention.SEGMENT_BLOCK_TOKENS = 0 if name == "segments_alone" else default_block_tokens
        config = ds_config(args.stage, args.accumulation)
        reward_model = create_critic_model(args.model_dir, tokenizer, config, dropout=0.0)
        torch.manual_seed(1)  # the head is created outside zero.Init: the same on every rank and run
        torch.nn.init.normal_(reward_model.v_head.weight, std=0.5)
        if layout.attention == SEGMENTS:
            use_segment_attention(reward_model)
        optimizer = torch.optim.AdamW(reward_model.parameters(), lr=1e-3, weight_decay=0.0)
        engine, *_ = deepspeed.initialize(model=reward_model, optimizer=optimizer, config=config)
        if name == "probed":
            passive = segment_attention.PASSIVE_ATTENTION_KEYWORDS
            segment_attention.PASSIVE_ATTENTION_KEYWORDS = passive - {"position_ids"}
            mask = BatchLayout(packing=True, share_prompt=True, attention=MASK, max_tokens_per_row=16)
            layout = probe_layout(engine, [layout, mask], TrainConfig(max_seq_len=8), pad_token_id=0)
            segment_attention.PASSIVE_ATTENTION_KEYWORDS = passive
            results["probed_layout"] = layout.describe()
        results[name] = train(engine, layout, args.micro_steps, vocab)
        engine.destroy()

    with open(os.path.join(args.out, f"rank{rank()}.json"), "w", encoding="utf-8") as file:
        json.dump(results, file)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    exit_process(0)  # skip the teardown that can abort after the work is done
