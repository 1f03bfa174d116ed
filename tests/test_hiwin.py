"""The Hiwin projector against the PyTorch re-derivation of official-spec §4 in
tests/reference/hiwin.py, item by item.

The reference takes every item at its exact size (no canvas): `nn.Linear` level projectors,
LayerNorm(eps=1e-6), `F.interpolate` bicubic of the position table per level, the official window
boxes (float64 -> float32 -> bf16) and sample grid, torchvision's RoIAlign sampling, zero-padding
to L_max with a key_padding_mask, and `nn.MultiheadAttention` (batch_first=False, each query token
its own batch element), loaded with our weights under the official names. The JAX side gets one
padded canvas batch with mixed grids, random filler outside each item, and an empty slot.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from hiwin_jax.models.hiwin import HiwinProjector, sincos_pos_embed
from hiwin_jax.models.layers import Precision
from tests.numerics import assert_close, bf16_values

torch = pytest.importorskip("torch")

from tests.reference import hiwin as hiwin_ref  # noqa: E402  (after the torch skip)

pytestmark = pytest.mark.torch

E, HEADS, KV = 64, 4, 16


def config(mask, attention="folded"):
  return ml_collections.ConfigDict(dict(embed_dim=E, kv_dim=KV, num_heads=HEADS, grid_size=12,
                                        feature_scale_mask=mask, layout="r1", attention=attention))


# --- helpers -----------------------------------------------------------------------------------

def randomised(model, seed):
  """Replaces every parameter by a random value (level embeddings, biases and norms included)."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  flat = {}
  for path, leaf in nnx.to_flat_state(state):
    name = ".".join(str(p) for p in path)
    shape = leaf.shape
    if name.endswith("kernel") or name == "proj":
      value = rng.standard_normal(shape) / math.sqrt(shape[0])
    elif name.endswith("scale"):
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    else:
      value = 0.5 * rng.standard_normal(shape)
    leaf.set_value(jnp.asarray(value, jnp.float32))
    flat[name] = np.asarray(value, np.float32)
  nnx.update(model, state)
  return flat


# Our attention in/out projections -> `nn.MultiheadAttention`'s names (official-spec §8.2).
_ATTN_NAMES = {"attn_in_proj.weight": "attn.in_proj_weight",
               "attn_in_proj.bias": "attn.in_proj_bias",
               "attn_out_proj.weight": "attn.out_proj.weight",
               "attn_out_proj.bias": "attn.out_proj.bias"}


def torch_hiwin(params, items, scales, dtype=torch.float32):
  """Our parameters (numpy, JAX layout) under their official names (Linear kernels transposed to
  (out, in), LayerNorm scale -> weight) in the reference; items: per item {s: (1, KV, H_s, W_s)}
  -> (n_items, 144, E) float32 numpy, each item its own group; computed in `dtype`."""
  official = {}
  for name, value in params.items():
    module, _, leaf = name.rpartition(".")
    key = f"{module}.weight" if leaf in ("kernel", "scale") else name
    official[_ATTN_NAMES.get(key, key)] = value.T if leaf == "kernel" else value
  model = hiwin_ref.Hiwin(KV, E, HEADS, scales)
  own = model.state_dict()
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in official.items()
                         if k in own})
  model = model.to(dtype)
  with torch.no_grad():
    return model([{s: item[s].to(dtype) for s in scales} for item in items]).float().numpy()


GRIDS = [(13, 10), (5, 14), (11, 11), (3, 6), (0, 0)]
CANVAS = (13, 14)


def canvas_batch(seed, scales, grids=GRIDS, canvas=CANVAS):
  rng = np.random.default_rng(seed)
  hc, wc = canvas
  levels = {s: rng.standard_normal((len(grids), s * hc, s * wc, KV)).astype(np.float32)
            for s in scales}
  items = [{s: torch.from_numpy(levels[s][n, :s * h, :s * w].transpose(2, 0, 1)[None].copy())
            for s in scales}
           for n, (h, w) in enumerate(grids) if h]
  return levels, np.asarray(grids, np.int32), items


@jax.jit(static_argnums=0)
def _apply(graphdef, state, levels, grid):
  return nnx.merge(graphdef, state)(levels, grid)


def run(model, levels, grid):
  """One padded canvas batch through the jitted projector (compiled once per model and shapes)."""
  graphdef, state = nnx.split(model)
  return np.asarray(_apply(graphdef, state, {s: jnp.asarray(v) for s, v in levels.items()},
                           jnp.asarray(grid)))


# --- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, scales, attention", [(7, (1, 2, 4), "folded"), (5, (1, 4), "folded"),
                                                     (7, (1, 2, 4), "official")])
def test_hiwin_matches_reference_on_mixed_grids(mask, scales, attention):
  model = HiwinProjector(config(mask, attention), Precision.parity(), rngs=nnx.Rngs(0))
  params = randomised(model, seed=mask)
  levels, grid, items = canvas_batch(mask, (1, 2, 4))
  got = run(model, levels, grid)
  assert got.shape == (len(GRIDS), 144, E)
  assert np.all(np.isfinite(got)), "the empty slot must give finite values"
  want = torch_hiwin(params, items, scales)
  valid = [n for n, (h, _) in enumerate(GRIDS) if h]
  assert_close(got[valid], want, 1e-5, f"hiwin mask {mask}, {attention} attention")


def test_hiwin_fp32_keeps_window_boxes_fp32():
  """fp32 means fp32: on grids whose window edges k * side / 12 are not bf16-representable the
  official fp32 forward (boxes cast to the float32 feature dtype) is matched; bf16-rounded boxes
  move RoIAlign samples there by up to ~2e-2 relative."""
  grids = [(20, 27), (16, 36), (8, 10)]
  model = HiwinProjector(config(5), Precision.parity(), rngs=nnx.Rngs(4))
  params = randomised(model, seed=4)
  levels, grid, items = canvas_batch(4, (1, 4), grids, canvas=(20, 36))
  assert_close(run(model, levels, grid), torch_hiwin(params, items, (1, 4)), 1e-5,
               "hiwin fp32 on grids with non-bf16 window edges")


def test_hiwin_item_ignores_canvas_filler_and_neighbours():
  model = HiwinProjector(config(7), Precision.parity(), rngs=nnx.Rngs(1))
  randomised(model, seed=11)
  levels, grid, _ = canvas_batch(5, (1, 2, 4))
  base = run(model, levels, grid)
  changed = {}
  for s, v in levels.items():
    v = v.copy()
    h, w = GRIDS[0]
    v[0, s * h:] = 1e4   # item 0's filler
    v[0, :, s * w:] = -1e4
    v[1:] = v[1:][::-1]  # other items permuted
    changed[s] = v
  np.testing.assert_array_equal(run(model, changed, np.concatenate([grid[:1], grid[1:][::-1]]))[0],
                                base[0])


def test_hiwin_bf16_runs_close_to_fp32():
  f32_model = HiwinProjector(config(5), Precision.parity(), rngs=nnx.Rngs(2))
  randomised(f32_model, seed=3)
  bf16_model = HiwinProjector(config(5), Precision(jnp.bfloat16, jnp.float32),
                              rngs=nnx.Rngs(2))
  nnx.update(bf16_model, nnx.state(f32_model, nnx.Param))
  levels, grid, _ = canvas_batch(7, (1, 4))
  want = run(f32_model, levels, grid)
  got = run(bf16_model, levels, grid)
  assert got.dtype == jnp.bfloat16
  assert_close(got.astype(np.float32)[:4], want[:4], 2e-2, "bf16 vs fp32")


@pytest.mark.parametrize("mask, scales", [(5, (1, 4)), (7, (1, 2, 4))])
def test_hiwin_bf16_rounds_where_torch_rounds(mask, scales):
  """The official-attention projector in bf16, jitted, against the reference run in bf16 by torch
  on CPU (inputs and weights bf16-representable): at most 5% of output elements differ (2.95% at
  mask 5 measured; 57.6% before every bf16 result feeding another op went through
  `layers.round_to`, and before the 1x level projection rounded twice like torch's F.linear on
  the non-contiguous `permute(0, 2, 3, 1)` view). Teacher-forced, every stage differs on <= 2e-4
  of its elements (float32 summation order in LayerNorm statistics, RoIAlign and dot products
  flipping a bf16 rounding); the chain of LayerNorms and E-wide projections spreads those."""
  model = HiwinProjector(config(mask, "official"), Precision(jnp.bfloat16, jnp.bfloat16),
                         rngs=nnx.Rngs(2))
  params = {k: bf16_values(v) for k, v in randomised(model, seed=3).items()}
  state = nnx.state(model, nnx.Param)
  for path, leaf in nnx.to_flat_state(state):
    leaf.set_value(jnp.asarray(params[".".join(map(str, path))], jnp.bfloat16))
  nnx.update(model, state)
  levels, grid, _ = canvas_batch(7, scales)
  levels = {s: bf16_values(v) for s, v in levels.items()}
  items = [{s: torch.from_numpy(levels[s][n, :s * h, :s * w].transpose(2, 0, 1)[None].copy())
            for s in scales} for n, (h, w) in enumerate(GRIDS) if h]
  got = run(model, {s: v.astype(jnp.bfloat16) for s, v in levels.items()}, grid)
  want = torch_hiwin(params, items, scales, torch.bfloat16)
  valid = [n for n, (h, _) in enumerate(GRIDS) if h]
  frac = float(np.mean(got[valid].astype(np.float32) != want))
  print(f"bf16 Hiwin mask {mask}: {frac:.3%} of elements differ from torch's bf16")
  assert frac <= 0.05, f"mask {mask}: {frac:.2%} of bf16 outputs differ from torch's bf16 flow"


def test_sincos_table_first_half_encodes_the_column():
  dim, g = 64, 12
  table = sincos_pos_embed(dim, g).astype(np.float64)
  omega = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
  y, x = np.divmod(np.arange(g * g), g)
  want = np.concatenate([np.sin(np.outer(x, omega)), np.cos(np.outer(x, omega)),
                         np.sin(np.outer(y, omega)), np.cos(np.outer(y, omega))], axis=1)
  np.testing.assert_allclose(table, want, atol=2e-6)
