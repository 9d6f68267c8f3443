#!/usr/bin/env bash
# Run a jaxkd entry point as N cooperating processes on this machine (CPU or one host of GPUs).
#   launch/local_multiprocess.sh 2 python -m jaxkd.train --config configs/cpu_default.yaml stage=kd
# Each process gets JAXKD_* variables that jaxkd.distributed.maybe_initialize() reads;
# JAXKD_LOCAL_DEVICES (default 1) fakes that many CPU devices per process.
set -euo pipefail
n=${1:?usage: $0 NUM_PROCESSES COMMAND...}; shift
port=${JAXKD_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  JAXKD_COORDINATOR=127.0.0.1:$port JAXKD_NUM_PROCESSES=$n JAXKD_PROCESS_ID=$i \
  JAXKD_LOCAL_DEVICES=${JAXKD_LOCAL_DEVICES:-1} "$@" > >(sed "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
