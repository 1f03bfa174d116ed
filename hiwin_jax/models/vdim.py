"""Stage 0's training-only modules (FeatUp's `train_vdim_upsampler.py`, official-spec §3.7).

VDIM pre-training optimises the JBU 4x stack together with two attention downsamplers and two
scale nets (one per upsampled level, 2x and 4x) that exist only for its loss
(`hiwin_jax.train.vdim_loss`); the trained JBU is what the LLaVA model keeps. Everything is
NHWC; parameter names follow the official state-dict keys.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hiwin_jax.models.jbu import JBUStack
from hiwin_jax.models.layers import Linear, Precision, param
from hiwin_jax.models.resize import reflect_pad


def gaussian_blur(x: jax.Array, window: int = 5, sigma: float = 1.0) -> jax.Array:
  """kornia `gaussian_blur2d(x, window, (sigma, sigma))` (reflect border, separable: x then y)
  on NHWC `x`: each channel is convolved with the normalised 1-D Gaussian along W, then H."""
  t = np.arange(window, dtype=np.float32) - window // 2
  k = np.exp(-(t ** 2) / np.float32(2 * sigma ** 2))
  k = (k / k.sum()).astype(np.float32)
  r = window // 2
  _, h, w, _ = x.shape
  xp = reflect_pad(x, r, axes=(2,))
  x = sum(xp[:, :, i:i + w] * k[i] for i in range(window))
  xp = reflect_pad(x, r, axes=(1,))
  return sum(xp[:, i:i + h] * k[i] for i in range(window))


def _torch_linear(in_features: int, out_features: int, precision: Precision, rngs: nnx.Rngs,
                  gain: float = 1.0) -> Linear:
  """`nn.Linear`/`nn.Conv2d(k=1)` with torch's default init U(+-1/sqrt(fan_in)) for the weight and
  the bias, times `gain` (ScaleNet scales both by 0.1). Replicated: no logical axes."""
  bound = gain / math.sqrt(in_features)

  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  layer = Linear(in_features, out_features, axes=(None, None), use_bias=True, precision=precision,
                 rngs=rngs, kernel_init=init)
  layer.bias = param(rngs, init, (out_features,), precision.param_dtype, (None,))
  return layer


class AttentionDownsampler(nnx.Module):
  """FeatUp's `AttentionDownsampler(dim, kernel_size, final_size, blur_attn)`.

  Blur the hi-res map (5x5 Gaussian, sigma 1), cut it into kernel x kernel blocks (stride =
  kernel: the official stride `(H - k) // (final - 1)` equals k when H = k * final, the only case
  supported), score each pixel with `Linear(dim -> 1)` after Dropout(0.2), multiply a block's
  scores by one Bernoulli(0.8) keep bit (not rescaled), then `* w + b` (learned k x k), softmax
  over the block, and return the weighted sum of the blurred block. Parameter names follow the
  official keys (`attention_net.1` -> `attention_net_1`).
  """

  def __init__(self, dim: int, *, kernel_size: int = 14, final_size: int = 24,
               blur_attn: bool = True, precision: Precision, rngs: nnx.Rngs):
    self.dim, self.kernel_size, self.final_size = dim, kernel_size, final_size
    self.blur_attn = blur_attn
    self.precision = precision
    self.attention_net_1 = _torch_linear(dim, 1, precision, rngs)
    k, pd = kernel_size, precision.param_dtype

    def jittered(base):
      return lambda key, shape, dtype: base + 0.01 * jax.random.normal(key, shape, dtype)

    self.w = param(rngs, jittered(1.0), (k, k), pd, (None, None))
    self.b = param(rngs, jittered(0.0), (k, k), pd, (None, None))

  def __call__(self, hr: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """hr: [B, k*final, k*final, C] -> [B, final, final, C]; `dropout_rng` = training mode."""
    b, h, w, c = hr.shape
    k, n = self.kernel_size, self.final_size
    if (h, w) != (k * n, k * n) or c != self.dim:
      raise ValueError(f"AttentionDownsampler(dim={self.dim}, kernel={k}, final={n}) needs "
                       f"[B, {k * n}, {k * n}, {self.dim}] features, got {hr.shape}")
    x = gaussian_blur(hr) if self.blur_attn else hr
    scored = x
    if dropout_rng is not None:
      k_drop, k_keep = jax.random.split(dropout_rng)
      keep = jax.random.bernoulli(k_drop, 0.8, x.shape)  # torch.nn.Dropout(0.2): x * mask / 0.8
      scored = jnp.where(keep, x * jnp.asarray(1.25, x.dtype), jnp.zeros((), x.dtype))
    logits = self.attention_net_1(scored)[..., 0].astype(jnp.float32)          # [B, H, W]
    logits = logits.reshape(b, n, k, n, k).transpose(0, 1, 3, 2, 4).reshape(b, n, n, k * k)
    if dropout_rng is not None:
      logits = logits * (jax.random.uniform(k_keep, (b, n, n, 1)) > 0.2)
    logits = (logits * self.w[...].reshape(-1).astype(jnp.float32)
              + self.b[...].reshape(-1).astype(jnp.float32))
    attn = jax.nn.softmax(logits, axis=-1).reshape(b, n, n, k, k)
    blocks = x.reshape(b, n, k, n, k, c)
    return jnp.einsum("bikjlc,bijkl->bijc", blocks, attn.astype(x.dtype),
                      precision=self.precision.matmul)


class ScaleNet(nnx.Module):
  """The predicted uncertainty: s = clamp_min(exp(Conv1x1(dim -> 1)(x) + 0.1), 1e-4), with the
  conv's default init scaled by 0.1 (as the official `ScaleNet.__init__`)."""

  def __init__(self, dim: int, *, precision: Precision, rngs: nnx.Rngs):
    self.net = _torch_linear(dim, 1, precision, rngs, gain=0.1)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, h, w, C] -> [B, h, w, 1] float32."""
    return jnp.maximum(jnp.exp(self.net(x).astype(jnp.float32) + 0.1), 1e-4)


class VdimModel(nnx.Module):
  """Everything the pre-training optimises, under the official state-dict prefixes: the JBU
  (`upsampler`), the downsamplers and the scale nets of the 4x and 2x levels."""

  def __init__(self, dim: int, *, image_size: int, patch_size: int, scale: int,
               precision: Precision, conv_impl: str, official_grad_bug: bool = False,
               rngs: nnx.Rngs):
    if scale != 4:
      raise ValueError(f"VDIM pre-training trains the 4x stack (levels 2x and 4x), got scale "
                       f"{scale}")
    final = image_size // patch_size
    self.upsampler = JBUStack(dim, scale=scale, precision=precision, conv_impl=conv_impl,
                              official_grad_bug=official_grad_bug, rngs=rngs)

    def down():
      return AttentionDownsampler(dim, kernel_size=patch_size, final_size=final, blur_attn=True,
                                  precision=precision, rngs=rngs)

    self.downsampler = down()
    self.downsampler_2x = down()
    self.scale_net = ScaleNet(dim, precision=precision, rngs=rngs)
    self.scale_net_2x = ScaleNet(dim, precision=precision, rngs=rngs)
