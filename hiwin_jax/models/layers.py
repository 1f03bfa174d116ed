"""Building blocks shared by every tower: parameters with logical axes, Linear, norms, remat, scan.

Every parameter is created by `param()`, which attaches its logical axis names (`embed`, `mlp`,
`heads`, ...) as `out_sharding` metadata. The mapping from logical names to mesh axes lives in
the config (`hiwin_jax.parallel.sharding`); modules never name a mesh axis. Eager sharding is off
on purpose: models are created unsharded (tests, conversion) or under `jax.jit` with explicit
`out_shardings` (training), never by a side effect of an ambient mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name as _checkpoint_name

Axes = tuple[str | None, ...]
Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}
PRECISIONS = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
              "highest": jax.lax.Precision.HIGHEST}


@dataclasses.dataclass(frozen=True)
class Precision:
  """Precision policy: parameters stored in `param_dtype`, matmuls in `dtype` at `matmul`.

  Norm statistics, softmax and logits are always computed in float32 regardless of `dtype`.
  The fp32 "parity" policy (`Precision.parity()`) is what the numerical tests use.
  """
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  matmul: Any = jax.lax.Precision.DEFAULT

  @classmethod
  def from_config(cls, cfg) -> "Precision":
    return cls(dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
               matmul=PRECISIONS[cfg.matmul_precision])

  @classmethod
  def parity(cls) -> "Precision":
    return cls(jnp.float32, jnp.float32, jax.lax.Precision.HIGHEST)


def normal_init(stddev: float = 0.02) -> Initializer:
  return jax.nn.initializers.normal(stddev)


def param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int], dtype: Any,
          axes: Axes) -> nnx.Param:
  """An `nnx.Param` of `shape` with logical axis names `axes` (one name or None per dim)."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match parameter shape {tuple(shape)}")
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel + bias, kernel stored (in, out) (PyTorch `nn.Linear.weight` transposed).

  `fused_bias` says where a bf16 result is rounded (`biased_matmul`): True (torch's `F.linear` on
  a 2-D or contiguous input, and its CPU convolutions) rounds once, after the bias; False (torch's
  `F.linear` on a non-contiguous input: matmul, then `add_`) rounds the product, then the sum.
  Modules set False only where the official code feeds a non-contiguous tensor.
  """

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
               use_bias: bool, precision: Precision, rngs: nnx.Rngs,
               kernel_init: Initializer = normal_init(), fused_bias: bool = True):
    self.precision = precision
    self.fused_bias = fused_bias
    self.kernel = param(rngs, kernel_init, (in_features, out_features), precision.param_dtype, axes)
    self.bias = (param(rngs, jax.nn.initializers.zeros, (out_features,), precision.param_dtype,
                       (axes[1],)) if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., in] -> [..., out] in the compute dtype."""
    return biased_matmul(x, self.kernel[...], None if self.bias is None else self.bias[...],
                         self.precision, fused=self.fused_bias)


def biased_matmul(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                  precision: Precision, *, fused: bool = True) -> jax.Array:
  """x @ kernel + bias, x: [..., in], kernel: [in, out], bias: [out] -> [..., out] in the compute
  dtype. The products accumulate in float32. `fused`: the bias is added to the float32 sum and
  the result rounded once, as torch's addmm (`F.linear` on 2-D or contiguous inputs, CPU
  convolutions) does; otherwise the product is rounded first and the bias added in the compute
  dtype, as torch's matmul + `add_` (`F.linear` on non-contiguous inputs, cuDNN convolutions).
  In bf16 the two rules disagree on ~28% of the outputs of a 1024-wide projection."""
  dt = precision.dtype
  y = jnp.matmul(x.astype(dt), kernel.astype(dt), precision=precision.matmul,
                 preferred_element_type=jnp.float32)
  if bias is None:
    return round_to(y, dt)
  if not fused:  # two roundings, both kept (`rounded`): the product's, then the sum's
    return round_to(rounded(y, dt) + rounded(bias, dt), dt)
  # The bias is a compute-dtype parameter in torch's run too: round it first, add it in float32.
  return round_to(y + rounded(bias, dt), dt)


def rounded(x: jax.Array, dtype: Any) -> jax.Array:
  """float32 `x` rounded (to nearest even) to `dtype`'s precision, kept in float32.

  `x.astype(bf16).astype(f32)` is not a rounding XLA keeps: with its default
  `xla_allow_excess_precision` it may drop the pair (or compute a bf16 op in float32 without
  rounding its result), while torch rounds every bf16 op's result. `reduce_precision` cannot be
  dropped."""
  info = jnp.finfo(dtype)
  return jax.lax.reduce_precision(x.astype(jnp.float32), exponent_bits=info.nexp,
                                  mantissa_bits=info.nmant)


def round_to(x: jax.Array, dtype: Any) -> jax.Array:
  """`x` (any float dtype) as `dtype`, rounded once to nearest even: `x.astype(dtype)` with a
  rounding XLA keeps. XLA:CPU computes bf16 dots and elementwise ops in float32 and, with its
  default excess precision, drops the round trip of a bf16 value between two such ops (a
  LayerNorm output feeding a projection, softmax probabilities feeding the context product):
  torch rounds each. The shared Linear and LayerNorm and the projector (JBU, Hiwin) route every
  compute-dtype result through here; RMSNorm and the ViT's and the LLM's attention probabilities
  and residual adds do not (yet). Only a bfloat16 `dtype` gets the kept rounding (its exponent
  range is float32's, so `reduce_precision` is exact there); any other is a plain cast (float16's
  `reduce_precision` would flush subnormals, float32/64 need none)."""
  if jnp.dtype(dtype) != jnp.bfloat16:
    return x.astype(dtype)
  return rounded(x, dtype).astype(dtype)


def add(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a + b` of two arrays of one compute dtype as torch's bf16 add computes it: the sum in
  float32 (or wider) rounded once (for bf16 equal to the correctly rounded bf16 sum: float32 has
  more than 2 x 8 + 2 bits), with a rounding XLA keeps (`round_to`)."""
  if a.dtype != b.dtype:
    raise TypeError(f"add: operands of one dtype expected, got {a.dtype} and {b.dtype}")
  wide = jnp.promote_types(a.dtype, jnp.float32)
  return round_to(a.astype(wide) + b.astype(wide), a.dtype)


def divide(a: jax.Array, b: jax.Array) -> jax.Array:
  """a / b correctly rounded, b broadcast to a's shape. XLA rewrites a / broadcast(b) into
  a * (1 / b) and (a / b) / c into a / (b * c), both off by an ulp; a barrier holding the dividend
  too hides the divisor."""
  a, b = jax.lax.optimization_barrier((a, jnp.broadcast_to(b, a.shape).astype(a.dtype)))
  return a / b


def scaled(x: jax.Array, factor: float) -> jax.Array:
  """`factor * x` as torch evaluates a Python scalar times a tensor: the factor as float32, the
  product in float32, rounded once to x's dtype (a weakly typed `x * factor` in JAX would round
  the factor to bf16 first: sqrt(1/128) or 0.1 then change many bf16 products). The rounding is
  `rounded`'s, which XLA keeps even where the product feeds another op."""
  return round_to(x.astype(jnp.float32) * np.float32(factor), x.dtype)


class LayerNorm(nnx.Module):
  """`torch.nn.LayerNorm(dim, eps)`: two-pass mean/variance in float32, output in compute dtype."""

  def __init__(self, dim: int, *, eps: float, axis_name: str | None, precision: Precision):
    self.eps = eps
    self.precision = precision
    self.scale = param(None, jax.nn.initializers.ones, (dim,), precision.param_dtype, (axis_name,))
    self.bias = param(None, jax.nn.initializers.zeros, (dim,), precision.param_dtype, (axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., dim] -> [..., dim]."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return round_to(y, self.precision.dtype)


class RMSNorm(nnx.Module):
  """LLaMA/Qwen2 RMSNorm as transformers computes it: normalise in float32, cast, then scale."""

  def __init__(self, dim: int, *, eps: float, axis_name: str | None, precision: Precision):
    self.eps = eps
    self.precision = precision
    self.scale = param(None, jax.nn.initializers.ones, (dim,), precision.param_dtype, (axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., dim] -> [..., dim]."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.precision.dtype) * y.astype(self.precision.dtype)


# --- remat -----------------------------------------------------------------------------------

_CP = jax.checkpoint_policies
REMAT_POLICIES: dict[str, Any] = {
    # name -> policy; "none" means no rematerialisation at all.
    "none": None,
    "full": _CP.nothing_saveable,
    "minimal": _CP.dots_with_no_batch_dims_saveable,
    "save_dots": _CP.dots_saveable,
    "save_qkv_proj": _CP.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "minimal_with_context": _CP.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "out_proj", "context", "mlp_in", "mlp_out"),
}


def checkpoint_name(x: jax.Array, name: str) -> jax.Array:
  """Tags an intermediate so that named remat policies can save it."""
  return _checkpoint_name(x, name)


# --- scanned layer stacks ---------------------------------------------------------------------

def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                 rngs: nnx.Rngs) -> nnx.Module:
  """Creates `num_layers` layers as one module whose parameters have a leading `layers` axis."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r):
    return make_layer(r)

  return create(rngs)


def scan_layers(layers: nnx.Module, body: Callable, carry: Any, xs: Any = None, *,
                remat: str = "none", num_layers: int | None = None):
  """Runs `body(layer, carry, x) -> (carry, y)` over the stacked layers with `lax.scan`.

  `num_layers` runs only the first layers (CLIP stops at `select_layer`). `remat` names a policy
  in `REMAT_POLICIES`; "full" recomputes the whole layer in the backward pass.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; choose from {sorted(REMAT_POLICIES)}")
  graphdef, state = nnx.split(layers)
  if num_layers is not None:
    state = jax.tree.map(lambda a: a[:num_layers], state)

  def step(c, inputs):
    st, x = inputs
    return body(nnx.merge(graphdef, st), c, x)

  if remat != "none":
    step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return jax.lax.scan(step, carry, (state, xs))
