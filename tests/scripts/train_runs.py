"""Run many `training.train_rm` runs in ONE process (the import and process-group start paid once).

    python tests/scripts/train_runs.py RUNS.json RESULTS.json

RUNS.json: `{"name": [argument, ...], ...}`. For each run, in order, `training.train_rm.main(arguments)` is
called; RESULTS.json gets `{"name": {"layout": <the start-up "batch layout" log line>, "error": "<type>: <message>"
or null, "seconds": wall time}}`. A run's error (bad flags, a refused layout or save format) is what `cli` would
print before exiting with status 2.
"""

import json
import logging
import sys
import time

from model_utils.checkpoint.errors import CheckpointError
from training.data.records import DataError
from training.errors import ConfigError, TrainingError
from training.train_rm import main


class LayoutLine(logging.Handler):
    """Keeps the last "batch layout: ..." record of training.probe."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.line = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("batch layout: "):
            self.line = message.removeprefix("batch layout: ")


def run_all(runs: dict[str, list[str]]) -> dict[str, dict]:
    handler = LayoutLine()
    logging.getLogger("training.probe").addHandler(handler)
    logging.getLogger("training.probe").setLevel(logging.INFO)
    results = {}
    for name, arguments in runs.items():
        handler.line, error, start = None, None, time.perf_counter()
        try:
            main(arguments)
        except (DataError, ConfigError, CheckpointError, TrainingError) as caught:
            error = f"{type(caught).__name__}: {caught}"
        results[name] = {
            "layout": handler.line,
            "error": error,
            "seconds": round(time.perf_counter() - start, 2),
        }
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    return results


if __name__ == "__main__":
    runs_path, results_path = sys.argv[1:3]
    with open(runs_path, encoding="utf-8") as file:
        results = run_all(json.load(file))
    with open(results_path, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=1)
