#!/usr/bin/env bash
#SBATCH --job-name=smsanet
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-task=8
#SBATCH --signal=TERM@120
# One training process per host; jax.distributed reads SLURM's environment (coordinator = first
# node, process id = task id). SIGTERM two minutes before the time limit saves a checkpoint, and
# resubmitting the same job resumes it.
# Usage: sbatch --nodes=N scripts/launch_slurm.sh --config configs/smsanet.py --workdir runs/x
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
srun --kill-on-bad-exit=1 .venv/bin/smsanet-jax train "$@"
