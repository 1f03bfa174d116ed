#!/usr/bin/env bash
# launch/local.sh: start N processes of one JAX job on this host and wait for all of them.
#
# Usage:
#   launch/local.sh NUM_PROCESSES COMMAND [ARGS...]
#
# Process i runs COMMAND through launch/env.sh with HIWIN_COORDINATOR=127.0.0.1:PORT,
# HIWIN_NUM_PROCESSES=NUM_PROCESSES and HIWIN_PROCESS_ID=i, which
# `hiwin_jax.parallel.distributed.init_distributed()` reads. All processes share stdout and
# stderr. The exit status is 0 when every process exits 0; when one fails, the others are
# stopped (SIGTERM, then SIGKILL after HIWIN_KILL_GRACE seconds) and its status is returned.
#
# Optional environment:
#   HIWIN_PORT               coordinator port (default: a free port chosen now)
#   HIWIN_FAKE_CPU_DEVICES   k: every process runs on CPU with k fake devices (JAX_PLATFORMS=cpu,
#                            XLA_FLAGS += --xla_force_host_platform_device_count=k)
#   HIWIN_GPUS_PER_PROCESS   k: process i owns GPUs i*k .. i*k+k-1 (HIWIN_LOCAL_DEVICE_IDS);
#                            unset = every process sees every local GPU
#   HIWIN_KILL_GRACE         seconds between SIGTERM and SIGKILL for the survivors (default 10)
#   HIWIN_PYTHON             python used to find a free port (default python3)
#
# Worked examples:
#   # 2 processes x 4 fake CPU devices = an 8-device mesh, the tiny SFT stage:
#   HIWIN_FAKE_CPU_DEVICES=4 launch/local.sh 2 hiwin train --config tiny_stage2 --out runs/local --config.data.json=... (data and init paths as in README)
#   # one process per GPU on an 8-GPU host:
#   HIWIN_GPUS_PER_PROCESS=1 launch/local.sh 8 hiwin train --config stage2_sft --out runs/s2
set -uo pipefail

usage() {
  sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 2 && $1 =~ ^[0-9]+$ ]] && (( $1 >= 1 )) || usage
num_processes=$1
shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
grace=${HIWIN_KILL_GRACE:-10}

if [[ -z ${HIWIN_PORT:-} ]]; then
  HIWIN_PORT=$("${HIWIN_PYTHON:-python3}" -c \
    'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
    || { echo "launch/local.sh: cannot find a free port; set HIWIN_PORT" >&2; exit 2; }
fi
if [[ -n ${HIWIN_FAKE_CPU_DEVICES:-} ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$HIWIN_FAKE_CPU_DEVICES"
fi

# Job control puts each process in its own process group, so stopping one stops its children
# too (data-loader workers, a shell's subprocesses).
set -m
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for ((t = 0; t < grace * 10; t++)); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  (
    if [[ -n ${HIWIN_GPUS_PER_PROCESS:-} ]]; then
      k=$HIWIN_GPUS_PER_PROCESS
      export HIWIN_LOCAL_DEVICE_IDS=$(seq -s, $((i * k)) $((i * k + k - 1)))
    fi
    exec "$here/env.sh" "127.0.0.1:$HIWIN_PORT" "$num_processes" "$i" "$@"
  ) &
  pids+=($!)
done

status=0
for ((done_count = 0; done_count < num_processes; done_count++)); do
  wait -n
  rc=$?
  if ((rc != 0)); then
    echo "launch/local.sh: a process exited with status $rc; stopping the others" >&2
    status=$rc
    stop_all
    wait "${pids[@]}" 2>/dev/null
    break
  fi
done
exit "$status"
