"""`hiwin train` for stages 1 and 2: data -> jitted step -> metrics, checkpoints, export.

One run writes into `out/`:
  checkpoints/<step>/   orbax CheckpointManager: `state` (trainable params, optimizer state,
                        step) and `data` (the data iterator's state, JSON), saved every
                        `checkpoint.every` steps (asynchronously unless `checkpoint.async_save`
                        is False), at the end, and when the process gets SIGTERM; the last
                        `checkpoint.keep` are kept. A run started on a folder with checkpoints
                        resumes from the latest one (any mesh or device count: orbax reshards
                        onto the current mesh) and repeats the losses an uninterrupted run has.
  final/                the whole model (trainable + frozen) as a hiwin parameter checkpoint
                        (`hiwin convert export --format llava-uhd` turns it into the official
                        PyTorch layout; `export.official` does that here too).
  metrics.jsonl         one line per step (process 0).
  tensorboard/          TensorBoard event files (process 0).
  loss.png              the loss curve (process 0).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import signal
import sys
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from hiwin_jax.parallel import mesh as M
from hiwin_jax.train import checkpoint
from hiwin_jax.train.trainer import Trainer

log = logging.getLogger("hiwin.train")
METRICS_FILE = "metrics.jsonl"


def checkpoint_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True, resume=True))


def init_config() -> ml_collections.ConfigDict:
  """Where the weights come from before training (applied in this order, later wins):
  `checkpoint`: a hiwin parameter checkpoint (e.g. stage 1's `final/`, or a converted official
  model); `vdim`: stage 0's output folder or an official VDIM `.ckpt` (the JBU; the official
  recipe reloads it in both stages)."""
  return ml_collections.ConfigDict(dict(checkpoint="", vdim=""))


def export_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(official=False, dtype="bfloat16"))


# --- initial weights --------------------------------------------------------------------------

def initial_params(cfg) -> dict[str, np.ndarray]:
  """Dotted path -> array from `cfg.init` (empty = random init everywhere)."""
  out: dict[str, np.ndarray] = {}
  if cfg.init.checkpoint:
    params, _ = checkpoint.read_params(cfg.init.checkpoint)
    out.update(params)
  if cfg.init.vdim:
    out.update({f"jbu.{k}": v for k, v in vdim_jbu_params(cfg.init.vdim, cfg.model).items()})
  return out


def vdim_jbu_params(path: str, model_cfg) -> dict[str, np.ndarray]:
  """The JBU's parameters (dotted, relative to the JBU) from stage 0's run folder (its latest
  checkpoint) or from an official VDIM Lightning `.ckpt`."""
  from hiwin_jax import config as C
  p = pathlib.Path(path)
  proj = C.resolved_projector(model_cfg)
  if p.is_file():
    from ckpt_convert import vdim
    from hiwin_jax.models.layers import Precision
    stack = vdim.import_vdim(p, Precision(), feat_dim=proj.kv_dim, scale=proj.jbu_scale)
    from ckpt_convert.core import model_params
    return model_params(stack)
  ckpts = p / "checkpoints"
  if not ckpts.is_dir():
    raise FileNotFoundError(f"init.vdim {path!r}: neither a VDIM .ckpt file nor a stage-0 run "
                            f"folder (no checkpoints/ inside)")
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(ckpts) as mngr:
    latest = mngr.latest_step()
    if latest is None:
      raise FileNotFoundError(f"init.vdim {path!r}: {ckpts} holds no checkpoint")
    tree = mngr.restore(latest, args=ocp.args.StandardRestore())
  flat = checkpoint.flatten_tree(tree["params"]["upsampler"])
  return {k: np.asarray(v) for k, v in flat.items()}


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


def write_loss_png(path: pathlib.Path, steps: list[int], losses: list[float],
                   title: str = "training loss") -> None:
  """A small line chart drawn with PIL (no plotting dependency)."""
  from PIL import Image, ImageDraw
  w, h, pad = 640, 360, 40
  img = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(img)
  d.rectangle([pad, pad // 2, w - pad // 2, h - pad], outline="black")
  d.text((pad, 4), title, fill="black")
  if len(losses) >= 2:
    y = np.asarray(losses, np.float64)
    lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = min(steps), max(steps)
    xs = [pad + (s - x0) / max(x1 - x0, 1) * (w - 1.5 * pad) for s in steps]
    ys = [h - pad - (v - lo) / (hi - lo) * (h - 1.5 * pad) for v in y]
    d.line(list(zip(xs, ys)), fill=(31, 119, 180), width=2)
    d.text((4, pad // 2), f"{hi:.3g}", fill="black")
    d.text((4, h - pad - 10), f"{lo:.3g}", fill="black")
    d.text((pad, h - pad + 4), f"step {x0}", fill="black")
    d.text((w - 3 * pad, h - pad + 4), f"step {x1}", fill="black")
  img.save(path)


@contextlib.contextmanager
def _sigterm_flag():
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


# --- the run ----------------------------------------------------------------------------------

def run_training(cfg, out_dir: str | pathlib.Path, *, devices=None, tokenizer=None,
                 stop_after: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) a stage into `out_dir` (see the module docstring); returns a summary.

  `stop_after`: stop (with a checkpoint) once this many steps have run in this call, as a
  preemption would (tests).
  """
  import orbax.checkpoint as ocp
  from hiwin_jax.data import loader
  from hiwin_jax.data.tokenizer import LlamaSpmTokenizer
  out = pathlib.Path(out_dir).resolve()
  lead = jax.process_index() == 0
  if lead:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))
  tokenizer = tokenizer or LlamaSpmTokenizer(cfg.data.tokenizer)
  data = loader.make_train_iterator(cfg.data, cfg.model, tokenizer,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  # Epochs can differ in length (the pre-resize draw moves samples between keys): the plan's
  # own total, not epoch 0's length times the epochs, is what the iterator can deliver.
  total = int(cfg.train.num_steps) if cfg.train.num_steps > 0 else data.num_steps
  if total > data.num_steps:
    raise ValueError(f"train.num_steps {total} is more than the {data.num_steps} steps the data "
                     f"gives over data.epochs={int(cfg.data.epochs)} epochs (steps per epoch "
                     f"{list(data.steps_per_epoch)}): raise data.epochs or lower num_steps")
  mesh = M.make_mesh(cfg.mesh, devices)
  trainer = Trainer(cfg, mesh, init_params=initial_params(cfg), total_steps=total)

  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(cfg.checkpoint.keep), create=True,
      enable_async_checkpointing=bool(cfg.checkpoint.async_save))
  mngr = ocp.CheckpointManager(out / "checkpoints", options=options,
                               item_names=("state", "data"))
  latest = checkpoint.latest_step(mngr, bool(cfg.checkpoint.resume))
  if latest is not None:
    restored = mngr.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(trainer.abstract_state()),
        data=ocp.args.JsonRestore()))
    state, start = restored["state"], int(restored["state"]["step"])
    data.set_state(restored["data"])
    log.info("resumed from %s at step %d", out / "checkpoints", start)
  else:
    state, start = trainer.init_state(), 0

  metrics_path = out / METRICS_FILE
  history = _read_metrics(metrics_path, start) if lead else []
  if lead:
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
  writer = _tensorboard(out / "tensorboard") if lead else None
  if lead:
    print(f"train: {cfg.name} stage {cfg.train.stage}: {total} steps (from {start}), "
          f"{trainer.num_trainable:,} trainable / {trainer.num_frozen:,} frozen parameters, "
          f"mesh {dict(mesh.shape)}, {jax.process_count()} process(es), "
          f"{data.num_steps_per_epoch} steps/epoch, {len(data.keys)} batch shapes", flush=True)

  def save(step_done: int, force: bool = False):
    mngr.save(step_done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(json.loads(data.get_state()))),
        force=force)

  every, log_every = int(cfg.checkpoint.every), max(int(cfg.train.log_every), 1)
  progress = _Progress(total, start, lead)
  last, ran, stopped = (history[-1] if history else {}), 0, None
  losses = [(r["step"], r["loss"]) for r in history]
  with _sigterm_flag() as sigterm, (open(metrics_path, "a") if lead else
                                    contextlib.nullcontext()) as mf:
    t_prev = time.perf_counter()
    for step in range(start, total):
      host = next(data)
      flops = trainer.flops(host)
      images = int(np.count_nonzero((np.asarray(host["image_token"]) >= 0).any(axis=-1)))
      state, metrics = trainer.step(state, trainer.device_batch(host))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.perf_counter()
      dt, t_prev = now - t_prev, now
      done = step + 1
      row = {"step": done, **metrics, "lr": trainer.lr(step), "step_time_s": dt,
             "tokens_per_s": metrics["tokens"] / dt,
             "images_per_s": images * jax.process_count() / dt,
             "skipped": int(sum(host["meta"]["skipped"].values()))}
      if trainer.peak_flops:
        row["mfu"] = flops / (dt * trainer.peak_flops * jax.device_count())
      losses.append((done, row["loss"]))
      last = row
      ran += 1
      if lead:
        mf.write(json.dumps(row) + "\n")
        mf.flush()
        if writer is not None:
          for k, v in row.items():
            if k != "step":
              writer.add_scalar(f"train/{k}", v, done)
        progress.update({"loss": row["loss"], "lr": row["lr"]})
        if done % log_every == 0 and progress.bar is None:
          print(f"step {done}/{total} loss {row['loss']:.4f} lr {row['lr']:.3g} "
                f"|g| {row['grad_norm']:.3g} {dt:.3f} s/step", flush=True)
      # A stop request on the last step is no preemption: the run is complete and exports.
      preempted = done < total and (sigterm["set"] or (stop_after is not None
                                                       and ran >= stop_after))
      if done % every == 0 or done == total or preempted:
        save(done, force=True)
      if preempted:
        stopped = done
        break
  progress.close()
  mngr.wait_until_finished()
  mngr.close()
  if writer is not None:
    writer.close()
  summary = {**last, "steps_run": ran, "start_step": start, "total_steps": total,
             "stopped_at": stopped, "losses": [v for _, v in losses[len(history):]],
             "skipped": dict(data.skipped), "checkpoint_dir": str(out / "checkpoints")}
  if stopped is None:
    summary["final"] = str(_export(trainer, state, cfg, out))
  if lead and losses:
    write_loss_png(out / "loss.png", [s for s, _ in losses], [v for _, v in losses],
                   f"{cfg.name}: stage {cfg.train.stage} loss")
    (out / "summary.json").write_text(json.dumps(
        {k: v for k, v in summary.items() if k != "losses"}, indent=2, default=str))
  return summary


def _export(trainer: Trainer, state: dict, cfg, out: pathlib.Path) -> pathlib.Path:
  """The whole model as a hiwin checkpoint (all processes write their shards), and with
  `export.official` the official PyTorch layout (process 0)."""
  folder = out / "final"
  params = trainer.params(state)
  checkpoint.write_params(folder, params, {"format": "llava-uhd", "model": cfg.model.to_dict()})
  if cfg.export.official:
    from jax.experimental import multihost_utils

    from ckpt_convert import llava_uhd
    host = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
            if jax.process_count() > 1 else np.asarray(v) for k, v in params.items()}
    if jax.process_index() == 0:
      llava_uhd.export_official(host, cfg.model, out / "official", cfg.export.dtype)
  return folder


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


def stage_config(model: str, stage: str) -> ml_collections.ConfigDict:
  """A stage-1 ("pretrain") or stage-2 ("sft") config on the model config `model` (a name in
  configs/), with the official hyperparameters of official-spec §7 (R1): data template, slicing,
  max length, global batch, learning rate, trainable sets; fp32 master weights."""
  from hiwin_jax import config as C
  from hiwin_jax.train import trainer
  cfg = C.load_config(model)
  cfg.stage = stage
  cfg.model.precision.param_dtype = "float32"
  cfg.train = trainer.train_config(stage)
  cfg.data = C.data_config()
  pre = stage == "pretrain"
  cfg.data.update(template="plain" if pre else "vicuna_v1", slicing=not pre,
                  max_length=3072 if pre else 4096, global_batch_size=256 if pre else 128)
  cfg.model.max_length = cfg.data.max_length
  cfg.checkpoint = checkpoint_config()
  cfg.init = init_config()
  cfg.export = export_config()
  return cfg
