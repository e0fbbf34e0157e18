#!/usr/bin/env bash
# Multi-GPU / multi-node launch under SLURM: one process per node, all of a node's GPUs in it.
# jax.distributed.initialize() detects SLURM (coordinator = first node, process id = SLURM_PROCID).
#
#   sbatch --nodes=4 --gpus-per-node=8 scripts/launch_slurm.sh \
#       elsa-jax prune --distributed --model /data/Llama-3-70B --mesh 8x4 --state-dtype float8_e4m3fn \
#       --moment-dtype int8 --sparsity 0.7 --preset full --output /data/runs/llama3-70b-70
#
#SBATCH --job-name=elsa-jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
[[ $# -gt 0 ]] || { echo "usage: sbatch $0 COMMAND..." >&2; exit 2; }
REPO_DIR="${REPO_DIR:-$SLURM_SUBMIT_DIR}"
cd "$REPO_DIR"
source .venv/bin/activate
srun --ntasks-per-node=1 "$@"
