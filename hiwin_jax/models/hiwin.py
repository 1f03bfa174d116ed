"""The Hiwin transformer: the official `AdaptSpatialResampler` (spec §4), 144 tokens per item.

Each item (a slice or an overview) brings a pyramid of feature maps (1x from the ViT, 2x and 4x
from the JBU). Every level is projected to E channels and normalised; keys add a bicubic-resized
copy of the 12x12 position table and a level embedding, values do not. Each map is cut into a
12 x 12 grid of equal windows and RoIAlign takes oh x ow samples per window (6 to 12, from the
item's aspect ratio). Query token q of four learned query sets attends to the samples of window q
on all levels through one shared `nn.MultiheadAttention`; the four results are concatenated and
projected to the LLM width.

Items arrive as canvases: item n's level-s map is the top-left (s*h_n, s*w_n) of a static
[N, s*Hc, s*Wc, kv_dim] array, with (h_n, w_n) a run-time value, so one compiled program serves
any mix of grids that fits the canvas. Everything outside an item's region gets zero RoIAlign
weight (and is zeroed before sampling, so even non-finite filler cannot leak in). A (0, 0) grid
is an empty slot: it is computed as a 1 x 1 grid and its output is finite garbage.

Precision: with float32 compute everything is float32, the window boxes included (the official
rounds them to the feature dtype, which is then float32). With bfloat16 compute the casts follow
the official bf16 projector (spec §4.3, §10.16, §10.22): the level projections (every level's
input is a non-contiguous view in the official, so product and bias round separately), LayerNorm
outputs, key sums (left to right) and attention in bf16; the key position table resized in
float32 and rounded to bf16; the window boxes rounded to bf16; RoIAlign in float32 on the bf16
maps, its samples rounded to bf16; attention logits rounded to bf16 like torch's baddbmm output,
then softmax in float32 (torch's bf16 softmax accumulates in float32 too) rounded to bf16. Each
of these roundings goes through `layers.round_to`, which XLA cannot drop under jit: the
official-attention forward then differs from torch's bf16 CPU run on ~3% of its outputs
(tests/test_hiwin.py), all from float32 summation orders.

Parameter names follow the official state dict one to one (`attn.in_proj_weight` [3E, E] is
`attn_in_proj.kernel` [E, 3E], rows q|k|v; `proj` is used as `x @ proj` in both).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hiwin_jax.models import resize
from hiwin_jax.models.layers import (LayerNorm, Linear, Precision, add, biased_matmul,
                                     checkpoint_name, normal_init, param, round_to, rounded,
                                     scaled)
from hiwin_jax.models.roi_align import (MAX_POOL, pooling_size, window_slots, window_weights)

_F32 = jnp.float32
LEVEL_SCALES = (1, 2, 4, 8)  # every level has parameters; the 4x JBU stack feeds 1x, 2x, 4x
NUM_QUERY_SETS = 4


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
  """MAE's 2-D sin-cos table [grid * grid, dim] in float32 numpy, row-major over (y, x).

  Row y * grid + x is [sin(x w), cos(x w), sin(y w), cos(y w)] with w_k = 10000^(-k / (dim/4)):
  the first half encodes the column, because MAE's meshgrid(grid_w, grid_h) puts w first."""
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs a multiple of 4 channels, got {dim}")
  pos = np.arange(grid, dtype=np.float32)
  col, row = np.meshgrid(pos, pos)  # col[y, x] = x

  def one_axis(coord):
    omega = np.arange(dim // 4, dtype=np.float32) / np.float32(dim / 4)
    omega = np.float32(1.0) / np.float32(10000) ** omega
    angle = coord.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

  return np.concatenate([one_axis(col), one_axis(row)], axis=1).astype(np.float32)


class HiwinProjector(nnx.Module):
  """`AdaptSpatialResampler` v2 forward (`forward_with_featup` minus the VDIM), spec §4.1-4.5.

  cfg: embed_dim E, kv_dim (the ViT width), num_heads, grid_size (12), feature_scale_mask.
  """

  def __init__(self, cfg, precision: Precision, *, rngs: nnx.Rngs):
    e, kv, g = int(cfg.embed_dim), int(cfg.kv_dim), int(cfg.grid_size)
    mask = int(cfg.feature_scale_mask)
    if not mask & 7 or mask & ~7:
      raise ValueError(f"feature_scale_mask {mask} must select levels among 1x/2x/4x (bits 1, 2, "
                       f"4): the 4x JBU stack has no 8x level")
    if e % cfg.num_heads:
      raise ValueError(f"embed_dim {e} is not divisible by num_heads {cfg.num_heads}")
    self.embed_dim, self.grid_size, self.num_heads = e, g, int(cfg.num_heads)
    self.attention = cfg.get("attention", "folded")
    if self.attention not in ("folded", "official"):
      raise ValueError(f"projector attention {self.attention!r}: choose 'folded' or 'official'")
    self.scales = tuple(s for s in (1, 2, 4) if mask & s)
    self.precision = precision
    pd = precision.param_dtype
    q = g * g

    def table(key, shape, dtype):
      return jnp.asarray(sincos_pos_embed(shape[1], g), dtype)

    def linear(n_in, n_out, axes, *, bias=True, init=normal_init(0.02), fused_bias=True):
      return Linear(n_in, n_out, axes=axes, use_bias=bias, precision=precision, rngs=rngs,
                    kernel_init=init, fused_bias=fused_bias)

    def norm():
      return LayerNorm(e, eps=1e-6, axis_name="norm", precision=precision)

    # timm's trunc_normal_(std=0.02) cuts at +-2 absolute (100 sigma): a plain normal here.
    self.pos_embed = param(None, table, (q, e), pd, (None, "embed"))
    self.query = param(rngs, normal_init(0.02), (q, e), pd, (None, "embed"))  # v1 path only
    self.kv_proj = linear(kv, e, ("vision_embed", "embed"), bias=False)     # v1 path only
    for s in LEVEL_SCALES:
      setattr(self, f"feature_{s}x_embedding",
              param(None, jax.nn.initializers.zeros, (1, 1, e), pd, (None, None, "embed")))
    for k in range(1, NUM_QUERY_SETS + 1):
      setattr(self, f"query_{k}", param(rngs, normal_init(0.02), (q, e), pd, (None, "embed")))
    # The official projects `level.permute(0, 2, 3, 1)` of NCHW-contiguous maps (the JBU's outputs,
    # and the 1x map after `torch.cat`, which gives the ViT's channels-last view NCHW strides): a
    # non-contiguous input, where torch's F.linear rounds the bf16 product before adding the bias
    # (`Linear.fused_bias`).
    for s in LEVEL_SCALES:
      setattr(self, f"features_{s}x_projector",
              linear(kv, e, ("vision_embed", "embed"), fused_bias=False))
    self.attn_in_proj = linear(e, 3 * e, ("embed", "heads"),
                               init=jax.nn.initializers.xavier_uniform())
    self.attn_out_proj = linear(e, e, ("heads", "embed"))
    self.ln_q, self.ln_kv, self.ln_proj, self.ln_post = norm(), norm(), norm(), norm()
    self.cat_proj = linear(NUM_QUERY_SETS * e, e, ("embed", "embed"))
    self.proj = param(rngs, normal_init(e ** -0.5), (e, e), pd, ("embed", "embed"))

  def __call__(self, levels: dict[int, jax.Array], grid: jax.Array) -> jax.Array:
    """levels: {s: [N, s*Hc, s*Wc, kv_dim]} for the selected scales, grid: [N, 2] int32 (h, w)
    -> [N, G*G, E] in the compute dtype, tokens row-major over the G x G query grid."""
    grid = jnp.asarray(grid, jnp.int32)
    h, w = jnp.maximum(grid[:, 0], 1), jnp.maximum(grid[:, 1], 1)
    oh, ow = pooling_size(h, w)              # every level of an item has the same aspect ratio
    slot_index, slot_valid = window_slots(oh, ow)                            # [N, 12] each
    keys, values = [], []
    for s in self.scales:
      if s not in levels:
        raise ValueError(f"feature_scale_mask selects the {s}x level but levels has only "
                         f"{sorted(levels)}")
      k, v = self._level_samples(s, levels[s], s * h, s * w, oh, ow, slot_index)
      keys.append(k)
      values.append(v)
    valid = jnp.tile(slot_valid, (1, len(self.scales)))                      # [N, L]
    return self._attend(jnp.concatenate(keys, axis=2), jnp.concatenate(values, axis=2), valid)

  def _level_samples(self, s, features, height, width, oh, ow, slot_index):
    """One level: features [N, Hc', Wc', kv_dim], the items' map sizes height, width [N] ->
    keys, values [N, G*G, 12, E] (slot j of window q is bin (j // ow, j % ow) of its samples)."""
    p = self.precision
    dt, e, g = p.dtype, self.embed_dim, self.grid_size
    n, hc, wc, _ = features.shape
    x = self.ln_kv(getattr(self, f"features_{s}x_projector")(features))      # [N, Hc', Wc', E]
    table = self.pos_embed[...].reshape(g, g, e).astype(_F32)
    pos = round_to(resize.resize_table_per_item(table, height, width, (hc, wc)), dt)
    key = add(add(x, pos), getattr(self, f"feature_{s}x_embedding")[...][0].astype(dt))
    inside = ((jnp.arange(hc)[None, :, None] < height[:, None, None])
              & (jnp.arange(wc)[None, None, :] < width[:, None, None]))      # [N, Hc', Wc']
    maps = jnp.where(inside[None, ..., None], jnp.stack([key, x]), jnp.zeros((), dt))

    ay, ax = jax.vmap(lambda *a: window_weights(*a, canvas_hw=(hc, wc), grid=g, dtype=dt))(
        height, width, oh, ow)                           # [N, G, 4, Hc'], [N, G, 4, Wc']
    # RoIAlign of all windows as two contractions; float32 like the official `level.float()`.
    rows = jnp.einsum("nrpy,tnyxe->tnrpxe", ay, maps, precision=p.matmul,
                      preferred_element_type=_F32)
    bins = jnp.einsum("ncqx,tnrpxe->tnrcpqe", ax, rows, precision=p.matmul,
                      preferred_element_type=_F32)
    bins = bins.reshape(2, n, g * g, MAX_POOL * MAX_POOL, e)
    samples = round_to(jnp.take_along_axis(bins, slot_index[None, :, None, :, None], axis=3), dt)
    return samples[0], samples[1]

  def _attend(self, keys, values, valid):
    """keys, values: [N, Q, L, E], valid: [N, L] -> [N, Q, E]: torch's MultiheadAttention with
    every query token its own batch element (sequence length 1) over its window's samples."""
    p = self.precision
    dt, e, nh = p.dtype, self.embed_dim, self.num_heads
    n, q, l, _ = keys.shape
    hd = e // nh
    w_in = self.attn_in_proj.kernel[...].astype(dt)
    b_in = self.attn_in_proj.bias[...]

    def in_proj(x, i):
      # torch's MHA projects the contiguous queries with addmm (one rounding) and the transposed
      # (non-contiguous) keys and values with matmul + add_ (two).
      cols = slice(i * e, (i + 1) * e)
      return biased_matmul(x, w_in[:, cols], b_in[cols], p, fused=i == 0)

    pos = self.pos_embed[...].astype(dt)
    queries = jnp.stack([add(self.ln_q(getattr(self, f"query_{k}")[...]), pos)
                         for k in range(1, NUM_QUERY_SETS + 1)])              # [S, Q, E]
    # torch scales q after the in-projection, by sqrt(1 / head_dim) (a Python float).
    qh = scaled(checkpoint_name(in_proj(queries, 0), "query_proj"), math.sqrt(1.0 / hd))
    qh = qh.reshape(NUM_QUERY_SETS, q, nh, hd)
    mask = valid[:, None, None, None, :]
    if self.attention == "official":
      kh = checkpoint_name(in_proj(keys.astype(dt), 1), "key_proj").reshape(n, q, l, nh, hd)
      vh = checkpoint_name(in_proj(values.astype(dt), 2), "value_proj").reshape(n, q, l, nh, hd)
      logits = rounded(jnp.einsum("sqhd,nqlhd->nsqhl", qh, kh, precision=p.matmul,
                                  preferred_element_type=_F32), dt)
      # Every item has >= 6 valid samples per window, so no row is fully masked.
      probs = round_to(jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1), dt)
      ctx = round_to(jnp.einsum("nsqhl,nqlhd->nsqhd", probs, vh, precision=p.matmul), dt)
    else:
      # The same attention with the k/v in-projections moved off the N*144*L samples:
      # q.(W_k x + b_k) = (W_k^T q).x + q.b_k, and the last term is one constant per query, which
      # the softmax cancels; sum_l p_l (W_v x_l + b_v) = W_v (sum_l p_l x_l) + b_v as sum_l p_l = 1.
      # The queries do not depend on the item, so W_k^T q is computed once (~12x fewer FLOPs at
      # E=4096; equal in exact arithmetic, rounded differently in bf16).
      wk = w_in[:, e:2 * e].reshape(e, nh, hd)
      wv = w_in[:, 2 * e:].reshape(e, nh, hd)
      qk = round_to(jnp.einsum("sqhd,ehd->sqhe", qh, wk, precision=p.matmul), dt)  # [S, Q, H, E]
      logits = rounded(jnp.einsum("sqhe,nqle->nsqhl", qk, keys.astype(dt), precision=p.matmul,
                                  preferred_element_type=_F32), dt)
      probs = round_to(jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1), dt)
      mixed = round_to(jnp.einsum("nsqhl,nqle->nsqhe", probs, values.astype(dt),
                                  precision=p.matmul), dt)
      ctx = round_to(jnp.einsum("nsqhe,ehd->nsqhd", mixed, wv, precision=p.matmul,
                                preferred_element_type=_F32)
                     + rounded(b_in[2 * e:].reshape(nh, hd), dt), dt)
    ctx = checkpoint_name(ctx.reshape(n, NUM_QUERY_SETS, q, e), "context")
    out = self.ln_proj(self.attn_out_proj(ctx))                              # [N, S, Q, E]
    z = jnp.moveaxis(out, 1, 2).reshape(n, q, NUM_QUERY_SETS * e)            # q1 | q2 | q3 | q4
    z = self.ln_post(self.cat_proj(z))
    return round_to(jnp.matmul(z, self.proj[...].astype(dt), precision=p.matmul), dt)
