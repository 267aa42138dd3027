"""The two ways a run stops on purpose; `train_rm.cli` prints either as one line, without a traceback.

- `ConfigError`: flags, a DeepSpeed config, or inputs that do not fit together (exit status 2).
- `TrainingError`: a run that cannot go on: a non-finite loss, a checkpoint that cannot be resumed (exit 1).
"""


class ConfigError(ValueError):
    """Flags (or a DeepSpeed config) that do not fit together; the message names them."""


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, ...); the message names the step."""
