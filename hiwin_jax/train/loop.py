"""`hiwin train`: the one run loop of every stage, driving a `Task`.

A task (stage 0: `train.vdim.VdimTrainer`; stages 1/2: `train.trainer.LlavaTask`) owns its model,
data, jitted step and export; this loop owns everything around them. One run writes into `out/`:
  checkpoints/<step>/   orbax CheckpointManager: `state` (the task's train state: trainable
                        params, optimizer state, step) and `data` (the data iterator's state,
                        JSON), saved every `checkpoint.every` steps (asynchronously unless
                        `checkpoint.async_save` is False), at the end, and when the process gets
                        SIGTERM; the last `checkpoint.keep` are kept. A run started on a folder
                        with checkpoints resumes from the latest one (any mesh or device count:
                        orbax reshards onto the current mesh) and repeats the losses an
                        uninterrupted run has.
  final/                the task's export when the run completes (a hiwin parameter checkpoint;
                        `export.official` adds the official PyTorch layout).
  train_config.json     the config of the run.
  metrics.jsonl         one line per step (process 0).
  tensorboard/          TensorBoard event files (process 0).
  loss.png              the loss curve and the learning rate (process 0; `plots.write_loss_png`).
  summary.json          the last step's metrics and the run's counts (process 0).
  run.lock              held while a run writes here (`outputs.RunLock`): a second run into the
                        same folder is refused, naming the holder.

Faults. Each checkpoint records its files' sizes and SHA-256 (`hiwin_checksums.json` in the step
folder, hashed in the background once orbax has committed it); a resume verifies them and starts
from the newest checkpoint that is intact, moving corrupt newer ones to `corrupt_checkpoints/`
(they are reported, never deleted). A save that fails (read-only folder, full disk) stops the run
at once with `CheckpointSaveError` naming the last good step: a run never trains on without
checkpoints. Every file a later command reads is replaced atomically.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import pathlib
import signal
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Protocol

import jax
import ml_collections
import numpy as np

from hiwin_jax import outputs

log = logging.getLogger("hiwin.train")
METRICS_FILE = "metrics.jsonl"
CORRUPT_DIR = "corrupt_checkpoints"


class CheckpointSaveError(OSError):
  """A checkpoint could not be saved; the run stopped at once (the message names the last good
  checkpoint)."""


class DataIterator(Protocol):
  """A checkpointable iterator of host batches: `get_state` is JSON (bytes) naming the next
  step, `set_state` continues from such a state, `close` stops any background work."""

  def __next__(self) -> Any: ...
  def get_state(self) -> bytes: ...
  def set_state(self, state: Mapping) -> None: ...
  def close(self) -> None: ...


class Task(Protocol):
  """One training stage as the loop drives it. The train state is a pytree with an int32 `step`
  (the number of steps taken) that the task's `step` advances."""

  cfg: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  num_steps: int        # the run's total steps
  data: DataIterator

  def describe(self) -> str:
    """A few words for the run's header: parameters, data."""

  def init_state(self) -> Any:
    """The initial train state, on the mesh."""

  def abstract_state(self) -> Any:
    """ShapeDtypeStructs of the train state with this mesh's shardings (the restore target)."""

  def step(self, state: Any, batch: Any) -> tuple[Any, Mapping[str, jax.Array]]:
    """One optimizer step on a host batch -> (next state, metrics); donates `state`."""

  def metrics(self, step: int, batch: Any, metrics: Mapping[str, float],
              seconds: float) -> dict[str, float]:
    """The fields that `metrics.jsonl` logs for 0-based `step` besides its device metrics and
    its time (learning rate, throughput, skipped samples, ...)."""

  def export(self, state: Any, out: pathlib.Path) -> pathlib.Path:
    """Writes the trained model into `out` (every process calls this); returns `final/`."""

  def summary(self) -> dict[str, Any]:
    """The run's counts for `summary.json` (skipped samples, bad images, ...)."""


# --- shared by the tasks ----------------------------------------------------------------------

_COMPILED: dict = {}


def compiled_step(fn: Callable, static: tuple, *, in_shardings, out_shardings,
                  donate_argnums=(0,)):
  """`jax.jit(partial(fn, *static))`, one per (fn, static, shardings) in the process, so a task
  built again on the same config (a resume in the same process, a test) reuses the compiled
  programs. `static` (graph definitions, settings) must be hashable and must carry everything
  the step closes over."""
  leaves, treedef = jax.tree.flatten((in_shardings, out_shardings))
  key = (fn, static, treedef, tuple(leaves), donate_argnums)
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(functools.partial(fn, *static), in_shardings=in_shardings,
                             out_shardings=out_shardings, donate_argnums=donate_argnums)
  return _COMPILED[key]


def checkpoint_manager(folder: pathlib.Path, ccfg=None):
  """The run checkpoints in `folder`: items `state` and `data`; `ccfg` (`cfg.checkpoint`) sets
  how many are kept and whether saves are asynchronous (None: read only)."""
  import orbax.checkpoint as ocp
  options = None
  if ccfg is not None:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(ccfg.keep), create=True,
        enable_async_checkpointing=bool(ccfg.async_save))
  return ocp.CheckpointManager(folder, options=options, item_names=("state", "data"))


def newest_intact_step(mngr, folder: pathlib.Path) -> tuple[int | None, list[tuple[int, str]]]:
  """(the newest step of `mngr` whose files match their checksums, [(newer step, what is wrong
  with it)]). A step without checksums (the run stopped between orbax's commit and the hashing)
  counts as intact, unverified."""
  corrupt = []
  for step in sorted(mngr.all_steps(), reverse=True):
    step_dir = folder / str(step)
    if not outputs.has_checksums(step_dir):
      log.warning("checkpoint %s has no checksums (the run stopped before they were written): "
                  "using it unverified", step_dir)
      return step, corrupt
    try:
      outputs.verify_checksums(step_dir)
    except outputs.IntegrityError as e:
      corrupt.append((step, str(e)))
      continue
    return step, corrupt
  return None, corrupt


def latest_state(run_folder: str | pathlib.Path) -> dict:
  """The train state of the newest intact checkpoint of a run folder, as host arrays."""
  import orbax.checkpoint as ocp
  folder = pathlib.Path(run_folder) / "checkpoints"
  if not folder.is_dir():
    raise FileNotFoundError(f"{run_folder}: not a training run folder (no checkpoints/ inside)")
  with checkpoint_manager(folder) as mngr:
    step, corrupt = newest_intact_step(mngr, folder)
    for bad, why in corrupt:
      log.warning("skipping corrupt checkpoint %d: %s", bad, why)
    if step is None:
      raise FileNotFoundError(f"{folder} holds no intact checkpoint" if corrupt else
                              f"{folder} holds no checkpoint")
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


# --- the run folder ---------------------------------------------------------------------------

@contextlib.contextmanager
def claim(out_dir: str | pathlib.Path) -> Iterator[pathlib.Path]:
  """Makes `out_dir` this run's folder while the block runs: it must be missing, empty or an
  earlier run's folder (resumed), and writable, and no other run may hold it; process 0 holds its
  lock (`outputs.RunLock`). Every process of a multi-process run fails together when it cannot.
  `run` claims its folder; the CLI claims it first, before it spends time building the run."""
  out = pathlib.Path(out_dir).resolve()
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = outputs.claim_run_folder(out)
    except OSError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      error = outputs.OutputError(f"--out {out}: process 0 could not claim the run folder")
  if error is not None:
    raise error
  try:
    yield out
  finally:
    if lock is not None:
      lock.release()


class _Saver:
  """The run's checkpoint saves: each one's failure stops the run (`CheckpointSaveError`); each
  committed step gets its checksums from a background thread (process 0)."""

  def __init__(self, mngr, folder: pathlib.Path, last_good: int | None, lead: bool):
    self.mngr, self.folder, self.last_good = mngr, folder, last_good
    self.pending: int | None = None
    self.hashing: list[tuple[int, concurrent.futures.Future]] = []
    self.pool = concurrent.futures.ThreadPoolExecutor(1, "hiwin-checksums") if lead else None

  def _failed(self, step: int, e: BaseException) -> CheckpointSaveError:
    good = ("no checkpoint was saved before it" if self.last_good is None else
            f"the last good checkpoint is step {self.last_good} "
            f"({self.folder / str(self.last_good)})")
    reason = " ".join(f"{type(e).__name__}: {e}".split())
    return CheckpointSaveError(f"cannot save the checkpoint of step {step} in {self.folder} "
                               f"({reason}); training stopped; {good}; rerun to resume from it")

  def save(self, step: int, args) -> None:
    self.finish(block=True)
    try:
      # A folder that cannot be written fails here, at once: inside orbax's background save the
      # same failure leaves threads waiting minutes for a signal that never comes.
      outputs.probe_writable(self.folder)
      self.mngr.save(step, args=args, force=True)
    except Exception as e:  # orbax raises what the file system raised, or its own errors
      raise self._failed(step, e) from e
    self.pending = step
    self.finish(block=False)

  def finish(self, block: bool) -> None:
    """Settles the save in flight (waiting for it with `block`, else only if orbax is done) and
    surfaces the errors of the save and of the hashing so far."""
    if self.pending is not None and (block or not self.mngr.is_saving_in_progress()):
      step, self.pending = self.pending, None
      try:
        self.mngr.wait_until_finished()
      except Exception as e:
        raise self._failed(step, e) from e
      self.last_good = step
      if self.pool is not None:
        self.hashing.append((step, self.pool.submit(self._record, step)))
    while self.hashing and (block or self.hashing[0][1].done()):
      step, future = self.hashing.pop(0)
      try:
        future.result()
      except OSError as e:
        raise self._failed(step, e) from e

  def _record(self, step: int) -> None:
    step_dir = self.folder / str(step)
    try:
      outputs.record_checksums(step_dir)
    except FileNotFoundError:
      if step_dir.exists():  # else orbax already dropped it (checkpoint.keep)
        raise

  def close(self) -> None:
    """Waits for everything in flight; called in `finally`, so an error already on its way
    out is not replaced by a second report of the same failure."""
    try:
      self.finish(block=True)
    finally:
      if self.pool is not None:
        self.pool.shutdown(wait=True)


def _restore(task: "Task", mngr, folder: pathlib.Path, lead: bool):
  """(state, start step, data state or None) from the newest intact checkpoint; corrupt newer ones
  are reported and moved to `corrupt_checkpoints/` (the run will save those steps again)."""
  import orbax.checkpoint as ocp
  step, corrupt = newest_intact_step(mngr, folder) if lead else (None, [])
  for bad, why in corrupt:
    dest = folder.parent / CORRUPT_DIR / f"{bad}-{int(time.time())}"
    log.warning("checkpoint %d is corrupt (%s): moved to %s", bad, why, dest)
    dest.parent.mkdir(exist_ok=True)
    (folder / str(bad)).rename(dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    step = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if step is None else step)))
    step = None if step < 0 else step
  if corrupt or jax.process_count() > 1:
    mngr.reload()
  if step is None:
    if corrupt:
      raise outputs.IntegrityError(
          f"{folder}: no intact checkpoint to resume from ({len(corrupt)} corrupt, moved to "
          f"{folder.parent / CORRUPT_DIR}); rerun to start the run from step 0")
    return None
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(task.abstract_state()), data=ocp.args.JsonRestore()))
  if corrupt:
    log.warning("resuming from checkpoint %d, the newest intact one", step)
  return restored["state"], int(restored["state"]["step"]), restored["data"]


# --- logging helpers --------------------------------------------------------------------------

class _Progress:
  """A console progress line with rate and ETA (tqdm when it is installed)."""

  def __init__(self, total: int, start: int, enabled: bool):
    self.bar = None
    if enabled:
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                        file=sys.stderr, mininterval=1.0)
      except ImportError:
        pass

  def update(self, postfix: Mapping[str, float]):
    if self.bar is not None:
      self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
      self.bar.update(1)

  def close(self):
    if self.bar is not None:
      self.bar.close()


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[dict]:
  """Turns SIGTERM (preemption) into a flag the loop checks after each step."""
  flag = {"set": False}

  def handler(signum, _frame):
    flag["set"] = True
    log.warning("signal %d: saving a checkpoint after this step, then stopping", signum)

  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: no handler
    yield flag
    return
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def _tensorboard(folder: pathlib.Path):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    log.warning("tensorboardX is not installed: no TensorBoard event files")
    return None
  return SummaryWriter(str(folder))


def _read_metrics(path: pathlib.Path, upto: int) -> list[dict]:
  """The logged rows up to step `upto`. A run killed while appending leaves a torn last line:
  it is dropped (its step runs again)."""
  if not path.is_file():
    return []
  rows = []
  for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
    try:
      row = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
      log.warning("%s: line %d is not a complete JSON row: dropped", path, i + 1)
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= upto:
      rows.append(row)
  return rows


# --- the run ----------------------------------------------------------------------------------

def run(task: Task, out_dir: str | pathlib.Path, *,
        stop_after: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) `task` into `out_dir` (see the module docstring); returns a summary:
  the last step's metrics, `losses` of the steps run here, `steps_run`, `start_step`,
  `total_steps`, `stopped_at` (None when complete), `final` (when complete) and the task's
  counts.

  `stop_after`: stop (with a checkpoint) once this many steps have run in this call, as a
  preemption would (tests).
  """
  with claim(out_dir) as out:
    return _run(task, out, stop_after)


def _run(task: Task, out: pathlib.Path, stop_after: int | None) -> dict[str, Any]:
  import orbax.checkpoint as ocp
  cfg, data, total = task.cfg, task.data, task.num_steps
  lead = jax.process_index() == 0
  if lead:
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_text(out / "train_config.json",
                       cfg.to_json_best_effort(indent=2, sort_keys=True))

  folder = out / "checkpoints"
  mngr = checkpoint_manager(folder, cfg.checkpoint)
  latest = mngr.latest_step()
  if latest is not None and not cfg.checkpoint.resume:
    raise FileExistsError(f"{folder} already holds checkpoints (latest step "
                          f"{latest}) and checkpoint.resume is False: choose another output "
                          f"folder or resume")
  restored = _restore(task, mngr, folder, lead) if latest is not None else None
  if restored is not None:
    state, start, data_state = restored
    data.set_state(data_state)
    log.info("resumed from %s at step %d", folder, start)
  else:
    state, start = task.init_state(), 0

  metrics_path = out / METRICS_FILE
  history = _read_metrics(metrics_path, start) if lead else []
  if lead:
    outputs.write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
  writer = _tensorboard(out / "tensorboard") if lead else None
  if lead:
    print(f"train: {cfg.name} stage {cfg.train.stage}: {total} steps (from {start}), "
          f"{task.describe()}, mesh {dict(task.mesh.shape)}, {jax.process_count()} "
          f"process(es)", flush=True)

  saver = _Saver(mngr, folder, start if restored is not None else None, lead)

  def save(step_done: int):
    saver.save(step_done, ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(json.loads(data.get_state()))))

  every, log_every = int(cfg.checkpoint.every), max(int(cfg.train.log_every), 1)
  progress = _Progress(total, start, lead)
  last, ran, stopped = (history[-1] if history else {}), 0, None
  losses = [(r["step"], r["loss"], r.get("lr")) for r in history]
  completed = False
  try:
    with _sigterm_flag() as sigterm, (open(metrics_path, "a") if lead else
                                      contextlib.nullcontext()) as mf:
      t_prev = time.perf_counter()
      for step in range(start, total):
        batch = next(data)
        state, device_metrics = task.step(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        done = step + 1
        row = {"step": done, **metrics, **task.metrics(step, batch, metrics, dt),
               "step_time_s": dt}
        losses.append((done, row["loss"], row.get("lr")))
        last = row
        ran += 1
        if lead:
          try:
            mf.write(json.dumps(row) + "\n")
            mf.flush()
          except OSError as e:
            raise OSError(e.errno, f"{metrics_path}: cannot append step {done}: {e.strerror}; "
                          f"training stopped") from None
          if writer is not None:
            for k, v in row.items():
              if k != "step":
                writer.add_scalar(f"train/{k}", v, done)
          progress.update({k: row[k] for k in ("loss", "lr") if k in row})
          if progress.bar is None and (done % log_every == 0 or done == start + 1):
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"step {done}/{total} {shown} lr {row.get('lr', 0.0):.3g} {dt:.3f} s/step",
                  flush=True)
        # An asynchronous save that failed stops the run here, one step later, not at the next
        # save.
        saver.finish(block=False)
        # A stop request on the last step is no preemption: the run is complete and exports.
        preempted = done < total and (sigterm["set"] or (stop_after is not None
                                                         and ran >= stop_after))
        if done % every == 0 or done == total or preempted:
          save(done)
        if preempted:
          stopped = done
          break
    saver.close()
    completed = True
  finally:
    closers = [progress.close, data.close] + ([writer.close] if writer is not None else [])
    if completed:
      for close in closers:
        close()
    else:
      # Unwinding from an error, which is the one to report: on a full disk the TensorBoard
      # flush fails too, and orbax raises a failed save's error again.
      for close in (*closers, saver.close, mngr.close):
        with contextlib.suppress(Exception):
          close()
  mngr.close()
  summary = {**last, "steps_run": ran, "start_step": start, "total_steps": total,
             "stopped_at": stopped, "losses": [v for _, v, _ in losses[len(history):]],
             **task.summary(), "checkpoint_dir": str(folder)}
  if stopped is None:
    summary["final"] = str(task.export(state, out))
  if lead and losses:
    from hiwin_jax import plots
    steps, values, lrs = zip(*losses)
    plots.write_loss_png(out / "loss.png", steps, values, f"{cfg.name}: stage {cfg.train.stage}",
                         lrs=None if None in lrs else lrs)
    outputs.write_text(out / "summary.json", json.dumps(
        {k: v for k, v in summary.items() if k != "losses"}, indent=2, default=str))
  return summary
