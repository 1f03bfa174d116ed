#!/usr/bin/env bash
# launch/mpirun.sh: start a JAX job with Open MPI's mpirun (one process per GPU or per host).
#
# Usage:
#   launch/mpirun.sh HOSTFILE NUM_PROCESSES COMMAND [ARGS...]
#
# HOSTFILE is an Open MPI hostfile ("host0 slots=8" per line); its first host runs rank 0 and
# the coordinator. mpirun gives every rank OMPI_COMM_WORLD_SIZE / _RANK / _LOCAL_SIZE /
# _LOCAL_RANK; this script adds HIWIN_COORDINATOR_HOST (the first host) and HIWIN_PORT, which
# `hiwin_jax.parallel.distributed.init_distributed()` combines into the coordinator address.
# With more than one rank per host, local rank r owns GPU r, so every rank must see all GPUs
# of its host (no per-rank CUDA_VISIBLE_DEVICES).
#
# Optional environment:
#   HIWIN_PORT             coordinator port on the first host (default 12355)
#   HIWIN_MPIRUN_ARGS      extra mpirun arguments, e.g. "--mca btl_tcp_if_include eth0"
#   HIWIN_EXPECTED_DEVICES forwarded when set: fail at start unless JAX sees this many devices
#
# Worked examples:
#   # 2 hosts x 8 GPUs, one process per GPU:
#   printf 'gpu-a slots=8\ngpu-b slots=8\n' > hosts.txt
#   launch/mpirun.sh hosts.txt 16 hiwin train --config stage2_sft --out /shared/runs/stage2
#   # one process per host (each drives its 8 GPUs):
#   printf 'gpu-a slots=1\ngpu-b slots=1\n' > hosts.txt
#   launch/mpirun.sh hosts.txt 2 hiwin train --config stage2_sft --out /shared/runs/stage2
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
fi
hostfile=$1 num_processes=$2
shift 2
if [[ ! -f $hostfile ]]; then
  echo "launch/mpirun.sh: hostfile '$hostfile' does not exist" >&2
  exit 2
fi
first_host=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")
if [[ -z $first_host ]]; then
  echo "launch/mpirun.sh: hostfile '$hostfile' lists no host" >&2
  exit 2
fi
export HIWIN_COORDINATOR_HOST=$first_host HIWIN_PORT=${HIWIN_PORT:-12355}
forward=(-x HIWIN_COORDINATOR_HOST -x HIWIN_PORT -x PATH)
[[ -n ${HIWIN_EXPECTED_DEVICES:-} ]] && forward+=(-x HIWIN_EXPECTED_DEVICES)
# shellcheck disable=SC2086  # HIWIN_MPIRUN_ARGS is a list of words on purpose
exec mpirun --hostfile "$hostfile" -np "$num_processes" --bind-to none "${forward[@]}" \
  ${HIWIN_MPIRUN_ARGS:-} "$@"
