"""Stages 1 and 2: the whole model's train step as one jitted pure function over a sharded mesh,
and `LlavaTask`, the stage as the run loop (`train/loop.py`) drives it.

State. The model's parameters are split by path rules (`cfg.train.trainable`, `cfg.train.frozen`:
regular expressions matched against the "/"-joined parameter path, e.g. `projector/pos_embed`;
frozen wins) into a trainable and a frozen pure dict. Only the trainable part has optimizer state;
the frozen part is a separate, read-only argument of the step, so it is bit-identical after any
number of steps. Both carry the shardings their logical axis names map to (`cfg.mesh.rules`); the
optimizer state is sharded like the parameters it tracks.

Step. A batch has a leading micro-batch axis `k` (`cfg.data.grad_accum`): `lax.scan` runs the
micro-batches, summing the cross-entropy and the gradient of the *summed* token losses, and the
update uses sum / (supervised tokens of the global batch): the loss is the mean over every
supervised token of the global batch, however it is split into micro-batches or devices. The
update is `cfg.train.optimizer`'s (the recipes: AdamW with warm-up and cosine decay,
`train/optimizers.py`). Parameters are stored in `precision.param_dtype` (fp32 master weights)
and the model computes in `precision.dtype` (bf16 in the real configs); the loss, softmax and
norm statistics are fp32.

FLOPs (the MFU estimate, `model_flops`): matmul FLOPs of the ViT and the LLM only,
2 * (weights used per token) * tokens + the attention score/value products, counted from the
batch's real (unpadded) patches and tokens, times 3 for a tower whose weights train, 2 for a
frozen tower that gradients flow through (stage 1's LLM), 1 for a frozen tower nothing upstream
of which trains (stage 1's ViT). The JBU and Hiwin (a few % of the total at 7B) are left out, so
the estimate is a slight underestimate. MFU = FLOPs / (step time * devices * peak FLOP/s).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hiwin_jax import weights
from hiwin_jax.models.layers import Precision
from hiwin_jax.models.llava_uhd import LlavaUHD
from hiwin_jax.parallel import mesh as mesh_lib
from hiwin_jax.parallel import sharding
from hiwin_jax.train import loop
from hiwin_jax.train.optimizers import Optimizer, make_optimizer

IGNORE_INDEX = -100
TEXT_KEYS = ("input_ids", "image_token", "labels", "attention_mask")

# Peak dense bf16 FLOP/s per device, for the MFU estimate (cfg.train.peak_tflops overrides).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v6": 918.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0}


# --- parameter selection ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamRules:
  """Which parameters train: full matches of `trainable` minus full matches of `frozen`."""
  trainable: tuple[str, ...]
  frozen: tuple[str, ...] = ()

  def __post_init__(self):
    for rx in self.trainable + self.frozen:
      try:
        re.compile(rx)
      except re.error as e:
        raise ValueError(f"train rule {rx!r} is not a regular expression: {e}") from None

  def __call__(self, path: Sequence[Any], _value: Any = None) -> bool:
    p = weights.path_str(path, "/")
    return (any(re.fullmatch(rx, p) for rx in self.trainable)
            and not any(re.fullmatch(rx, p) for rx in self.frozen))

  @classmethod
  def from_config(cls, tcfg) -> "ParamRules":
    return cls(tuple(tcfg.trainable), tuple(tcfg.frozen))


# --- the step ---------------------------------------------------------------------------------

def cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy summed over supervised positions, and their count (fp32)."""
  logits = logits[:, :-1].astype(jnp.float32)
  target = labels[:, 1:]
  mask = target != IGNORE_INDEX
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, logz - gold, 0.0)), jnp.sum(mask).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Everything static the step closes over (hashable: it keys the compiled-step cache)."""
  seed: int
  jbu_dropout: bool
  optimizer: Optimizer


def train_step(graphdef, st: StepSettings, state: dict, frozen: dict, batch: dict
               ) -> tuple[dict, dict]:
  """state {"params", "opt_state", "step"} -> (next state, metrics). Pure; jit it.

  batch: the model's batch with a leading micro-batch axis on every array (`TEXT_KEYS` and
  `buckets`). metrics: loss (mean over supervised tokens), tokens, grad_norm (before clipping),
  lr is added by the caller from the schedule.
  """
  params, step = state["params"], state["step"]
  key = jax.random.fold_in(jax.random.key(st.seed), step)

  def micro_grads(mb, i):
    def loss_fn(p):
      model = nnx.merge(graphdef, p, frozen)
      rng = jax.random.fold_in(key, i) if st.jbu_dropout else None
      logits, _ = model(mb, dropout_rng=rng)
      return cross_entropy_sum(logits, mb["labels"])
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  k = batch["input_ids"].shape[0]
  if k == 1:  # no accumulator: one parameter-sized buffer fewer
    (loss_sum, tokens), grads = micro_grads(jax.tree.map(lambda x: x[0], batch), 0)
  else:
    def micro(carry, inputs):
      grads, loss_sum, tokens = carry
      (ce, n), g = micro_grads(*inputs)
      return (jax.tree.map(jnp.add, grads, g), loss_sum + ce, tokens + n), None

    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32))
    (grads, loss_sum, tokens), _ = jax.lax.scan(micro, init, (batch, jnp.arange(k)))
  denom = jnp.maximum(tokens, 1.0)
  grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
  updates, opt_state = st.optimizer.tx.update(grads, state["opt_state"], params)
  new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
         "step": step + 1}
  return new, {"loss": loss_sum / denom, "tokens": tokens, "grad_norm": optax.tree.norm(grads)}


# --- FLOPs ------------------------------------------------------------------------------------

def tower_flops(layers: int, width: int, mlp: int, kv_width: int, gated: bool,
                lengths: np.ndarray) -> float:
  """Forward matmul FLOPs of a transformer stack over sequences of the given lengths."""
  per_token = 2 * layers * (width * (2 * width + 2 * kv_width) + (3 if gated else 2) * width * mlp)
  attn = 4 * layers * width * np.sum(np.asarray(lengths, np.float64) ** 2)
  return float(per_token * np.sum(lengths) + attn)


def model_flops(model_cfg, batch: Mapping, rules: ParamRules, param_paths: Sequence[str]) -> float:
  """Training FLOPs of one step for the batch (host arrays; see the module docstring)."""
  v, l_ = model_cfg.vision, model_cfg.llm
  mask = np.asarray(batch["attention_mask"]).reshape(-1, np.shape(batch["attention_mask"])[-1])
  llm_lengths = mask.sum(axis=1)
  llm = tower_flops(l_.num_layers, l_.hidden_size, l_.mlp_dim, l_.num_kv_heads * l_.head_dim,
                    True, llm_lengths)
  llm += 2 * float(llm_lengths.sum()) * l_.hidden_size * l_.vocab_size  # lm_head
  grids = [np.asarray(b["grid"]).reshape(-1, 2) for b in batch.get("buckets", ())]
  patches = np.concatenate([g[:, 0] * g[:, 1] for g in grids]) if grids else np.zeros(0)
  patches = patches[patches > 0] + 1  # + CLS
  used = v.num_layers + 1 + v.select_layer if v.select_layer < 0 else v.select_layer
  vit = tower_flops(used, v.hidden_size, v.mlp_dim, v.hidden_size, False, patches)
  trains = {g: any(rules(p.split("/")) for p in param_paths if p.startswith(g + "/"))
            for g in ("vision", "jbu", "projector", "llm")}
  upstream = trains["vision"] or trains["jbu"] or trains["projector"]
  mult_llm = 3 if trains["llm"] else (2 if upstream else 1)
  mult_vit = 3 if trains["vision"] else 1
  return mult_llm * llm + mult_vit * vit


def peak_flops_per_device(tcfg) -> float | None:
  if tcfg.peak_tflops:
    return float(tcfg.peak_tflops) * 1e12
  kind = jax.devices()[0].device_kind
  for name, tf in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return tf * 1e12
  return None


# --- the trainer ------------------------------------------------------------------------------

class Trainer:
  """Builds the model in its sharded layout, splits it, and jits the step for a config.

  `init_params`: dotted parameter path -> array (`initial_params`: a previous stage's `final/`,
  a converted official checkpoint, stage 0's JBU) loaded over the random init; paths not in the
  model are an error, parameters it does not name keep their random init.

  `abstract=True` allocates nothing: the model is `nnx.eval_shape`d, and `_params` / `frozen`
  hold ShapeDtypeStructs carrying their shardings, so `compiled_step().lower(...)` works on a
  mesh of abstract devices (`train/aot.py`: a TPU pod compiled on a CPU machine);
  `init_state` and `step` need real arrays and are unavailable.
  """

  def __init__(self, cfg, mesh: Mesh | None = None, *,
               init_params: Mapping[str, np.ndarray] | None = None, total_steps: int = 1,
               abstract: bool = False):
    if abstract and init_params:
      raise ValueError("an abstract Trainer holds no weights: init_params cannot be loaded")
    self.cfg = cfg
    self.abstract = abstract
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(cfg.mesh)
    self.rules_table = cfg.mesh.rules
    self.param_rules = ParamRules.from_config(cfg.train)
    self.precision = Precision.from_config(cfg.model.precision)
    self.total_steps = int(total_steps)
    seed = int(cfg.seed)
    make_model = lambda: LlavaUHD(cfg.model, self.precision, rngs=nnx.Rngs(seed))
    model = (nnx.eval_shape(make_model) if abstract
             else sharding.create_sharded(make_model, self.mesh, self.rules_table))
    if init_params:
      weights.load_params(model, dict(init_params), partial=True)
    self.graphdef, trainable, frozen = nnx.split(model, nnx.All(nnx.Param, self.param_rules),
                                                 ...)
    self.param_shardings = nnx.to_pure_dict(
        sharding.state_shardings(trainable, self.mesh, self.rules_table))
    self.frozen_shardings = nnx.to_pure_dict(
        sharding.state_shardings(frozen, self.mesh, self.rules_table))
    self._params = nnx.to_pure_dict(trainable)
    self.frozen = nnx.to_pure_dict(frozen)
    if abstract:
      sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
      self._params = jax.tree.map(sds, self._params, self.param_shardings)
      self.frozen = jax.tree.map(sds, self.frozen, self.frozen_shardings)
    self.trainable_paths = list(weights.flatten(self._params, "/"))
    if not self.trainable_paths:
      raise ValueError(f"train.trainable {list(cfg.train.trainable)} minus train.frozen "
                       f"{list(cfg.train.frozen)} selects no parameter")
    self.num_trainable = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self._params))
    self.num_frozen = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.frozen))
    self.optimizer = make_optimizer(cfg.train.optimizer, self.total_steps)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(self.optimizer.tx.init, self._params)
    opt_shardings = optax.tree_map_params(
        self.optimizer.tx, lambda _, s: s, abstract_opt, self.param_shardings,
        transform_non_params=lambda _: self.replicated)
    self.state_shardings = {"params": self.param_shardings, "opt_state": opt_shardings,
                            "step": self.replicated}
    self.settings = StepSettings(seed, bool(cfg.train.jbu_dropout), self.optimizer)
    self.peak_flops = peak_flops_per_device(cfg.train)
    self._params_taken = False

  # -- state --
  def init_state(self) -> dict:
    """{"params": trainable pure dict, "opt_state", "step": int32}, placed on the mesh.

    Once per Trainer: the initial parameters move into the state (donated), so no second copy
    of them stays alive beside the training state."""
    if self.abstract:
      raise RuntimeError("an abstract Trainer has no weights; use abstract_state()")
    if self._params_taken:
      raise RuntimeError("init_state() was already called: the initial parameters moved into "
                         "that state (restore a checkpoint or build a new Trainer)")

    @functools.partial(jax.jit, out_shardings=self.state_shardings, donate_argnums=(0,))
    def init(params):
      return {"params": params, "opt_state": self.optimizer.tx.init(params),
              "step": jnp.zeros((), jnp.int32)}
    params = self._params
    self._params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
        self.param_shardings)
    self._params_taken = True
    return init(params)

  def abstract_state(self) -> dict:
    """ShapeDtypeStructs with this mesh's shardings (the orbax restore target: a checkpoint
    written on another mesh or device count is resharded onto this one)."""
    shapes = jax.eval_shape(lambda p: {"params": p, "opt_state": self.optimizer.tx.init(p),
                                       "step": jnp.zeros((), jnp.int32)}, self._params)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, self.state_shardings)

  # -- batches --
  @functools.cached_property
  def batch_sharding(self) -> NamedSharding:
    """Every batch array is [micro, rows or items, ...]: the micro-batch axis replicated, the
    next axis split over the mesh axes the `batch` rule names (all of them: rows and items
    per global micro-batch must divide by their product)."""
    axes = tuple(a for a in sharding.rules_dict(self.rules_table)["batch"]
                 if self.mesh.shape[a] > 1)
    return NamedSharding(self.mesh, PartitionSpec(None, axes or None))

  def device_batch(self, host: Mapping[str, Any]) -> dict:
    """A process-local host batch (leading micro axis, then this process's rows/items) ->
    global arrays: every process contributes its block along axis 1, process-major."""
    procs = jax.process_count()
    spec = self.batch_sharding.spec[1]
    parts = math.prod(self.mesh.shape[a] for a in (spec if isinstance(spec, tuple) else
                                                   (spec,) if spec else ()))

    def put(name, x):
      x = np.asarray(x)
      global_shape = (x.shape[0], x.shape[1] * procs) + x.shape[2:]
      if global_shape[1] % parts:
        raise ValueError(f"batch array {name!r}: {global_shape[1]} rows/items per micro-batch "
                         f"do not split over the {parts} devices of the mesh's batch axes "
                         f"{spec}; make the per-micro-batch size a multiple of {parts}")
      if procs == 1:
        return jax.device_put(x, self.batch_sharding)
      return jax.make_array_from_process_local_data(self.batch_sharding, x, global_shape)

    out = {k: put(k, host[k]) for k in TEXT_KEYS}
    out["buckets"] = tuple({k: put(f"buckets[{i}].{k}", b[k]) for k in ("pixels", "grid")}
                           for i, b in enumerate(host.get("buckets", ())))
    return out

  # -- the step --
  def compiled_step(self):
    return loop.compiled_step(
        train_step, (self.graphdef, self.settings),
        in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, self.replicated))

  def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
    """One optimizer step on a device batch (`device_batch`); donates `state`."""
    with jax.set_mesh(self.mesh), sharding.use_rules(self.rules_table):
      return self.compiled_step()(state, self.frozen, batch)

  def lr(self, step: int) -> float:
    return float(self.optimizer.schedule(step))

  def flops(self, host_batch: Mapping) -> float:
    """Training FLOPs of a process-local host batch, times the process count."""
    paths = self.trainable_paths + list(weights.flatten(self.frozen, "/"))
    return model_flops(self.cfg.model, host_batch, self.param_rules, paths) * jax.process_count()

  # -- outputs --
  def params(self, state: dict) -> dict[str, jax.Array]:
    """Every parameter (trainable and frozen) as dotted path -> (sharded) array."""
    return {**weights.flatten(state["params"]), **weights.flatten(self.frozen)}

  def model(self, state: dict) -> LlavaUHD:
    return nnx.merge(self.graphdef, state["params"], self.frozen)


# --- initial weights --------------------------------------------------------------------------

def initial_params(cfg) -> dict[str, np.ndarray]:
  """Dotted path -> array from `cfg.init` (empty = random init everywhere)."""
  out: dict[str, np.ndarray] = {}
  if cfg.init.checkpoint:
    params, _ = weights.read_params(cfg.init.checkpoint)
    out.update(params)
  if cfg.init.vdim:
    out.update({f"jbu.{k}": v for k, v in vdim_jbu_params(cfg.init.vdim, cfg.model).items()})
  return out


def vdim_jbu_params(path: str, model_cfg) -> dict[str, np.ndarray]:
  """The JBU's parameters (dotted, relative to the JBU) from stage 0's run folder (its latest
  checkpoint) or from an official VDIM Lightning `.ckpt`."""
  p = pathlib.Path(path)
  if p.is_file():
    from hiwin_jax.convert import vdim
    proj = model_cfg.projector
    stack = vdim.import_vdim(p, Precision(), feat_dim=proj.kv_dim, scale=proj.jbu_scale)
    return weights.model_params(stack)
  try:
    state = loop.latest_state(p)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"init.vdim {path!r}: neither a VDIM .ckpt file nor a stage-0 run "
                            f"folder ({e})") from None
  return {k: np.asarray(v) for k, v in weights.flatten(state["params"]["upsampler"]).items()}


# --- the task ---------------------------------------------------------------------------------

class LlavaTask:
  """Stages 1 and 2 as the run loop's task (`loop.Task`): the data iterator of `cfg.data` for
  this process, the run's step count, and a `Trainer` starting from `cfg.init`'s weights."""

  def __init__(self, cfg, devices: Sequence[jax.Device] | None = None, tokenizer=None):
    from hiwin_jax.data import loader
    from hiwin_jax.data.tokenizer import load_tokenizer
    self.cfg = cfg
    tokenizer = tokenizer or load_tokenizer(cfg.data.tokenizer)
    self.data = loader.make_train_iterator(cfg.data, cfg.model, tokenizer,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count())
    # Epochs can differ in length (the pre-resize draw moves samples between keys): the plan's
    # own total, not epoch 0's length times the epochs, is what the iterator can deliver.
    total = int(cfg.train.num_steps) if cfg.train.num_steps > 0 else self.data.num_steps
    if total > self.data.num_steps:
      raise ValueError(f"train.num_steps {total} is more than the {self.data.num_steps} steps "
                       f"the data gives over data.epochs={int(cfg.data.epochs)} epochs (steps "
                       f"per epoch {list(self.data.steps_per_epoch)}): raise data.epochs or "
                       f"lower num_steps")
    self.num_steps = total
    self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    self.trainer = Trainer(cfg, self.mesh, init_params=initial_params(cfg), total_steps=total)

  def describe(self) -> str:
    t = self.trainer
    return (f"{t.num_trainable:,} trainable / {t.num_frozen:,} frozen parameters, "
            f"{self.data.num_steps_per_epoch} steps/epoch, {len(self.data.keys)} batch shapes")

  def init_state(self) -> dict:
    return self.trainer.init_state()

  def abstract_state(self) -> dict:
    return self.trainer.abstract_state()

  def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
    return self.trainer.step(state, self.trainer.device_batch(batch))

  def metrics(self, step: int, batch: dict, metrics: Mapping[str, float],
              seconds: float) -> dict[str, float]:
    images = int(np.count_nonzero((np.asarray(batch["image_token"]) >= 0).any(axis=-1)))
    row = {"lr": self.trainer.lr(step), "tokens_per_s": metrics["tokens"] / seconds,
           "images_per_s": images * jax.process_count() / seconds,
           "skipped": int(sum(batch["meta"]["skipped"].values()))}
    if self.trainer.peak_flops:
      row["mfu"] = self.trainer.flops(batch) / (seconds * self.trainer.peak_flops
                                                * jax.device_count())
    return row

  def export(self, state: dict, out: pathlib.Path) -> pathlib.Path:
    """The whole model as a hiwin checkpoint `final/` (all processes write their shards), and
    with `export.official` the official PyTorch layout `official/` (process 0). Each replaces
    the run's earlier export whole, atomically."""
    folder = out / "final"
    params = self.trainer.params(state)
    weights.write_params(folder, params, {"format": "llava-uhd",
                                          "model": self.cfg.model.to_dict()}, overwrite=True)
    if self.cfg.export.official:
      from jax.experimental import multihost_utils

      from hiwin_jax.convert import llava_uhd
      host = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
              if jax.process_count() > 1 else np.asarray(v) for k, v in params.items()}
      if jax.process_index() == 0:
        llava_uhd.export_official(host, self.cfg.model, out / "official",
                                  self.cfg.export.dtype, overwrite=True)
    return folder

  def summary(self) -> dict:
    return {"skipped": dict(self.data.skipped)}
