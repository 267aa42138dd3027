#!/usr/bin/env bash
# Launch reward-model training with the deepspeed launcher.
#
#   launch/train_rm.sh                                   # the embedded default: SmolLM2-135M + generated pairs
#   launch/train_rm.sh --model_name_or_path Qwen/Qwen2.5-0.5B --data_path Anthropic/hh-rlhf --zero_stage 3
#   NUM_GPUS=8 launch/train_rm.sh ...                    # one node, 8 GPUs (default: every visible GPU)
#   HOSTFILE=hostfile NUM_NODES=2 launch/train_rm.sh ... # several nodes (DeepSpeed hostfile: "host slots=8")
#   NUM_PROCS=2 launch/train_rm.sh --zero_stage 2        # CPU-only machine, 2 processes (gloo)
#
# Every argument is passed to `python -m training.train_rm` (see README for the flags); MASTER_PORT picks
# the rendezvous port (default 29500). With no arguments `training.train_rm` runs the embedded default
# (its settings: `DEFAULT_RUN` in training/arguments.py).
#
# Stop signals: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 sent to this script are forwarded to this node's training
# processes, which write a checkpoint at the next step boundary and exit 143 / 130 / 138; this script then exits
# with that status (see README, "Preemption"). Only the training processes get the signal: DeepSpeed 0.19's
# per-node launcher answers SIGTERM/SIGINT by terminating its ranks and SIGKILLing them 30 s later (a longer
# save would be cut short), and its runner and launcher die at SIGUSR1 without passing it on. The launcher runs
# in its own session, so Ctrl-C at a terminal reaches this script alone. The ranks agree at each step boundary, so
# signalling one node's ranks stops every node; with HOSTFILE the ranks run under ssh, not below this script: let
# the scheduler signal them (SLURM signals every task of a job step, e.g. `scancel --signal=USR1 <job>`).
set -euo pipefail
cd "$(dirname "$0")/.."

launcher_args=(--master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  launcher_args+=(--hostfile "$HOSTFILE")
  [ -n "${NUM_NODES:-}" ] && launcher_args+=(--num_nodes "$NUM_NODES")
  [ -n "${NUM_GPUS:-}" ] && launcher_args+=(--num_gpus "$NUM_GPUS")
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  launcher_args+=(--num_gpus "${NUM_GPUS:-$(nvidia-smi -L | wc -l)}")
else
  # No GPU: DeepSpeed's CPU accelerator with gloo. Without --num_gpus the launcher starts one process per
  # NUMA node; the CPU-only run wants an explicit count.
  export DS_ACCELERATOR=cpu
  launcher_args+=(--num_gpus "${NUM_PROCS:-1}")
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / ${NUM_PROCS:-1} ))}"
fi

descendants() {  # every process below $1
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

forward() {  # $1: a signal name; sent to the training processes below the launcher (`python -u -m training.train_rm`)
  local pid
  for pid in $(descendants "$launcher"); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- '-m training\.train_rm '; then
      kill -s "$1" "$pid" 2>/dev/null || true
    fi
  done
}

setsid --wait deepspeed "${launcher_args[@]}" --module training.train_rm "$@" &
launcher=$!
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward USR1' USR1
# `wait` returns early whenever a trap runs; wait again until the launcher is gone, then take its status.
while kill -0 "$launcher" 2>/dev/null; do
  wait "$launcher" || true
done
wait "$launcher"
