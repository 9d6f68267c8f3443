#!/usr/bin/env bash
# Run on every worker of a TPU VM pod slice (the repo and .venv already on each worker):
#   launch/tpu_vm_pod.sh TPU_NAME ZONE --config configs/qwen2.5-7b-to-1.5b.yaml stage=kd
# On TPU pods jax.distributed.initialize() finds its peers itself (see jaxkd/distributed.py).
set -euo pipefail
name=${1:?usage: $0 TPU_NAME ZONE ARGS...}; zone=${2:?zone}; shift 2
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd ~/jaxkd && .venv/bin/python -m jaxkd.train $args"
