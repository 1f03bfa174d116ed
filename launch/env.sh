#!/usr/bin/env bash
# launch/env.sh: run one process of a multi-process job from plain environment variables.
#
# Usage (on every host, or once per process):
#   launch/env.sh COORDINATOR NUM_PROCESSES PROCESS_ID COMMAND [ARGS...]
#
# Exports the variables `hiwin_jax.parallel.distributed.init_distributed()` reads first (they
# win over SLURM, Open MPI and TPU detection), then execs COMMAND:
#   HIWIN_COORDINATOR       host:port of process 0's coordinator service; every process uses the
#                           same value, and process 0's host must accept connections on the port
#   HIWIN_NUM_PROCESSES     total number of processes (usually hosts, or GPUs for one per GPU)
#   HIWIN_PROCESS_ID        this process, 0 .. NUM_PROCESSES-1; 0 runs the coordinator
#   HIWIN_LOCAL_DEVICE_IDS  optional, comma-separated accelerator ids this process owns
#                           ("3" for one process per GPU); unset = all local devices
#   HIWIN_EXPECTED_DEVICES  optional: fail at start unless JAX sees this many devices in total
# The variables may also be set by hand instead of using this script; it only checks them.
#
# Worked example: two 8-GPU hosts, host0 = 10.0.0.1, one process per host:
#   host0$ launch/env.sh 10.0.0.1:12355 2 0 hiwin train --config stage2_sft --out runs/s2
#   host1$ launch/env.sh 10.0.0.1:12355 2 1 hiwin train --config stage2_sft --out runs/s2
# (add HIWIN_EXPECTED_DEVICES=16 in front of both to catch a missing GPU at start).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 4 ]] || usage
coordinator=$1 num_processes=$2 process_id=$3
shift 3
if [[ ! $coordinator =~ ^[^:]+:[0-9]+$ ]]; then
  echo "launch/env.sh: COORDINATOR must be host:port, got '$coordinator'" >&2
  exit 2
fi
if [[ ! $num_processes =~ ^[0-9]+$ ]] || (( num_processes < 1 )); then
  echo "launch/env.sh: NUM_PROCESSES must be a positive integer, got '$num_processes'" >&2
  exit 2
fi
if [[ ! $process_id =~ ^[0-9]+$ ]] || (( process_id >= num_processes )); then
  echo "launch/env.sh: PROCESS_ID must be in 0..$((num_processes - 1)), got '$process_id'" >&2
  exit 2
fi
export HIWIN_COORDINATOR=$coordinator HIWIN_NUM_PROCESSES=$num_processes
export HIWIN_PROCESS_ID=$process_id
exec "$@"
