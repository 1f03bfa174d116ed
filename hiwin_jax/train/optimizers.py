"""The optimizers of the official recipes, built from `cfg.train.optimizer`.

- "adamw" (stages 1/2, `config.adamw_config`): HF Trainer's `adamw_torch` as LLaVA's scripts
  run it: optax AdamW (decoupled weight decay, torch's defaults) after global-norm clipping,
  with linear warm-up then cosine decay to 0 (HF's `get_cosine_schedule_with_warmup`: warm-up
  steps = ceil(warmup_ratio * total)), or a constant rate.
  `projector_lr` / `vision_lr` give the projector (with the JBU) and the ViT their own peak
  rates (LLaVA's `mm_projector_lr` / `mm_vision_tower_lr`), on `lr`'s schedule.
- "nadam" (stage 0, `config.nadam_config`): `torch.optim.NAdam` after Lightning's gradient-norm
  clip in the first `clip_steps` steps only, constant rate (FeatUp's `train_vdim_upsampler.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation and its learning-rate schedule, compared by what built them (the
  optimizer config and the step count): every build makes new closures, and a compiled train
  step that closes over one must be found again for an equal config (it keys the step cache)."""
  key: str
  tx: optax.GradientTransformation = dataclasses.field(compare=False)
  schedule: optax.Schedule = dataclasses.field(compare=False)


def lr_schedule(ocfg, total_steps: int) -> optax.Schedule:
  total = max(int(total_steps), 1)
  if ocfg.get("schedule", "constant") == "constant":
    return optax.constant_schedule(ocfg.lr)
  if ocfg.schedule != "cosine":
    raise ValueError(f"optimizer.schedule {ocfg.schedule!r}: expected 'cosine' or 'constant'")
  warmup = math.ceil(ocfg.warmup_ratio * total)
  return optax.warmup_cosine_decay_schedule(0.0, ocfg.lr, warmup, max(total, warmup + 1), 0.0)


# Top-level modules with their own learning rate -> the optimizer field that sets it.
MODULE_LR_FIELDS = {"projector": "projector_lr", "jbu": "projector_lr", "vision": "vision_lr"}


def module_lr_factors(ocfg) -> dict[str, float]:
  """Top-level module -> its peak learning rate / `lr`, for the modules whose rate differs."""
  out = {}
  for module, field in MODULE_LR_FIELDS.items():
    lr = float(ocfg.get(field, 0.0))
    if lr < 0:
      raise ValueError(f"optimizer.{field} {lr} must be >= 0 (0: optimizer.lr)")
    if lr and lr != ocfg.lr:
      out[module] = lr / float(ocfg.lr)
  return out


def scale_by_module(factors: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates of each top-level module (the first key of a parameter's path) by
  its factor. After AdamW that is the module's own learning rate (its weight decay included).
  Stateless: the AdamW moments, and their shardings, are those of a single rate."""

  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, u: u * factors.get(top_module(path), 1.0), updates)
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def top_module(path) -> str:
  """The top-level module name of a parameter's tree path (a dict key or an attribute name);
  a path that has none is a bug, not a parameter that silently keeps the base rate."""
  entry = path[0] if path else None
  name = getattr(entry, "key", getattr(entry, "name", None))
  if not isinstance(name, str):
    raise ValueError(f"parameter path {jax.tree_util.keystr(tuple(path))} does not start with a "
                     f"module name: per-module learning rates cannot be applied")
  return name


def decay_mask(params):
  """Which parameters AdamW's weight decay applies to: all but biases and norm scales (leaves
  named `bias` or `scale`; every `scale` here is a LayerNorm/RMSNorm weight), by name as HF's
  Trainer, which trained the official model, excludes them. Stacked layers carry a leading
  `layers` axis, so the rank cannot tell a bias from a matrix."""
  def decayed(path, _):
    names = [getattr(e, "key", getattr(e, "name", None)) for e in path]
    leaf = next((n for n in reversed(names) if n != "value"), None)
    return leaf not in ("bias", "scale")
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(ocfg, total_steps: int) -> Optimizer:
  """The optimizer `ocfg.name` names, for a run of `total_steps` steps."""
  schedule = lr_schedule(ocfg, total_steps)
  if ocfg.name == "adamw":
    parts = [optax.clip_by_global_norm(ocfg.grad_clip)] if ocfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                             weight_decay=ocfg.weight_decay, mask=decay_mask))
    factors = module_lr_factors(ocfg)
    if factors:
      parts.append(scale_by_module(factors))
    tx = optax.chain(*parts)
  elif ocfg.name == "nadam":
    tx = optax.chain(clip_by_global_norm_until(ocfg.clip_norm, ocfg.clip_steps),
                     torch_nadam(ocfg.lr, ocfg.b1, ocfg.b2, ocfg.eps, ocfg.momentum_decay))
  else:
    raise ValueError(f"optimizer.name {ocfg.name!r}: expected 'adamw' or 'nadam'")
  key = json.dumps({"optimizer": ocfg.to_dict(), "total_steps": int(total_steps)}, sort_keys=True)
  return Optimizer(key, tx, schedule)


class ClipUntilState(NamedTuple):
  count: jax.Array


def clip_by_global_norm_until(max_norm: float, num_steps: int) -> optax.GradientTransformation:
  """Lightning's `clip_gradients(opt, max_norm, 'norm')` for `global_step < num_steps` only:
  g *= min(max_norm / (|g| + 1e-6), 1) (`torch.nn.utils.clip_grad_norm_`), identity after."""

  def init(params):
    del params
    return ClipUntilState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    coef = jnp.minimum(max_norm / (optax.tree.norm(updates) + CLIP_EPS), 1.0)
    coef = jnp.where(state.count < num_steps, coef, 1.0)
    updates = jax.tree.map(lambda g: g * coef.astype(g.dtype), updates)
    return updates, ClipUntilState(state.count + 1)

  return optax.GradientTransformation(init, update)


class TorchNAdamState(NamedTuple):
  count: jax.Array       # int32 steps taken
  mu_product: jax.Array  # float32 prod_t mu_t
  exp_avg: Any
  exp_avg_sq: Any


def torch_nadam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                momentum_decay: float = 4e-3) -> optax.GradientTransformation:
  """`torch.optim.NAdam(lr, betas=(b1, b2), eps, momentum_decay)` (weight decay 0), returning the
  full parameter update. Torch's NAdam (Dozat) ramps the momentum: mu_t = b1 (1 - 0.5 *
  0.96^(t * momentum_decay)) (about 0.45 early on), which optax.nadam does not:

      m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2;  denom = sqrt(v / (1 - b2^t)) + eps
      p -= lr (1 - mu_t) / (1 - prod mu_1..t) g / denom + lr mu_{t+1} / (1 - prod mu_1..t+1) m / denom
  """

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return TorchNAdamState(jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32), zeros(), zeros())

  def update(grads, state, params=None):
    del params
    t = (state.count + 1).astype(jnp.float32)
    bc2 = 1.0 - b2 ** t
    mu = b1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1.0) * momentum_decay))
    mu_product = state.mu_product * mu
    c_grad = -lr * (1.0 - mu) / (1.0 - mu_product)
    c_avg = -lr * mu_next / (1.0 - mu_product * mu_next)
    m = jax.tree.map(lambda m, g: m + (1.0 - b1) * (g - m), state.exp_avg, grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.exp_avg_sq, grads)

    def step(g, m, v):
      denom = jnp.sqrt(v / bc2) + eps
      return c_grad * g / denom + c_avg * m / denom

    updates = jax.tree.map(step, grads, m, v)
    return updates, TorchNAdamState(state.count + 1, mu_product, m, v)

  return optax.GradientTransformation(init, update)
