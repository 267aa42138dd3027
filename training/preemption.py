"""Stopping on a scheduler's signal without losing a step.

SIGTERM (SLURM at preemption and at the time limit, Kubernetes, preemptible VMs), SIGINT (Ctrl-C) and SIGUSR1
(SLURM `--signal=USR1@<seconds>`) only set a flag (`install_stop_handlers`, first thing in `train_rm.cli`). At
the next optimizer-step boundary every rank agrees (`stop_requested`: one all-reduce of the flag, so a signal that
reached one rank stops them all at the same step), a complete checkpoint is written (`save_checkpoint`, atomic as
always; not again when that step was just saved), and `RunStopped` ends the run: `train_rm.cli` prints

    stopped by SIGTERM at step 12; checkpoint step_12 written; continue with --resume

and exits with `exit_status`: 128 + the signal number (143 TERM, 130 INT, 138 USR1), what a shell reports for a
process those signals ended, so job scripts that already treat 143 as "terminated by the scheduler" keep working;
unlike a killed process, this one has saved first. A signal while the data loads ends the run before the model
is built, without a checkpoint (`stop_before_training`: nothing was trained); one while the model is built, at the
first step boundary.

A repeated signal changes nothing (schedulers signal every process of a job and launchers forward the signal as
well, so a rank often gets it twice): the first one is kept and a save in progress runs to its end. A signal after
the last step (during the final evaluation and save) lets the run finish: the model is saved and the exit status
is 0, as nothing is left to resume.
"""

from __future__ import annotations

import os
import signal

import torch

from model_utils.distributed import device
from training.arguments import TrainConfig
from training.checkpointing import CHECKPOINT_PREFIX, Checkpoint, TrainState, save_checkpoint

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_received: list[int] = []  # the first stop signal this process received


class RunStopped(Exception):
    """A stop signal ended the run; the message says at which step and what was saved."""

    def __init__(self, signal_number: int, what: str) -> None:
        self.signal_number = signal_number
        super().__init__(f"stopped by {signal.Signals(signal_number).name} {what}")


def exit_status(signal_number: int) -> int:
    """128 + the signal number: 143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1."""
    return 128 + signal_number


def _request_stop(signal_number: int, frame) -> None:
    if not _received:
        _received.append(signal_number)
        # os.write: safe inside a signal handler (print may be interrupted mid-write by this very handler).
        message = f"received {signal.Signals(signal_number).name}: stopping at the next step boundary\n"
        os.write(2, message.encode())


def install_stop_handlers() -> None:
    """Turn SIGTERM, SIGINT and SIGUSR1 into a stop request (main thread only, as Python requires)."""
    for signal_number in STOP_SIGNALS:
        signal.signal(signal_number, _request_stop)


def received_signal() -> int | None:
    """The first stop signal this process received, if any (local: no collective)."""
    return _received[0] if _received else None


def stop_requested() -> int | None:
    """The stop signal any rank received, or None; the same answer on every rank. Collective."""
    flag = torch.tensor([received_signal() or 0], device=device())  # NCCL reduces only GPU tensors
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) or None


def stop_before_training(checkpoint: Checkpoint | None) -> None:
    """While data and model load: a stop request ends the run at once, as nothing was trained since `checkpoint`
    (None: a fresh run). Collective."""
    signal_number = stop_requested()
    if signal_number is None:
        return
    if checkpoint is None:
        raise RunStopped(signal_number, "before the first step; nothing to save; start it again")
    raise RunStopped(
        signal_number,
        f"before training on from {checkpoint.tag}; nothing new to save; continue with --resume",
    )


def stop_if_requested(engine, state: TrainState, config: TrainConfig, saved_step: int) -> None:
    """At a step boundary: when any rank was signalled, save (unless step `saved_step` is this one) and raise
    `RunStopped`. Collective."""
    signal_number = stop_requested()
    if signal_number is None:
        return
    tag = f"{CHECKPOINT_PREFIX}{state.global_step}"
    if saved_step != state.global_step:
        tag = save_checkpoint(engine, state, config)
    raise RunStopped(
        signal_number, f"at step {state.global_step}; checkpoint {tag} written; continue with --resume"
    )
