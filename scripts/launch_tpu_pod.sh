#!/usr/bin/env bash
# Runs an elsa-jax command on every worker of a Cloud TPU pod slice at once.
# JAX's multi-controller runtime detects the pod itself (jax.distributed.initialize()
# with no arguments), so each worker only needs the same command.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash scripts/launch_tpu_pod.sh \
#       elsa-jax prune --distributed --model meta-llama/Meta-Llama-3-8B --mesh 16x4 \
#       --sparsity 0.7 --preset full --output gs://bucket/runs/llama3-8b-70
#
# Setup (once): the same checkout and venv on every worker, e.g.
#   bash scripts/launch_tpu_pod.sh --setup
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the pod slice name}"
: "${ZONE:?set ZONE to its zone}"
REPO_DIR="${REPO_DIR:-~/elsa_jax}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

run_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" $PROJECT_FLAG --worker=all --command "$1"
}

if [[ "${1:-}" == "--setup" ]]; then
  run_all "cd $REPO_DIR && python3 -m venv .venv && .venv/bin/pip install -e . 'jax[tpu]'"
  exit 0
fi
[[ $# -gt 0 ]] || { echo "usage: $0 --setup | COMMAND..." >&2; exit 2; }
printf -v CMD '%q ' "$@"
run_all "cd $REPO_DIR && source .venv/bin/activate && $CMD"
