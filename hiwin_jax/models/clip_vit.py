"""CLIP ViT-L/14-336 vision tower as LLaVA-UHD v2 uses it (official-spec §2).

One compiled program encodes a padded batch of images with different patch grids: every item sits
at the top-left of a shared canvas, its (h, w) grid is a run-time value, its tokens are gathered
row-major from the canvas, its position table is bicubic-resized to (h, w) at run time, and padded
tokens are masked out of attention. The output is `hidden_states[select_layer]` without the CLS row,
as `CLIPVisionModel(..., output_hidden_states=True).hidden_states[-2][:, 1:]` gives it for each
image alone.

Parameter names mirror HF's `CLIPVisionModel` so that `hiwin_jax/convert/hf_clip.py` reads
naturally.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hiwin_jax.models import resize
from hiwin_jax.models.layers import (LayerNorm, Linear, Precision, checkpoint_name, normal_init,
                                     param, scan_layers, stack_layers)
from hiwin_jax.parallel.sharding import constrain

_ACTIVATION = ("batch", None, None)


def quick_gelu(x: jax.Array) -> jax.Array:
  """transformers' `QuickGELUActivation`: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def select_index(select_layer: int, num_layers: int) -> int:
  """Index into HF's `hidden_states` (length num_layers + 1) = number of encoder layers to run."""
  k = select_layer + num_layers + 1 if select_layer < 0 else select_layer
  if not 0 <= k <= num_layers:
    raise ValueError(f"select_layer {select_layer} is outside hidden_states of a "
                     f"{num_layers}-layer encoder (valid: {-num_layers - 1}..{num_layers})")
  return k


class ClipAttention(nnx.Module):
  """transformers' `CLIPAttention` (eager, dropout 0) with an additive key mask."""

  def __init__(self, cfg, precision: Precision, *, rngs: nnx.Rngs):
    c = cfg.hidden_size
    if c % cfg.num_heads:
      raise ValueError(f"hidden_size {c} is not divisible by num_heads {cfg.num_heads}")
    self.num_heads = cfg.num_heads
    self.head_dim = c // cfg.num_heads
    self.precision = precision

    def proj(axes):
      return Linear(c, c, axes=axes, use_bias=True, precision=precision, rngs=rngs)

    self.q_proj = proj(("vision_embed", "vision_heads"))
    self.k_proj = proj(("vision_embed", "vision_heads"))
    self.v_proj = proj(("vision_embed", "vision_heads"))
    self.out_proj = proj(("vision_heads", "vision_embed"))

  def __call__(self, x: jax.Array, key_bias: jax.Array) -> jax.Array:
    """x: [N, T, C], key_bias: [N, 1, 1, T] float32 (0 or finfo.min) -> [N, T, C]."""
    p = self.precision
    n, t, _ = x.shape

    def heads(y):
      return y.reshape(n, t, self.num_heads, self.head_dim)

    # The official (transformers 4.37) scales q after the projection, before q.k.
    q = heads(checkpoint_name(self.q_proj(x), "query_proj") * self.head_dim ** -0.5)
    k = heads(checkpoint_name(self.k_proj(x), "key_proj"))
    v = heads(checkpoint_name(self.v_proj(x), "value_proj"))
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, precision=p.matmul,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits + key_bias, axis=-1).astype(p.dtype)
    ctx = jnp.einsum("nhqk,nkhd->nqhd", probs, v, precision=p.matmul).reshape(n, t, -1)
    ctx = checkpoint_name(ctx, "context")
    return checkpoint_name(self.out_proj(ctx), "out_proj")


class ClipMlp(nnx.Module):
  """transformers' `CLIPMLP`: fc2(quick_gelu(fc1(x)))."""

  def __init__(self, cfg, precision: Precision, *, rngs: nnx.Rngs):
    self.fc1 = Linear(cfg.hidden_size, cfg.mlp_dim, axes=("vision_embed", "vision_mlp"),
                      use_bias=True, precision=precision, rngs=rngs)
    self.fc2 = Linear(cfg.mlp_dim, cfg.hidden_size, axes=("vision_mlp", "vision_embed"),
                      use_bias=True, precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, T, C] -> [N, T, C]."""
    h = quick_gelu(checkpoint_name(self.fc1(x), "mlp_in"))
    return checkpoint_name(self.fc2(h), "mlp_out")


class ClipEncoderLayer(nnx.Module):
  """transformers' `CLIPEncoderLayer`: pre-LN attention and MLP blocks with residuals."""

  def __init__(self, cfg, precision: Precision, *, rngs: nnx.Rngs):
    def norm():
      return LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, axis_name="norm",
                       precision=precision)

    self.layer_norm1 = norm()
    self.self_attn = ClipAttention(cfg, precision, rngs=rngs)
    self.layer_norm2 = norm()
    self.mlp = ClipMlp(cfg, precision, rngs=rngs)

  def __call__(self, x: jax.Array, key_bias: jax.Array) -> jax.Array:
    """x: [N, T, C], key_bias: [N, 1, 1, T] -> [N, T, C]."""
    x = constrain(x, _ACTIVATION)
    x = x + self.self_attn(self.layer_norm1(x), key_bias)
    return x + self.mlp(self.layer_norm2(x))


class ClipVisionTower(nnx.Module):
  """Patch/CLS/position embeddings, pre-LN, and the encoder up to `cfg.select_layer`."""

  def __init__(self, cfg, precision: Precision, *, rngs: nnx.Rngs):
    # Plain static fields, not the ConfigDict: a GraphDef must be hashable (nnx.jit, caches).
    self.patch_size, self.num_channels, self.remat = cfg.patch_size, cfg.num_channels, cfg.remat
    self.precision = precision
    c, p, ch = cfg.hidden_size, cfg.patch_size, cfg.num_channels
    if cfg.image_size % p:
      raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {p}")
    self.grid_size = cfg.image_size // p
    self.num_layers_run = select_index(cfg.select_layer, cfg.num_layers)
    pd = precision.param_dtype
    self.patch_embedding = param(rngs, normal_init(), (p, p, ch, c), pd,
                                 (None, None, None, "vision_embed"))
    self.class_embedding = param(rngs, normal_init(c ** -0.5), (c,), pd, ("vision_embed",))
    self.position_embedding = param(rngs, normal_init(), (self.grid_size ** 2 + 1, c), pd,
                                    ("vision_pos", "vision_embed"))
    self.pre_layrnorm = LayerNorm(c, eps=cfg.layer_norm_eps, axis_name="norm", precision=precision)
    self.layers = stack_layers(lambda r: ClipEncoderLayer(cfg, precision, rngs=r),
                               cfg.num_layers, rngs)
    # Only feeds HF's pooled output, which LLaVA never reads; kept so checkpoints round-trip.
    self.post_layernorm = LayerNorm(c, eps=cfg.layer_norm_eps, axis_name="norm",
                                    precision=precision)

  def __call__(self, pixels: jax.Array, grid: jax.Array | None = None,
               num_tokens: int | None = None) -> tuple[jax.Array, jax.Array]:
    """pixels: [N, Hp, Wp, 3], grid: [N, 2] int32 (h, w) or None -> ([N, L, C], valid [N, L]).

    Item n's image fills the top-left (14h, 14w) of the canvas; h <= Hp/14 and w <= Wp/14, and
    L = `num_tokens` (default Hp*Wp/14^2) must be >= h*w (not checkable on traced values: tokens
    past L are dropped). A (0, 0) grid is an empty slot: all its tokens are invalid.
    """
    n, hp, wp, _ = pixels.shape
    p = self.patch_size
    if hp % p or wp % p:
      raise ValueError(f"canvas {hp}x{wp} is not a multiple of the patch size {p}")
    gh, gw = hp // p, wp // p
    num_tokens = gh * gw if num_tokens is None else int(num_tokens)
    if grid is None:
      if num_tokens < gh * gw:
        raise ValueError(f"num_tokens {num_tokens} < {gh}x{gw} patches of a full canvas")
      grid = jnp.broadcast_to(jnp.array([gh, gw], jnp.int32), (n, 2))
      gather = num_tokens != gh * gw
    else:
      grid = jnp.asarray(grid, jnp.int32)
      gather = True
    h, w = grid[:, 0], grid[:, 1]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    valid = t[None, :] < (h * w)[:, None]                                       # [N, L]
    row = jnp.minimum(t[None, :] // jnp.maximum(w, 1)[:, None], gh - 1)          # [N, L]
    col = t[None, :] % jnp.maximum(w, 1)[:, None]                                # [N, L]

    x = self._embed(pixels, row, col, valid, gather)                            # [N, L, C]
    pos = self._patch_positions(h, w, row, col, gh, gw)                         # [N, L, C]
    dt = self.precision.dtype
    table = self.position_embedding[...]
    cls = (self.class_embedding[...] + table[0]).astype(dt)
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, cls.shape[-1])), x + pos.astype(dt)],
                        axis=1)                                                  # [N, 1+L, C]
    x = constrain(self.pre_layrnorm(x), _ACTIVATION)
    seq_valid = jnp.concatenate([jnp.ones((n, 1), bool), valid], axis=1)        # [N, 1+L]
    # The official pads each pre-LN'd sequence with zeros, so padded rows enter layer 1 as 0.
    x = jnp.where(seq_valid[..., None], x, jnp.zeros((), x.dtype))
    # transformers' _prepare_4d_attention_mask: finfo(dtype).min on padded keys, every query.
    key_bias = jnp.where(seq_valid, 0.0, jnp.finfo(dt).min).astype(jnp.float32)[:, None, None, :]

    if self.num_layers_run:
      def body(layer, carry, _):
        return layer(carry, key_bias), None

      x, _ = scan_layers(self.layers, body, x, remat=self.remat,
                         num_layers=self.num_layers_run)
    return x[:, 1:], valid

  def _embed(self, pixels, row, col, valid, gather) -> jax.Array:
    """`Conv2d(3, C, k=p, s=p, bias=False)` + flatten(2).transpose(1, 2), per item's own grid.

    pixels: [N, Hp, Wp, 3], row/col/valid: [N, L] -> [N, L, C]; invalid tokens are zero patches.
    """
    p, ch = self.patch_size, self.num_channels
    n, hp, wp, _ = pixels.shape
    gh, gw = hp // p, wp // p
    patches = pixels.reshape(n, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, gh * gw, p * p * ch)                            # [N, gh*gw, K]
    if gather:
      src = jnp.where(valid, row * gw + col, 0)
      patches = jnp.take_along_axis(patches, src[..., None], axis=1)             # [N, L, K]
      patches = jnp.where(valid[..., None], patches, jnp.zeros((), patches.dtype))
    dt = self.precision.dtype
    kernel = self.patch_embedding[...].reshape(p * p * ch, -1)                   # HWIO -> [K, C]
    return jnp.matmul(patches.astype(dt), kernel.astype(dt), precision=self.precision.matmul)

  def _patch_positions(self, h, w, row, col, gh, gw) -> jax.Array:
    """Patch rows of the position table resized to each item's (h, w), in the parameter dtype.

    `F.interpolate(table[1:].reshape(1, G, G, C).permute(0, 3, 1, 2), size=(h, w), mode='bicubic',
    align_corners=False)` flattened row-major, with (h, w) traced. Like torch, the weights are
    rounded to the parameter dtype, the arithmetic runs in float32 (float64 for float64), each
    output is sum_j wy_j * (sum_i wx_i * T[y_j, x_i]), and the result is rounded once.
    h, w: [N]; row, col: [N, L] (row < gh, col < gw) -> [N, L, C]. A 24x24 grid gets the table
    exactly (weights 0, 1, 0, 0), which is what the official code's skip of the resize gives.
    """
    g = self.grid_size
    pd = self.precision.param_dtype
    op = jnp.promote_types(pd, jnp.float32)
    table = self.position_embedding[...][1:].reshape(g, g, -1).astype(op)      # [G, G, C]
    canvas = resize.resize_table_per_item(table, h, w, (gh, gw), pd)           # [N, gh, gw, C]
    items = jnp.arange(h.shape[0])[:, None]
    out = canvas[items, row, col]                                               # [N, L, C]
    return out.astype(pd)
