#!/usr/bin/env bash
# launch/tpu_pod.sh: run one command on every worker of a Cloud TPU VM pod slice.
#
# Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE COMMAND [ARGS...]
#
# Runs `gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all --command "..."`:
# every worker starts COMMAND at once, in HIWIN_TPU_WORKDIR (default: the checkout's path on
# this machine, which must exist on every worker: clone it there, or use a shared disk).
# On the workers `hiwin_jax.parallel.distributed.init_distributed()` sees TPU_WORKER_HOSTNAMES
# and lets JAX find the coordinator itself; no address or port is needed.
#
# Optional environment:
#   HIWIN_TPU_WORKDIR   directory on the workers to cd into before COMMAND ('~/x' = under the
#                       remote home; quote it so the local shell does not expand the ~)
#   HIWIN_TPU_SETUP     shell commands run first on every worker (e.g. "source .venv/bin/activate")
#   HIWIN_GCLOUD_ARGS   extra gcloud arguments, e.g. "--project my-proj --internal-ip"
#
# Worked example: stage 2 on a v5p-64 slice (8 workers), the checkout in ~/hiwin on each:
#   HIWIN_TPU_WORKDIR='~/hiwin' HIWIN_TPU_SETUP='source .venv/bin/activate' \
#   launch/tpu_pod.sh my-v5p-64 us-east5-a \
#     hiwin train --config stage2_sft --out gs://my-bucket/runs/stage2
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
fi
tpu_name=$1 zone=$2
shift 2
workdir=${HIWIN_TPU_WORKDIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# Quote every argument for the remote shell, so arguments with spaces survive the ssh hop.
if [[ $workdir == "~/"* ]]; then  # a path under the remote user's home: expand it there
  command="cd ~/$(printf '%q' "${workdir#\~/}")"
else
  command="cd $(printf '%q' "$workdir")"
fi
[[ -n ${HIWIN_TPU_SETUP:-} ]] && command+=" && $HIWIN_TPU_SETUP"
command+=" && exec$(printf ' %q' "$@")"
# shellcheck disable=SC2086  # HIWIN_GCLOUD_ARGS is a list of words on purpose
exec gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" --worker=all \
  ${HIWIN_GCLOUD_ARGS:-} --command "$command"
