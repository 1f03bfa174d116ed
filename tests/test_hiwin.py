"""The Hiwin projector against a PyTorch re-derivation of official-spec §4, item by item.

The reference takes every item at its exact size (no canvas): `nn.Linear` level projectors,
LayerNorm(eps=1e-6), `F.interpolate` bicubic of the position table per level, the official window
boxes (float64 -> float32 -> bf16) and sample grid, RoIAlign sample by sample as torchvision does
it, zero-padding to L_max with a key_padding_mask, and `nn.MultiheadAttention` (batch_first=False,
each query token its own batch element) loaded with our weights. The JAX side gets one padded
canvas batch with mixed grids, random filler outside each item, and an empty slot.
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
from numerics import assert_close
from test_roi_align import official_pooling_size, official_window_boxes

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.torch

E, HEADS, KV = 64, 4, 16


def config(mask, attention="folded"):
  return ml_collections.ConfigDict(dict(embed_dim=E, kv_dim=KV, num_heads=HEADS, grid_size=12,
                                        feature_scale_mask=mask, layout="r1", attention=attention))


# --- the PyTorch reference ---------------------------------------------------------------------

def torch_roi_align(feat, boxes, output_size):
  """torchvision roi_align(aligned=False, sampling_ratio=-1): feat (H, W, C), boxes [K, 4]
  float32 numpy -> (K, oh, ow, C). All boxes at once: each box's gh x gw samples per bin are the
  first of a padded max(gh) x max(gw) grid, the rest masked out."""
  oh, ow = output_size
  h, w = feat.shape[:2]
  x1, y1, x2, y2 = torch.from_numpy(boxes).T[..., None, None]                   # (K, 1, 1)
  roi_w, roi_h = torch.clamp(x2 - x1, min=1.0), torch.clamp(y2 - y1, min=1.0)
  bin_h, bin_w = roi_h / oh, roi_w / ow
  gh, gw = torch.ceil(roi_h / oh), torch.ceil(roi_w / ow)                       # per box
  iy = torch.arange(int(gh.max()))[None, None, :]
  ix = torch.arange(int(gw.max()))[None, None, :]
  ys = (y1 + torch.arange(oh)[None, :, None] * bin_h) + (iy + 0.5) * bin_h / gh  # (K, oh, Gh)
  xs = (x1 + torch.arange(ow)[None, :, None] * bin_w) + (ix + 0.5) * bin_w / gw  # (K, ow, Gw)
  shape = (len(boxes), oh, ow, ys.shape[-1], xs.shape[-1])
  y, x = ys[:, :, None, :, None].expand(shape), xs[:, None, :, None, :].expand(shape)
  used = (iy < gh)[:, :, None, :, None] & (ix < gw)[:, None, :, None, :]
  inside = used & (y >= -1) & (y <= h) & (x >= -1) & (x <= w)
  y, x = y.clamp(min=0), x.clamp(min=0)
  y_low, x_low = y.floor().long(), x.floor().long()
  y_end, x_end = y_low >= h - 1, x_low >= w - 1
  y_low, x_low = torch.where(y_end, h - 1, y_low), torch.where(x_end, w - 1, x_low)
  y_high, x_high = torch.where(y_end, h - 1, y_low + 1), torch.where(x_end, w - 1, x_low + 1)
  y, x = torch.where(y_end, y_low.float(), y), torch.where(x_end, x_low.float(), x)
  ly, lx = y - y_low, x - x_low
  hy, hx = 1 - ly, 1 - lx
  val = ((hy * hx)[..., None] * feat[y_low, x_low] + (hy * lx)[..., None] * feat[y_low, x_high]
         + (ly * hx)[..., None] * feat[y_high, x_low] + (ly * lx)[..., None] * feat[y_high, x_high])
  val = torch.where(inside[..., None], val, 0.0)
  return val.sum((3, 4)) / (gh * gw)[..., None]


def torch_hiwin(params, items, scales):
  """params: our parameters as numpy (JAX layout); items: per item {s: (H_s, W_s, KV) tensor}
  -> (n_items, 144, E). Follows spec §4.3-4.5 (fp32)."""
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in params.items()}
  pos = t["pos_embed"]

  def ln(x, name):
    return F.layer_norm(x, (E,), t[f"{name}.scale"], t[f"{name}.bias"], eps=1e-6)

  keys, values = [], []
  for maps in items:
    ks, vs = [], []
    for s in scales:
      f = maps[s]
      h, w = f.shape[:2]
      x = ln(F.linear(f, t[f"features_{s}x_projector.kernel"].T,
                      t[f"features_{s}x_projector.bias"]), "ln_kv")
      pos_k = F.interpolate(pos.reshape(1, 12, 12, E).permute(0, 3, 1, 2), size=(h, w),
                            mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
      key = x + pos_k + t[f"feature_{s}x_embedding"][0]
      oh, ow = official_pooling_size(w / h)
      samples = torch_roi_align(torch.cat([key, x], -1), official_window_boxes(h, w), (oh, ow))
      samples = samples.reshape(144, oh * ow, 2 * E)
      ks.append(samples[..., :E])
      vs.append(samples[..., E:])
    keys.append(torch.cat(ks, 1))
    values.append(torch.cat(vs, 1))
  l_max = max(k.shape[1] for k in keys)
  pad = lambda a: F.pad(a, (0, 0, 0, l_max - a.shape[1]))
  k_all = torch.cat([pad(k) for k in keys])                                    # (B, L, E)
  v_all = torch.cat([pad(v) for v in values])
  key_padding_mask = torch.cat([torch.arange(l_max)[None, :].expand(144, -1) >= k.shape[1]
                                for k in keys])                                # (B, L)

  mha = torch.nn.MultiheadAttention(E, HEADS)
  with torch.no_grad():
    mha.in_proj_weight.copy_(t["attn_in_proj.kernel"].T)
    mha.in_proj_bias.copy_(t["attn_in_proj.bias"])
    mha.out_proj.weight.copy_(t["attn_out_proj.kernel"].T)
    mha.out_proj.bias.copy_(t["attn_out_proj.bias"])
  outs = []
  for k in range(1, 5):
    q = (ln(t[f"query_{k}"], "ln_q") + pos).repeat(len(items), 1)             # (B, E)
    o, _ = mha(q[None], k_all.transpose(0, 1), v_all.transpose(0, 1),
               key_padding_mask=key_padding_mask)
    outs.append(ln(o[0], "ln_proj"))
  z = F.linear(torch.cat(outs, -1), t["cat_proj.kernel"].T, t["cat_proj.bias"])
  z = ln(z, "ln_post") @ t["proj"]
  return z.reshape(len(items), 144, E).detach().numpy()


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


GRIDS = [(13, 10), (5, 14), (11, 11), (3, 6), (0, 0)]
CANVAS = (13, 14)


def canvas_batch(seed, scales):
  rng = np.random.default_rng(seed)
  hc, wc = CANVAS
  levels = {s: rng.standard_normal((len(GRIDS), s * hc, s * wc, KV)).astype(np.float32)
            for s in scales}
  items = [{s: torch.from_numpy(levels[s][n, :s * h, :s * w].copy()) for s in scales}
           for n, (h, w) in enumerate(GRIDS) if h]
  return levels, np.asarray(GRIDS, np.int32), items


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


def test_sincos_table_first_half_encodes_the_column():
  dim, g = 64, 12
  table = sincos_pos_embed(dim, g).astype(np.float64)
  omega = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
  y, x = np.divmod(np.arange(g * g), g)
  want = np.concatenate([np.sin(np.outer(x, omega)), np.cos(np.outer(x, omega)),
                         np.sin(np.outer(y, omega)), np.cos(np.outer(y, omega))], axis=1)
  np.testing.assert_allclose(table, want, atol=2e-6)
