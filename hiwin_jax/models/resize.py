"""PyTorch-exact resampling primitives: bicubic resize, adaptive average pooling, reflect padding.

Position embeddings and feature maps are resized at run time, so these reproduce the arithmetic
of torch's CPU kernels (same taps, same weights rounded the same way, same summation order)
rather than a textbook formula: fp32 results match torch 2.x bit for bit in almost all cases.
Float32/float64 compute in their own dtype; bfloat16/float16 compute in float32 ("opmath") and
round once at the end, as torch does. Two XLA habits matter for exactness: it contracts
a*b + c into FMAs inside a fusion (as GCC did for torch's AVX2/AVX512 kernels), and it turns
division by a broadcast or constant into a reciprocal multiply (see `layers.divide`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hiwin_jax.models.layers import divide, round_to

_A = -0.75  # torch's Keys cubic coefficient (PIL uses -0.5).


def _opmath(dtype) -> np.dtype:
  """torch's at::opmath_type: float64 stays float64, every other float computes in float32."""
  return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _fma32(a, b, c):
  """Correctly rounded float32 a*b + c, computed with float64 numpy ops."""
  a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
  p = a * b  # exact: two 24-bit significands fit in 53 bits
  s = p + c
  bp = s - c
  e = (p - bp) + (c - (s - bp))  # TwoSum: s + e == a*b + c exactly
  r = s.astype(np.float32)
  # Rounding twice (exact -> f64 -> f32) only errs when s lands exactly on a float32 tie
  # that the exact value misses; stepping s one f64 ulp towards the exact value fixes it.
  nb = np.nextafter(r, np.where(s > r, np.float32(np.inf), np.float32(-np.inf)))
  tie = (e != 0) & (s != r) & (s == (r.astype(np.float64) + nb.astype(np.float64)) / 2)
  return np.where(tie, np.nextafter(s, np.copysign(np.inf, e)), s).astype(np.float32)


def _mul_add(a, b, c):
  return a * b + c


def _cubic_np(in_size: int, out_size: int, op, fma: bool):
  """Taps and weights in opmath `op` (numpy), mirroring HelperInterpCubic::compute_indices_weights.

  torch's x86 wheels dispatch to an AVX2/AVX512 build of this loop where GCC contracted some
  (not all) multiply-adds into FMAs; `fma=True` reproduces exactly those, `fma=False` the
  DEFAULT (no-FMA) build. Float64 has no exact FMA emulation here and always uses plain ops.
  """
  f = _fma32 if (fma and op == np.float32) else _mul_add
  one = op(1)
  scale = op(in_size) / op(out_size)  # area_pixel_compute_scale (no scale_factor)
  src = f(scale, np.arange(out_size, dtype=op) + op(0.5), op(-0.5))  # not clamped for cubic
  # guard_index_and_lambda: index capped at in-1, lambda clamped to [0, 1].
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - i0.astype(op), op(0), one)

  def conv1(x):  # ((A+2)x - (A+3)) x x + 1
    return f(op(_A + 2), x, op(-(_A + 3))) * x * x + one

  def conv2(x):  # ((A x - 5A) x + 8A) x - 4A
    return f(f(op(_A), x, op(-5 * _A)), x, op(8 * _A)) * x - op(4 * _A)

  x2 = one - t  # torch uses (1 - t) + 1 for the last tap, not 2 - t, which rounds differently.
  w = np.stack([conv2(t + one), conv1(t), conv1(x2), conv2(x2 + one)], axis=-1).astype(op)
  idx = np.clip(i0[:, None] + np.arange(-1, 3), 0, in_size - 1).astype(np.int32)
  return idx, w


def cubic_weights(in_size: int, out_size: int, dtype=jnp.float32, fma: bool = True):
  """Taps and weights of `F.interpolate(mode='bicubic', align_corners=False, antialias=False)`
  along one axis (size given, no scale_factor: scale = in/out), Keys cubic with A = -0.75.

  Returns numpy arrays `idx` [out, 4] int32 (already clamped to [0, in_size-1]) and `w`
  [out, 4] of `dtype`. Weights are computed in torch's opmath type (float32 for
  fp32/bf16/fp16) and then rounded to `dtype`, because torch stores them as scalar_t.
  `fma` selects torch's AVX2/AVX512 kernel (default) or its no-FMA DEFAULT kernel.
  """
  idx, w = _cubic_np(in_size, out_size, _opmath(dtype).type, fma)
  return idx, w.astype(dtype)


def cubic_weights_dynamic(in_size: int, out_size: jax.Array, max_out: int, dtype=jnp.float32,
                          fma: bool = True):
  """`cubic_weights` for a traced `out_size` (int32 scalar in [1, max_out]), padded to `max_out`.

  Looks the rows up in a static table of all sizes 1..max_out (O(max_out^2) constants) rather
  than recomputing in jnp: XLA contracts multiply-adds differently per backend, so only the
  numpy arithmetic reproduces torch's weights exactly. Rows >= out_size have index 0, weight 0.
  """
  idx_t = np.zeros((max_out + 1, max_out, 4), np.int32)
  w_t = np.zeros((max_out + 1, max_out, 4), np.dtype(dtype))
  for n in range(1, max_out + 1):
    idx_t[n, :n], w_t[n, :n] = cubic_weights(in_size, n, dtype, fma)
  n = jnp.clip(jnp.asarray(out_size, jnp.int32), 0, max_out)
  return jnp.asarray(idx_t)[n], jnp.asarray(w_t)[n]


def apply_cubic_weights(x: jax.Array, idx, w, axis: int) -> jax.Array:
  """Resample one axis of `x` (already in opmath) with 4-tap (idx, w) from `cubic_weights*`.

  Written as x0*w0 + x1*w1 + x2*w2 + x3*w3, left to right, like torch's Interpolate::eval; GCC
  turns that into fma(x3, w3, fma(x2, w2, fma(x0, w0, x1*w1))) and XLA's LLVM backend usually
  contracts it the same way when the four products sit in one fusion. Run eagerly (no
  fusion), or where LLVM fuses the other product first (seen with uniform weights, e.g.
  24 -> 2), the last bit can differ.
  """
  axis = axis % x.ndim
  bshape = (-1,) + (1,) * (x.ndim - axis - 1)
  out = None
  for k in range(4):
    wk = jnp.asarray(w[:, k], x.dtype).reshape(bshape)
    term = jnp.take(x, idx[:, k], axis=axis, mode="clip") * wk
    out = term if out is None else out + term
  return out


@functools.partial(jax.jit, static_argnames=("out_hw", "axes", "fma"))
def _resize_bicubic(x, out_hw, axes, fma):
  ax_h, ax_w = (a % x.ndim for a in axes)
  y = x.astype(_opmath(x.dtype))
  # torch computes sum_j wy_j * (sum_i wx_i * x[y_j, x_i]); the inner sum depends only on the
  # input row, so a W pass then an H pass is the same arithmetic.
  for ax, n_out in ((ax_w, out_hw[1]), (ax_h, out_hw[0])):
    y = apply_cubic_weights(y, *cubic_weights(x.shape[ax], n_out, x.dtype, fma), ax)
  return round_to(y, x.dtype)


def resize_bicubic(x: jax.Array, out_hw: Sequence[int], axes: Sequence[int] = (-3, -2),
                   fma: bool = True) -> jax.Array:
  """`torch.nn.functional.interpolate(x, size=out_hw, mode='bicubic', align_corners=False,
  antialias=False)` on the spatial `axes` of `x` (default NHWC: -3, -2).

  bf16/fp16 are computed in float32 with weights rounded to the input dtype, then rounded
  once, as torch's CPU kernel does. No clamping: bicubic overshoots, as in torch. Jitted
  even when called eagerly, so the multiply-adds are contracted into FMAs as in torch's
  AVX2/AVX512 kernel (`fma=False`: torch's DEFAULT-capability weights).
  """
  return _resize_bicubic(x, tuple(int(n) for n in out_hw), tuple(int(a) for a in axes), bool(fma))


def resize_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Dense float32 [out, in] matrix of the bicubic resize along one axis (edge taps merged)."""
  idx, w = cubic_weights(in_size, out_size, np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  np.add.at(m, (np.repeat(np.arange(out_size), 4), idx.ravel()), w.ravel())
  return m


def _pool_windows(n_in: int, n_out: int):
  """torch's start_index/end_index windows, as K padded taps per output plus a validity mask."""
  o = np.arange(n_out)
  start = (o * n_in) // n_out
  end = ((o + 1) * n_in + n_out - 1) // n_out
  k = int((end - start).max())
  taps = start[:, None] + np.arange(k)
  valid = taps < end[:, None]
  return np.minimum(taps, n_in - 1).astype(np.int32), valid, (end - start)


def adaptive_avg_pool2d(x: jax.Array, out_hw: Sequence[int],
                        axes: Sequence[int] = (-3, -2)) -> jax.Array:
  """`torch.nn.functional.adaptive_avg_pool2d(x, out_hw)` on the spatial `axes` (default NHWC).

  Reproduces the contiguous CPU kernel: each window [floor(i*In/Out), ceil((i+1)*In/Out)) is
  summed row by row in opmath, then divided `sum / kh / kw` (two divisions, not one by kh*kw).
  Windows may overlap (In % Out != 0) or repeat inputs (Out > In). Like torch, an output of
  (1, 1) is a plain mean (reduction order differs from torch's there: ~1e-7 relative).
  """
  return _adaptive_avg_pool2d(x, tuple(int(n) for n in out_hw), tuple(int(a) for a in axes))


@functools.partial(jax.jit, static_argnames=("out_hw", "axes"))
def _adaptive_avg_pool2d(x, out_hw, axes):
  ax_h, ax_w = (a % x.ndim for a in axes)
  op = _opmath(x.dtype)
  xf = x.astype(op)
  if out_hw == (1, 1):  # torch dispatches this case to input.mean((-1, -2)).
    return round_to(jnp.mean(xf, axis=(ax_h, ax_w), keepdims=True), x.dtype)
  th, vh, ch = _pool_windows(x.shape[ax_h], out_hw[0])
  tw, vw, cw = _pool_windows(x.shape[ax_w], out_hw[1])

  def bcast(v, ax):
    return jnp.asarray(v).reshape((-1,) + (1,) * (x.ndim - ax - 1))

  # Terms enter row by row, column by column, as in torch's loop; masked taps add +0 exactly.
  # Small windows unroll into one fusion, large ones (e.g. 350 -> 2) stay a loop.
  unroll = th.shape[1] * tw.shape[1] <= 64
  th, vh, tw, vw = (jnp.asarray(a) for a in (th, vh, tw, vw))

  def tap(a, taps, valid, ax):
    return jnp.where(bcast(valid, ax), jnp.take(a, taps, axis=ax, mode="clip"), 0)

  def add_row(kh, total):
    rows = tap(xf, th[:, kh], vh[:, kh], ax_h)

    def add_col(kw, total):
      return total + tap(rows, tw[:, kw], vw[:, kw], ax_w)

    return jax.lax.fori_loop(0, tw.shape[1], add_col, total, unroll=unroll)

  shape = list(x.shape)
  shape[ax_h], shape[ax_w] = out_hw
  total = jax.lax.fori_loop(0, th.shape[1], add_row, jnp.zeros(shape, op), unroll=unroll)
  out = divide(divide(total, bcast(ch.astype(op), ax_h)), bcast(cw.astype(op), ax_w))
  return round_to(out, x.dtype)


def reflect_pad(x: jax.Array, pad: int | Sequence[int],
                axes: Sequence[int] = (-3, -2)) -> jax.Array:
  """`F.pad(x, ..., mode='reflect')`: pad each of `axes` by `pad` on both sides, mirroring
  without repeating the edge. `pad` is an int or one int per axis.
  """
  pads = [int(pad)] * len(axes) if isinstance(pad, (int, np.integer)) else [int(p) for p in pad]
  widths = [(0, 0)] * x.ndim
  for ax, p in zip(axes, pads, strict=True):
    size = x.shape[ax]
    if p >= size:  # torch rejects this too: a reflection can't reach past the opposite edge.
      raise ValueError(f"reflect padding {p} must be smaller than the axis size {size} (axis {ax})")
    widths[ax % x.ndim] = (p, p)
  return jnp.pad(x, widths, mode="reflect")


# --- per-item ("canvas") variants --------------------------------------------------------------
# Items of different sizes share one padded canvas, each at the start of its batch row's spatial
# axes, with its valid length per axis a run-time value. These variants make the size-dependent
# parts per item so one compiled program serves every size: inside an item's valid region they
# give exactly what the static function gives on the item alone; outside it, finite values that
# callers must ignore (or mask out of a loss). They use elementwise selects and a few-row gather
# per item rather than full-map gathers, so the backward pass has no colliding scatter-adds
# (atomics on GPU) and costs about what the static path's does.


def _valid_lengths(valid, batch: int, naxes: int) -> jax.Array:
  valid = jnp.asarray(valid, jnp.int32)
  if valid.shape != (batch, naxes):
    raise ValueError(f"valid lengths {valid.shape} must be [batch, {naxes}] = [{batch}, {naxes}]")
  return valid


def _position(x: jax.Array, axis: int) -> jax.Array:
  """Indices along `axis`, shaped to broadcast against x."""
  shape = [1] * x.ndim
  shape[axis] = x.shape[axis]
  return jnp.arange(x.shape[axis], dtype=jnp.int32).reshape(shape)


def _row_per_item(x: jax.Array, row: jax.Array, axis: int) -> jax.Array:
  """x[n] at index row[n] along `axis` (kept, length 1); row: [B] int32, in range."""
  shape = [1] * x.ndim
  shape[0] = x.shape[0]
  return jnp.take_along_axis(x, row.reshape(shape), axis=axis, mode="clip")


def _per_item(valid: jax.Array, ndim: int) -> jax.Array:
  return valid.reshape((-1,) + (1,) * (ndim - 1))


def replicate_edge_per_item(x: jax.Array, valid, axes: Sequence[int] = (-3, -2)) -> jax.Array:
  """Item n's last valid row (column, ...) repeated over the rest of each of `axes`.

  x: [B, ...] with item n at the start of `axes`, valid: [B, len(axes)] int32 lengths (traced is
  fine) -> x's shape. A static resampler that clamps its taps into [0, size - 1] (torch's
  bicubic, `cubic_weights`) then reads `x[n][clamp(j, 0, length_n - 1)]` at every tap j, which
  is the clamp it does on the item alone. A length of 0 repeats index 0.
  """
  valid = _valid_lengths(valid, x.shape[0], len(axes))
  for k, ax in enumerate(axes):
    ax = ax % x.ndim
    last = jnp.clip(valid[:, k] - 1, 0, x.shape[ax] - 1)
    inside = _position(x, ax) < _per_item(valid[:, k], x.ndim)
    x = jnp.where(inside, x, _row_per_item(x, last, ax))
  return x


def reflect_pad_per_item(x: jax.Array, pad: int, valid, axes: Sequence[int] = (-3, -2)
                         ) -> jax.Array:
  """`F.pad(x[n][:h_n, :w_n], (pad,) * 4, mode='reflect')` for every item n of batch axis 0.

  x: [B, ..., H, ..., W, ...] with item n's data at the start of each of `axes`; valid: [B,
  len(axes)] int32 per-item lengths (traced is fine), each in [pad + 1, size] as torch requires.
  Returns x with each of `axes` grown by 2 * pad, item n's padded map at the start. The leading
  `pad` entries mirror entries 1..pad whatever the length; the `pad` entries after an item,
  length - 2 - k, are placed per item. Everything else is the buffer itself (or zeros past it).
  A length torch rejects (<= pad, including 0) reads in-buffer entries: finite values.
  """
  pad = int(pad)
  valid = _valid_lengths(valid, x.shape[0], len(axes))
  for k, ax in enumerate(axes):
    ax = ax % x.ndim
    size = x.shape[ax]
    if pad >= size:  # the leading reflection reads entries 1..pad
      raise ValueError(f"reflect padding {pad} must be smaller than the axis size {size} "
                       f"(axis {ax})")
    length = _per_item(valid[:, k], x.ndim)
    lead = jnp.flip(jax.lax.slice_in_dim(x, 1, pad + 1, axis=ax), axis=ax)
    widths = [(0, 0)] * x.ndim
    widths[ax] = (0, pad)
    body = jnp.pad(x, widths)
    pos = _position(body, ax)
    for j in range(pad):  # entry length + j mirrors entry length - 2 - j
      src = jnp.clip(valid[:, k] - 2 - j, 0, jnp.clip(valid[:, k] - 1, 0, size - 1))
      body = jnp.where(pos == length + j, _row_per_item(x, src, ax), body)
    x = jnp.concatenate([lead, body], axis=ax)
  return x


def upsample2x_bicubic(x: jax.Array, valid, axes: Sequence[int] = (-3, -2),
                       fma: bool = True) -> jax.Array:
  """`F.interpolate(x[n][:h_n, :w_n], size=(2 h_n, 2 w_n), mode='bicubic', align_corners=False,
  antialias=False)` for every item n of batch axis 0, computed on the whole buffer.

  x: [B, ..., H, ..., W, ...] with item n at the start of `axes`; valid: [B, 2] int32 (h_n, w_n),
  traced is fine -> [B, ..., 2H, ..., 2W, ...], item n's result in the top-left (2h_n, 2w_n).
  An exact x2 has scale in/out = 1/2 for every size, so the source positions (i + 0.5) / 2 - 0.5
  and the tap weights are the same for every item (rows of `cubic_weights(H, 2H)`); only the
  clamping of the taps into [0, h_n - 1] is per item, and replicating each item's edge
  (`replicate_edge_per_item`) turns the static clamp into that. So this is `resize_bicubic` on
  the replicated buffer: the same arithmetic, weights and order as on the item alone.
  """
  x = replicate_edge_per_item(x, valid, axes)
  ax_h, ax_w = (a % x.ndim for a in axes)
  return resize_bicubic(x, (2 * x.shape[ax_h], 2 * x.shape[ax_w]), axes, fma)


def resize_table_per_item(table: jax.Array, height: jax.Array, width: jax.Array,
                          canvas_hw: tuple[int, int], weight_dtype=jnp.float32) -> jax.Array:
  """`F.interpolate(table.permute(2, 0, 1)[None], size=(h_n, w_n), mode='bicubic',
  align_corners=False)` for every item n, each placed at the top-left of a canvas.

  table: [G, G, C] in the arithmetic dtype (float32, or float64); height, width: [N] traced
  sizes (<= the canvas). Returns [N, Hc, Wc, C], zero outside each item's region. Same
  arithmetic as torch's CPU kernel: weights rounded to `weight_dtype` (torch keeps them in the
  tensor's dtype), a width pass over the G table rows, then a height pass, taps summed in order.
  Used for position tables resized to each item's grid (CLIP's 24x24, Hiwin's 12x12).
  """
  g = table.shape[0]
  hc, wc = canvas_hw
  op = table.dtype

  def weights(size, max_out):
    return jax.vmap(lambda s: cubic_weights_dynamic(g, s, max_out, weight_dtype))(size)

  ix, wx = weights(width, wc)                                                # [N, Wc, 4]
  iy, wy = weights(height, hc)                                               # [N, Hc, 4]
  cols = None
  for k in range(4):
    term = table[:, ix[..., k]] * wx[None, ..., k, None].astype(op)          # [G, N, Wc, C]
    cols = term if cols is None else cols + term
  cols = jnp.moveaxis(cols, 0, 1)                                            # [N, G, Wc, C]
  out = None
  for k in range(4):
    rows = jax.vmap(lambda c, i: c[i])(cols, iy[..., k])                     # [N, Hc, Wc, C]
    term = rows * wy[..., k, None, None].astype(op)
    out = term if out is None else out + term
  return out


# --- bilinear (VDIM pre-training losses) ------------------------------------------------------

def linear_taps(dst: jax.Array, scale, in_size: int):
  """Two-tap weights of torch's linear interpolation (align_corners=False) along one axis, for
  traced positions `dst` (the jitter's zoomed crop): src = max(scale (dst + 0.5) - 0.5, 0),
  i0 = min(floor(src), in - 1), i1 = min(i0 + 1, in - 1), l1 = clamp(src - i0, 0, 1), l0 = 1 - l1
  (`area_pixel_compute_source_index`, then `guard_index_and_lambda`)."""
  src = jnp.maximum(scale * (dst.astype(jnp.float32) + 0.5) - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  l1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  return i0, jnp.minimum(i0 + 1, in_size - 1), 1.0 - l1, l1


def linear_taps_static(in_size: int, out_size: int):
  """`linear_taps` for a resize to `out_size` (scale = in / out), in numpy with the source index
  as one fused multiply-add, as torch's AVX2/AVX512 CPU kernel computes it: bit-exact with
  `F.interpolate(mode='bilinear')` on square maps (checked in the tests)."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = _fma32(scale, np.arange(out_size, dtype=np.float32) + np.float32(0.5), np.float32(-0.5))
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  l1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  return i0, np.minimum(i0 + 1, in_size - 1).astype(np.int32), np.float32(1) - l1, l1


def apply_linear_taps(x: jax.Array, taps, axis: int) -> jax.Array:
  i0, i1, l0, l1 = taps
  shape = (-1,) + (1,) * (x.ndim - axis % x.ndim - 1)
  return (jnp.take(x, i0, axis=axis) * jnp.reshape(l0, shape).astype(x.dtype)
          + jnp.take(x, i1, axis=axis) * jnp.reshape(l1, shape).astype(x.dtype))


def resize_bilinear(x: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """`F.interpolate(x, size=out_hw, mode='bilinear', align_corners=False)` on NHWC `x`
  ([B, H, W, C] -> [B, h, w, C]): width pass then height pass, torch's
  `(x00 w0 + x01 w1) h0 + (x10 w0 + x11 w1) h1`. Jitted even when called eagerly, so XLA contracts
  the multiply-adds into FMAs as torch's kernel does. (`jax.image.resize(..., 'linear',
  antialias=False)` is the same map for upsampling but differs in the last bits.)"""
  return _resize_bilinear(x, tuple(int(n) for n in out_hw))


@functools.partial(jax.jit, static_argnames=("out_hw",))
def _resize_bilinear(x, out_hw):
  _, h, w, _ = x.shape
  x = apply_linear_taps(x, linear_taps_static(w, out_hw[1]), 2)
  return apply_linear_taps(x, linear_taps_static(h, out_hw[0]), 1)
