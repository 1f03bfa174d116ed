"""Pallas GPU kernels for `adaptive_conv` (forward, grad_x, grad_F), Triton lowering.

Why Triton and not Mosaic GPU (decided for jax 0.10.2 on CPU and jax 0.11.x on the GPU):
- `pl.pallas_call` with Triton `CompilerParams` lowers on both 0.10.2 and 0.11.x (0.11.0
  deprecates the Triton backend, warning "jax-pallas-triton", but keeps it). The params
  class is looked up with getattr (`CompilerParams`, formerly `TritonCompilerParams`).
- Mosaic GPU through `pl.pallas_call` is itself deprecated since 0.10.2 in favour of
  `plgpu.kernel` + `emit_pipeline`, an API still changing between those versions; its
  TMA copies need 16-byte-aligned minor dims (49 taps x 4 B is not), and its interpret mode
  runs single-block grids only, so CPU tests could not cover a real grid.
- Triton kernels written with plain ref indexing run under the generic `interpret=True`
  on CPU with their full grid.

Triton constraints that shape the kernels: every value touched must have a power-of-2
size, and register values cannot be sliced, so every shifted window is its own ref load.
The wrapper zero-pads W to a multiple of the W tile `tw` (plus the 6-column halo) and C to
a multiple of the channel tile `tc`, so all loads are in bounds and need no masks, and
transposes the filters to tap-major [B, 49, H, W] so each tap's filter row is a contiguous
load. Results are sliced back. All arithmetic is float32.

- forward: one program per (b, y, W tile, C tile); 49 taps (a outer, b inner) of
  `f[b, t, y, w0:w0+tw, None] * x[b, y+a, w0+b:w0+b+tw, c0:c0+tc]`.
- grad_x: same grid over the padded (H+6, W+6) output; g and F are zero-padded by 6 on
  each side, turning the transpose into a gather with both operands shifted (no atomics).
- grad_F: one program per (b, y, W tile); a `fori_loop` over channel tiles carries 49
  (tw,) accumulators of per-tap reductions over C; written tap-major, then transposed.

Block sizes can be forced with `tw=` / `tc=` (powers of 2).

Checked off-device: Pallas -> Triton IR lowering (power-of-2 rule included) in f32 and
bf16 (`test_pallas_gpu_kernels_lower_to_triton_off_device`), and the kernels in interpret
mode. Not yet compiled to PTX, run or timed on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

K = 7
T = K * K
R = K // 2


def _compiler_params(num_warps=4, num_stages=2):
  from jax.experimental.pallas import triton as pltriton  # deprecated (warns) on jax >= 0.11
  cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def _round_up(x, m):
  return -(-x // m) * m


def tiles(w: int, c: int, tw: int | None = None, tc: int | None = None) -> tuple[int, int]:
  """(tw, tc): the W and channel tiles of a kernel whose grid spans `w` columns (the output's W
  for forward and grad_F, the padded W + 6 for grad_x) and `c` channels. Forced values are kept
  (powers of 2). At production size (W = 48 or 96, and 54 or 102 for grad_x; C = 1024) every
  kernel uses tw=32, tc=128."""
  tw = tw or min(32, pl.next_power_of_2(w))
  tc = tc or min(128, pl.next_power_of_2(c))
  if tw & (tw - 1) or tc & (tc - 1):
    raise ValueError(f"adaptive_conv pallas_gpu: tiles must be powers of 2, got tw={tw}, tc={tc}")
  return tw, tc


def _f32_io(x):
  """Kernels read 16/32-bit floats; wider inputs (x64 mode) are computed in f32."""
  return x.astype(jnp.float32) if x.dtype.itemsize > 4 else x


def _pad(x, widths):
  if all(p == (0, 0) for p in widths):
    return x
  return jnp.pad(x, widths)


def _call(kernel, out_shape, grid, args, interpret, name, flops, nbytes):
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      compiler_params=_compiler_params(),
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
      interpret=bool(interpret),
      name=name,
  )(*args)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(x_ref, f_ref, o_ref, *, tw, tc):
  n, y = pl.program_id(0), pl.program_id(1)
  w0 = pl.multiple_of(pl.program_id(2) * tw, tw)
  c0 = pl.multiple_of(pl.program_id(3) * tc, tc)
  acc = jnp.zeros((tw, tc), jnp.float32)
  for a in range(K):
    for b in range(K):
      f = f_ref[n, K * a + b, y, pl.ds(w0, tw)].astype(jnp.float32)
      x = x_ref[n, y + a, pl.ds(w0 + b, tw), pl.ds(c0, tc)].astype(jnp.float32)
      acc = acc + f[:, None] * x
  o_ref[n, y, pl.ds(w0, tw), pl.ds(c0, tc)] = acc


def forward(xpad, filters, *, interpret=False, tw=None, tc=None):
  """xpad [B, H+6, W+6, C], filters [B, H, W, 49] -> [B, H, W, C] float32."""
  xpad, filters = _f32_io(xpad), filters.astype(jnp.float32)
  bsz, hp, wp, c = xpad.shape
  h, w = hp - 2 * R, wp - 2 * R
  tw, tc = tiles(w, c, tw, tc)
  wq, cq = _round_up(w, tw), _round_up(c, tc)
  x = _pad(xpad, ((0, 0), (0, 0), (0, wq - w), (0, cq - c)))
  f = _pad(jnp.transpose(filters, (0, 3, 1, 2)), ((0, 0), (0, 0), (0, 0), (0, wq - w)))
  out = _call(functools.partial(_fwd_kernel, tw=tw, tc=tc),
              jax.ShapeDtypeStruct((bsz, h, wq, cq), jnp.float32),
              (bsz, h, wq // tw, cq // tc), (x, f), interpret, "adaptive_conv_fwd_gpu",
              2 * T * bsz * h * w * c,
              xpad.size * xpad.dtype.itemsize + filters.size * 4 + bsz * h * w * c * 4)
  return out[:, :, :w, :c]


# ----------------------------------------------------------------------------- grad_x


def _grad_x_kernel(g_ref, f_ref, o_ref, *, tw, tc):
  n, yp = pl.program_id(0), pl.program_id(1)
  w0 = pl.multiple_of(pl.program_id(2) * tw, tw)
  c0 = pl.multiple_of(pl.program_id(3) * tc, tc)
  acc = jnp.zeros((tw, tc), jnp.float32)
  for a in range(K):
    for b in range(K):
      row, col = yp + 2 * R - a, w0 + 2 * R - b
      f = f_ref[n, K * a + b, row, pl.ds(col, tw)].astype(jnp.float32)
      g = g_ref[n, row, pl.ds(col, tw), pl.ds(c0, tc)].astype(jnp.float32)
      acc = acc + f[:, None] * g
  o_ref[n, yp, pl.ds(w0, tw), pl.ds(c0, tc)] = acc


def grad_x(g, filters, *, interpret=False, tw=None, tc=None):
  """g [B, H, W, C], filters [B, H, W, 49] -> grad wrt xpad [B, H+6, W+6, C] float32."""
  g, filters = _f32_io(g), filters.astype(jnp.float32)
  bsz, h, w, c = g.shape
  hp, wp = h + 2 * R, w + 2 * R
  tw, tc = tiles(wp, c, tw, tc)
  wq, cq = _round_up(wp, tw), _round_up(c, tc)
  halo = 2 * R
  gz = _pad(g, ((0, 0), (halo, halo), (halo, halo + wq - wp), (0, cq - c)))
  fz = _pad(jnp.transpose(filters, (0, 3, 1, 2)),
            ((0, 0), (0, 0), (halo, halo), (halo, halo + wq - wp)))
  out = _call(functools.partial(_grad_x_kernel, tw=tw, tc=tc),
              jax.ShapeDtypeStruct((bsz, hp, wq, cq), jnp.float32),
              (bsz, hp, wq // tw, cq // tc), (gz, fz), interpret, "adaptive_conv_grad_x_gpu",
              2 * T * bsz * hp * wp * c,
              g.size * g.dtype.itemsize + filters.size * 4 + bsz * hp * wp * c * 4)
  return out[:, :, :wp, :c]


# ----------------------------------------------------------------------------- grad_F


def _grad_f_kernel(g_ref, x_ref, o_ref, *, tw, tc, nc):
  n, y = pl.program_id(0), pl.program_id(1)
  w0 = pl.multiple_of(pl.program_id(2) * tw, tw)

  def body(ci, accs):
    c0 = pl.multiple_of(ci * tc, tc)
    g = g_ref[n, y, pl.ds(w0, tw), pl.ds(c0, tc)].astype(jnp.float32)
    out = []
    for a in range(K):
      for b in range(K):
        x = x_ref[n, y + a, pl.ds(w0 + b, tw), pl.ds(c0, tc)].astype(jnp.float32)
        out.append(accs[K * a + b] + jnp.sum(g * x, axis=1))
    return tuple(out)

  accs = lax.fori_loop(0, nc, body, tuple(jnp.zeros((tw,), jnp.float32) for _ in range(T)))
  for t in range(T):
    o_ref[n, t, y, pl.ds(w0, tw)] = accs[t]


def grad_f(g, xpad, *, interpret=False, tw=None, tc=None):
  """g [B, H, W, C], xpad [B, H+6, W+6, C] -> grad wrt filters [B, H, W, 49] float32."""
  g, xpad = _f32_io(g), _f32_io(xpad)
  bsz, h, w, c = g.shape
  tw, tc = tiles(w, c, tw, tc)
  wq, cq = _round_up(w, tw), _round_up(c, tc)
  gq = _pad(g, ((0, 0), (0, 0), (0, wq - w), (0, cq - c)))
  xq = _pad(xpad, ((0, 0), (0, 0), (0, wq - w), (0, cq - c)))
  out = _call(functools.partial(_grad_f_kernel, tw=tw, tc=tc, nc=cq // tc),
              jax.ShapeDtypeStruct((bsz, T, h, wq), jnp.float32),
              (bsz, h, wq // tw), (gq, xq), interpret, "adaptive_conv_grad_f_gpu",
              2 * T * bsz * h * w * c,
              g.size * g.dtype.itemsize + xpad.size * xpad.dtype.itemsize + bsz * h * w * T * 4)
  return jnp.transpose(out[:, :, :, :w], (0, 2, 3, 1))
