"""Stages 1 and 2: the whole model's train step as one jitted pure function over a sharded mesh.

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
update is optax AdamW (decoupled weight decay, torch's defaults) after global-norm clipping, with
linear warm-up then cosine decay to 0 (HF's `get_cosine_schedule_with_warmup`: warm-up steps =
ceil(warmup_ratio * total)). Parameters are stored in `precision.param_dtype` (fp32 master
weights) and the model computes in `precision.dtype` (bf16 in the real configs); the loss,
softmax and norm statistics are fp32.

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
import json
import logging
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hiwin_jax.models.layers import Precision
from hiwin_jax.models.llava_uhd import LlavaUHD
from hiwin_jax.parallel import mesh as M
from hiwin_jax.parallel import sharding as S

log = logging.getLogger("hiwin.train")
IGNORE_INDEX = -100
TEXT_KEYS = ("input_ids", "image_token", "labels", "attention_mask")

# Official trainable sets (official-spec §7, R1). The official JBU is `mm_projector.upsampler`;
# ours is the `jbu` group, so "the projector except the upsampler" is `projector/.*`.
PRETRAIN_TRAINABLE = (r"projector/.*",)
PRETRAIN_FROZEN = ()
SFT_TRAINABLE = (r"llm/.*", r"vision/.*", r"projector/.*", r"jbu/fixup_proj/.*")
SFT_FROZEN = (r"projector/pos_embed",)

# Peak dense bf16 FLOP/s per device, for the MFU estimate (cfg.train.peak_tflops overrides).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v6": 918.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0}


def optimizer_config() -> ml_collections.ConfigDict:
  """HF Trainer's `adamw_torch` defaults as LLaVA's scripts use them (official-spec §7)."""
  return ml_collections.ConfigDict(dict(
      lr=2e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, b1=0.9, b2=0.999,
      eps=1e-8, grad_clip=1.0))


def train_config(stage: str = "sft") -> ml_collections.ConfigDict:
  """`stage`: "pretrain" (stage 1) or "sft" (stage 2); sets the official trainable sets."""
  if stage not in ("pretrain", "sft"):
    raise ValueError(f"train stage {stage!r}: expected 'pretrain' or 'sft'")
  pre = stage == "pretrain"
  opt = optimizer_config()
  opt.lr = 1e-3 if pre else 2e-5
  return ml_collections.ConfigDict(dict(
      stage=stage,
      trainable=list(PRETRAIN_TRAINABLE if pre else SFT_TRAINABLE),
      frozen=list(PRETRAIN_FROZEN if pre else SFT_FROZEN),
      optimizer=opt,
      num_steps=-1,        # -1: data.epochs over the dataset
      jbu_dropout=True,    # the official JBU's Dropout2d is active in both stages (frozen or not)
      peak_tflops=0.0,     # per device, for MFU; 0 = from the device kind (unknown on CPU)
      log_every=10,
  ))


# --- parameter selection ----------------------------------------------------------------------

def path_str(path: Sequence[Any], sep: str = "/") -> str:
  """"a/b/c" from an nnx path or a jax key path (DictKey etc.)."""
  return sep.join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


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
    p = path_str(path)
    return (any(re.fullmatch(rx, p) for rx in self.trainable)
            and not any(re.fullmatch(rx, p) for rx in self.frozen))

  @classmethod
  def from_config(cls, tcfg) -> "ParamRules":
    return cls(tuple(tcfg.trainable), tuple(tcfg.frozen))


def flat_paths(tree: Mapping) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# --- optimizer and loss -----------------------------------------------------------------------

def lr_schedule(ocfg, total_steps: int) -> optax.Schedule:
  total = max(int(total_steps), 1)
  if ocfg.schedule == "constant":
    return optax.constant_schedule(ocfg.lr)
  if ocfg.schedule != "cosine":
    raise ValueError(f"optimizer.schedule {ocfg.schedule!r}: expected 'cosine' or 'constant'")
  warmup = math.ceil(ocfg.warmup_ratio * total)
  return optax.warmup_cosine_decay_schedule(0.0, ocfg.lr, warmup, max(total, warmup + 1), 0.0)


def make_optimizer(ocfg, total_steps: int) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(ocfg.grad_clip)] if ocfg.grad_clip > 0 else []
  parts.append(optax.adamw(lr_schedule(ocfg, total_steps), b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                           weight_decay=ocfg.weight_decay))
  return optax.chain(*parts)


def cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy summed over supervised positions, and their count (fp32)."""
  logits = logits[:, :-1].astype(jnp.float32)
  target = labels[:, 1:]
  mask = target != IGNORE_INDEX
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, logz - gold, 0.0)), jnp.sum(mask).astype(jnp.float32)


# --- the step ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Everything static the step closes over (hashable: it keys the compiled-step cache).

  `optimizer` is rebuilt (new closures) by every Trainer, so equality uses `optimizer_key`
  (the optimizer config and the step count it was built for) instead of the functions."""
  seed: int
  jbu_dropout: bool
  optimizer: Any = dataclasses.field(compare=False)  # optax.GradientTransformation
  optimizer_key: Any = None


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
  updates, opt_state = st.optimizer.update(grads, state["opt_state"], params)
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

_STEP_CACHE: dict = {}


class Trainer:
  """Builds the model in its sharded layout, splits it, and jits the step for a config.

  `init_params`: dotted parameter path -> array (e.g. `checkpoint.read_params` of a previous
  stage, a converted official checkpoint, stage 0's JBU) loaded over the random init; keys not
  in the model are an error, parameters it does not name keep their random init.

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
    self.mesh = mesh if mesh is not None else M.make_mesh(cfg.mesh)
    self.rules_table = cfg.mesh.rules
    self.param_rules = ParamRules.from_config(cfg.train)
    self.precision = Precision.from_config(cfg.model.precision)
    self.total_steps = int(total_steps)
    seed = int(cfg.seed)
    make_model = lambda: LlavaUHD(cfg.model, self.precision, rngs=nnx.Rngs(seed))
    model = (nnx.eval_shape(make_model) if abstract
             else S.create_sharded(make_model, self.mesh, self.rules_table))
    if init_params:
      _load_into(model, init_params)
    self.graphdef, trainable, frozen = nnx.split(model, nnx.All(nnx.Param, self.param_rules),
                                                 ...)
    self.param_shardings = nnx.to_pure_dict(
        S.state_shardings(trainable, self.mesh, self.rules_table))
    self.frozen_shardings = nnx.to_pure_dict(
        S.state_shardings(frozen, self.mesh, self.rules_table))
    self._params = nnx.to_pure_dict(trainable)
    self.frozen = nnx.to_pure_dict(frozen)
    if abstract:
      sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
      self._params = jax.tree.map(sds, self._params, self.param_shardings)
      self.frozen = jax.tree.map(sds, self.frozen, self.frozen_shardings)
    self.trainable_paths = flat_paths(self._params)
    if not self.trainable_paths:
      raise ValueError(f"train.trainable {list(cfg.train.trainable)} minus train.frozen "
                       f"{list(cfg.train.frozen)} selects no parameter")
    self.num_trainable = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self._params))
    self.num_frozen = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.frozen))
    self.optimizer = make_optimizer(cfg.train.optimizer, self.total_steps)
    self.schedule = lr_schedule(cfg.train.optimizer, self.total_steps)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(self.optimizer.init, self._params)
    opt_shardings = optax.tree_map_params(
        self.optimizer, lambda _, s: s, abstract_opt, self.param_shardings,
        transform_non_params=lambda _: self.replicated)
    self.state_shardings = {"params": self.param_shardings, "opt_state": opt_shardings,
                            "step": self.replicated}
    opt_key = (json.dumps(cfg.train.optimizer.to_dict(), sort_keys=True), self.total_steps)
    self.settings = StepSettings(seed, bool(cfg.train.jbu_dropout), self.optimizer, opt_key)
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
      return {"params": params, "opt_state": self.optimizer.init(params),
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
    shapes = jax.eval_shape(lambda p: {"params": p, "opt_state": self.optimizer.init(p),
                                       "step": jnp.zeros((), jnp.int32)}, self._params)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, self.state_shardings)

  # -- batches --
  @functools.cached_property
  def batch_sharding(self) -> NamedSharding:
    """Every batch array is [micro, rows or items, ...]: the micro-batch axis replicated, the
    next axis split over the mesh axes the `batch` rule names (all of them: rows and items
    per global micro-batch must divide by their product)."""
    axes = tuple(a for a in S.rules_dict(self.rules_table)["batch"] if self.mesh.shape[a] > 1)
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
    key = (self.graphdef, self.settings, self.mesh, _tree_key(self.state_shardings),
           _tree_key(self.frozen_shardings))
    if key not in _STEP_CACHE:
      _STEP_CACHE[key] = jax.jit(
          functools.partial(train_step, self.graphdef, self.settings),
          in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding),
          out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    return _STEP_CACHE[key]

  def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
    """One optimizer step on a device batch (`device_batch`); donates `state`."""
    with jax.set_mesh(self.mesh), S.use_rules(self.rules_table):
      return self.compiled_step()(state, self.frozen, batch)

  def lr(self, step: int) -> float:
    return float(self.schedule(step))

  def flops(self, host_batch: Mapping) -> float:
    """Training FLOPs of a process-local host batch, times the process count."""
    return model_flops(self.cfg.model, host_batch, self.param_rules,
                       self.trainable_paths + flat_paths(self.frozen)) * jax.process_count()

  # -- outputs --
  def params(self, state: dict) -> dict[str, jax.Array]:
    """Every parameter (trainable and frozen) as dotted path -> (sharded) array."""
    out = {}
    for tree in (state["params"], self.frozen):
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[path_str(path, ".")] = leaf
    return out

  def model(self, state: dict) -> LlavaUHD:
    return nnx.merge(self.graphdef, state["params"], self.frozen)


def _tree_key(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef, tuple(leaves))


def _load_into(model: nnx.Module, arrays: Mapping[str, np.ndarray]) -> None:
  """Overwrites the named parameters of a (sharded) model, keeping each one's sharding."""
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  unknown = sorted(set(arrays) - set(flat))
  if unknown:
    raise KeyError(f"initial parameters name {len(unknown)} keys the model does not have, e.g. "
                   f"{unknown[:5]}")
  for key, value in arrays.items():
    var = flat[key]
    old = var.get_value()
    if tuple(np.shape(value)) != tuple(old.shape):
      raise ValueError(f"initial parameter {key}: shape {tuple(np.shape(value))}, the model "
                       f"expects {tuple(old.shape)}")
    var.set_value(jax.device_put(np.asarray(value).astype(old.dtype), old.sharding))
