"""Every causal-LM family of the installed transformers, built tiny from one set of generic settings, through the
start-up probe: the layout it keeps, and whether that layout gives the padded batch's rewards on pairs the probe
never scored.

    python tests/scripts/backbone_sweep.py RESULTS.json [--dtype fp32|bf16] [FAMILY ...]

A family of the wide table (`tests/tiny_models.py`) is built with its settings there, any other with
`tiny_models.generic_config`. RESULTS.json gets `{family: {"status": "layout" | "skipped" | "error", ...}}`: for a
layout, its `attention`, `packing`, `share_prompt`, `reason` (the start-up log's), the largest |reward difference|
on the unseen pairs and their reward `scale` (the largest |padded reward|, at least 1); for a skip, `why` (an
encoder-decoder, settings the family refuses or that do not build, a model over `MAX_PARAMETERS` with them, a
padded forward that fails); an error is anything raised once the padded forward worked (the start-up would crash
where it should choose a layout). Each family runs in a forked child with a memory limit and an alarm, so a
family that allocates much or hangs costs only its own entry.
"""

import argparse
import json
import os
import resource
import signal
import sys

import torch

torch.set_num_threads(1)  # before any parallel region: a forked child must not inherit an OpenMP pool

from transformers import AutoModel  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from test_packing import make_pairs  # noqa: E402
from tiny_models import BACKBONES, generic_config, tiny_config, wide_head_reward_model  # noqa: E402

from training.arguments import TrainConfig  # noqa: E402
from training.data.collate import PaddedCollator  # noqa: E402
from training.ds_config import torch_dtype  # noqa: E402
from training.layout import BatchLayout, batch_rewards  # noqa: E402
from training.probe import choose_layout  # noqa: E402

PAD = 2
MAX_PARAMETERS = 20_000_000
MAX_SEQ_LEN = 32
# Not the probe's pairs (`training.probe.probe_pairs`): other lengths, another seed.
UNSEEN_SHAPES = [(3, 4, 5), (0, 6, 2), (7, 3, 3), (11, 9, 12), (1, 1, 1)]


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]


def sweep_family(family: str, dtype: torch.dtype) -> dict:
    try:  # the wide table's own settings where it has them (tests/tiny_models.py), else the generic ones
        config = tiny_config(family) if family in BACKBONES else generic_config(family)
    except Exception as error:  # a family's own validation of the generic settings
        return {"status": "skipped", "why": f"settings refused: {first_line(error)}"}
    if getattr(config, "is_encoder_decoder", False):
        return {"status": "skipped", "why": "encoder-decoder"}
    try:
        with torch.device("meta"):
            size = sum(parameter.numel() for parameter in AutoModel.from_config(config).parameters())
    except Exception as error:
        return {"status": "skipped", "why": f"does not build: {first_line(error)}"}
    if size > MAX_PARAMETERS:
        return {"status": "skipped", "why": f"{size / 1e6:.0f}M parameters with the generic settings"}
    try:
        model = wide_head_reward_model(config, dtype).eval()
        pairs = make_pairs(UNSEEN_SHAPES, seed=7)
        with torch.no_grad():
            expected = batch_rewards(model, PaddedCollator(PAD)(pairs), BatchLayout())
    except Exception as error:
        return {"status": "skipped", "why": f"padded forward fails: {first_line(error)}"}
    layout = choose_layout(TrainConfig(max_seq_len=MAX_SEQ_LEN), model, PAD)
    with torch.no_grad():
        rewards = batch_rewards(model, layout.collator(PAD)(pairs), layout)
    return {
        "status": "layout",
        "attention": layout.attention,
        "packing": layout.packing,
        "share_prompt": layout.share_prompt,
        "reason": layout.reason,
        "difference": float((rewards - expected).abs().max()),
        "scale": max(1.0, float(expected.abs().max())),
    }


def in_child(family: str, dtype: torch.dtype, timeout_s: int = 120, memory_gib: int = 12) -> dict:
    """`sweep_family(family, dtype)` in a forked child (memory limit, alarm); its death is the family's entry."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one family, its JSON down the pipe
        os.close(read_end)
        limit = memory_gib * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        signal.alarm(timeout_s)
        try:
            result = sweep_family(family, dtype)
        except BaseException as error:  # noqa: BLE001 - anything is the family's result, not the sweep's end
            result = {"status": "error", "why": first_line(error)}
        with os.fdopen(write_end, "w") as pipe:
            json.dump(result, pipe)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not text:
        return {"status": "skipped", "why": f"child died (wait status {status}): out of memory or time"}
    return json.loads(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("families", nargs="*", default=sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    args = parser.parse_intermixed_args()
    dtype = torch_dtype(args.dtype)
    results = {family: in_child(family, dtype) for family in args.families}
    with open(args.output, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
