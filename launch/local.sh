#!/usr/bin/env bash
# Run megads-train on this machine with N ranks under torchrun (gloo on CPU, nccl on GPUs).
#
#   launch/local.sh 8 parallel=pp2_ep2 schedule.train_steps=20
#   NPROC=4 launch/local.sh parallel.pp=2 parallel.ep=2
#
# The first argument, when numeric, is the number of ranks (default: $NPROC or 4); the rest are
# Hydra overrides. The layout is validated before any process group starts.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-4}"
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC="$1"; shift; fi
PY="${PYTHON:-.venv/bin/python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# SIGUSR1 or SIGTERM to torchrun (kill -USR1 <pid>): the workers finish the step, save a checkpoint and
# exit (75); a relaunch resumes. torchrun forwards only the signals of this list and waits this long.
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export PET_SHUTDOWN_TIMEOUT="${PET_SHUTDOWN_TIMEOUT:-110}"
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megads.train.cli "$@"
