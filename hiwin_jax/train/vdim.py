"""Stage 0: VDIM pre-training (FeatUp's `train_vdim_upsampler.py`, official-spec §3.7) as one
jitted step, and `VdimTrainer`, the stage as the run loop (`train/loop.py`) drives it.

The JBU 4x stack learns to upsample frozen CLIP features so that, after a random jitter of the
image, an attention downsampler maps the jittered upsampled features back onto CLIP of the
jittered image ("multi-view reconstruction", `train/vdim_loss.py`). Per step, each of
`n_jitters` jitters runs its own forward and backward and the gradients are summed (one
optimizer step): `cfg.train.optimizer` (the recipe: PyTorch's NAdam after Lightning's
gradient-norm clip in the first 10 steps, `train/optimizers.py`) over the JBU, both downsamplers
and both scale nets (`models/vdim.py`). CLIP is frozen: it is an input of the step, never
differentiated, never saved.

All randomness of a step (dropout, jitter, projection, CRF pixels) derives from (seed, step), so
a resumed run repeats an uninterrupted one exactly. The official CUDA adaptive-conv
`grad_filters` bug (official-spec §3.4) is not reproduced by default: the filters get the correct
gradient; `model.projector.jbu_official_grad_bug = True` reproduces it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from hiwin_jax import outputs, weights
from hiwin_jax.data.vdim_images import VdimBatches, VdimImages
from hiwin_jax.models.clip_vit import ClipVisionTower
from hiwin_jax.models.layers import Precision
from hiwin_jax.models.vdim import VdimModel
from hiwin_jax.parallel import mesh as mesh_lib
from hiwin_jax.parallel import sharding
from hiwin_jax.train import loop
from hiwin_jax.train.optimizers import Optimizer, make_optimizer
from hiwin_jax.train.vdim_loss import LossSettings, clip_features, jitter_loss

log = logging.getLogger("hiwin.vdim")


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Everything static the step closes over (hashable: it keys the compiled-step cache)."""
  seed: int
  loss: LossSettings
  optimizer: Optimizer


def train_step(graphdef, clip_graphdef, st: StepSettings, state: dict, clip_state,
               images: jax.Array) -> tuple[dict, dict]:
  """state = {"params", "opt_state", "step"} -> (next state, metrics). Pure; jit it.

  images [B, S, S, 3] ImageNet-normalised. metrics: `loss` and `rec_4x`/`rec_2x` summed over
  the jitters (the official `loss/total`; the rec terms are already divided by n_jitters),
  `crf_4x`/`crf_2x` of jitter 0 (unweighted), `grad_norm` of the summed gradient before
  clipping. The jitters run in a `lax.scan` (one compiled copy of the JBU's backward pass, half
  the compile time of an unrolled loop), each with its own forward/backward, summing gradients
  as the official `manual_backward` per jitter does."""
  params, step = state["params"], state["step"]
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(st.seed), 3), step)
  clip = nnx.merge(clip_graphdef, clip_state)
  lr_feats = clip_features(clip, images)

  def loss_fn(p, k, first):
    return jitter_loss(nnx.merge(graphdef, p), clip, images, lr_feats, k, first, st.loss)

  def one_jitter(grads, j):
    (loss, parts), g = jax.value_and_grad(loss_fn, has_aux=True)(
        params, jax.random.fold_in(key, j), j == 0)
    return jax.tree.map(jnp.add, grads, g), {"loss": loss, **parts}

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, per_jitter = jax.lax.scan(one_jitter, zeros, jnp.arange(st.loss.n_jitters))
  metrics = {k: jnp.sum(v) for k, v in per_jitter.items()}  # crf_*: jitter 0's (others are 0)
  metrics["grad_norm"] = optax.tree.norm(grads)
  updates, opt_state = st.optimizer.tx.update(grads, state["opt_state"], params)
  new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
         "step": step + 1}
  return new, metrics


def build_clip(cfg, precision: Precision) -> ClipVisionTower:
  """The frozen featurizer `model.vision`: HF CLIP weights from `cfg.init.vision`, else random
  (warned)."""
  if cfg.init.vision:
    from hiwin_jax.convert import formats
    _, clip = formats.import_model("hf-clip", cfg.init.vision, precision, cfg=cfg.model.vision)
    return clip
  log.warning("init.vision is empty: the CLIP featurizer is randomly initialised (seed %d), so "
              "the VDIM learns to upsample random features; set --config.init.vision to an HF "
              "CLIP folder (openai/clip-vit-large-patch14-336) for a real run", cfg.seed)
  return ClipVisionTower(cfg.model.vision, precision,
                         rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(cfg.seed), 1)))


class VdimTrainer:
  """Stage 0 as the run loop's task (`loop.Task`): the models, the images and the jitted step
  of a config.

  `params` (pure dict) and the optimizer state are replicated (the VDIM has ~1 M parameters);
  the batch is sharded over the mesh's data axes; CLIP is placed by the logical-axis rules.
  One process (the batch is assembled on the host that runs the step).
  """

  def __init__(self, cfg, devices: Sequence[jax.Device] | None = None):
    if jax.process_count() > 1:
      raise ValueError("stage 0 (VDIM pre-training) runs in one process: the VDIM has ~1 M "
                       "parameters; use one host's devices")
    self.cfg = cfg
    size, patch = int(cfg.data.image_size), int(cfg.model.vision.patch_size)
    if size % patch or size // patch < 2:
      raise ValueError(f"data.image_size {size} must be a multiple of the patch size {patch} "
                       f"with at least 2 patches per side")
    loss = LossSettings.from_config(cfg.train.vdim_loss)
    if loss.max_pad >= size:
      raise ValueError(f"train.vdim_loss.max_pad {loss.max_pad} must be smaller than the image "
                       f"size {size} (reflect padding)")
    self.precision = Precision.from_config(cfg.model.precision)
    self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    self.rules = cfg.mesh.rules
    self.images = VdimImages(cfg.data.source, size)
    self.batch_size = int(cfg.data.global_batch_size)
    self.num_steps = (math.ceil(len(self.images) / self.batch_size) if cfg.train.num_steps < 0
                      else int(cfg.train.num_steps))
    self.data = VdimBatches(self.images, self.batch_size, cfg.seed, cfg.data.workers,
                            self.num_steps)
    self.optimizer = make_optimizer(cfg.train.optimizer, self.num_steps)
    self.settings = StepSettings(int(cfg.seed), loss, self.optimizer)

    clip = build_clip(cfg, self.precision)
    self.clip_graphdef, clip_state = nnx.split(clip)
    clip_shardings = sharding.state_shardings(clip_state, self.mesh, self.rules)
    self.clip_state = jax.device_put(clip_state, clip_shardings)

    proj = cfg.model.projector
    model = VdimModel(int(proj.kv_dim), image_size=size, patch_size=patch,
                      scale=int(proj.jbu_scale), precision=self.precision,
                      conv_impl=proj.conv_impl, official_grad_bug=bool(proj.jbu_official_grad_bug),
                      rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(cfg.seed), 2)))
    self.graphdef, state = nnx.split(model)
    self._init_params = nnx.to_pure_dict(state)
    self.num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self._init_params))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    spec = sharding.logical_to_spec(("batch", None, None, None), self.rules, self.mesh,
                                    (self.batch_size, size, size, 3))
    self.batch_sharding = NamedSharding(self.mesh, spec)
    if spec[0] is None and self.mesh.size > 1:
      log.warning("batch size %d does not divide over the mesh %s: every device computes the "
                  "whole batch", self.batch_size, dict(self.mesh.shape))
    self._step = loop.compiled_step(
        train_step, (self.graphdef, self.clip_graphdef, self.settings),
        in_shardings=(self.replicated, clip_shardings, self.batch_sharding),
        out_shardings=(self.replicated, self.replicated))

  def describe(self) -> str:
    return (f"{self.num_params:,} trainable parameters, {len(self.images)} images from "
            f"{self.cfg.data.source!r}, batch {self.batch_size}")

  def _fresh_state(self) -> dict:
    params = self._init_params
    return {"params": params, "opt_state": self.optimizer.tx.init(params),
            "step": jnp.zeros((), jnp.int32)}

  def init_state(self) -> dict:
    """{"params": pure dict, "opt_state": optax state, "step": int32}, replicated."""
    return jax.device_put(self._fresh_state(), self.replicated)

  def abstract_state(self) -> dict:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated),
                        jax.eval_shape(self._fresh_state))

  def step(self, state: dict, images: np.ndarray) -> tuple[dict, dict]:
    """One optimizer step on a host batch [B, S, S, 3] (donates `state`)."""
    with jax.set_mesh(self.mesh), sharding.use_rules(self.rules):
      return self._step(state, self.clip_state, jax.device_put(images, self.batch_sharding))

  def metrics(self, step: int, images: np.ndarray, metrics: Mapping[str, float],
              seconds: float) -> dict[str, float]:
    return {"lr": float(self.optimizer.schedule(step)), "images_per_s": len(images) / seconds}

  def model(self, state: dict) -> VdimModel:
    """The trained modules (the JBU is `.upsampler`)."""
    return nnx.merge(self.graphdef, jax.device_get(state["params"]))

  def export(self, state: dict, out: pathlib.Path) -> pathlib.Path:
    """The trained JBU as a hiwin parameter checkpoint `final/` (paths `jbu.*`, as in the LLaVA
    model), and with `export.official` the official VDIM checkpoint `official/vdim.ckpt`. Each
    replaces the run's earlier export whole, atomically."""
    stack = self.model(state).upsampler
    folder = weights.write_params(
        out / "final", {f"jbu.{k}": v for k, v in weights.model_params(stack).items()},
        {"format": "vdim", "model": self.cfg.model.to_dict()}, overwrite=True)
    if self.cfg.export.official and jax.process_index() == 0:
      from hiwin_jax.convert import formats, vdim
      with outputs.atomic_folder(out / "official", outputs.MODEL_FOLDER, overwrite=True) as tmp:
        vdim.write_vdim_ckpt(tmp / "vdim.ckpt",
                             vdim.export_jbu(stack, dtype=formats.np_dtype(self.cfg.export.dtype)),
                             global_step=self.num_steps)
    return folder

  def summary(self) -> dict:
    return {"bad_images": len(self.images.bad)}
