"""`hiwin train` stages 1 and 2 end to end (hiwin_jax/train/loop.py) on the smallest tiny model.

One synthetic task and one stage-1 config serve every resume test, so the module compiles few
programs: an uninterrupted run is the reference that stopped, SIGTERMed, killed, resharded
(8 <-> 1 devices) and two-process runs must reproduce. A persistent JAX compilation cache (a
temporary folder, this module only) lets every later Trainer and every `hiwin train` subprocess
reuse what an earlier one compiled.

Bit-identical comparisons are made between runs of the same kind of process: this process has 8
fake CPU devices and a `hiwin train` subprocess one, and XLA compiles their (otherwise equal)
1-device programs with last-bit differences (measured: <= 3e-7 relative on the losses). So
in-process resumes are compared with the in-process `baseline`, subprocess resumes with the
subprocess `sub_baseline`, and different device or process counts at 1e-5.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax._src import compilation_cache

from hiwin_jax import config, weights
from hiwin_jax.data import synthetic
from hiwin_jax.parallel import mesh as mesh_lib
from hiwin_jax.train import loop, trainer
from tests.numerics import assert_close

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 12
STOP = 4
# The smallest model that runs the whole stage: no JBU levels, one ViT and one LLM layer.
SMALL = ["--config.model.projector.feature_scale_mask=1", "--config.model.vision.num_layers=1",
         "--config.model.llm.num_layers=1", "--config.data.max_length=512",
         "--config.train.log_every=1000"]
COMPILE_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # one per jit cache miss


# --- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  folder = tmp_path_factory.mktemp("jax_cache")
  saved = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield folder
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  root = tmp_path_factory.mktemp("task")
  t = synthetic.write_task(root / "task", 24, 1, seed=0, image_size=(112, 56))
  synthetic.make_tokenizer(root / "tok", t.texts())
  return {"pretrain": str(t.pretrain_json), "sft": str(t.sft_json),
          "images": str(t.image_folder), "tokenizer": str(root / "tok")}


def stage_args(task, stage=1, *extra):
  """`hiwin train` overrides of the tiny stage on the synthetic task (3 steps an epoch)."""
  return [f"--config.data.json={task['pretrain' if stage == 1 else 'sft']}",
          f"--config.data.image_folder={task['images']}",
          f"--config.data.tokenizer={task['tokenizer']}",
          f"--config.train.num_steps={STEPS}", "--config.data.epochs=8",
          "--config.checkpoint.every=3", *SMALL, *extra]


def load_cfg(args, stage=1):
  return config.load_config(f"tiny_stage{stage}", list(args))


def train(args, out, ndev=1, stage=1, **kw):
  return loop.run(trainer.LlavaTask(load_cfg(args, stage), devices=jax.devices()[:ndev]), out,
                  **kw)


def metrics(out) -> list[dict]:
  path = pathlib.Path(out) / loop.METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(out) -> np.ndarray:
  rows = metrics(out)
  assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), [r["step"] for r in rows]
  return np.asarray([r["loss"] for r in rows], np.float64)


def assert_same_losses(out, expected, exact=True, what=""):
  got = losses(out)
  assert got.shape == expected.shape, f"{what}: {len(got)} steps logged, expected {len(expected)}"
  if exact:
    bad = np.flatnonzero(got != expected)
    assert not bad.size, (f"{what}: losses differ first at step {bad[0] + 1}: "
                          f"{got[bad[0]]!r} != {expected[bad[0]]!r}\n{got}\n{expected}")
  else:
    assert_close(got, expected, 1e-5, what)


def latest_step(out):
  with ocp.CheckpointManager(pathlib.Path(out) / "checkpoints") as mngr:
    return mngr.latest_step()


def subprocess_env(cache, **extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "HIWIN_"))}
  env.update(PATH=os.pathsep.join([str(pathlib.Path(sys.executable).parent), env.get("PATH", "")]),
             JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.update(extra)
  return env


def hiwin_train(out, args):
  return [sys.executable, "-m", "hiwin_jax.cli", "train", "--config", "tiny_stage1", "--out",
          str(out), *args]


def start(cmd, env, log):
  return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                          start_new_session=True)


def wait_for(predicate, proc, timeout, log):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      pytest.fail(f"the run exited ({proc.returncode}) before the awaited checkpoint:\n"
                  f"{pathlib.Path(log).read_text()[-3000:]}")
    if time.monotonic() > deadline:
      os.killpg(proc.pid, signal.SIGKILL)
      pytest.fail(f"no checkpoint after {timeout} s:\n{pathlib.Path(log).read_text()[-3000:]}")
    time.sleep(0.02)


def run_cmd(cmd, env, timeout=600):
  res = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout, check=False)
  assert res.returncode == 0, res.stdout[-4000:]
  return res.stdout


def flat_frozen_init(cfg, ndev=1):
  """The frozen parameters a fresh Trainer starts from (dotted path -> numpy)."""
  tr = trainer.Trainer(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:ndev]),
                       init_params=trainer.initial_params(cfg), total_steps=STEPS)
  flat = {k: np.asarray(v) for k, v in tr.params({"params": {}}).items()}
  init = {k: np.asarray(v) for k, v in tr.params({"params": tr._params}).items()}
  return flat, {k: v for k, v in init.items() if k not in flat}, tr


@pytest.fixture(scope="module")
def baseline(task, jax_cache, tmp_path_factory):
  """The uninterrupted stage-1 run on one device: the reference every resume test repeats."""
  out = tmp_path_factory.mktemp("baseline")
  summary = train(stage_args(task), out)
  return out, summary, losses(out)


@pytest.fixture(scope="module")
def sub_baseline(baseline, task, jax_cache, tmp_path_factory):
  """The same uninterrupted run as `hiwin train` in a 1-device subprocess."""
  out = tmp_path_factory.mktemp("sub_baseline")
  run_cmd(hiwin_train(out, stage_args(task)), subprocess_env(jax_cache))
  assert_same_losses(out, baseline[2], exact=False, what="subprocess vs in-process")
  return out, losses(out)


# --- 1. stages 1 and 2 end to end -------------------------------------------------------------

def check_stage_outputs(out, summary, cfg, trainable_prefix):
  out = pathlib.Path(out)
  assert summary["stopped_at"] is None and summary["steps_run"] == STEPS, summary
  assert (out / "summary.json").is_file() and (out / "loss.png").stat().st_size > 10_000
  got = losses(out)
  assert len(got) == STEPS and np.all(np.isfinite(got)), got
  assert got[-2:].mean() < got[:2].mean() - 0.05, f"loss does not fall: {got}"

  frozen, trainable_init, tr = flat_frozen_init(cfg)
  final, _ = weights.read_params(out / "final")
  assert set(final) == set(frozen) | set(trainable_init), "final/ lacks parameters"
  assert frozen, "no frozen parameters"
  changed = [k for k in frozen if not np.array_equal(final[k], frozen[k])]
  assert not changed, f"frozen parameters changed by training: {changed[:5]}"
  assert all(k.startswith(trainable_prefix) for k in trainable_init), sorted(trainable_init)[:5]
  moved = [k for k in trainable_init if not np.array_equal(final[k], trainable_init[k])]
  assert len(moved) > len(trainable_init) // 2, f"only {len(moved)} trainable parameters moved"

  # The checkpoint's optimizer state tracks exactly the trainable parameters.
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(out / "checkpoints" / str(latest_step(out)) / "state").item_metadata.tree
  opt_paths = set(weights.flatten(meta["opt_state"]))
  for name in frozen:
    assert not any(p.endswith("." + name) for p in opt_paths), f"{name} has optimizer state"
  per_param = [p for p in opt_paths if any(p.endswith("." + k) for k in trainable_init)]
  assert len(per_param) == 2 * len(trainable_init), (len(per_param), len(trainable_init))
  assert set(weights.flatten(meta["params"])) == set(trainable_init)
  return tr


def test_stage1_trains_projector_only_and_exports(baseline, task):
  out, summary, _ = baseline
  check_stage_outputs(out, summary, load_cfg(stage_args(task)), "projector.")
  assert latest_step(out) == STEPS
  cfg_json = json.loads((out / "final" / weights.CONFIG_NAME).read_text())
  assert cfg_json["format"] == "llava-uhd"


def test_stage2_from_stage1_trains_and_keeps_frozen(baseline, task, tmp_path):
  args = stage_args(task, 2, f"--config.init.checkpoint={baseline[0] / 'final'}")
  summary = train(args, tmp_path, stage=2)
  cfg = load_cfg(args, 2)
  check_stage_outputs(tmp_path, summary, cfg,
                      ("llm.", "vision.", "projector.", "jbu.fixup_proj."))
  # Stage 2 starts from stage 1's weights: its frozen pos_embed is stage 1's, bit for bit.
  stage1, _ = weights.read_params(baseline[0] / "final")
  final, _ = weights.read_params(tmp_path / "final")
  assert np.array_equal(final["projector.pos_embed"], stage1["projector.pos_embed"])


# --- 2. interrupt and resume ------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped(baseline, task, tmp_path_factory):
  """A 1-device run stopped (as by preemption) after STOP steps, not at a checkpoint multiple."""
  out = tmp_path_factory.mktemp("stopped")
  summary = train(stage_args(task), out, stop_after=STOP)
  return out, summary


def test_stop_after_then_resume_repeats_losses_bit_for_bit(baseline, stopped, task, tmp_path):
  src, summary = stopped
  assert summary["stopped_at"] == STOP and "final" not in summary, summary
  assert latest_step(src) == STOP
  assert not (src / "final").exists()
  out = tmp_path / "run"
  shutil.copytree(src, out)
  resumed = train(stage_args(task), out)
  assert resumed["start_step"] == STOP and resumed["steps_run"] == STEPS - STOP, resumed
  assert_same_losses(out, baseline[2], what="stopped at 4, resumed")
  final, _ = weights.read_params(out / "final")
  expected, _ = weights.read_params(baseline[0] / "final")
  bad = [k for k in expected if not np.array_equal(final[k], expected[k])]
  assert not bad, f"resumed final parameters differ: {bad[:5]}"


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resume_repeats_losses(sub_baseline, task, jax_cache,
                                                             tmp_path):
  out, log = tmp_path / "run", tmp_path / "log.txt"
  args = stage_args(task, 1, "--config.checkpoint.every=2")
  env = subprocess_env(jax_cache)
  proc = start(hiwin_train(out, args), env, log)
  wait_for(lambda: (out / "checkpoints" / "2").is_dir(), proc, 600, log)
  proc.send_signal(signal.SIGTERM)
  rc = proc.wait(timeout=300)
  text = log.read_text()
  assert rc == 0, text[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  stopped_at = summary["stopped_at"]
  assert stopped_at is not None and 2 <= stopped_at < STEPS, (summary, text[-2000:])
  assert latest_step(out) == stopped_at
  assert len(metrics(out)) == stopped_at
  run_cmd(hiwin_train(out, args), env)
  summary = json.loads((out / "summary.json").read_text())
  assert summary["stopped_at"] is None and summary["start_step"] == stopped_at, summary
  assert_same_losses(out, sub_baseline[1], what=f"SIGTERM at step {stopped_at}, resumed")


@pytest.mark.slow
def test_kill9_during_async_save_keeps_last_checkpoint(sub_baseline, task, jax_cache, tmp_path):
  out, log = tmp_path / "run", tmp_path / "log.txt"
  args = stage_args(task, 1, "--config.checkpoint.every=1", "--config.checkpoint.async_save=True")
  env = subprocess_env(jax_cache)
  proc = start(hiwin_train(out, args), env, log)
  wait_for(lambda: (out / "checkpoints" / "3").is_dir(), proc, 600, log)
  os.killpg(proc.pid, signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it was killed"
  killed_at = latest_step(out)
  assert killed_at is not None and 3 <= killed_at < STEPS, killed_at
  run_cmd(hiwin_train(out, args), env)
  summary = json.loads((out / "summary.json").read_text())
  assert summary["start_step"] == killed_at and summary["stopped_at"] is None, summary
  assert_same_losses(out, sub_baseline[1], what=f"killed after checkpoint {killed_at}, resumed")


# --- 3. resharding: 8 devices <-> 1 device ----------------------------------------------------

@pytest.mark.slow
def test_checkpoint_moves_between_8_devices_and_1(baseline, stopped, task, tmp_path):
  ref = baseline[2]
  # 1 device -> 8 devices.
  out = tmp_path / "one_to_eight"
  shutil.copytree(stopped[0], out)
  summary = train(stage_args(task), out, ndev=8)
  assert summary["start_step"] == STOP, summary
  assert_same_losses(out, ref, exact=False, what="1 -> 8 devices")
  # 8 devices -> 1 device.
  out = tmp_path / "eight_to_one"
  summary = train(stage_args(task), out, ndev=8, stop_after=STOP)
  assert summary["stopped_at"] == STOP
  summary = train(stage_args(task), out, ndev=1)
  assert summary["start_step"] == STOP, summary
  assert_same_losses(out, ref, exact=False, what="8 -> 1 devices")


# --- 4. two processes -------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_match_one(baseline, task, jax_cache, tmp_path):
  out = tmp_path / "run"
  env = subprocess_env(jax_cache, HIWIN_FAKE_CPU_DEVICES="1", HIWIN_KILL_GRACE="2")
  text = run_cmd([str(ROOT / "launch" / "local.sh"), "2", *hiwin_train(out, stage_args(task))],
                 env)
  assert "2 process(es)" in text, text[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["stopped_at"] is None and summary["steps_run"] == STEPS, summary
  assert_same_losses(out, baseline[2], exact=False, what="2 processes vs 1")
  final, _ = weights.read_params(out / "final")
  expected, _ = weights.read_params(baseline[0] / "final")
  assert set(final) == set(expected)
  # Per tensor, Adam turns last-bit gradient differences of near-zero parameters into
  # lr-sized ones; over the whole model, a misplaced shard would still stand out.
  keys = sorted(expected)
  assert_close(np.concatenate([final[k].ravel() for k in keys]),
               np.concatenate([expected[k].ravel() for k in keys]), 1e-4, "final parameters")


# --- 5 and 6. mixed image sizes: bounded compilations; corrupt images are counted -------------

def write_mixed_task(root: pathlib.Path):
  """Two image sizes (two batch shapes) plus one undecodable file (skipped by the metadata pass)
  and one truncated PNG with an intact header (skipped when loaded)."""
  images, records = root / "images", []
  for name, size in (("wide", (112, 56)), ("tall", (56, 112))):
    t = synthetic.write_task(root / name, 8, 1, seed=1, image_size=size)
    for r in json.loads(t.pretrain_json.read_text()):
      dst = images / name / r["image"]
      dst.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(t.image_folder / r["image"], dst)
      records.append({**r, "id": f"{name}_{r['id']}", "image": f"{name}/{r['image']}"})
  good = records[0]
  (images / "garbage.png").write_bytes(b"not an image at all")
  data = (images / good["image"]).read_bytes()
  (images / "truncated.png").write_bytes(data[:len(data) // 2])
  records.append({**good, "id": "garbage", "image": "garbage.png"})
  records.append({**good, "id": "truncated", "image": "truncated.png"})
  (root / "data.json").write_text(json.dumps(records))
  synthetic.make_tokenizer(root / "tok", [c["value"] for r in records for c in r["conversations"]])
  return root / "data.json", images, root / "tok"


@pytest.mark.slow
def test_200_mixed_steps_compile_once_per_batch_shape_and_count_skips(jax_cache, tmp_path):
  data_json, images, tok = write_mixed_task(tmp_path / "task")
  cfg = config.load_config("tiny_stage1", [
      f"--config.data.json={data_json}", f"--config.data.image_folder={images}",
      f"--config.data.tokenizer={tok}", "--config.data.global_batch_size=2",
      "--config.data.epochs=40", "--config.train.num_steps=200", "--config.checkpoint.every=100",
      *SMALL])
  events = []

  def listener(event, _duration, **_):
    if event == COMPILE_EVENT:
      events.append(event)

  before = {id(f): f._cache_size() for f in loop._COMPILED.values()}
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    summary = loop.run(trainer.LlavaTask(cfg, devices=jax.devices()[:1]), tmp_path / "run")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  step_compiles = sum(f._cache_size() - before.get(id(f), 0) for f in loop._COMPILED.values())
  rows = metrics(tmp_path / "run")
  assert len(rows) == 200 and summary["steps_run"] == 200

  from hiwin_jax.data import loader
  from hiwin_jax.data.tokenizer import LlamaSpmTokenizer
  it = loader.make_train_iterator(cfg.data, cfg.model, LlamaSpmTokenizer(tok))
  keys = len(it.keys)
  assert keys >= 2, f"the mixed sizes gave only {keys} batch shape(s)"
  assert 1 <= step_compiles <= keys, f"{step_compiles} train-step compilations for {keys} keys"
  # Everything else (init, checkpointing, export) compiles a fixed number of small programs;
  # a per-step recompile of anything would add hundreds.
  assert len(events) <= keys + 30, f"{len(events)} compilations in a 200-step run"

  skipped = summary["skipped"]
  assert skipped.get("unreadable_image", 0) >= 1 and sum(skipped.values()) >= 2, skipped
  assert rows[0]["skipped"] >= 1, rows[0]
  assert rows[-1]["skipped"] == sum(skipped.values()) > rows[0]["skipped"], (rows[0], rows[-1])


def test_more_steps_than_the_data_gives_is_a_clear_error(task, tmp_path):
  with pytest.raises(ValueError, match="raise data.epochs"):
    train(stage_args(task, 1, "--config.train.num_steps=100", "--config.data.epochs=2"),
          tmp_path)
