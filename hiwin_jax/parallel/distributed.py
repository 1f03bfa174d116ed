"""One `init_distributed()` for every launcher: single process, explicit coordinator, SLURM,
Open MPI and TPU pods.

The launch environment is read by `detect()` (a pure function of the environment, tested with fake
environments), then `jax.distributed.initialize` is called with explicit arguments, so what JAX
does never depends on its own auto-detection heuristics. Afterwards the process and device counts
are logged and checked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Mapping

log = logging.getLogger(__name__)
DEFAULT_PORT = 12355


@dataclasses.dataclass(frozen=True)
class Cluster:
  kind: str                       # "single", "explicit", "slurm", "openmpi", "tpu"
  coordinator: str | None = None  # "host:port"; None lets JAX find it (TPU pods)
  num_processes: int = 1
  process_id: int = 0
  local_device_ids: tuple[int, ...] | None = None


def first_slurm_host(nodelist: str) -> str:
  """First host of a SLURM node list: `node[003-005,9],gpu1` -> `node003`."""
  m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
  if not m:
    raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
  prefix, _, ranges = m.groups()
  if not ranges:
    return prefix
  first = ranges.split(",")[0].split("-")[0]
  return prefix + first


def detect(env: Mapping[str, str]) -> Cluster:
  """Reads the launcher's environment variables; explicit HIWIN_* variables win."""
  if "HIWIN_COORDINATOR" in env:
    return Cluster("explicit", env["HIWIN_COORDINATOR"], int(env["HIWIN_NUM_PROCESSES"]),
                   int(env["HIWIN_PROCESS_ID"]), _ids(env.get("HIWIN_LOCAL_DEVICE_IDS")))
  port = int(env.get("HIWIN_PORT", DEFAULT_PORT))
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
    # One process per GPU (ntasks-per-node = GPUs per node) pins each process to its GPU;
    # one process per node sees all local GPUs.
    per_node = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    local = (int(env["SLURM_LOCALID"]),) if per_node > 1 and "SLURM_LOCALID" in env else None
    nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    return Cluster("slurm", f"{first_slurm_host(nodes)}:{port}", int(env["SLURM_NTASKS"]),
                   int(env["SLURM_PROCID"]), local)
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    if "HIWIN_COORDINATOR_HOST" not in env:
      raise ValueError("Open MPI launch: set HIWIN_COORDINATOR_HOST to the host of rank 0 "
                       "(launch/mpirun.sh does this)")
    per_node = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"))
    local = (int(env["OMPI_COMM_WORLD_LOCAL_RANK"]),) if per_node > 1 else None
    return Cluster("openmpi", f"{env['HIWIN_COORDINATOR_HOST']}:{port}",
                   int(env["OMPI_COMM_WORLD_SIZE"]), int(env["OMPI_COMM_WORLD_RANK"]), local)
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return Cluster("tpu", None, len(hosts.split(",")), int(env.get("TPU_WORKER_ID", "0")))
  return Cluster("single")


def _ids(text: str | None) -> tuple[int, ...] | None:
  return tuple(int(x) for x in text.split(",")) if text else None


def init_distributed(env: Mapping[str, str] | None = None,
                     expected_devices: int | None = None) -> Cluster:
  """Initialises multi-process JAX if the environment asks for it; checks and logs the result.

  `expected_devices` (or HIWIN_EXPECTED_DEVICES) fails fast when a node or GPU is missing.
  Safe to call twice.
  """
  import jax  # here: `detect` serves callers that must not wait for jax to import
  env = os.environ if env is None else env
  cluster = detect(env)
  if cluster.kind != "single" and not jax.distributed.is_initialized():
    if cluster.kind == "tpu":
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(cluster.coordinator, num_processes=cluster.num_processes,
                                 process_id=cluster.process_id,
                                 local_device_ids=cluster.local_device_ids)
  if jax.process_count() != cluster.num_processes:
    raise RuntimeError(f"{cluster.kind} launch expected {cluster.num_processes} processes, "
                       f"JAX sees {jax.process_count()}")
  if jax.process_index() != cluster.process_id and cluster.kind != "tpu":
    raise RuntimeError(f"process id {cluster.process_id} but JAX process index "
                       f"{jax.process_index()}")
  expected = expected_devices or int(env.get("HIWIN_EXPECTED_DEVICES", "0")) or None
  if expected is not None and jax.device_count() != expected:
    raise RuntimeError(f"expected {expected} devices in total, found {jax.device_count()} "
                       f"({jax.local_device_count()} on process {jax.process_index()})")
  log.info("distributed: %s, process %d/%d, %d local / %d global %s devices", cluster.kind,
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count(), jax.default_backend())
  return cluster
