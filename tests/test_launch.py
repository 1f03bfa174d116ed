"""launch/: syntax, usage, a real two-process start, failure propagation, and the SLURM, Open MPI
and TPU scripts run against fake srun / mpirun / gcloud executables."""

import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from hiwin_jax.parallel import distributed as D

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = ["env.sh", "local.sh", "slurm.sbatch", "mpirun.sh", "tpu_pod.sh"]

# Each process: init_distributed, then a cross-process sum of (process_index + 1). Results are
# written with one os.write each, so lines of concurrent processes do not interleave.
JAX_PROBE = textwrap.dedent("""
    import os
    import numpy as np, jax
    from jax.experimental import multihost_utils
    from hiwin_jax.parallel.distributed import init_distributed
    c = init_distributed()
    total = multihost_utils.process_allgather(np.asarray([jax.process_index() + 1.0])).sum()
    os.write(1, f"RESULT {c.kind} {jax.process_index()} {jax.process_count()} "
                f"{jax.device_count()} {float(total)} {c.local_device_ids}\\n".encode())
""")
DETECT_PROBE = ("import os; from hiwin_jax.parallel.distributed import detect; "
                "os.write(1, f'DETECT {detect(os.environ)!r}\\n'.encode())")


def _env(tmp_path=None, **extra):
  """The test environment without any launcher's variables, on CPU, with one device each."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "HIWIN_", "TPU_"))}
  path = [str(pathlib.Path(sys.executable).parent), env.get("PATH", "")]
  if tmp_path is not None:
    path.insert(0, str(tmp_path))
  env.update(PATH=os.pathsep.join(path), JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONPATH=str(ROOT))
  env.update(extra)
  return env


def _run(args, env, timeout=120):
  return subprocess.run(args, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, timeout=timeout, check=False)


def _fake(tmp_path, name, body):
  path = tmp_path / name
  path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
  path.chmod(0o755)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return str(s.getsockname()[1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_valid_bash_and_prints_usage(script):
  path = LAUNCH / script
  assert os.access(path, os.X_OK), f"{script} is not executable"
  syntax = _run(["bash", "-n", str(path)], _env())
  assert syntax.returncode == 0, syntax.stdout
  usage = _run(["bash", str(path)], _env())
  assert usage.returncode == 2 and "usage" in usage.stdout.lower(), usage.stdout


@pytest.mark.slow
def test_local_sh_starts_two_jax_processes_that_see_each_other():
  result = _run([str(LAUNCH / "local.sh"), "2", sys.executable, "-c", JAX_PROBE],
                _env(HIWIN_FAKE_CPU_DEVICES="2"))
  assert result.returncode == 0, result.stdout
  lines = sorted(re.findall(r"^RESULT .*$", result.stdout, re.MULTILINE))
  # 2 processes x 2 fake CPU devices; the sum 1 + 2 went across processes
  assert lines == [f"RESULT explicit {i} 2 4 3.0 None" for i in range(2)], result.stdout


def test_local_sh_stops_everything_and_fails_when_one_process_fails(tmp_path):
  marker = tmp_path / "survivor"
  command = ('if [ "$HIWIN_PROCESS_ID" = 1 ]; then sleep 0.5; exit 3; fi; '
             f'(sleep 2; touch "{marker}") & wait')
  start = time.monotonic()
  result = _run([str(LAUNCH / "local.sh"), "2", "bash", "-c", command],
                _env(HIWIN_KILL_GRACE="2"), timeout=60)
  assert result.returncode == 3, result.stdout
  assert time.monotonic() - start < 2, "local.sh waited for the surviving process"
  assert "exited with status 3" in result.stdout
  # the survivor's own child was stopped too (its process group was killed)
  time.sleep(max(0.0, start + 3 - time.monotonic()))
  assert not marker.exists(), "a child of the surviving process kept running"


def test_local_sh_gives_each_process_its_variables():
  command = ('echo "VARS $HIWIN_PROCESS_ID $HIWIN_NUM_PROCESSES $HIWIN_COORDINATOR '
             '$HIWIN_LOCAL_DEVICE_IDS"')
  result = _run([str(LAUNCH / "local.sh"), "3", "bash", "-c", command],
                _env(HIWIN_PORT="23456", HIWIN_GPUS_PER_PROCESS="2"))
  assert result.returncode == 0, result.stdout
  assert sorted(re.findall(r"^VARS .*$", result.stdout, re.MULTILINE)) == [
      "VARS 0 3 127.0.0.1:23456 0,1", "VARS 1 3 127.0.0.1:23456 2,3",
      "VARS 2 3 127.0.0.1:23456 4,5"]


def test_env_sh_checks_its_arguments():
  env_sh = str(LAUNCH / "env.sh")
  bad = _run([env_sh, "host:1", "2", "2", "true"], _env())
  assert bad.returncode == 2 and "PROCESS_ID must be in 0..1" in bad.stdout
  bad = _run([env_sh, "host", "2", "0", "true"], _env())
  assert bad.returncode == 2 and "host:port" in bad.stdout
  good = _run([env_sh, "10.0.0.1:9999", "4", "3", sys.executable, "-c", DETECT_PROBE], _env())
  assert good.returncode == 0, good.stdout
  assert repr(D.Cluster("explicit", "10.0.0.1:9999", 4, 3)) in good.stdout


# A stand-in for srun on one node: SLURM_NTASKS local tasks with the per-task variables.
FAKE_SRUN = """
    [[ $1 == --kill-on-bad-exit=1 ]] || { echo "fake srun: unexpected $1" >&2; exit 90; }
    shift
    echo "SRUN port=$HIWIN_PORT expected=${HIWIN_EXPECTED_DEVICES:-}"
    pids=()
    for ((i = 0; i < SLURM_NTASKS; i++)); do
      SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" &
      pids+=($!)
    done
    rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    exit $rc
"""


def test_slurm_sbatch_derives_port_and_expected_devices(tmp_path):
  _fake(tmp_path, "srun", FAKE_SRUN)
  env = _env(tmp_path, SLURM_JOB_ID="4242", SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8(x2)",
             SLURM_JOB_NODELIST="gpu[10-11]", SLURM_JOB_NUM_NODES="2",
             SLURM_GPUS_PER_NODE="a100:8")
  result = _run(["bash", str(LAUNCH / "slurm.sbatch"), "true"], env)
  assert result.returncode == 0, result.stdout
  assert "SRUN port=24242 expected=16" in result.stdout
  # what init_distributed makes of task 9 of that job
  task = dict(env, HIWIN_PORT="24242", SLURM_PROCID="9", SLURM_LOCALID="1",
              SLURM_STEP_NODELIST="gpu[10-11]")
  assert D.detect(task) == D.Cluster("slurm", "gpu10:24242", 16, 9, (1,))


@pytest.mark.slow
def test_slurm_sbatch_runs_two_tasks_through_init_distributed(tmp_path):
  _fake(tmp_path, "srun", FAKE_SRUN)
  env = _env(tmp_path, SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
             SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2",
             HIWIN_PORT=_free_port())
  result = _run(["bash", str(LAUNCH / "slurm.sbatch"), sys.executable, "-c", JAX_PROBE], env)
  assert result.returncode == 0, result.stdout
  lines = sorted(re.findall(r"^RESULT .*$", result.stdout, re.MULTILINE))
  # one task per "GPU": each pinned to its local id, 2 devices expected and found
  assert lines == [f"RESULT slurm {i} 2 2 3.0 ({i},)" for i in range(2)], result.stdout


def test_mpirun_sh_passes_the_coordinator_to_every_rank(tmp_path):
  _fake(tmp_path, "mpirun", """
      echo "MPIRUN $*"
      while [[ $1 == -* ]]; do
        case $1 in -np) np=$2; shift 2 ;; --hostfile|-x|--bind-to) shift 2 ;; *) shift ;; esac
      done
      for ((i = 0; i < np; i++)); do
        OMPI_COMM_WORLD_SIZE=$np OMPI_COMM_WORLD_RANK=$i OMPI_COMM_WORLD_LOCAL_SIZE=$np \\
          OMPI_COMM_WORLD_LOCAL_RANK=$i "$@" &
      done
      wait
  """)
  hosts = tmp_path / "hosts.txt"
  hosts.write_text("# comment\n\ngpu-a slots=2\ngpu-b slots=2\n")
  result = _run([str(LAUNCH / "mpirun.sh"), str(hosts), "2", sys.executable, "-c",
                 DETECT_PROBE], _env(tmp_path))
  assert result.returncode == 0, result.stdout
  assert "-x HIWIN_COORDINATOR_HOST -x HIWIN_PORT" in result.stdout
  for i in range(2):
    expected = D.Cluster("openmpi", "gpu-a:12355", 2, i, (i,))
    assert f"DETECT {expected!r}" in result.stdout, result.stdout
  missing = _run([str(LAUNCH / "mpirun.sh"), str(tmp_path / "nope"), "2", "true"],
                 _env(tmp_path))
  assert missing.returncode == 2 and "does not exist" in missing.stdout


def test_tpu_pod_sh_runs_the_command_on_all_workers(tmp_path):
  _fake(tmp_path, "gcloud", 'printf "%s\\n" "$@" > "$GCLOUD_ARGS_FILE"\n')
  args_file = tmp_path / "args"
  workdir = tmp_path / "work dir"
  workdir.mkdir()
  env = _env(tmp_path, GCLOUD_ARGS_FILE=str(args_file), HIWIN_TPU_WORKDIR=str(workdir),
             HIWIN_TPU_SETUP="export GREETING=hi")
  probe = "import os, sys; print(os.getcwd(), os.environ['GREETING'], sys.argv[1:])"
  command = [sys.executable, "-c", probe, "two words", 'a"quote']
  result = _run([str(LAUNCH / "tpu_pod.sh"), "my-tpu", "us-central2-b", *command], env)
  assert result.returncode == 0, result.stdout
  args = args_file.read_text().splitlines()
  assert args[:9] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b",
                      "--worker=all", "--command"]
  # the remote command, run by a shell as ssh would, cds, sets up and keeps every argument
  remote = _run(["bash", "-c", args[9]], env)
  assert remote.stdout.strip() == f"{workdir} hi ['two words', 'a\"quote']", args[9]
