"""LLaMA attention="splash" (the Pallas TPU splash kernel, interpret mode on CPU) against the xla
einsum attention: logits and gradients with padding (left and right) and GQA, alone and
shard_mapped under a mesh; cached decoding falls back to xla."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hiwin_jax import config as C
from hiwin_jax.models.layers import Precision
from hiwin_jax.models.llama import LlamaModel
from hiwin_jax.parallel import sharding
from tests.numerics import assert_close

B, S = 4, 13  # S is padded to 128 inside the kernel wrapper


def _model(attention):
  """The tiny LLM with GQA (4 query heads on 2 kv heads)."""
  cfg = C.load_config("tiny").model.llm
  cfg.update(attention=attention, num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2)
  return LlamaModel(cfg, Precision.parity(), rngs=nnx.Rngs(0))


def _inputs():
  """ids [B, S]; rows right-padded by 2, left-padded by 3 (positions cumsum - 1), unpadded, and
  right-padded by 6; the loss counts real tokens predicted from real tokens only."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 256, (B, S)).astype(np.int32)
  mask = np.ones((B, S), np.int32)
  mask[0, -2:] = 0
  mask[1, :3] = 0
  mask[3, -6:] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)


def _step(attention):
  graphdef, params = nnx.split(_model(attention))
  ids, mask, positions = _inputs()

  def loss(params):
    logits, _ = nnx.merge(graphdef, params)(ids, attention_mask=mask, positions=positions)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    real = mask[:, :-1] * mask[:, 1:]  # a padding query's row is unspecified
    return jnp.sum(nll * real) / real.sum(), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True)), params, np.asarray(mask, bool)


@pytest.fixture(scope="module")
def xla_result():
  step, params, _ = _step("xla")
  return step(params)


def _check(got, want, mask, what):
  (loss, logits), grads = got
  (want_loss, want_logits), want_grads = want
  assert_close(np.asarray(logits)[mask], np.asarray(want_logits)[mask], 1e-5, f"{what} logits")
  assert_close(loss, want_loss, 1e-5, f"{what} loss")
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    assert_close(a, e, 1e-5, f"{what} grad {jax.tree_util.keystr(path)}")


@pytest.mark.slow
def test_splash_matches_xla_attention_with_padding_and_gqa(xla_result):
  step, params, mask = _step("splash")
  _check(step(params), xla_result, mask, "splash")


@pytest.mark.slow
def test_splash_is_shard_mapped_over_batch_and_kv_heads_under_a_mesh(xla_result):
  step, params, mask = _step("splash")
  mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), sharding.use_rules(C.default_logical_rules()):
    assert sharding.mesh_axes("kv_heads", 2) == ("tensor",)
    assert "shard_map" in str(jax.make_jaxpr(step)(params))
    got = step(params)
  _check(got, xla_result, mask, "splash under a data 2 x tensor 2 mesh")


def test_splash_lowers_to_a_mosaic_kernel_for_tpu_only():
  graphdef, params = nnx.split(_model("splash"))
  ids = jnp.zeros((1, 256), jnp.int32)
  fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
  tpu = fn.trace(params, ids).lower(lowering_platforms=("tpu",)).as_text()
  cpu = fn.trace(params, ids).lower(lowering_platforms=("cpu",)).as_text()
  assert "tpu_custom_call" in tpu and "tpu_custom_call" not in cpu
  with pytest.raises(NotImplementedError, match="platform_index"):  # no interpreted GPU kernel
    fn.trace(params, ids).lower(lowering_platforms=("cuda",))


def test_splash_on_a_gpu_backend_is_a_one_line_error(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="attention='splash'.*no GPU lowering"):
    _model("splash")


def test_splash_decoding_with_a_cache_uses_the_xla_path():
  """A cache step has T != S; splash falls back to xla there, so cached logits are identical."""
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 5)), jnp.int32)
  outs = []
  for attention in ("xla", "splash"):
    model = _model(attention)
    cache = model.init_cache(2, 8)
    logits, cache = model(ids, cache=cache)
    step, _ = model(ids[:, :1], cache=cache)
    outs.append((logits, step))
  np.testing.assert_array_equal(np.asarray(outs[0][1]), np.asarray(outs[1][1]))
