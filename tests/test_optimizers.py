"""Per-module learning rates of the AdamW recipe (`optimizer.projector_lr`, `vision_lr`)
against a numpy AdamW reference."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hiwin_jax import config
from hiwin_jax.train import optimizers


def _adamw_reference(p, grads, lr, ocfg, steps):
  """torch.optim.AdamW's update rule (decoupled weight decay), numpy float64."""
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t, g in enumerate(grads, 1):
    m = ocfg.b1 * m + (1 - ocfg.b1) * g
    v = ocfg.b2 * v + (1 - ocfg.b2) * g * g
    mhat, vhat = m / (1 - ocfg.b1 ** t), v / (1 - ocfg.b2 ** t)
    p = p - lr * (mhat / (np.sqrt(vhat) + ocfg.eps) + ocfg.weight_decay * p)
  return p


@pytest.mark.parametrize("as_state", [False, True])
def test_each_module_moves_at_its_own_rate(as_state):
  ocfg = config.adamw_config()
  ocfg.update(lr=1e-2, schedule="constant", grad_clip=0.0, weight_decay=0.1,
              projector_lr=3e-4, vision_lr=2e-5)
  rng = np.random.default_rng(0)
  shapes = {"projector": (3, 2), "jbu": (4,), "vision": (2, 5), "llm": (5, 3)}
  rates = {"projector": 3e-4, "jbu": 3e-4, "vision": 2e-5, "llm": 1e-2}
  params = {k: {"w": rng.standard_normal(s)} for k, s in shapes.items()}
  grads = [{k: {"w": rng.standard_normal(s)} for k, s in shapes.items()} for _ in range(3)]

  def tree(d):
    t = {k: {"w": jnp.asarray(v["w"], jnp.float32)} for k, v in d.items()}
    return nnx.State(t) if as_state else t

  tx = optimizers.make_optimizer(ocfg, 3).tx
  p = tree(params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(tree(g), state, p)
    p = optax.apply_updates(p, updates)
  for k, rate in rates.items():
    want = _adamw_reference(params[k]["w"], [g[k]["w"] for g in grads], rate, ocfg, 3)
    got = np.asarray(p[k]["w"], np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=k)


def test_zero_means_lr_and_negative_is_refused():
  ocfg = config.adamw_config()
  assert optimizers.module_lr_factors(ocfg) == {}
  ocfg.update(lr=1e-3, projector_lr=1e-3, vision_lr=1e-5)
  assert optimizers.module_lr_factors(ocfg) == {"vision": pytest.approx(1e-2)}
  ocfg.vision_lr = -1.0
  with pytest.raises(ValueError, match="optimizer.vision_lr -1.0 must be >= 0"):
    optimizers.make_optimizer(ocfg, 10)


def test_weight_decay_spares_biases_and_norm_scales_of_the_real_model():
  """On the tiny LlavaUHD's own parameter tree (stacked layers included, where a bias is 2-D),
  with zero gradients AdamW's decay moves every parameter but the biases and the norm scales;
  and every parameter's path names its top-level module."""
  from hiwin_jax.models.layers import Precision
  from hiwin_jax.models.llava_uhd import LlavaUHD
  cfg = config.load_config("tiny_stage2")
  model = nnx.eval_shape(lambda: LlavaUHD(cfg.model, Precision(), rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  params = jax.tree.map(lambda s: jnp.ones(s.shape, jnp.float32), state)
  ocfg = config.adamw_config()
  ocfg.update(lr=1e-2, schedule="constant", grad_clip=0.0, weight_decay=0.1, vision_lr=1e-3)
  tx = optimizers.make_optimizer(ocfg, 1).tx
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  seen, spared = set(), 0
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    name = jax.tree_util.keystr(path)
    seen.add(optimizers.top_module(path))
    if re.search(r"\['(bias|scale)'\](\.value)?$", name):  # e.g. ['llm']['norm']['scale'].value
      assert not bool(jnp.any(u != 0)), name
      spared += 1
      continue
    rate = 1e-3 if optimizers.top_module(path) == "vision" else 1e-2
    np.testing.assert_allclose(np.asarray(u).ravel(), -rate * 0.1, rtol=1e-6, err_msg=name)
  assert spared >= 30 and {"vision", "jbu", "projector", "llm"} <= seen


def test_a_path_without_a_module_name_is_an_error():
  with pytest.raises(ValueError, match="does not start with a module name"):
    optimizers.top_module((jax.tree_util.SequenceKey(0),))
