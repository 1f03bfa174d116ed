"""The Visual Detail Injection Module (VDIM): FeatUp's joint bilateral upsampler (spec §3).

`JBULearnedRange` doubles a feature map's resolution: each output pixel is a learned 7x7 kernel
(a softmax range kernel over projected guidance pixels, times a spatial Gaussian, normalised, then
nudged by a small MLP) applied to the bicubically upsampled features. `JBUStack` chains these
steps, pooling fresh guidance from the full-resolution pixels for each level, and adds a 1x1-conv
fix-up to the last level only. Everything is NHWC.

Canvas mode (`grid=` given): items of different patch grids share one padded canvas, item n at
the top-left with its (h_n, w_n) a run-time value, so one compiled program serves a bucket of
grids. Only three steps depend on the item's size, and those become per-item index maps: the
reflect padding of the range keys and of the upsampled features mirrors at the item's border,
and the bicubic x2 clamps its taps into the item (`resize.reflect_pad_per_item`,
`resize.upsample2x_bicubic`). The guidance pooling needs no change: from 14h to s*h (s = 2, 4,
8) torch's windows [floor(i 14/s), ceil((i+1) 14/s)) do not depend on h, so pooling the whole
canvas gives every item its own pooling. Inside each item's valid region (s h_n, s w_n) the
outputs are those of the item alone; elsewhere they are finite and meaningless.

Precision: in float32 every step is float32. With a bfloat16 compute dtype the casts happen at
exactly the points where the official bf16 projector casts (spec §3.6): inputs, pooling, range
projection, logits and softmax in bf16 (statistics accumulated in float32, then rounded); `R * S`
and the normalisation in float32; the kernel MLP in bf16 with `0.1 * fixup` rounded to bf16 before
it is added to the float32 kernel; bicubic in bf16; the adaptive convolution in float32; each
level's output rounded to bf16; the stack's fix-up in bf16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hiwin_jax.kernels.adaptive_conv import adaptive_conv, adaptive_conv_sharded
from hiwin_jax.models.layers import (Linear, Precision, add, divide, param, round_to,
                                     rounded, scaled)
from hiwin_jax.models.resize import (adaptive_avg_pool2d, reflect_pad, reflect_pad_per_item,
                                     resize_bicubic, upsample2x_bicubic)
from hiwin_jax.parallel import sharding

_F32 = jnp.float32
_TENTH = np.float32(0.1)  # torch multiplies a bf16 tensor by the Python 0.1 in float32 opmath


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps)` in float32: the first half counts up from `start`, the
  second half down from `end`, each value one fused multiply-add (`end - step * k` rounded once;
  the middle of linspace(-1, 1, 7) is -2.98e-8, not 0)."""
  step = np.float64(np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1)))
  i = np.arange(steps, dtype=np.float64)
  # float64 holds step * k and the sum exactly, so one rounding to float32 equals the FMA.
  values = np.where(i < steps // 2, np.float32(start) + step * i,
                    np.float32(end) - step * (steps - 1 - i))
  return values.astype(np.float32)


def dropout2d(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """`torch.nn.Dropout2d(rate)` on NHWC `x: [B, H, W, C]`: in training (`rng` given) zero whole
  channels per (sample, channel) with probability `rate`, scale survivors by 1/(1-rate) (the
  scale is rounded to x's dtype, as torch's noise tensor is); identity when `rng` is None."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0], 1, 1, x.shape[-1]))
  return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


def _gelu(x: jax.Array) -> jax.Array:
  """`torch.nn.GELU()` (exact erf form), computed in float32 and rounded to x's dtype."""
  return round_to(jax.nn.gelu(x.astype(_F32), approximate=False), x.dtype)


def _conv1x1(in_features: int, out_features: int, axes, precision: Precision,
             rngs: nnx.Rngs) -> Linear:
  """A `Conv2d(in, out, 1)` as a Linear, with torch's default init U(+-1/sqrt(fan_in)) for the
  kernel and the bias (so VDIM pre-training from scratch starts where the official one did)."""
  bound = 1.0 / math.sqrt(in_features)

  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  layer = Linear(in_features, out_features, axes=axes, use_bias=True, precision=precision,
                 rngs=rngs, kernel_init=init)
  layer.bias = param(rngs, init, (out_features,), precision.param_dtype, (axes[1],))
  return layer


def _range_logits(padded: jax.Array, keys: jax.Array, diameter: int) -> jax.Array:
  """padded: [B, H+2r, W+2r, c], keys: [B, H, W, c] -> [B, H, W, d^2] with
  logits[..., d a + b] = sum_c padded[:, y+a, x+b] * keys[:, y, x], one row offset a per step.

  The row offsets run in a fori_loop, so only one [B, H, W, d, c] block of neighbours is live:
  stacking all 49 shifted slices materialised [B, H, W, 49, c], 386 MiB at the 4x level (B=7,
  96x96, c=32), the largest buffer of the whole forward. Each step is rematerialised in the
  backward pass (jax.checkpoint), so the residuals stay (padded, keys). The per-pixel sums keep
  the 7-wide stack-and-reduce form: one slice-reduction per tap made the canvas and single-item
  programs round ~1e-6 apart, and an unrolled loop of 49 of them compiles ~10x slower."""
  n, h, w, c = keys.shape
  d = diameter

  @jax.checkpoint
  def row(a, padded, keys):
    slab = jax.lax.dynamic_slice(padded, (0, a, 0, 0), (n, h, w + d - 1, c))
    neighbours = jnp.stack([slab[:, :, b:b + w] for b in range(d)], axis=-2)  # [B, H, W, d, c]
    return jnp.sum(neighbours * keys[:, :, :, None, :], axis=-1)

  def body(a, logits):
    return jax.lax.dynamic_update_slice(logits, row(a, padded, keys)[:, :, :, None],
                                        (0, 0, 0, a, 0))

  logits = jax.lax.fori_loop(0, d, body, jnp.zeros((n, h, w, d, d), keys.dtype))
  return logits.reshape(n, h, w, d * d)


def check_grid(h: int, w: int, what: str = "JBU source") -> None:
  """Reflect padding by 3 of the 2x upsampled map needs 2h, 2w >= 4; the official code crashes."""
  if h < 2 or w < 2:
    raise ValueError(f"{what} grid (h, w) = ({h}, {w}) is too small: the JBU needs h, w >= 2 "
                     f"(reflect padding by 3 of the 2x upsampled {2 * h}x{2 * w} map needs >= 4)")


def check_canvas_grid(grid, hc: int, wc: int) -> jax.Array:
  """grid: [N, 2] int per-item (h, w) in an (hc, wc) canvas -> grid as int32.

  The canvas must hold a valid item (`check_grid`). A concrete (host) grid is checked item by
  item: each is an empty slot (0, 0) or has 2 <= h <= hc, 2 <= w <= wc. A traced grid cannot be
  checked; the data pipeline must have run this check (or `check_grid`) on the host. An invalid
  traced item (h or w < 2, where the official code crashes) still yields finite values, all
  confined to its own batch row, which callers must ignore."""
  check_grid(hc, wc, "JBU canvas")
  if isinstance(grid, jax.core.Tracer):
    return grid.astype(jnp.int32)
  g = np.asarray(grid)
  if g.ndim != 2 or g.shape[1] != 2:
    raise ValueError(f"grid {g.shape} must be [N, 2] per-item (h, w)")
  for n, (h, w) in enumerate(g.tolist()):
    if (h, w) != (0, 0):
      check_grid(h, w, f"JBU item {n}")
      if h > hc or w > wc:
        raise ValueError(f"JBU item {n} grid (h, w) = ({h}, {w}) exceeds the {hc}x{wc} canvas")
  return jnp.asarray(g, jnp.int32)


class JBULearnedRange(nnx.Module):
  """FeatUp's `JBULearnedRange(guidance_dim, feat_dim, key_dim, scale=2, radius)`: one 2x step.

  Parameter names follow the official Sequential indices (`range_proj.0` -> `range_proj_0`).
  `conv_impl` selects the adaptive-conv implementation (`kernels.adaptive_conv`): "auto" (the
  default) is the Pallas kernel of the platform the program is lowered for (TPU: pallas_tpu,
  CUDA: pallas_gpu) and xla elsewhere. Under a mesh with logical-axis rules
  (`sharding.use_rules`), a Pallas impl runs in a `shard_map` over the mesh axes of the
  `batch` rule (`pallas_call` cannot be partitioned by XLA); the xla impl partitions itself.
  `official_grad_bug=True` reproduces the official CUDA `grad_filters` bug (spec §3.4): the
  conv's filter cotangent keeps only taps 0, 1, 4, 9, 16, 25, 36 (the other 42 get zero), and so
  does every gradient that flows through the filters (range projection, `range_temp`,
  `sigma_spatial`, kernel fix-up). The forward and the source gradient are unchanged. Only for
  reproducing the official VDIM pre-training; the default is the correct gradient.
  """

  def __init__(self, feat_dim: int, *, guidance_dim: int = 3, key_dim: int = 32, radius: int = 3,
               precision: Precision, conv_impl: str = "auto", official_grad_bug: bool = False,
               rngs: nnx.Rngs):
    if radius != 3:
      raise ValueError(f"radius {radius}: the adaptive convolution is a 7x7 (radius 3) kernel")
    self.feat_dim = feat_dim
    self.radius = radius
    self.diameter = 2 * radius + 1
    taps = self.diameter ** 2
    self.precision = precision
    self.conv_impl = conv_impl
    self.official_grad_bug = bool(official_grad_bug)
    scalar = lambda v: param(rngs, jax.nn.initializers.constant(v), (), precision.param_dtype, ())
    self.range_temp = scalar(0.0)
    self.range_proj_0 = _conv1x1(guidance_dim, key_dim, (None, None), precision, rngs)
    self.range_proj_3 = _conv1x1(key_dim, key_dim, (None, None), precision, rngs)
    self.fixup_proj_0 = _conv1x1(taps + guidance_dim, taps, (None, None), precision, rngs)
    self.fixup_proj_3 = _conv1x1(taps, taps, (None, None), precision, rngs)
    self.sigma_spatial = scalar(1.0)

  def spatial_kernel(self) -> jax.Array:
    """S[7a+b] = exp(-(t_a^2 + t_b^2) / (2 sigma^2)), t = linspace(-1, 1, 7): [49] float32.
    2 sigma^2 is a 0-d value in the compute dtype (bf16-rounded in a bf16 module)."""
    t = _torch_linspace_f32(-1.0, 1.0, self.diameter)
    d2 = (t[:, None] ** 2 + t[None, :] ** 2).reshape(-1)
    sigma = self.sigma_spatial[...].astype(self.precision.dtype)
    return jnp.exp(divide(-jnp.asarray(d2), (2 * sigma ** 2).astype(_F32)))

  def range_kernel(self, guidance: jax.Array, rng: jax.Array | None,
                   valid: jax.Array | None = None) -> jax.Array:
    """guidance: [B, H, W, 3] -> softmax over the 49 taps of tau * <key(y+a-3, x+b-3), key(y, x)>,
    [B, H, W, 49] in the compute dtype. `valid`: [B, 2] per-item guidance (H, W) in canvas mode,
    where the keys reflect at each item's border."""
    cd = self.precision.dtype
    keys = self.range_proj_3(dropout2d(_gelu(self.range_proj_0(guidance)), 0.1, rng))
    padded = (reflect_pad(keys, self.radius) if valid is None
              else reflect_pad_per_item(keys, self.radius, valid)).astype(_F32)
    logits = round_to(_range_logits(padded, keys.astype(_F32), self.diameter), cd)
    tau = jnp.clip(jnp.exp(self.range_temp[...].astype(cd)), 1e-4, 1e4)
    # torch multiplies in the compute dtype: the float32 product of two bf16 values is exact,
    # `rounded` is torch's rounding of it, which XLA would otherwise skip inside the softmax.
    return round_to(jax.nn.softmax(rounded(tau.astype(_F32) * logits.astype(_F32), cd),
                                   axis=-1), cd)

  def filters(self, guidance: jax.Array, dropout_rng: jax.Array | None = None,
              valid: jax.Array | None = None) -> jax.Array:
    """guidance: [B, H, W, 3] -> the adaptive-conv kernel [B, H, W, 49] float32, tap 7a+b.
    `valid`: [B, 2] per-item guidance (H, W) in canvas mode."""
    cd = self.precision.dtype
    guidance = guidance.astype(cd)
    rng_range, rng_fixup = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    kernel = self.range_kernel(guidance, rng_range, valid).astype(_F32) * self.spatial_kernel()
    # The 49 taps summed in tap order, one float32 add at a time: a fixed order, so the canvas
    # and single-item programs round alike (XLA's reduction order follows the shape); divided
    # exactly, as torch divides (XLA would multiply by the reciprocal).
    total = kernel[..., 0]
    for tap in range(1, kernel.shape[-1]):
      total = total + kernel[..., tap]
    kernel = divide(kernel, jnp.maximum(total, 1e-7)[..., None])
    fix_in = jnp.concatenate([round_to(kernel, cd), guidance], axis=-1)
    fix = self.fixup_proj_3(dropout2d(_gelu(self.fixup_proj_0(fix_in)), 0.1, rng_fixup))
    return kernel + scaled(fix, _TENTH).astype(_F32)  # no renormalisation, as in the official

  def __call__(self, source: jax.Array, guidance: jax.Array, *, grid: jax.Array | None = None,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """source: [B, h, w, C], guidance: [B, 2h, 2w, 3] -> [B, 2h, 2w, C] float32.

    `grid`: [B, 2] int32 per-item (h_n, w_n) of the source (canvas mode, see the module
    docstring): item n fills the top-left of its row of `source` and of `guidance` (2h_n, 2w_n);
    its output's top-left (2h_n, 2w_n) is the output of the item alone, the rest finite filler.
    `dropout_rng` switches on the two Dropout2d(0.1) layers (training mode)."""
    b, h, w, c = source.shape
    if grid is None:
      check_grid(h, w)
    else:
      grid = check_canvas_grid(grid, h, w)
      if grid.shape[0] != b:
        raise ValueError(f"grid {grid.shape} must be [B, 2] for source {source.shape}")
    if c != self.feat_dim:
      raise ValueError(f"source {source.shape} has {c} channels, this JBU was built for "
                       f"feat_dim={self.feat_dim}")
    if guidance.shape[:3] != (b, 2 * h, 2 * w):
      raise ValueError(f"guidance {guidance.shape} must be [B, 2h, 2w, 3] = [{b}, {2 * h}, "
                       f"{2 * w}, 3] for source {source.shape}")
    source = source.astype(self.precision.dtype)
    if grid is None:
      kernel = self.filters(guidance, dropout_rng)
      padded = reflect_pad(resize_bicubic(source, (2 * h, 2 * w)), self.radius)
    else:
      kernel = self.filters(guidance, dropout_rng, 2 * grid)
      padded = reflect_pad_per_item(upsample2x_bicubic(source, grid), self.radius, 2 * grid)
    # padded stays in the compute dtype: the conv upcasts each tap's slice to float32 itself
    # (exact), so a bf16 module never holds a float32 copy of the [B, 2h+6, 2w+6, C] map.
    conv = dict(impl=self.conv_impl, official_grad_bug=self.official_grad_bug)
    axes = () if self.conv_impl == "xla" else sharding.mesh_axes("batch", b)
    if axes:
      return adaptive_conv_sharded(padded, kernel, mesh=jax.sharding.get_abstract_mesh(),
                                   batch_axis=axes, **conv)
    return adaptive_conv(padded, kernel, **conv)


class JBUStack(nnx.Module):
  """LLaVA-UHD v2's `JBU{2,4,8}xStack`: `scale` = 2, 4 (the released model) or 8.

  Levels `up1..upL` each double the resolution with guidance pooled from the full-resolution
  pixels; `fixup_proj` = Dropout2d(0.2) + Conv1x1(C, C) adds `0.1 * fixup(x)` to the last level.
  For scale 4 this is `forward_with_internal_features` exactly. Scale 2 and 8 are the natural
  extensions of that forward (the official JBU8xStack has a different key layout, with per-level
  `fixup_proj_2x/4x/8x`, and no `forward_with_internal_features`; the released model never
  uses it).
  `conv_impl` and `official_grad_bug` are passed to every level (see `JBULearnedRange`).
  """

  def __init__(self, feat_dim: int, *, scale: int = 4, precision: Precision,
               conv_impl: str = "auto", official_grad_bug: bool = False, rngs: nnx.Rngs):
    levels = {2: 1, 4: 2, 8: 3}
    if scale not in levels:
      raise ValueError(f"JBU stack scale must be 2, 4 or 8, got {scale}")
    self.scale = scale
    self.num_levels = levels[scale]
    self.precision = precision
    for k in range(1, self.num_levels + 1):
      setattr(self, f"up{k}", JBULearnedRange(feat_dim, precision=precision, conv_impl=conv_impl,
                                              official_grad_bug=official_grad_bug, rngs=rngs))
    self.fixup_proj = _conv1x1(feat_dim, feat_dim, ("vision_embed", None), precision, rngs)

  def __call__(self, source: jax.Array, pixels: jax.Array, *, grid: jax.Array | None = None,
               dropout_rng: jax.Array | None = None,
               hierarchical: bool = False) -> dict[str, jax.Array]:
    """source: [B, h, w, C] ViT features, pixels: [B, 14h, 14w, 3] normalised image ->
    {"feat2x": [B, 2h, 2w, C], "feat4x": [B, 4h, 4w, C], ...} up to `scale`, compute dtype.

    `grid`: [B, 2] int32 per-item patch grids (h_n, w_n), traced is fine (canvas mode, see the
    module docstring): `source` and `pixels` are canvases with item n at the top-left, (0, 0)
    marks an empty slot. Each level's top-left (s h_n, s w_n) is the item's own output, the rest
    finite filler to be ignored (and masked out of any loss).
    `dropout_rng` switches on every Dropout2d (training mode). `hierarchical=True` is VDIM
    pre-training's `forward_stageloss`: each level sees its input through stop_gradient, so the
    loss on a level trains only that level (and the fix-up)."""
    cd = self.precision.dtype
    _, h, w, _ = source.shape
    if grid is None:
      check_grid(h, w)
    else:
      grid = check_canvas_grid(grid, h, w)
    rngs = ([None] * (self.num_levels + 1) if dropout_rng is None
            else list(jax.random.split(dropout_rng, self.num_levels + 1)))
    pixels = pixels.astype(cd)
    x = source.astype(cd)
    out = {}
    for k in range(1, self.num_levels + 1):
      s = 2 ** k
      guidance = adaptive_avg_pool2d(pixels, (s * h, s * w))  # always from the full-res pixels
      inp = jax.lax.stop_gradient(x) if hierarchical and k > 1 else x
      level_grid = None if grid is None else grid * (s // 2)
      x = round_to(getattr(self, f"up{k}")(inp, guidance, grid=level_grid,
                                           dropout_rng=rngs[k - 1]), cd)
      out[f"feat{s}x"] = x
    fix = self.fixup_proj(dropout2d(x, 0.2, rngs[-1]))
    out[f"feat{self.scale}x"] = add(x, scaled(fix, _TENTH))
    return out
