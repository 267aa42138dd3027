"""Run `training.train_rm.main` on one rank with DeepSpeed's gradient reduction forced (`--reduce`: the engine's
`no_sync` made a no-op, so every backward all-reduces as before the trainer skipped it) or as the trainer does it;
write the losses and how many backwards ran inside `no_sync` to OUTPUT/run.json.

    python tests/scripts/one_rank_reduction.py OUTPUT [--reduce] -- TRAIN_RM_FLAGS...
"""

import contextlib
import json
import os
import sys

from deepspeed.runtime.engine import DeepSpeedEngine

from training import train_rm

output, rest = sys.argv[1], sys.argv[2:]
force_reduce = rest[0] == "--reduce"
flags = rest[rest.index("--") + 1 :]
entered = []
original_no_sync = DeepSpeedEngine.no_sync


@contextlib.contextmanager
def counting_no_sync(self):
    entered.append(1)
    if force_reduce:
        yield
    else:
        with original_no_sync(self):
            yield


DeepSpeedEngine.no_sync = counting_no_sync
train_rm.main([*flags, "--output_dir", output])
with open(os.path.join(output, "metrics.jsonl"), encoding="utf-8") as file:
    losses = [record["loss"] for record in map(json.loads, file) if "loss" in record]
with open(os.path.join(output, "run.json"), "w", encoding="utf-8") as file:
    json.dump({"losses": losses, "no_sync_backwards": len(entered)}, file)
