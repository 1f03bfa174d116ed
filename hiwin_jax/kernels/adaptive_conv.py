"""Adaptive convolution of the JBU upsampler (FeatUp's `AdaptiveConv` CUDA op), NHWC.

    out[n, y, x, c] = sum_{a, b} filters[n, y, x, 7a + b] * xpad[n, y + a, x + b, c]

`xpad` is the hi-res feature map already reflect-padded by 3 ([B, H+6, W+6, C], any float
dtype); `filters` is [B, H, W, 49] (tap p = 7a + b, a = row offset, b = column offset, the
`torch.nn.Unfold` order FeatUp uses). The sum runs in float32 (a outer, b inner, like the
official CUDA kernel) and the output is float32; callers cast. float64 inputs accumulate and
return float64 on the pure-JAX path (used by the finite-difference gradient checks).

Implementations (`impl=`), all behind one `jax.custom_vjp` with explicit backward passes
(`pallas_call` has no transpose rule, and the explicit form pins the residuals to
`(xpad, filters)` instead of 49 shifted slices):
- "xla": 49 shifted-slice accumulations (the 49 shifted copies are never materialised).
  grad_x is the exact transpose (49 zero-padded shifted products summed on the padded
  grid), grad_F is a per-tap reduction over C. The CPU path and the oracle for the kernels.
- "pallas_tpu": Mosaic TPU kernels (`adaptive_conv_pallas_tpu.py`).
- "pallas_gpu": Pallas-Triton GPU kernels (`adaptive_conv_pallas_gpu.py`).
- "auto" (the default, and the models' default): the rule is
      TPU -> pallas_tpu,   CUDA GPU -> pallas_gpu,   anything else (CPU, ROCm) -> xla,
  decided by the platform the program is *lowered for* (`lax.platform_dependent`), not by
  `jax.default_backend()`: a train step compiled ahead of time on a CPU host for a TPU slice
  (`hiwin aot`) gets the Mosaic kernels. The Pallas kernels are checked in interpret mode at
  the production block shapes and by off-device lowering/compiling; `benchmarks/device_check.py`
  checks and times them on a card (BUILD_NOTES.md says which numbers exist). impl="xla" keeps
  the reference path everywhere.
A Pallas impl lowered for another platform than its own (pallas_tpu on CPU or GPU, pallas_gpu
on CPU or TPU) runs in Pallas's generic interpret mode (slow; for tests and the CPU smoke
check); `interpret=True` (Pallas impls only) forces interpret mode everywhere, the TPU kernels
with TPU semantics (`pltpu.InterpretParams()`).

`official_grad_bug=True` reproduces the indexing bug of the official CUDA
`adaptive_conv_grad_filters_kernel` (`f = blockIdx.z * blockIdx.z + threadIdx.z`): only
taps {0, 1, 4, 9, 16, 25, 36} receive a filter gradient, the other 42 get zero. grad_x is
unaffected. Only for reproducing the official VDIM (JBU) pretraining; the default is the
correct gradient.

Sharding: `pallas_call` cannot be partitioned automatically. Under a jit whose inputs are
sharded over the batch, call `adaptive_conv_sharded(xpad, filters, mesh=..., batch_axis=...)`
(a `jax.shard_map` over the batch axis) instead of `adaptive_conv`; the JBU modules do this
by themselves under a mesh and logical-axis rules (`models/jbu.py`). The xla impl partitions
by itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KSIZE = 7
NTAPS = KSIZE * KSIZE
PAD = KSIZE // 2
IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")
# Taps the official CUDA grad_filters kernel writes: f = z * z for z = 0..6 (z >= 7 is >= 49).
BUGGY_GRAD_TAPS = tuple(z * z for z in range(KSIZE))


def _acc_dtype(*dtypes):
  """float32, or float64 when an input is float64 (the pure-JAX path keeps f64 exact)."""
  return jnp.result_type(jnp.float32, *dtypes)


# ----------------------------------------------------------------------------- xla


# The 49 taps run in a fori_loop so XLA keeps one accumulator live: an unrolled chain of 49
# shifted products is fused or scheduled by XLA into many C-sized temporaries at once (the 4x
# level's backward asked for 32 GB at B=7, C=1024). Taps are added in order t = 7a + b, as the
# official CUDA kernel does, so the loop is bit-identical to the unrolled sum.

def _tap(t):
  return t // KSIZE, t % KSIZE


def forward_xla(xpad, filters):
  """out: [B, H, W, C] = sum_t filters[..., t] * shifted xpad; float32 accumulation."""
  n, hp, wp, c = xpad.shape
  h, w = hp - 2 * PAD, wp - 2 * PAD
  acc_t = _acc_dtype(xpad.dtype, filters.dtype)
  f = filters.astype(acc_t)
  # The barrier keeps XLA from pushing tap 0's slice through the producer of xpad (a reflect
  # pad's concatenate), which would keep the producer's input live next to xpad and the
  # accumulator.
  xpad = lax.optimization_barrier(xpad)

  def term(t):
    a, b = _tap(t)
    x = lax.dynamic_slice(xpad, (0, a, b, 0), (n, h, w, c)).astype(acc_t)
    return lax.dynamic_slice_in_dim(f, t, 1, axis=3) * x

  # The loop starts from tap 0's product (0 + p == p), not from a zeros map: the accumulator
  # then comes into being right before the loop instead of being a broadcast XLA may schedule
  # (and keep live) long before, next to the upsampling temporaries.
  return lax.fori_loop(1, KSIZE * KSIZE, lambda t, acc: acc + term(t), term(0))


def grad_x_xla(g, filters):
  """grad wrt xpad: [B, H+6, W+6, C]; gxp[y+a, x+b] += g[y, x] * F[y, x, 7a+b]."""
  n, h, w, c = g.shape
  acc_t = _acc_dtype(g.dtype, filters.dtype)
  g = g.astype(acc_t)
  f = filters.astype(acc_t)

  def body(t, acc):
    a, b = _tap(t)
    window = lax.dynamic_slice(acc, (0, a, b, 0), (n, h, w, c))
    term = g * lax.dynamic_slice_in_dim(f, t, 1, axis=3)
    return lax.dynamic_update_slice(acc, window + term, (0, a, b, 0))

  init = jnp.zeros((n, h + 2 * PAD, w + 2 * PAD, c), acc_t)
  return lax.fori_loop(0, KSIZE * KSIZE, body, init)


def grad_f_xla(g, xpad):
  """grad wrt filters: [B, H, W, 49]; gF[..., 7a+b] = sum_c g * xpad[:, a:a+H, b:b+W]."""
  n, h, w, c = g.shape
  acc_t = _acc_dtype(g.dtype, xpad.dtype)
  g = g.astype(acc_t)

  def body(t, out):
    a, b = _tap(t)
    x = lax.dynamic_slice(xpad, (0, a, b, 0), (n, h, w, c)).astype(acc_t)
    tap = jnp.sum(g * x, axis=-1, keepdims=True)
    return lax.dynamic_update_slice(out, tap, (0, 0, 0, t))

  return lax.fori_loop(0, KSIZE * KSIZE, body, jnp.zeros((n, h, w, KSIZE * KSIZE), acc_t))


# ----------------------------------------------------------------------------- dispatch


def _check_impl(impl: str, interpret: bool) -> str:
  if impl not in IMPLS:
    raise ValueError(f"adaptive_conv: impl must be one of {IMPLS}, got {impl!r}")
  if interpret and impl not in _KERNEL_PLATFORM:
    raise ValueError(f"adaptive_conv: interpret=True needs impl 'pallas_tpu' or 'pallas_gpu', "
                     f"got {impl!r}")
  return impl


_XLA_FNS = (forward_xla, grad_x_xla, grad_f_xla)
# The platform each Pallas impl compiles for (lax.platform_dependent's names).
_KERNEL_PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "cuda"}
_AUTO = {"tpu": "pallas_tpu", "cuda": "pallas_gpu"}


def _kernel_fn(impl: str, op: int, interpret):
  if impl == "pallas_tpu":
    from hiwin_jax.kernels import adaptive_conv_pallas_tpu as k
  else:
    from hiwin_jax.kernels import adaptive_conv_pallas_gpu as k
  fn = (k.forward, k.grad_x, k.grad_f)[op]

  def run(a, b):
    # The kernels compute in float32; float64 inputs (x64 mode) get float64 results, as on the
    # xla path, so every platform branch has the same output type.
    return fn(a, b, interpret=interpret).astype(_acc_dtype(a.dtype, b.dtype))

  return run


def _op(impl: str, op: int, interpret: bool):
  """The callable for pass `op` (0 forward, 1 grad_x, 2 grad_f) of `impl`, chosen per lowering
  platform (see the module docstring). The off-platform branch of a Pallas impl uses the
  generic interpreter: `lax.platform_dependent` branches must agree in side effects, and the TPU
  simulator (`interpret=True`) has some."""
  if impl == "xla":
    return _XLA_FNS[op]
  if interpret:
    return _kernel_fn(impl, op, True)
  if impl == "auto":
    branches = {p: _kernel_fn(k, op, False) for p, k in _AUTO.items()}
    default = _XLA_FNS[op]
  else:
    branches = {_KERNEL_PLATFORM[impl]: _kernel_fn(impl, op, False)}
    default = _kernel_fn(impl, op, "generic")
  return lambda a, b: lax.platform_dependent(a, b, default=default, **branches)


def _buggy_tap_mask(dtype):
  m = np.zeros((NTAPS,), np.float32)
  m[list(BUGGY_GRAD_TAPS)] = 1.0
  return jnp.asarray(m, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _adaptive_conv(xpad, filters, impl, official_grad_bug, interpret):
  return _op(impl, 0, interpret)(xpad, filters)


def _adaptive_conv_fwd(xpad, filters, impl, official_grad_bug, interpret):
  return _op(impl, 0, interpret)(xpad, filters), (xpad, filters)


def _adaptive_conv_bwd(impl, official_grad_bug, interpret, res, g):
  xpad, filters = res
  gx = _op(impl, 1, interpret)(g, filters).astype(xpad.dtype)
  gf = _op(impl, 2, interpret)(g, xpad)
  if official_grad_bug:
    gf = gf * _buggy_tap_mask(gf.dtype)
  return gx, gf.astype(filters.dtype)


_adaptive_conv.defvjp(_adaptive_conv_fwd, _adaptive_conv_bwd)
# One executable per shape when called eagerly (instead of ~150 op-by-op dispatches); a
# plain nested call under an outer jit.
_adaptive_conv_jit = jax.jit(_adaptive_conv, static_argnums=(2, 3, 4))


def _validate(xpad, filters):
  xs, fs = tuple(xpad.shape), tuple(filters.shape)
  if len(xs) != 4 or len(fs) != 4:
    raise ValueError(f"adaptive_conv: expected xpad [B, H+6, W+6, C] and filters [B, H, W, 49], "
                     f"got xpad {xs} and filters {fs}")
  b, hp, wp, c = xs
  h, w = hp - 2 * PAD, wp - 2 * PAD
  if h < 1 or w < 1 or c < 1 or b < 1:
    raise ValueError(f"adaptive_conv: xpad {xs} gives an empty output grid H={h}, W={w} "
                     f"(C={c}, B={b}); xpad must be [B, H+6, W+6, C] with H, W, C, B >= 1 "
                     f"(filters {fs})")
  if fs != (b, h, w, NTAPS):
    raise ValueError(f"adaptive_conv: filters {fs} must be [B, H, W, 49] = {(b, h, w, NTAPS)} "
                     f"for xpad {xs}")
  for name, dt in (("xpad", xpad.dtype), ("filters", filters.dtype)):
    if not jnp.issubdtype(dt, jnp.floating):
      raise TypeError(f"adaptive_conv: {name} must be a float array, got {dt} "
                      f"(xpad {xs}, filters {fs})")


def adaptive_conv(xpad, filters, *, impl: str = "auto", official_grad_bug: bool = False,
                  interpret: bool = False):
  """FeatUp `AdaptiveConv` in NHWC.

  xpad: [B, H+6, W+6, C] reflect-padded features (any float dtype).
  filters: [B, H, W, 49] per-pixel taps, p = 7*row_offset + col_offset (float32).
  returns: [B, H, W, C] float32 (float64 for float64 inputs).
  Differentiable in both arguments; cotangents have the primal dtypes. `impl` and `interpret`:
  see the module docstring.
  """
  _validate(xpad, filters)
  return _adaptive_conv_jit(xpad, filters, _check_impl(impl, interpret),
                            bool(official_grad_bug), bool(interpret))


def adaptive_conv_sharded(xpad, filters, *, mesh, batch_axis="data", **kwargs):
  """`adaptive_conv` under `jax.shard_map` over the batch axis (needed by the Pallas impls
  when xpad/filters are batch-sharded inside jit). `batch_axis` is a mesh axis name or a
  tuple of them; the batch must divide evenly over it."""
  spec = jax.sharding.PartitionSpec(batch_axis)
  fn = functools.partial(adaptive_conv, **kwargs)
  # check_vma=False: pallas_call out_shapes carry no varying-manual-axes annotation, which
  # the checker would demand; every output here is per-shard anyway.
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec), out_specs=spec,
                       check_vma=False)(xpad, filters)
