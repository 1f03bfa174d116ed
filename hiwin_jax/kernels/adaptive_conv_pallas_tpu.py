"""Mosaic TPU Pallas kernels for `adaptive_conv` (forward, grad_x, grad_F).

Layout (jbu-kernel.md §4.3): NHWC with C on lanes, W on sublanes, H a free leading dim.
Each kernel runs on a grid (B, row blocks, channel blocks); a row block of `th` outputs
reads `th + 6` input rows through a `pl.Element` halo (Mosaic requires every non-squeezed
dim of such a block to be an Element, so those index maps return element offsets). W is
always a full-dim block, C a multiple of 128: C is zero-padded to one even below 128, rows
to a multiple of `th`, and the results are sliced back. `th`/`tc` are picked so the VMEM
estimate stays under VMEM_BUDGET. f32 and bf16 inputs are read as they are (bf16 upcast
once per block into an f32 VMEM scratch: unaligned sublane reads are only safe on 32-bit
data); f16 and f64 are converted to f32 first. All arithmetic is f32.

Checked off-device: all three kernels compile with libtpu 0.0.42 for abstract v4, v5e,
v5p and v6e chips at B=7, 96x96, C=1024 and smaller odd shapes, in f32, bf16 and f16
(v5e in `test_pallas_tpu_kernels_compile_for_an_abstract_v5e`, the others by hand with
the same calls). Not yet run or timed on a TPU.

- forward: per output row, a (W, tc) accumulator takes the 49 taps (a outer, b inner),
  each a sublane-shifted window of the input times one lane of the filter row broadcast
  over channels.
- grad_x: the transpose computed as a gather on the padded grid. g and F are zero-padded
  by 6 rows/cols in XLA (one extra pass over g, instead of masking unspecified halo
  padding in the kernel), so gxp[yp, xp] = sum_{a,b} Fz[yp+6-a, xp+6-b, 7a+b] *
  gz[yp+6-a, xp+6-b]: a forward-like stencil with both operands shifted.
- grad_F: a per-tap lane reduction over the channel block, placed into lane t of a
  (W, 49) row by an iota select, accumulated in the resident output block over the
  channel grid axis ("arbitrary").

`interpret=True` runs them through `pltpu.InterpretParams()` (TPU semantics on CPU, with
ordered callbacks); `interpret="generic"` through Pallas's generic interpreter, which has no side
effects and can therefore share a `lax.platform_dependent` with the compiled kernel (what
`adaptive_conv` runs off TPU).
Block sizes can be forced with `th=` / `tc=` (tests use that to cross block boundaries).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

K = 7
T = K * K
R = K // 2
LANES = 128
# Conservative: below the 16 MiB default scoped VMEM of v4/v5e, leaves room for the
# compiler's own temporaries.
VMEM_BUDGET = 8 * 1024 * 1024


def _round_up(x, m):
  return -(-x // m) * m


def _interpret_arg(interpret):
  if interpret == "generic":
    return True
  if not interpret:
    return False
  params = getattr(pltpu, "InterpretParams", None)
  return params() if params is not None else True


def _tiles(rows, c, vmem_bytes, th=None, tc=None):
  """(padded rows, th, padded C, tc) for a grid over `rows` output rows and C channels.

  C is always padded to a multiple of 128, even below 128: with a narrow full-dim channel
  block Mosaic cannot prove the halo row offsets tile-aligned (seen compiling for v5e).
  The widest channel block that still allows th >= 8 rows under VMEM_BUDGET wins (the
  6-row halo makes short row blocks re-read their input up to 7x); then th is evened out
  over the same number of row blocks, so the row padding (a copy of the input) is minimal
  and absent whenever th divides `rows`.
  """
  cp = _round_up(c, LANES)
  tcs = [tc] if tc else [d for d in (512, 256, 128) if cp % d == 0]
  ths = [th] if th else sorted({d for d in (32, 16, 8, 4, 2, 1, min(rows, 32)) if d <= rows},
                               reverse=True)
  best = None
  for tc_ in tcs:
    th_ = next((d for d in ths if vmem_bytes(d, tc_) <= VMEM_BUDGET), ths[-1])
    if best is None or th_ > best[0]:
      best = (th_, tc_)
    if th_ >= min(8, rows):
      break
  th_, tc_ = best
  if th is None:
    th_ = -(-rows // -(-rows // th_))   # same block count, least row padding
  return _round_up(rows, th_), th_, _round_up(c, tc_), tc_


def _vmem_bytes(op, th, tc, w, dtype, x_dtype):
  """VMEM estimate of one grid step of `op` (blocks double-buffered, f32 upcast copies)."""
  isz = jnp.dtype(dtype).itemsize
  up = 0 if jnp.dtype(dtype) == jnp.float32 else 4
  wp = w + 2 * R
  if op == "forward":    # x, filters, out, one accumulator row
    return ((th + 2 * R) * wp * tc * (2 * isz + up) + th * w * LANES * 4 * 2
            + th * w * tc * 4 * 2 + w * tc * 4)
  if op == "grad_x":     # g, filters (both with a 6-wide zero halo), out, one accumulator row
    wz = w + 4 * R
    return ((th + 2 * R) * wz * (tc * (2 * isz + up) + LANES * 4 * 2)
            + th * wp * tc * 4 * 2 + wp * tc * 4)
  xsz = jnp.dtype(x_dtype).itemsize  # grad_f: x and g, resident out, one row
  up = 4 if up or jnp.dtype(x_dtype) != jnp.float32 else 0
  return ((th + 2 * R) * wp * tc * (2 * xsz + up) + th * w * tc * (2 * isz + up)
          + th * w * LANES * 4 * 2 + w * tc * 4)


def tiles(op: str, h: int, w: int, c: int, dtype, x_dtype=None, *, th=None, tc=None):
  """(padded grid rows, th, padded C, tc) that kernel `op` ("forward", "grad_x", "grad_f") uses
  for an output of [., h, w, c] (grad_x's grid covers the h + 6 padded rows). `dtype` is the
  feature operand's (xpad for forward, g for the gradients), `x_dtype` grad_f's xpad, both after
  the f16/f64 -> f32 conversion. Forced `th`/`tc` are kept. At production size (B=7, C=1024)
  every kernel picks th=8 with tc=512 at 48x48 and tc=256 at 96x96, f32 or bf16 features."""
  if op not in ("forward", "grad_x", "grad_f"):
    raise ValueError(f"unknown adaptive-conv kernel {op!r}")
  rows = h + 2 * R if op == "grad_x" else h
  vmem = lambda th_, tc_: _vmem_bytes(op, th_, tc_, w, dtype, x_dtype or dtype)
  return _tiles(rows, c, vmem, th, tc)


def _f32_io(x):
  """Kernels read f32 or bf16. Mosaic rejects the f16 block loads ("Invalid vector type for
  load", v4 to v6e), and f64 (x64 mode) has no TPU vector type: both go through f32."""
  return x if x.dtype in (jnp.float32, jnp.bfloat16) else x.astype(jnp.float32)


def _pad_to(x, shape):
  pads = [(0, s - d) for d, s in zip(x.shape, shape)]
  if all(p == (0, 0) for p in pads):
    return x
  return jnp.pad(x, pads)


def _halo_spec(th, width, lanes, per_channel_block=True):
  """Rows [i*th, i*th + th + 6) of a [B, rows, width, lanes] array. Mosaic wants every
  non-squeezed dim of an Element block to be an Element, so the index map returns element
  offsets for all of them."""
  if per_channel_block:
    index_map = lambda n, i, j: (n, i * th, 0, j * lanes)
  else:
    index_map = lambda n, i, j: (n, i * th, 0, 0)
  return pl.BlockSpec((None, pl.Element(th + 2 * R), pl.Element(width), pl.Element(lanes)),
                      index_map)


def _params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _upcast(src_ref, scratch):
  """f32 view of an input block: the ref itself for f32, else a filled f32 scratch."""
  if scratch is None:
    return src_ref
  scratch[...] = src_ref[...].astype(jnp.float32)
  return scratch


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(x_ref, f_ref, o_ref, *scratch, th, w):
  xs = _upcast(x_ref, scratch[0] if scratch else None)

  def row(r, carry):
    f = f_ref[r].astype(jnp.float32)                        # (W, 49)
    acc = jnp.zeros(o_ref.shape[1:], jnp.float32)           # (W, tc)
    for a in range(K):
      for b in range(K):
        t = K * a + b
        acc = acc + f[:, t:t + 1] * xs[r + a, pl.ds(b, w), :]
    o_ref[r] = acc
    return carry

  lax.fori_loop(0, th, row, 0)


def forward(xpad, filters, *, interpret=False, th=None, tc=None):
  """xpad [B, H+6, W+6, C], filters [B, H, W, 49] -> [B, H, W, C] float32."""
  xpad, filters = _f32_io(xpad), filters.astype(jnp.float32)
  bsz, hp, wp, c = xpad.shape
  h, w = hp - 2 * R, wp - 2 * R
  isz = xpad.dtype.itemsize
  hq, th, cp, tc = tiles("forward", h, w, c, xpad.dtype, th=th, tc=tc)
  x = _pad_to(xpad, (bsz, hq + 2 * R, wp, cp))
  f = _pad_to(filters, (bsz, hq, w, T))
  scratch = [] if xpad.dtype == jnp.float32 else [pltpu.VMEM((th + 2 * R, wp, tc), jnp.float32)]
  out = pl.pallas_call(
      functools.partial(_fwd_kernel, th=th, w=w),
      out_shape=jax.ShapeDtypeStruct((bsz, hq, w, cp), jnp.float32),
      grid=(bsz, hq // th, cp // tc),
      in_specs=[
          _halo_spec(th, wp, tc),
          pl.BlockSpec((None, th, w, T), lambda n, i, j: (n, i, 0, 0)),
      ],
      out_specs=pl.BlockSpec((None, th, w, tc), lambda n, i, j: (n, i, 0, j)),
      scratch_shapes=scratch,
      compiler_params=_params(("parallel", "parallel", "parallel")),
      cost_estimate=pl.CostEstimate(flops=2 * T * bsz * h * w * c, transcendentals=0,
                                    bytes_accessed=xpad.size * isz + filters.size * 4
                                    + bsz * h * w * c * 4),
      interpret=_interpret_arg(interpret),
      name="adaptive_conv_fwd_tpu",
  )(x, f)
  return out[:, :h, :, :c]


# ----------------------------------------------------------------------------- grad_x


def _grad_x_kernel(g_ref, f_ref, o_ref, *scratch, th, wp):
  gs = _upcast(g_ref, scratch[0] if scratch else None)

  def row(r, carry):
    acc = jnp.zeros(o_ref.shape[1:], jnp.float32)            # (W+6, tc)
    for a in range(K):
      for b in range(K):
        t = K * a + b
        ra, cb = r + 2 * R - a, 2 * R - b
        f = f_ref[ra, pl.ds(cb, wp), :].astype(jnp.float32)  # (W+6, 49)
        acc = acc + f[:, t:t + 1] * gs[ra, pl.ds(cb, wp), :]
    o_ref[r] = acc
    return carry

  lax.fori_loop(0, th, row, 0)


def grad_x(g, filters, *, interpret=False, th=None, tc=None):
  """g [B, H, W, C], filters [B, H, W, 49] -> grad wrt xpad [B, H+6, W+6, C] float32."""
  g, filters = _f32_io(g), filters.astype(jnp.float32)
  bsz, h, w, c = g.shape
  hp, wp, wz = h + 2 * R, w + 2 * R, w + 4 * R
  isz = g.dtype.itemsize
  hq, th, cp, tc = tiles("grad_x", h, w, c, g.dtype, th=th, tc=tc)
  # Zero halo of 6 on every side (rows: up to hq + 6 so the last block's halo is in range).
  row_pad = ((0, 0), (2 * R, hq - h), (2 * R, 2 * R), (0, 0))
  gz = jnp.pad(_pad_to(g, (bsz, h, w, cp)), row_pad)
  fz = jnp.pad(filters, row_pad)
  scratch = [] if g.dtype == jnp.float32 else [pltpu.VMEM((th + 2 * R, wz, tc), jnp.float32)]
  out = pl.pallas_call(
      functools.partial(_grad_x_kernel, th=th, wp=wp),
      out_shape=jax.ShapeDtypeStruct((bsz, hq, wp, cp), jnp.float32),
      grid=(bsz, hq // th, cp // tc),
      in_specs=[
          _halo_spec(th, wz, tc),
          _halo_spec(th, wz, T, per_channel_block=False),
      ],
      out_specs=pl.BlockSpec((None, th, wp, tc), lambda n, i, j: (n, i, 0, j)),
      scratch_shapes=scratch,
      compiler_params=_params(("parallel", "parallel", "parallel")),
      cost_estimate=pl.CostEstimate(flops=2 * T * bsz * hp * wp * c, transcendentals=0,
                                    bytes_accessed=gz.size * isz + fz.size * 4
                                    + bsz * hp * wp * c * 4),
      interpret=_interpret_arg(interpret),
      name="adaptive_conv_grad_x_tpu",
  )(gz, fz)
  return out[:, :hp, :, :c]


# ----------------------------------------------------------------------------- grad_F


def _grad_f_kernel(g_ref, x_ref, o_ref, *scratch, th, w):
  gs = _upcast(g_ref, scratch[0] if scratch else None)
  xs = _upcast(x_ref, scratch[1] if scratch else None)

  @pl.when(pl.program_id(2) == 0)
  def _init():
    o_ref[...] = jnp.zeros_like(o_ref)

  lane = lax.broadcasted_iota(jnp.int32, (w, T), 1)

  def row(r, carry):
    gr = gs[r]                                                # (W, tc)
    acc = jnp.zeros((w, T), jnp.float32)
    for a in range(K):
      for b in range(K):
        s = jnp.sum(gr * xs[r + a, pl.ds(b, w), :], axis=-1, keepdims=True)   # (W, 1)
        acc = jnp.where(lane == K * a + b, s, acc)
    o_ref[r] = o_ref[r] + acc
    return carry

  lax.fori_loop(0, th, row, 0)


def grad_f(g, xpad, *, interpret=False, th=None, tc=None):
  """g [B, H, W, C], xpad [B, H+6, W+6, C] -> grad wrt filters [B, H, W, 49] float32."""
  g, xpad = _f32_io(g), _f32_io(xpad)
  bsz, h, w, c = g.shape
  wp = w + 2 * R
  gsz, xsz = g.dtype.itemsize, xpad.dtype.itemsize
  upcast = g.dtype != jnp.float32 or xpad.dtype != jnp.float32
  hq, th, cp, tc = tiles("grad_f", h, w, c, g.dtype, xpad.dtype, th=th, tc=tc)
  gq = _pad_to(g, (bsz, hq, w, cp))
  xq = _pad_to(xpad, (bsz, hq + 2 * R, wp, cp))
  scratch = ([pltpu.VMEM((th, w, tc), jnp.float32),
              pltpu.VMEM((th + 2 * R, wp, tc), jnp.float32)] if upcast else [])
  out = pl.pallas_call(
      functools.partial(_grad_f_kernel, th=th, w=w),
      out_shape=jax.ShapeDtypeStruct((bsz, hq, w, T), jnp.float32),
      grid=(bsz, hq // th, cp // tc),
      in_specs=[
          pl.BlockSpec((None, th, w, tc), lambda n, i, j: (n, i, 0, j)),
          _halo_spec(th, wp, tc),
      ],
      out_specs=pl.BlockSpec((None, th, w, T), lambda n, i, j: (n, i, 0, 0)),
      scratch_shapes=scratch,
      compiler_params=_params(("parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(flops=2 * T * bsz * h * w * c, transcendentals=0,
                                    bytes_accessed=g.size * gsz + xpad.size * xsz
                                    + bsz * h * w * T * 4),
      interpret=_interpret_arg(interpret),
      name="adaptive_conv_grad_f_tpu",
  )(gq, xq)
  return out[:, :h]
