"""Both towers under 8-device meshes equal the single-device result, and are really sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hiwin_jax import config as C
from hiwin_jax.models.clip_vit import ClipVisionTower
from hiwin_jax.models.layers import Precision
from hiwin_jax.models.llama import LlamaModel
from hiwin_jax.parallel import mesh as M
from hiwin_jax.parallel import sharding
from tests.numerics import assert_close

MESHES = [(1, 8, 1), (1, 4, 2), (2, 2, 2)]
MIN_SHARDED = 1024  # every parameter with this many elements or more must be split


@pytest.fixture(scope="module")
def cfg():
  return C.load_config("tiny")


def _mesh(shape):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return M.make_mesh(dict(zip(M.AXES, shape)))


def _run(model, forward, inputs, mesh=None, rules=None):
  graphdef, state = nnx.split(model)

  def f(state, *args):
    return forward(nnx.merge(graphdef, state), *args)

  if mesh is None:
    return np.asarray(jax.jit(f)(state, *inputs)), state
  state = sharding.shard_state(state, mesh, rules)
  batch = NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules, mesh))
  inputs = [jax.device_put(x, batch) for x in inputs]
  with jax.set_mesh(mesh), sharding.use_rules(rules):
    out = jax.jit(f)(state, *inputs)
  return np.asarray(out), state


def _assert_sharded(state, mesh):
  too_big = sharding.unsharded_report(nnx.state(state, nnx.Param), MIN_SHARDED)
  assert not too_big, f"replicated large parameters on mesh {mesh.shape}: {too_big}"


@pytest.fixture(scope="module")
def llm_case(cfg):
  model = LlamaModel(cfg.model.llm, Precision.parity(), rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.model.llm.vocab_size)
  mask = jnp.arange(16)[None, :] < jnp.array([16, 9, 16, 3, 16, 16, 12, 1])[:, None]
  fwd = lambda m, ids, mask: m(ids, attention_mask=mask)[0]
  ref, _ = _run(model, fwd, (ids, mask))
  return model, fwd, (ids, mask), ref


@pytest.fixture(scope="module")
def clip_case(cfg):
  model = ClipVisionTower(cfg.model.vision, Precision.parity(), rngs=nnx.Rngs(0))
  pixels = jax.random.normal(jax.random.key(2), (8, 14 * 6, 14 * 5, 3))
  grid = jnp.array([[6, 5], [5, 4], [6, 5], [2, 5], [6, 3], [1, 5], [6, 5], [4, 4]], jnp.int32)
  fwd = lambda m, px, grid: m(px, grid)[0]
  ref, _ = _run(model, fwd, (pixels, grid))
  return model, fwd, (pixels, grid), ref


@pytest.mark.parametrize("shape", MESHES)
def test_llama_forward_on_mesh_equals_single_device(llm_case, cfg, shape):
  mesh = _mesh(shape)
  model, fwd, inputs, ref = llm_case
  out, state = _run(model, fwd, inputs, mesh, cfg.mesh.rules)
  _assert_sharded(state, mesh)
  assert_close(out, ref, 1e-5, f"llama logits on mesh {mesh.shape}")


@pytest.mark.parametrize("shape", MESHES)
def test_clip_forward_on_mesh_equals_single_device(clip_case, cfg, shape):
  mesh = _mesh(shape)
  model, fwd, inputs, ref = clip_case
  out, state = _run(model, fwd, inputs, mesh, cfg.mesh.rules)
  _assert_sharded(state, mesh)
  assert_close(out, ref, 1e-5, f"clip features on mesh {mesh.shape}")


def test_parameters_carry_the_expected_mesh_axes(cfg):
  mesh = _mesh((2, 2, 2))
  model = sharding.create_sharded(
      lambda: LlamaModel(cfg.model.llm, Precision.parity(), rngs=nnx.Rngs(0)), mesh, cfg.mesh.rules)
  state = nnx.state(model, nnx.Param)
  assert state["embed_tokens"]["embedding"].get_value().sharding.spec == P("tensor", "fsdp")
  q = state["layers"]["self_attn"]["q_proj"]["kernel"].get_value()
  assert q.sharding.spec == P(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (cfg.model.llm.num_layers, 32, 32)
  down = state["layers"]["mlp"]["down_proj"]["kernel"].get_value()
  assert down.sharding.spec == P(None, "tensor", "fsdp")


def test_rules_skip_axes_that_do_not_divide(cfg):
  mesh = _mesh((1, 8, 1))
  spec = sharding.logical_to_spec(("vocab", "embed"), cfg.mesh.rules, mesh, (512, 12))
  assert spec == P(None, None)  # 12 is not divisible by 8, tensor has size 1
  with pytest.raises(KeyError, match="no rule"):
    sharding.logical_to_spec(("nonsense",), cfg.mesh.rules, mesh)


@pytest.mark.slow
def test_whole_model_on_a_mesh_equals_single_device(cfg):
  """LlavaUHD (ViT -> JBU -> Hiwin -> LLaMA) sharded over (data=2, fsdp=2, tensor=2)."""
  from hiwin_jax.data import buckets, layout
  from hiwin_jax.models.llava_uhd import LlavaUHD

  mesh = _mesh((2, 2, 2))
  model = LlavaUHD(cfg.model, Precision.parity(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = layout.TokenLayout.from_config(cfg.model.projector)
  samples = []
  for grid, (h, w) in [(None, (6, 5)), ((2, 1), (5, 4))]:
    n_items = 1 if grid is None else 3
    items = [rng.standard_normal((14 * h, 14 * w, 3)).astype(np.float32) for _ in range(n_items)]
    span = layout.image_layout(grid, tokens)
    seq = layout.splice(np.array([1, 7, layout.IMAGE_TOKEN_INDEX, 9]), None, [span])
    samples.append((seq, items))
  seq_len = max(len(s.input_ids) for s, _ in samples)
  batch = buckets.make_batch(samples, [(6, 6)], seq_len, tokens_per_item=tokens.tokens_per_item)
  batch = dict(batch, buckets=tuple(batch["buckets"]))
  graphdef, state = nnx.split(model)
  fwd = lambda st, b: nnx.merge(graphdef, st)(b)[0]
  ref = np.asarray(jax.jit(fwd)(state, batch))
  sharded = sharding.shard_state(state, mesh, cfg.mesh.rules)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    out = np.asarray(jax.jit(fwd)(sharded, batch))
  _assert_sharded(sharded, mesh)
  real = batch["attention_mask"]
  assert_close(out[real], ref[real], 1e-5, "LLaVA-UHD logits on mesh (2, 2, 2)")
