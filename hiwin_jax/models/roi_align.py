"""RoIAlign as torchvision computes it, built from separable per-axis weight matrices (spec §4.4).

`torchvision.ops.roi_align(x, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
aligned=False)` averages, for every output bin, a gh x gw grid of bilinear samples. Both the
bilinear weights and the "sample outside [-1, H]" test factor into a y part and an x part, so the
bin (ph, pw) of box k is `Ay[k, ph, :] @ F @ Ax[k, pw, :]^T`, where `Ay[k, ph, r]` is the mean over
the gh row samples of their bilinear weight on feature row r (zero for samples outside). Building
Ay and Ax needs no dynamic shapes even though gh, gw vary per box (ceil(roi / out)): `axis_weights`
visits each (bin, feature row) pair and only the few samples that can touch that row (see there),
so any box size works with traced coordinates.

Hiwin samples a 12 x 12 grid of equal windows on every level map (`window_weights`); its y weights
depend only on the window row and its x weights only on the window column, so all 144 windows of a
map cost two small einsums. Sample positions follow torchvision's float32 expression order with
its roundings (the bin origin's product in integers, `_times`; correctly rounded divisions, `_div`),
so on CPU and GPU, jitted or not, the samples are those torchvision takes; only the summation
differs (separable sums instead of per-sample products, one division by gh and one by gw instead of
one by gh*gw): ~1e-7 relative.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32

# `cal_best_pooling_size` candidates (w, h), in the official order; the first minimum wins.
POOL_CANDIDATES = ((4, 2), (3, 2), (4, 3), (3, 3), (2, 4), (2, 3), (3, 4))
MAX_POOL = 4       # largest oh and ow among the candidates
MAX_SAMPLES = 12   # largest oh * ow: the slots per window and level
_CANDIDATES_PER_ROW = 6  # see `axis_weights`


def _div(a: jax.Array, b: jax.Array) -> jax.Array:
  """Correctly rounded a / b. XLA rewrites a / broadcast(b) into a * (1 / b), which is off by an
  ulp; that would move sample points and, when roi / out is an integer, change ceil(roi / out)."""
  a, b = jax.lax.optimization_barrier((a, jnp.broadcast_to(b, a.shape).astype(a.dtype)))
  return a / b


def _times(n: jax.Array, x: jax.Array) -> jax.Array:
  """float32(n * x), correctly rounded, computed in integers: int32 n in [0, 128), float32 x
  normal and > 0 (a bin size, >= 1 / out).

  torchvision rounds `ph * bin` before adding the box start; a float multiply followed by an add
  is contracted into one fused multiply-add by LLVM on CPU (an optimization_barrier between them
  does not survive to code generation), which skips that rounding and moves bin origins by an
  ulp. An integer result bit-cast to float is no multiply, so nothing can contract it.
  """
  n, x = jnp.broadcast_arrays(jnp.asarray(n, jnp.int32), x)
  bits = jax.lax.bitcast_convert_type(x.astype(_F32), jnp.int32)
  exponent = bits >> 23                                   # x > 0: no sign bit
  product = n * ((bits & 0x7FFFFF) | 0x800000)            # the exact product of the significands
  shift = jnp.maximum(8 - jax.lax.clz(product), 0)        # bits beyond the 24 kept
  kept = product >> shift
  rest = product - (kept << shift)
  half = jnp.where(shift > 0, 1 << jnp.maximum(shift - 1, 0), 0)
  kept = kept + ((shift > 0) & ((rest > half) | ((rest == half) & ((kept & 1) == 1))))
  carry = kept >> 24                                      # rounding up to 2^24
  kept, shift = kept >> carry, shift + carry
  out = jax.lax.bitcast_convert_type(((exponent + shift) << 23) | (kept & 0x7FFFFF), _F32)
  return jnp.where(n == 0, jnp.zeros((), _F32), out)


def pooling_size(height, width) -> tuple[jax.Array, jax.Array]:
  """`cal_best_pooling_size(W / H)` of the official code: (oh, ow) for a level map of (H, W).

  The official picks the first candidate (w, h) minimising |ln(W/H) - ln(w/h)| with a strict `<`.
  Here the distances are compared exactly in integers: |ln(a/b)| orders like max(a, b) / min(a, b),
  and two such fractions compare by cross-multiplication. No two candidates are ever exactly tied
  (a tie needs W/H = sqrt(w1 w2 / (h1 h2)), which is irrational for every adjacent pair), so this
  equals the float64 computation except where float64 itself would misorder distances that differ
  by < 1e-15, which takes sides > 10^7. height, width: int arrays (traced is fine), any shape.
  Returns (oh, ow) int32 arrays of that shape.
  """
  height = jnp.asarray(height, jnp.int32)
  width = jnp.asarray(width, jnp.int32)
  best_num = best_den = best_h = best_w = None
  for cw, ch in POOL_CANDIDATES:
    a, b = width * ch, height * cw  # (W/H) / (cw/ch) = a / b
    num, den = jnp.maximum(a, b), jnp.minimum(a, b)
    if best_num is None:
      best_num, best_den = num, den
      best_h, best_w = jnp.full_like(height, ch), jnp.full_like(width, cw)
      continue
    better = num * best_den < best_num * den  # num/den < best_num/best_den
    best_num, best_den = jnp.where(better, num, best_num), jnp.where(better, den, best_den)
    best_h, best_w = jnp.where(better, ch, best_h), jnp.where(better, cw, best_w)
  return best_h, best_w


def axis_weights(start: jax.Array, end: jax.Array, out_size, length, *, canvas: int,
                 max_out: int | None = None) -> jax.Array:
  """Per-axis RoIAlign weights: `A[k, p, r]` = mean over the samples of bin p of box k of their
  bilinear weight on feature row r (torchvision roi_align, aligned=False, sampling_ratio=-1).

  start, end: [K] box edges on this axis (float32, already scaled); out_size: the number of bins
  (int or traced int scalar, <= max_out); length: the feature map's size on this axis (int or
  traced int scalar, <= canvas). Returns [K, max_out, canvas] float32; bins p >= out_size and rows
  r >= length are zero. max_out defaults to out_size (which must then be a Python int).

  torchvision: roi = max(end - start, 1), bin = roi / out, g = ceil(roi / out) samples per bin at
  y = start + p*bin + (i + 0.5)*bin/g; a sample with y < -1 or y > length is 0; otherwise y is
  clamped to >= 0 and, when floor(y) >= length - 1, snapped to the last row.

  No static bound on g is needed: each (bin, row) pair visits only samples that can touch row r,
  i.e. with y in [r - 1, r + 1] (the clamps only send samples from [-1, 0] to row 0 and from
  [length - 1, length] to row length - 1). For g >= 2 the spacing bin/g is > 1/2, so at most four
  samples fall in that interval, two on each side of r. We take six consecutive indices
  around the sample just below r (one spare on each side for float error in locating it), clipped
  into [0, g); for g <= 6 that is simply all samples. Each candidate's position and weight are then
  computed exactly as torchvision computes them, so a sample that does not touch r adds 0.
  """
  if max_out is None:
    max_out = int(out_size)
  if max_out > 128:
    raise ValueError(f"roi_align output size {max_out} > 128 bins per axis is not supported")
  start = jnp.asarray(start, _F32)
  end = jnp.asarray(end, _F32)
  n_out = jnp.asarray(out_size, jnp.int32)
  length = jnp.asarray(length, jnp.int32)

  roi = jnp.maximum(end - start, 1.0)                                      # [K]
  bin_size = _div(roi, n_out.astype(_F32))                                 # [K]
  g = jnp.ceil(bin_size).astype(jnp.int32)                                 # [K] samples per bin
  g_f = g.astype(_F32)
  bin_ = bin_size[:, None, None, None]                                     # [K, 1, 1, 1]
  g4 = g[:, None, None, None]

  p = jnp.arange(max_out, dtype=jnp.int32)[None, :, None, None]            # [1, P, 1, 1]
  r = jnp.arange(canvas, dtype=jnp.int32)[None, None, :, None]             # [1, 1, R, 1]
  origin = start[:, None, None, None] + _times(p, bin_)                    # [K, P, 1, 1]

  # The sample just below row r, located in float (only approximately, hence the spare indices).
  spacing = _div(bin_size, g_f)[:, None, None, None]
  approx = (r.astype(_F32) - origin) / spacing - 0.5
  approx = jnp.clip(approx, -8.0, g_f[:, None, None, None] + 8.0)
  last_start = jnp.maximum(g4 - _CANDIDATES_PER_ROW, 0)
  first = jnp.clip(jnp.floor(approx).astype(jnp.int32) - 2, 0, last_start)
  i = first + jnp.arange(_CANDIDATES_PER_ROW, dtype=jnp.int32)              # [K, P, R, 6]

  # torchvision: roi_start + ph * bin + static_cast<T>(i + .5f) * bin / static_cast<T>(grid).
  offset = _div((i.astype(_F32) + 0.5) * bin_, g4.astype(_F32))
  y = origin + offset
  length_f = length.astype(_F32)
  inside = (y >= -1.0) & (y <= length_f) & (i < g4) & (p < n_out)
  y = jnp.maximum(y, 0.0)
  low = jnp.floor(y).astype(jnp.int32)
  at_end = low >= length - 1
  low = jnp.where(at_end, length - 1, low)
  high = jnp.where(at_end, length - 1, low + 1)
  y = jnp.where(at_end, low.astype(_F32), y)
  frac = y - low.astype(_F32)
  weight = (jnp.where(low == r, 1.0 - frac, 0.0) + jnp.where(high == r, frac, 0.0))
  total = jnp.sum(jnp.where(inside, weight, 0.0), axis=-1)                 # [K, P, R]
  return _div(total, g_f[:, None, None])


def roi_align(features: jax.Array, boxes: jax.Array, output_size: Sequence[int] | int, *,
              box_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """`torchvision.ops.roi_align(features, [boxes], output_size, spatial_scale=1.0,
  sampling_ratio=-1, aligned=False)` for one NHWC image.

  features: [H, W, C]; boxes: [K, 4] as (x1, y1, x2, y2) in feature pixels (pixel k's centre at
  k). Returns [K, oh, ow, C] float32 (the computation runs in float32, as the official calls it
  on `level.float()`). The boxes are first rounded float32 -> `box_dtype` -> float32, as the
  official casts its window boxes to the feature dtype (bfloat16 in a bf16 run).
  """
  oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
  return _roi_align(features, jnp.asarray(boxes, _F32), (int(oh), int(ow)),
                    jnp.dtype(box_dtype), precision)


@functools.partial(jax.jit, static_argnames=("output_size", "box_dtype", "precision"))
def _roi_align(features, boxes, output_size, box_dtype, precision):
  oh, ow = output_size
  h, w, _ = features.shape
  boxes = boxes.astype(box_dtype).astype(_F32)
  ay = axis_weights(boxes[:, 1], boxes[:, 3], oh, h, canvas=h)             # [K, oh, H]
  ax = axis_weights(boxes[:, 0], boxes[:, 2], ow, w, canvas=w)             # [K, ow, W]
  f = features.astype(_F32)
  rows = jnp.einsum("kpy,yxc->kpxc", ay, f, precision=precision)
  return jnp.einsum("kqx,kpxc->kpqc", ax, rows, precision=precision)


# --- Hiwin's 12 x 12 windows -------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _edge_table(max_length: int, grid: int, dtype: np.dtype) -> np.ndarray:
  """[max_length + 1, grid + 1] float32: row n holds k * n / grid as the official computes it
  (float64, stored as float32, cast to `dtype`, read back as float32)."""
  n = np.arange(max_length + 1, dtype=np.float64)[:, None]
  k = np.arange(grid + 1, dtype=np.float64)[None, :]
  return (k * n / grid).astype(np.float32).astype(dtype).astype(np.float32)


def window_edges(length, grid: int = 12, *, dtype, max_length: int | None = None) -> jax.Array:
  """The edges k * length / grid, k = 0..grid, of the official window boxes along one axis:
  window c spans [edges[c], edges[c + 1]]. length: an int, or a traced int <= max_length ->
  [grid + 1] float32.

  The official computes them in float64, stores them as a float32 tensor and casts that to the
  features' dtype before RoIAlign reads it back as float32: `dtype` is that feature dtype
  (bfloat16 in a bf16 run, where the edges are bf16-rounded; float32 in an fp32 run, where they
  are not). The edges come from a host table computed the same way: the official's float64
  formula differs from k * n / grid by ~1e-16 relative, which moves no float32 rounding, and
  exact arithmetic matters here because roi / out sits on an integer for many windows, where an
  ulp changes torchvision's sample count ceil(roi / out).
  """
  if max_length is None:
    if isinstance(length, jax.core.Tracer):
      raise ValueError("window_edges of a traced length needs its static bound max_length")
    max_length = int(length)
  table = _edge_table(int(max_length), int(grid), np.dtype(dtype))
  return jnp.asarray(table)[jnp.asarray(length, jnp.int32)]


def window_boxes(height, width, grid: int = 12, *, dtype) -> jax.Array:
  """The official boxes (x1, y1, x2, y2) of the grid x grid windows of a (height, width) map,
  row-major over (row, column), rounded to the feature `dtype` (`window_edges`):
  [grid * grid, 4] float32."""
  ye, xe = window_edges(height, grid, dtype=dtype), window_edges(width, grid, dtype=dtype)
  y1, x1 = jnp.meshgrid(ye[:-1], xe[:-1], indexing="ij")
  y2, x2 = jnp.meshgrid(ye[1:], xe[1:], indexing="ij")
  return jnp.stack([x1, y1, x2, y2], axis=-1).reshape(grid * grid, 4)


def window_weights(height, width, oh, ow, canvas_hw: Sequence[int], grid: int = 12, *,
                   dtype) -> tuple[jax.Array, jax.Array]:
  """Separable RoIAlign weights of the grid x grid windows of a (height, width) map inside a
  static canvas (Hc, Wc): the samples of window (r, c) are `Ay[r] @ F @ Ax[c]^T`.

  height, width, oh, ow: int scalars (traced is fine), oh and ow <= MAX_POOL; dtype: the feature
  dtype the window boxes are rounded to (`window_edges`). Returns Ay [grid, MAX_POOL, Hc] and
  Ax [grid, MAX_POOL, Wc] float32; bins past oh / ow and rows or columns past the map are zero.
  """
  hc, wc = (int(n) for n in canvas_hw)
  ye = window_edges(height, grid, dtype=dtype, max_length=hc)
  xe = window_edges(width, grid, dtype=dtype, max_length=wc)
  ay = axis_weights(ye[:-1], ye[1:], oh, height, canvas=hc, max_out=MAX_POOL)
  ax = axis_weights(xe[:-1], xe[1:], ow, width, canvas=wc, max_out=MAX_POOL)
  return ay, ax


def window_slots(oh: jax.Array, ow: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Slot j < MAX_SAMPLES of a window holds bin (j // ow, j % ow), row-major as the official
  flattens (oh, ow). oh, ow: [N] -> (index into the MAX_POOL x MAX_POOL bins [N, 12] int32,
  valid [N, 12] bool = j < oh * ow)."""
  j = jnp.arange(MAX_SAMPLES, dtype=jnp.int32)[None, :]
  ow = ow[:, None]
  valid = j < oh[:, None] * ow
  index = jnp.where(valid, (j // ow) * MAX_POOL + j % ow, 0)
  return index, valid
