"""init_distributed: launcher detection from environments, and a real two-process start."""

import os
import subprocess
import sys
import textwrap

import pytest

from hiwin_jax.parallel import distributed as D


def test_single_process_when_no_launcher():
  assert D.detect({}) == D.Cluster("single")


def test_explicit_coordinator_wins():
  env = {"HIWIN_COORDINATOR": "10.0.0.1:9999", "HIWIN_NUM_PROCESSES": "4",
         "HIWIN_PROCESS_ID": "3", "HIWIN_LOCAL_DEVICE_IDS": "0,1", "SLURM_NTASKS": "8",
         "SLURM_PROCID": "5"}
  assert D.detect(env) == D.Cluster("explicit", "10.0.0.1:9999", 4, 3, (0, 1))


@pytest.mark.parametrize("nodelist,host", [("gpu[003-005,9]", "gpu003"), ("a1,b2", "a1"),
                                            ("node7", "node7"), ("x[12]", "x12")])
def test_slurm_nodelist_first_host(nodelist, host):
  assert D.first_slurm_host(nodelist) == host


def test_slurm_one_process_per_gpu_pins_local_device():
  env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
         "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_STEP_NODELIST": "gpu[10-11]", "HIWIN_PORT": "7000"}
  assert D.detect(env) == D.Cluster("slurm", "gpu10:7000", 16, 9, (1,))


def test_slurm_one_process_per_node_sees_all_gpus():
  env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
         "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NODELIST": "gpu[10-11]"}
  assert D.detect(env) == D.Cluster("slurm", f"gpu10:{D.DEFAULT_PORT}", 2, 1, None)


def test_openmpi_needs_coordinator_host():
  env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
         "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
  with pytest.raises(ValueError, match="HIWIN_COORDINATOR_HOST"):
    D.detect(env)
  env["HIWIN_COORDINATOR_HOST"] = "head"
  assert D.detect(env) == D.Cluster("openmpi", f"head:{D.DEFAULT_PORT}", 4, 2, (0,))


def test_tpu_pod_lets_jax_find_the_coordinator():
  env = {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "2"}
  assert D.detect(env) == D.Cluster("tpu", None, 4, 2)


def test_single_process_init_checks_device_count():
  import jax
  assert D.init_distributed({}).kind == "single"
  with pytest.raises(RuntimeError, match="expected 3 devices"):
    D.init_distributed({}, expected_devices=3)
  assert D.init_distributed({}, expected_devices=jax.device_count()).kind == "single"


@pytest.mark.slow
def test_two_real_processes_on_localhost():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp
      from hiwin_jax.parallel.distributed import init_distributed
      c = init_distributed(expected_devices=2)
      x = jax.make_array_from_process_local_data(
          jax.sharding.NamedSharding(jax.make_mesh((2,), ("d",)), jax.P("d")),
          jnp.full((1,), jax.process_index() + 1.0))
      print("RESULT", c.kind, jax.process_index(), jax.process_count(), float(jnp.sum(x)))
  """)
  procs = []
  for i in range(2):
    env = dict(os.environ, HIWIN_COORDINATOR=f"127.0.0.1:{port}", HIWIN_NUM_PROCESSES="2",
               HIWIN_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outs = [p.communicate(timeout=120)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out
    assert f"RESULT explicit {i} 2 3.0" in out, out
