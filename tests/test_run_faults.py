"""Faults around a training run (hiwin_jax/train/loop.py, hiwin_jax/outputs.py): one run per
folder, a save that fails mid-run, corrupt or truncated checkpoints on resume, a torn metrics
line, and the same through `hiwin train` subprocesses.

The loop drives any `Task`; most cases use `CounterTask`, whose state is one vector that each
step adds its batch to, so a run costs no compilation and a correct resume is exact arithmetic:
after N steps, however interrupted, the vector holds 1 + 2 + ... + N.
"""

import contextlib
import errno
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hiwin_jax import outputs
from hiwin_jax.train import loop

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZE = 4096


class CounterData:
  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return np.full(SIZE, self.i, np.float32)

  def get_state(self) -> bytes:
    return json.dumps({"i": self.i}).encode()

  def set_state(self, state):
    self.i = int(state["i"])

  def close(self):
    pass


class CounterTask:
  """A `loop.Task` without a model: state {"w": [SIZE], "step"}; step k adds k to every entry.
  `before_step(i)` runs before the 0-based step i (a fault injected mid-run)."""

  def __init__(self, num_steps=6, every=2, async_save=True, before_step=None):
    self.cfg = ml_collections.ConfigDict(dict(
        name="counter", train=dict(stage="test", log_every=1000),
        checkpoint=dict(every=every, keep=10, async_save=async_save, resume=True)))
    self.mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    self.num_steps = num_steps
    self.data = CounterData()
    self.before_step = before_step
    self.sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def describe(self):
    return "counter"

  def init_state(self):
    return jax.device_put({"w": jnp.zeros(SIZE, jnp.float32), "step": jnp.int32(0)},
                          self.sharding)

  def abstract_state(self):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.sharding),
                        jax.eval_shape(self.init_state))

  def step(self, state, batch):
    if self.before_step is not None:
      self.before_step(int(state["step"]))
    w = state["w"] + batch
    return {"w": w, "step": state["step"] + 1}, {"loss": w[0]}

  def metrics(self, step, batch, metrics, seconds):
    return {}

  def export(self, state, out):
    folder = out / "final"
    folder.mkdir(exist_ok=True)
    np.save(folder / "w.npy", np.asarray(state["w"]))
    return folder

  def summary(self):
    return {}


def expected_w(steps: int) -> float:
  return float(steps * (steps + 1) // 2)


def final_w(out: pathlib.Path) -> float:
  w = np.load(out / "final" / "w.npy")
  assert np.all(w == w[0])
  return float(w[0])


def step_dirs(out: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def biggest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@contextlib.contextmanager
def read_only(folder: pathlib.Path):
  """Nothing can be created in `folder` while the block runs. Root ignores permission bits, so
  there the folder is made immutable (chattr +i) instead."""
  if os.geteuid() == 0:
    subprocess.run(["chattr", "+i", str(folder)], check=True)
  else:
    folder.chmod(0o555)
  try:
    yield
  finally:
    if os.geteuid() == 0:
      subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
      folder.chmod(0o755)


@pytest.fixture
def stopped_run(tmp_path):
  """A run stopped (as by preemption) after 4 of 6 steps: checkpoints 2 and 4, with checksums."""
  out = tmp_path / "run"
  summary = loop.run(CounterTask(), out, stop_after=4)
  assert summary["stopped_at"] == 4 and step_dirs(out) == [2, 4]
  for step in (2, 4):
    outputs.verify_checksums(out / "checkpoints" / str(step))
  return out


# --- one run per folder -----------------------------------------------------------------------

def hold_lock_in_a_subprocess(folder: pathlib.Path):
  proc = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom hiwin_jax import outputs\n"
       "outputs.RunLock.acquire(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(120)",
       str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_folder_held_by_another_run_is_refused_naming_the_holder(tmp_path):
  out = tmp_path / "run"
  holder = hold_lock_in_a_subprocess(out)
  try:
    with pytest.raises(outputs.OutputError, match=rf"in use by another run \(pid {holder.pid} "):
      loop.run(CounterTask(), out)
    assert sorted(p.name for p in out.iterdir()) == [outputs.LOCK_NAME], "the refused run wrote"
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone: its lock is stale (the kernel dropped the flock) and the run proceeds.
  summary = loop.run(CounterTask(), out)
  assert summary["stopped_at"] is None and final_w(out) == expected_w(6)


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
  out = tmp_path / "run"
  out.mkdir()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  (out / outputs.LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": "x"}))
  assert loop.run(CounterTask(), out)["stopped_at"] is None
  # The run recorded itself over the dead one, and cleared its record when it finished.
  assert (out / outputs.LOCK_NAME).read_text() == ""


@pytest.fixture
def no_flock(monkeypatch):
  """A file system without flock (some network mounts): the lock record decides."""
  def flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(outputs.fcntl, "flock", flock)


def test_without_flock_a_finished_run_does_not_block_the_next(tmp_path, no_flock):
  with outputs.claim_run_folder(tmp_path / "run"):
    with pytest.raises(outputs.OutputError, match="in use by another run"):
      outputs.RunLock(tmp_path / "run")._take()  # another process's view
  assert (tmp_path / "run" / outputs.LOCK_NAME).read_text() == ""
  outputs.check_run_folder(tmp_path / "run")
  with outputs.claim_run_folder(tmp_path / "run") as lock:
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("record", [
    "[1, 2]", "not json", '"pid"', '{{"host": "{host}"}}', '{{"pid": 0, "host": "{host}"}}',
    '{{"pid": -1, "host": "{host}"}}', '{{"pid": "12", "host": "{host}"}}',
    '{{"pid": true, "host": "{host}"}}'],
    ids=["list", "not_json", "string", "no_pid", "pid_0", "pid_negative", "pid_text", "pid_bool"])
def test_without_flock_a_garbled_lock_is_refused_saying_to_remove_it(record, tmp_path, no_flock):
  run = tmp_path / "run"
  run.mkdir()
  (run / outputs.LOCK_NAME).write_text(record.format(host=socket.gethostname()))
  for claim in (outputs.check_run_folder, outputs.claim_run_folder):
    with pytest.raises(outputs.OutputError) as e:
      claim(run)
    assert "\n" not in str(e.value) and f"remove {run / outputs.LOCK_NAME}" in str(e.value)


def test_without_flock_the_record_decides_who_holds_the_folder(tmp_path, no_flock):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  run = tmp_path / "run"
  run.mkdir()
  lock = run / outputs.LOCK_NAME
  lock.write_text(json.dumps({"pid": os.getppid(), "host": "elsewhere"}))
  with pytest.raises(outputs.OutputError, match="host elsewhere.*if no run uses it, remove"):
    outputs.check_run_folder(run)
  lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
  with pytest.raises(outputs.OutputError, match=f"pid {os.getppid()} "):
    outputs.claim_run_folder(run)
  lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
  outputs.check_run_folder(run)
  with outputs.claim_run_folder(run):
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_non_empty_folder_that_is_not_a_run_is_refused_untouched(tmp_path):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  with pytest.raises(outputs.OutputError, match="not a hiwin run folder.*notes.txt"):
    loop.run(CounterTask(), out)
  assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_temporary_names_are_unique_to_the_host_process_and_thread(tmp_path, monkeypatch):
  seen = []
  real_open = open

  def spy(path, *args, **kwargs):
    seen.append(pathlib.Path(path).name)
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr("builtins.open", spy)
  with outputs.atomic_file(tmp_path / "a.txt") as f:
    f.write("x")
  monkeypatch.undo()
  assert seen and seen[0].endswith(
      f"-{socket.gethostname()}-{os.getpid()}-t{threading.get_native_id()}"), seen
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


class WriteFails(Exception):
  pass


@pytest.mark.parametrize("writer", ["safetensors", "npy", "bytes"])
def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(writer, tmp_path,
                                                                         monkeypatch):
  from hiwin_jax.convert import safetensors_io
  from hiwin_jax.data import npy_files
  path = tmp_path / "out.bin"
  path.write_bytes(b"old")

  class Unsaveable:  # np.save writes the header, then fails on the data
    def __array__(self, *a, **k):
      raise WriteFails

  def fsync_fails(fd):
    raise WriteFails

  if writer == "safetensors":
    monkeypatch.setattr(os, "fsync", fsync_fails)  # after every byte went to the temporary
    write = lambda: safetensors_io.write_safetensors(path, [("a", np.zeros(3, np.float32))])
  elif writer == "npy":
    write = lambda: npy_files.save_atomic(path, Unsaveable())
  else:
    monkeypatch.setattr(os, "fsync", fsync_fails)
    write = lambda: npy_files.write_atomic(path, b"new")
  with pytest.raises(WriteFails):
    write()
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
  assert path.read_bytes() == b"old"


def test_one_file_digest_for_checksums_and_the_data_cache(tmp_path):
  import hashlib
  data = bytes(range(256)) * 5000  # spans several read chunks
  (tmp_path / "f").write_bytes(data)
  assert outputs.file_digest(tmp_path / "f") == hashlib.sha256(data).hexdigest()
  assert (outputs.file_digest(tmp_path / "f", "blake2b", digest_size=20)
          == hashlib.blake2b(data, digest_size=20).hexdigest())
  outputs.record_checksums(tmp_path, ["f"])
  assert hashlib.sha256(data).hexdigest() in (tmp_path / outputs.CHECKSUMS_NAME).read_text()


# --- a save that fails ------------------------------------------------------------------------

@pytest.mark.parametrize("async_save", [True, False])
def test_a_save_into_a_folder_made_read_only_stops_the_run_and_resume_works(tmp_path,
                                                                             async_save):
  out = tmp_path / "run"
  ckpt = out / "checkpoints"
  guard = contextlib.ExitStack()
  made_read_only = {}

  def fault(i):
    if i == 3:  # after checkpoint 2 (committed: an asynchronous save may still be writing)
      deadline = time.monotonic() + 60
      while not (ckpt / "2").is_dir():
        assert time.monotonic() < deadline, "checkpoint 2 was never committed"
        time.sleep(0.01)
      guard.enter_context(read_only(ckpt))
      made_read_only["at"] = time.monotonic()

  try:
    with pytest.raises(loop.CheckpointSaveError) as e:
      loop.run(CounterTask(num_steps=8, async_save=async_save, before_step=fault), out)
    took = time.monotonic() - made_read_only["at"]
  finally:
    guard.close()
  assert took < 30, f"the failed save took {took:.0f} s to stop the run"
  message = str(e.value)
  assert "\n" not in message
  assert "step 4" in message and "last good checkpoint is step 2" in message, message
  rows = [json.loads(line) for line in (out / loop.METRICS_FILE).read_text().splitlines()]
  assert len(rows) <= 5, f"trained on for {len(rows) - 4} steps without a checkpoint"
  assert step_dirs(out) == [2]
  outputs.verify_checksums(ckpt / "2")
  summary = loop.run(CounterTask(num_steps=8, async_save=async_save), out)
  assert summary["start_step"] == 2 and summary["stopped_at"] is None
  assert final_w(out) == expected_w(8)


@pytest.fixture
def small_disk(tmp_path):
  """A 96 KiB file system (tmpfs): a few checkpoints fill it. Needs the right to mount."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)],
                           capture_output=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
  try:
    yield disk
  finally:
    # Lazily: the failed TensorBoard writer may still hold its file open.
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


@pytest.mark.parametrize("async_save", [True, False])
def test_a_full_disk_stops_the_run_naming_the_last_good_checkpoint(small_disk, async_save):
  out = small_disk / "run"
  t = time.monotonic()
  with pytest.raises(loop.CheckpointSaveError) as e:
    loop.run(CounterTask(num_steps=40, async_save=async_save), out)
  assert time.monotonic() - t < 30
  message = str(e.value)
  assert "No space left on device" in message and "last good checkpoint is step" in message
  good = int(message.split("last good checkpoint is step ")[1].split()[0])
  outputs.verify_checksums(out / "checkpoints" / str(good))


# --- corrupt checkpoints on resume ------------------------------------------------------------

def flip_a_byte(path: pathlib.Path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x40
  path.write_bytes(bytes(data))


def truncate(path: pathlib.Path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [flip_a_byte, truncate], ids=["flipped", "truncated"])
def test_a_damaged_latest_checkpoint_is_reported_and_the_run_resumes_from_the_previous(
    stopped_run, damage, caplog):
  out = stopped_run
  damage(biggest_file(out / "checkpoints" / "4" / "state"))
  with caplog.at_level(logging.WARNING, logger="hiwin.train"):
    summary = loop.run(CounterTask(), out)
  text = caplog.text
  assert "checkpoint 4 is corrupt" in text and "resuming from checkpoint 2" in text, text
  assert summary["start_step"] == 2 and final_w(out) == expected_w(6)
  moved = list((out / loop.CORRUPT_DIR).iterdir())
  assert [p.name.split("-")[0] for p in moved] == ["4"], "the corrupt checkpoint was not kept"
  rows = [json.loads(line) for line in (out / loop.METRICS_FILE).read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 7))


def test_when_every_checkpoint_is_corrupt_the_run_refuses_to_start_over_silently(stopped_run):
  for step in (2, 4):
    flip_a_byte(biggest_file(stopped_run / "checkpoints" / str(step) / "state"))
  with pytest.raises(outputs.IntegrityError, match="no intact checkpoint"):
    loop.run(CounterTask(), stopped_run)


def test_a_checkpoint_without_checksums_is_restored_with_a_warning(stopped_run, caplog):
  (stopped_run / "checkpoints" / "4" / outputs.CHECKSUMS_NAME).unlink()
  with caplog.at_level(logging.WARNING, logger="hiwin.train"):
    summary = loop.run(CounterTask(), stopped_run)
  assert "no checksums" in caplog.text
  assert summary["start_step"] == 4 and final_w(stopped_run) == expected_w(6)


def test_a_torn_last_metrics_line_is_dropped_on_resume(stopped_run):
  path = stopped_run / loop.METRICS_FILE
  path.write_text(path.read_text() + '{"step": 5, "lo')  # killed mid-append
  loop.run(CounterTask(), stopped_run)
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 7))


def test_latest_state_skips_a_corrupt_checkpoint(stopped_run):
  flip_a_byte(biggest_file(stopped_run / "checkpoints" / "4" / "state"))
  state = loop.latest_state(stopped_run)
  assert int(state["step"]) == 2 and float(np.asarray(state["w"])[0]) == expected_w(2)


# --- through `hiwin train` --------------------------------------------------------------------

def hiwin_env():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "HIWIN_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(ROOT))
  return env


@pytest.mark.slow
def test_a_second_hiwin_train_into_a_running_folder_exits_within_5_s(tmp_path):
  out, log = tmp_path / "run", tmp_path / "first.log"
  train = [sys.executable, "-m", "hiwin_jax.cli", "train", "--config", "vdim_stage0_tiny",
           "--out", str(out), "--config.train.num_steps=6", "--config.checkpoint.every=3",
           "--config.data.workers=1"]
  first = subprocess.Popen(train, cwd=ROOT, env=hiwin_env(), stdout=open(log, "w"),
                           stderr=subprocess.STDOUT, start_new_session=True)
  try:
    deadline = time.monotonic() + 600
    while not (out / loop.METRICS_FILE).is_file() or not (out / loop.METRICS_FILE).read_text():
      assert first.poll() is None, log.read_text()[-3000:]
      assert time.monotonic() < deadline, "the first run logged no step in 600 s"
      time.sleep(0.1)
    t = time.monotonic()
    second = subprocess.run(train, cwd=ROOT, env=hiwin_env(), capture_output=True, text=True,
                            timeout=60)
    took = time.monotonic() - t
    assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
  finally:
    if first.poll() is None:
      os.killpg(first.pid, signal.SIGKILL)
  # Log lines of the start (the distributed setup) may precede it; the error is one line.
  lines = [line for line in second.stderr.strip().splitlines() if " INFO " not in line]
  assert second.returncode == 2 and len(lines) == 1, second.stderr
  assert f"in use by another run (pid {first.pid} on host" in lines[0], lines[0]
  assert took < 5, f"the second run took {took:.1f} s to refuse"
  rows = [json.loads(line) for line in (out / loop.METRICS_FILE).read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 7)), "the first run's metrics were touched"
  summary = json.loads((out / "summary.json").read_text())
  assert summary["stopped_at"] is None and summary["steps_run"] == 6


def test_cpu_commands_start_quietly_where_libtpu_is_installed(tmp_path):
  """A command that starts JAX on a CPU machine prints its own lines only: no libtpu host
  probing, no absl preamble (the shared venv has the tpu-aot extra, so libtpu is there)."""
  from hiwin_jax import config
  from hiwin_jax.convert import formats
  vision = config.load_config("tiny").model.vision
  formats.export_model("hf-clip", formats.FORMATS["hf-clip"].model(vision), vision,
                       tmp_path / "clip")
  env = hiwin_env()
  del env["JAX_PLATFORMS"]
  res = subprocess.run([sys.executable, "-m", "hiwin_jax.cli", "convert", "import", "--format",
                        "hf-clip", "--input", str(tmp_path / "clip"), "--output",
                        str(tmp_path / "ours")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  noise = [line for line in res.stderr.splitlines()
           if any(w in line for w in ("TPU", "tpu", "InitGoogle", "E0000", "W0000", "absl"))]
  assert not noise, "\n".join(noise)
  assert (tmp_path / "ours" / "params").is_dir()


def test_a_run_claimed_by_the_cli_is_not_refused_by_itself(tmp_path):
  """`hiwin train` claims the folder, then `loop.run` claims it again in the same process."""
  out = tmp_path / "run"
  with loop.claim(out):
    assert loop.run(CounterTask(), out)["stopped_at"] is None
  assert final_w(out) == expected_w(6)
