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
"""

from __future__ import annotations

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

log = logging.getLogger("hiwin.train")
METRICS_FILE = "metrics.jsonl"


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


def latest_state(run_folder: str | pathlib.Path) -> dict:
  """The train state of the latest checkpoint of a run folder, as host arrays."""
  import orbax.checkpoint as ocp
  folder = pathlib.Path(run_folder) / "checkpoints"
  if not folder.is_dir():
    raise FileNotFoundError(f"{run_folder}: not a training run folder (no checkpoints/ inside)")
  with checkpoint_manager(folder) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"{folder} holds no checkpoint")
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


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
  if not path.is_file():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if r["step"] <= upto]


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
  import orbax.checkpoint as ocp
  cfg, data, total = task.cfg, task.data, task.num_steps
  out = pathlib.Path(out_dir).resolve()
  lead = jax.process_index() == 0
  if lead:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))

  mngr = checkpoint_manager(out / "checkpoints", cfg.checkpoint)
  latest = mngr.latest_step()
  if latest is not None and not cfg.checkpoint.resume:
    raise FileExistsError(f"{out / 'checkpoints'} already holds checkpoints (latest step "
                          f"{latest}) and checkpoint.resume is False: choose another output "
                          f"folder or resume")
  if latest is not None:
    restored = mngr.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(task.abstract_state()), data=ocp.args.JsonRestore()))
    state, start = restored["state"], int(restored["state"]["step"])
    data.set_state(restored["data"])
    log.info("resumed from %s at step %d", out / "checkpoints", start)
  else:
    state, start = task.init_state(), 0

  metrics_path = out / METRICS_FILE
  history = _read_metrics(metrics_path, start) if lead else []
  if lead:
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
  writer = _tensorboard(out / "tensorboard") if lead else None
  if lead:
    print(f"train: {cfg.name} stage {cfg.train.stage}: {total} steps (from {start}), "
          f"{task.describe()}, mesh {dict(task.mesh.shape)}, {jax.process_count()} "
          f"process(es)", flush=True)

  def save(step_done: int):
    mngr.save(step_done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(json.loads(data.get_state()))),
        force=True)

  every, log_every = int(cfg.checkpoint.every), max(int(cfg.train.log_every), 1)
  progress = _Progress(total, start, lead)
  last, ran, stopped = (history[-1] if history else {}), 0, None
  losses = [(r["step"], r["loss"], r.get("lr")) for r in history]
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
          mf.write(json.dumps(row) + "\n")
          mf.flush()
          if writer is not None:
            for k, v in row.items():
              if k != "step":
                writer.add_scalar(f"train/{k}", v, done)
          progress.update({k: row[k] for k in ("loss", "lr") if k in row})
          if progress.bar is None and (done % log_every == 0 or done == start + 1):
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"step {done}/{total} {shown} lr {row.get('lr', 0.0):.3g} {dt:.3f} s/step",
                  flush=True)
        # A stop request on the last step is no preemption: the run is complete and exports.
        preempted = done < total and (sigterm["set"] or (stop_after is not None
                                                         and ran >= stop_after))
        if done % every == 0 or done == total or preempted:
          save(done)
        if preempted:
          stopped = done
          break
  finally:
    progress.close()
    data.close()
    mngr.wait_until_finished()
    mngr.close()
    if writer is not None:
      writer.close()
  summary = {**last, "steps_run": ran, "start_step": start, "total_steps": total,
             "stopped_at": stopped, "losses": [v for _, v, _ in losses[len(history):]],
             **task.summary(), "checkpoint_dir": str(out / "checkpoints")}
  if stopped is None:
    summary["final"] = str(task.export(state, out))
  if lead and losses:
    from hiwin_jax import plots
    steps, values, lrs = zip(*losses)
    plots.write_loss_png(out / "loss.png", steps, values, f"{cfg.name}: stage {cfg.train.stage}",
                         lrs=None if None in lrs else lrs)
    (out / "summary.json").write_text(json.dumps(
        {k: v for k, v in summary.items() if k != "losses"}, indent=2, default=str))
  return summary
