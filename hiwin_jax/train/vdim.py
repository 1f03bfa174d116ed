"""Stage 0: VDIM pre-training (FeatUp's `train_vdim_upsampler.py`, spec §3.7), as one jitted step.

The JBU 4x stack learns to upsample frozen CLIP features so that, after a random jitter T of the
image, an attention downsampler D maps T(upsampled features) back onto CLIP(T(image)) ("multi-view
reconstruction"). Per step, for each of `n_jitters` jitters (gradients summed, one optimizer step):

    F2, F4   = JBU(CLIP(x), x)                      hierarchical: up2 sees stop_gradient(F2)
    F2, F4   = bilinear(F2, F4 -> image size)
    x~, lr~  = T(x), stop_gradient(CLIP(T(x)))
    d_k      = P(D_k(T(F_k)))                        P: per-sample Gaussian projection C -> 30
    rec_k    = mean((d_k - P(lr~))^2 / (2 s_k^2) + log s_k) / n_jitters,  s_k = ScaleNet_k(lr~)
    crf_k    = SampledCRF(x, P(T(F_k)))              jitter 0 only, weight 0.001
    loss     = (rec_4x + 0.001 crf_4x) + (rec_2x + 0.001 crf_2x)

TV and entropy terms have weight 0 in the official run and are left out. The optimizer is
PyTorch's NAdam (with its momentum-decay schedule; optax.nadam has none) over the JBU, both
downsamplers and both scale nets, after Lightning's gradient-norm clip to 1e-4 in the first 10
steps. CLIP is frozen: it is an input of the step, never differentiated, never saved.

Everything is NHWC. All randomness of a step (dropout, jitter, projection, CRF pixels) derives
from (seed, step), so a resumed run repeats an uninterrupted one exactly. The official CUDA
adaptive-conv `grad_filters` bug (spec §3.4) is not reproduced by default: the filters get the
correct gradient. `cfg.jbu.official_grad_bug = True` reproduces it (only taps 0, 1, 4, 9, 16, 25,
36 of each level's filters receive gradient, as in the official pre-training).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from hiwin_jax.models.clip_vit import ClipVisionTower
from hiwin_jax.models.jbu import JBUStack
from hiwin_jax.models.layers import Linear, Precision, param
from hiwin_jax.models.resize import apply_linear_taps, linear_taps, reflect_pad, resize_bilinear
from hiwin_jax.parallel import mesh as M
from hiwin_jax.parallel import sharding as S
from hiwin_jax.train import checkpoint, vdim_data

log = logging.getLogger("hiwin.vdim")

# SampledCRFLoss(alpha=.1, beta=.15, gamma=.005, w1=10.0, w2=3.0, shift=0.0) of the official run.
CRF_ALPHA, CRF_BETA, CRF_GAMMA, CRF_W1, CRF_W2 = 0.1, 0.15, 0.005, 10.0, 3.0
CLIP_UNTIL_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)


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


# --- jitter ------------------------------------------------------------------------------------

class Jitter(NamedTuple):
  """One draw of FeatUp's `sample_transform`: zoom factor, crop offset (x rows, y cols), flip."""
  zoom: jax.Array   # float32 scalar in [1, max_zoom)
  x: jax.Array      # int32 row offset in the zoomed padded map
  y: jax.Array      # int32 column offset
  flip: jax.Array   # bool: mirror the columns


def sample_jitter(key: jax.Array, h: int, w: int, max_pad: int, max_zoom: float) -> Jitter:
  """`sample_transform(True, max_pad, max_zoom, h, w)`: flip p=0.5; zoom p=0.5 by U[1, max_zoom);
  offsets uniform over the `int((size + 2 pad) * zoom) - size + 1` valid crops."""
  kf, kz, ku, kx, ky = jax.random.split(key, 5)
  flip = jax.random.uniform(kf) > 0.5
  zoom = jnp.where(jax.random.uniform(kz) > 0.5,
                   jax.random.uniform(ku) * (max_zoom - 1.0) + 1.0, 1.0).astype(jnp.float32)

  def offset(k, size):
    valid = jnp.floor((size + 2 * max_pad) * zoom).astype(jnp.int32) - size + 1
    return jax.random.randint(k, (), 0, valid, dtype=jnp.int32)

  return Jitter(zoom, offset(kx, h), offset(ky, w), flip)


def apply_jitter(x: jax.Array, max_pad: int, jit: Jitter) -> jax.Array:
  """FeatUp's `apply_jitter` on NHWC `x` [B, H, W, C] -> [B, H, W, C]: reflect-pad by `max_pad`,
  bilinear zoom by `jit.zoom` (torch `scale_factor` semantics: source = (dst + 0.5) / zoom - 0.5),
  crop [x : x + H, y : y + W], flip the columns. The zoomed map is never built: the crop's
  positions are sampled directly, so the shapes are static. zoom = 1 samples at integer
  positions with weights (1, 0): an exact crop, as the official code's no-zoom branch."""
  _, h, w, _ = x.shape
  xp = reflect_pad(x, max_pad) if max_pad else x
  hp, wp = h + 2 * max_pad, w + 2 * max_pad
  inv = 1.0 / jit.zoom
  rows = jit.x + jnp.arange(h, dtype=jnp.int32)
  cols = jit.y + jnp.where(jit.flip, w - 1 - jnp.arange(w, dtype=jnp.int32),
                           jnp.arange(w, dtype=jnp.int32))
  xp = apply_linear_taps(xp, linear_taps(cols, inv, wp), 2)
  return apply_linear_taps(xp, linear_taps(rows, inv, hp), 1)


# --- projection and losses ---------------------------------------------------------------------

def random_projection(key: jax.Array, batch: int, channels: int, dim: int) -> jax.Array:
  """[B, C, D] Gaussian with every column L2-normalised over C (`proj /= proj.norm(dim=1)`)."""
  p = jax.random.normal(key, (batch, channels, dim), jnp.float32)
  return p / jnp.sqrt(jnp.sum(jnp.square(p), axis=1, keepdims=True))


def project(feats: jax.Array, proj: jax.Array, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """`einsum('bchw,bcd->bdhw')` in NHWC: feats [B, H, W, C], proj [B, C, D] -> [B, H, W, D]."""
  return jnp.einsum("bhwc,bcd->bhwd", feats.astype(jnp.float32), proj, precision=precision)


def sampled_crf_loss(key: jax.Array, guidance: jax.Array, feats: jax.Array,
                     n_samples: int) -> jax.Array:
  """FeatUp's `SampledCRFLoss(n_samples, alpha=.1, beta=.15, gamma=.005, w1=10, w2=3, shift=0)`.

  guidance [B, H, W, 3] (the un-jittered image), feats [B, H, W, D]. The same `n_samples` random
  pixels for every item, coordinates normalised by (H, W); over all sample pairs (i, j):
  k = w1 exp(-|dxy|^2 / 2a - |drgb|^2 / 2b) + w2 exp(-|dxy|^2 / 2g), loss = mean(|f_i - f_j|^2 k).

  k is symmetric, so sum_ij k_ij |f_i - f_j|^2 = 2 (sum_i r_i |f_i|^2 - sum_i f_i . (K f)_i) with
  r = row sums of k: one [N, N] x [N, D] product instead of the [B, N, N, D] differences (which
  the backward pass materialises: 6x slower on CPU). The loss is translation-invariant, so the
  first sample's features are subtracted first: that keeps the cancellation small and makes the
  loss of a constant map exactly 0.
  """
  b, h, w, _ = guidance.shape
  kr, kc = jax.random.split(key)
  rows = jax.random.randint(kr, (n_samples,), 0, h)
  cols = jax.random.randint(kc, (n_samples,), 0, w)
  coords = jnp.stack([rows / h, cols / w]).astype(jnp.float32)                   # [2, N]
  coord_diff = jnp.sum(jnp.square(coords[:, :, None] - coords[:, None, :]), 0)  # [N, N]
  g = guidance[:, rows, cols].astype(jnp.float32)                               # [B, N, 3]
  guide_diff = jnp.sum(jnp.square(g[:, :, None] - g[:, None, :]), -1)           # [B, N, N]
  sim = (CRF_W1 * jnp.exp(-coord_diff / (2 * CRF_ALPHA) - guide_diff / (2 * CRF_BETA))
         + CRF_W2 * jnp.exp(-coord_diff / (2 * CRF_GAMMA)))
  f = feats[:, rows, cols].astype(jnp.float32)                                  # [B, N, D]
  f = f - f[:, :1]
  kf = jnp.einsum("bij,bjd->bid", sim, f, precision=jax.lax.Precision.HIGHEST)
  total = 2.0 * (jnp.sum(jnp.sum(jnp.square(f), -1) * jnp.sum(sim, -1)) - jnp.sum(f * kf))
  return total / (b * n_samples * n_samples)


# --- modules that exist only for pre-training --------------------------------------------------

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
  """Everything the pre-training optimises, under the official state-dict prefixes."""

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


# --- optimizer ---------------------------------------------------------------------------------

class ClipUntilState(NamedTuple):
  count: jax.Array


def clip_by_global_norm_until(max_norm: float, num_steps: int) -> optax.GradientTransformation:
  """Lightning's `clip_gradients(opt, max_norm, 'norm')` for `global_step < num_steps` only:
  g *= min(max_norm / (|g| + 1e-6), 1) (`torch.nn.utils.clip_grad_norm_`), identity after."""

  def init(params):
    del params
    return ClipUntilState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    coef = jnp.minimum(max_norm / (optax.tree.norm(updates) + CLIP_UNTIL_EPS), 1.0)
    coef = jnp.where(state.count < num_steps, coef, 1.0)
    updates = jax.tree.map(lambda g: g * coef.astype(g.dtype), updates)
    return updates, ClipUntilState(state.count + 1)

  return optax.GradientTransformation(init, update)


class TorchNAdamState(NamedTuple):
  count: jax.Array       # int32 steps taken
  mu_product: jax.Array  # float32 prod_t mu_t
  exp_avg: Any
  exp_avg_sq: Any


def torch_nadam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                momentum_decay: float = 4e-3) -> optax.GradientTransformation:
  """`torch.optim.NAdam(lr, betas=(b1, b2), eps, momentum_decay)` (weight decay 0), returning the
  full parameter update. Torch's NAdam (Dozat) ramps the momentum: mu_t = b1 (1 - 0.5 *
  0.96^(t * momentum_decay)) (about 0.45 early on), which optax.nadam does not:

      m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2;  denom = sqrt(v / (1 - b2^t)) + eps
      p -= lr (1 - mu_t) / (1 - prod mu_1..t) g / denom + lr mu_{t+1} / (1 - prod mu_1..t+1) m / denom
  """

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return TorchNAdamState(jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32), zeros(), zeros())

  def update(grads, state, params=None):
    del params
    t = (state.count + 1).astype(jnp.float32)
    bc2 = 1.0 - b2 ** t
    mu = b1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1.0) * momentum_decay))
    mu_product = state.mu_product * mu
    c_grad = -lr * (1.0 - mu) / (1.0 - mu_product)
    c_avg = -lr * mu_next / (1.0 - mu_product * mu_next)
    m = jax.tree.map(lambda m, g: m + (1.0 - b1) * (g - m), state.exp_avg, grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.exp_avg_sq, grads)

    def step(g, m, v):
      denom = jnp.sqrt(v / bc2) + eps
      return c_grad * g / denom + c_avg * m / denom

    updates = jax.tree.map(step, grads, m, v)
    return updates, TorchNAdamState(state.count + 1, mu_product, m, v)

  return optax.GradientTransformation(init, update)


# --- the train step ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepSettings:
  """The static (hashable) part of a config that shapes the compiled step."""
  seed: int
  image_size: int
  n_jitters: int
  max_pad: int
  max_zoom: float
  projection_dim: int
  crf_weight: float
  crf_samples: int
  optim: tuple  # (lr, b1, b2, eps, momentum_decay, clip_norm, clip_steps)

  @classmethod
  def from_config(cls, cfg) -> "StepSettings":
    o = cfg.optim
    return cls(int(cfg.seed), int(cfg.data.image_size), int(cfg.loss.n_jitters),
               int(cfg.loss.max_pad), float(cfg.loss.max_zoom), int(cfg.loss.projection_dim),
               float(cfg.loss.crf_weight), int(cfg.loss.crf_samples),
               (float(o.lr), float(o.b1), float(o.b2), float(o.eps), float(o.momentum_decay),
                float(o.clip_norm), int(o.clip_steps)))

  def optimizer(self) -> optax.GradientTransformation:
    lr, b1, b2, eps, md, clip_norm, clip_steps = self.optim
    return optax.chain(clip_by_global_norm_until(clip_norm, clip_steps),
                       torch_nadam(lr, b1, b2, eps, md))


def clip_features(clip: ClipVisionTower, pixels: jax.Array) -> jax.Array:
  """Frozen featurizer: pixels [B, S, S, 3] -> hidden_states[select_layer] without CLS as
  [B, S/14, S/14, C] float32, under stop_gradient."""
  b, s, _, _ = pixels.shape
  feats, _ = clip(pixels)
  g = s // clip.patch_size
  return jax.lax.stop_gradient(feats.reshape(b, g, g, -1).astype(jnp.float32))


def jitter_loss(model: VdimModel, clip: ClipVisionTower, images: jax.Array, lr_feats: jax.Array,
                key: jax.Array, first: jax.Array, st: StepSettings) -> tuple[jax.Array, dict]:
  """One jitter's contribution to the loss (rec already divided by n_jitters, as the official
  does) and its parts. images [B, S, S, 3] ImageNet-normalised, lr_feats [B, S/14, S/14, C];
  `first` (a traced bool) switches the CRF term on (the official computes it at jitter 0 only)."""
  b, s, _, _ = images.shape
  k_up, k_jit, k_proj, k_crf, k_d4, k_d2 = jax.random.split(key, 6)
  feats = model.upsampler(lr_feats, images, dropout_rng=k_up, hierarchical=True)
  jit = sample_jitter(k_jit, s, s, st.max_pad, st.max_zoom)
  lr_jit = clip_features(clip, apply_jitter(images, st.max_pad, jit))
  proj = random_projection(k_proj, b, lr_feats.shape[-1], st.projection_dim)
  target = project(lr_jit, proj)
  parts = {}
  total = jnp.zeros((), jnp.float32)
  for lvl, down, scale_net, k_down in (("4x", model.downsampler, model.scale_net, k_d4),
                                       ("2x", model.downsampler_2x, model.scale_net_2x, k_d2)):
    hr_jit = apply_jitter(resize_bilinear(feats[f"feat{lvl}"], (s, s)), st.max_pad, jit)
    d = project(down(hr_jit, dropout_rng=k_down), proj)
    scales = scale_net(lr_jit)
    rec = jnp.mean(1.0 / (2.0 * scales ** 2) * jnp.square(d - target)
                   + jnp.log(scales)) / st.n_jitters
    parts[f"rec_{lvl}"] = rec
    total = total + rec
    if st.crf_weight > 0:
      crf = jax.lax.cond(
          first, lambda f: sampled_crf_loss(k_crf, images, f, st.crf_samples),
          lambda f: jnp.zeros((), jnp.float32), project(hr_jit, proj))
      parts[f"crf_{lvl}"] = crf
      total = total + st.crf_weight * crf
  return total, parts


def train_step(graphdef, clip_graphdef, st: StepSettings, state: dict, clip_state,
               images: jax.Array) -> tuple[dict, dict]:
  """state = {"params", "opt_state", "step"} -> (next state, metrics). Pure; jit it.

  metrics: `loss` and `rec_4x`/`rec_2x` summed over the jitters (the official `loss/total`;
  the rec terms are already divided by n_jitters), `crf_4x`/`crf_2x` of jitter 0 (unweighted),
  `grad_norm` of the summed gradient before clipping.
  The jitters run in a `lax.scan` (one compiled copy of the JBU's backward pass, half the
  compile time of an unrolled loop), each with its own forward/backward, summing gradients as
  the official `manual_backward` per jitter does."""
  params, step = state["params"], state["step"]
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(st.seed), 3), step)
  clip = nnx.merge(clip_graphdef, clip_state)
  lr_feats = clip_features(clip, images)

  def loss_fn(p, k, first):
    return jitter_loss(nnx.merge(graphdef, p), clip, images, lr_feats, k, first, st)

  def one_jitter(grads, j):
    (loss, parts), g = jax.value_and_grad(loss_fn, has_aux=True)(
        params, jax.random.fold_in(key, j), j == 0)
    return jax.tree.map(jnp.add, grads, g), {"loss": loss, **parts}

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, per_jitter = jax.lax.scan(one_jitter, zeros, jnp.arange(st.n_jitters))
  metrics = {k: jnp.sum(v) for k, v in per_jitter.items()}  # crf_*: jitter 0's (others are 0)
  metrics["grad_norm"] = optax.tree.norm(grads)
  updates, opt_state = st.optimizer().update(grads, state["opt_state"], params)
  new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
         "step": step + 1}
  return new, metrics


_STEP_CACHE: dict = {}


def compiled_step(graphdef, clip_graphdef, st: StepSettings, replicated: NamedSharding,
                  clip_shardings, batch_sharding: NamedSharding):
  """The jitted `train_step`, shared by every trainer with the same model, settings and
  shardings (a resumed run in the same process reuses the compiled program)."""
  leaves, treedef = jax.tree.flatten(clip_shardings)
  key = (graphdef, clip_graphdef, st, replicated, treedef, tuple(leaves), batch_sharding)
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = jax.jit(
        functools.partial(train_step, graphdef, clip_graphdef, st),
        in_shardings=(replicated, clip_shardings, batch_sharding),
        out_shardings=(replicated, replicated), donate_argnums=(0,))
  return _STEP_CACHE[key]


# --- the trainer -------------------------------------------------------------------------------

def build_clip(cfg, precision: Precision) -> ClipVisionTower:
  """The frozen featurizer: HF CLIP weights from `cfg.vision_weights`, else random (warned)."""
  if cfg.vision_weights:
    from ckpt_convert import formats
    _, clip = formats.import_model("hf-clip", cfg.vision_weights, precision, cfg=cfg.vision)
    return clip
  log.warning("cfg.vision_weights is empty: the CLIP featurizer is randomly initialised (seed %d), "
              "so the VDIM learns to upsample random features; set --config.vision_weights to an "
              "HF CLIP folder (openai/clip-vit-large-patch14-336) for a real run", cfg.seed)
  return ClipVisionTower(cfg.vision, precision,
                         rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(cfg.seed), 1)))


class VdimTrainer:
  """Builds the models, the data and the jitted step from a config.

  `params` (pure dict) and the optimizer state are replicated (the VDIM has ~1 M parameters);
  the batch is sharded over the mesh's data axes; CLIP is placed by the logical-axis rules.
  """

  def __init__(self, cfg, devices: Sequence[jax.Device] | None = None):
    self.cfg = cfg
    self.settings = StepSettings.from_config(cfg)
    size, patch = int(cfg.data.image_size), int(cfg.vision.patch_size)
    if size % patch or size // patch < 2:
      raise ValueError(f"data.image_size {size} must be a multiple of the patch size {patch} "
                       f"with at least 2 patches per side")
    if cfg.loss.max_pad >= size:
      raise ValueError(f"loss.max_pad {cfg.loss.max_pad} must be smaller than the image size "
                       f"{size} (reflect padding)")
    self.precision = Precision.from_config(cfg.precision)
    self.mesh = M.make_mesh(cfg.mesh, devices)
    self.rules = cfg.mesh.rules
    self.images = vdim_data.VdimImages(cfg.data.source, size)
    self.batch_size = int(cfg.data.batch_size)
    self.num_steps = (math.ceil(len(self.images) / self.batch_size) if cfg.steps < 0
                      else int(cfg.steps))

    clip = build_clip(cfg, self.precision)
    self.clip_graphdef, clip_state = nnx.split(clip)
    clip_shardings = S.state_shardings(clip_state, self.mesh, self.rules)
    self.clip_state = jax.device_put(clip_state, clip_shardings)

    model = VdimModel(int(cfg.vision.hidden_size), image_size=size, patch_size=patch,
                      scale=int(cfg.jbu.scale), precision=self.precision,
                      conv_impl=cfg.jbu.conv_impl,
                      official_grad_bug=bool(cfg.jbu.get("official_grad_bug", False)),
                      rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(cfg.seed), 2)))
    self.graphdef, state = nnx.split(model)
    self._init_params = nnx.to_pure_dict(state)
    self.num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self._init_params))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    spec = S.logical_to_spec(("batch", None, None, None), self.rules, self.mesh,
                             (self.batch_size, size, size, 3))
    self.batch_sharding = NamedSharding(self.mesh, spec)
    if spec[0] is None and self.mesh.size > 1:
      log.warning("batch size %d does not divide over the mesh %s: every device computes the "
                  "whole batch", self.batch_size, dict(self.mesh.shape))
    self._step = compiled_step(self.graphdef, self.clip_graphdef, self.settings,
                               self.replicated, clip_shardings, self.batch_sharding)

  def _fresh_state(self) -> dict:
    params = self._init_params
    return {"params": params, "opt_state": self.settings.optimizer().init(params),
            "step": jnp.zeros((), jnp.int32)}

  def init_state(self) -> dict:
    """{"params": pure dict, "opt_state": optax state, "step": int32}, replicated."""
    return jax.device_put(self._fresh_state(), self.replicated)

  def abstract_state(self) -> dict:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated),
                        jax.eval_shape(self._fresh_state))

  def batch(self, step: int) -> np.ndarray:
    return self.images.batch(step, self.batch_size, self.cfg.seed)

  def step(self, state: dict, images) -> tuple[dict, dict]:
    """One optimizer step (donates `state`)."""
    with jax.set_mesh(self.mesh), S.use_rules(self.rules):
      return self._step(state, self.clip_state, jax.device_put(images, self.batch_sharding))

  def model(self, state: dict) -> VdimModel:
    """The trained modules (JBU: `.upsampler`, exportable with `ckpt_convert.vdim.export_jbu`)."""
    return nnx.merge(self.graphdef, jax.device_get(state["params"]))


# --- the run -----------------------------------------------------------------------------------

METRICS_FILE = "metrics.jsonl"


def _checkpoint_manager(folder: pathlib.Path, cfg):
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=int(cfg.checkpoint.keep), create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(folder, options=options)


def _read_metrics(path: pathlib.Path, upto: int) -> list[dict]:
  if not path.is_file():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if r["step"] <= upto]


def run_vdim(cfg, out_dir: str | pathlib.Path, *,
             devices: Sequence[jax.Device] | None = None) -> dict:
  """Trains (or resumes) stage 0 into `out_dir`; returns the last step's metrics and a summary.

  `out_dir/checkpoints/<step>` (orbax: trainable params, optimizer state, step; not CLIP) every
  `cfg.checkpoint.every` steps and at the end, the last `cfg.checkpoint.keep` kept;
  `out_dir/metrics.jsonl` one line per step; `out_dir/vdim_config.json`. With
  `cfg.checkpoint.resume` a run continues from the latest checkpoint and repeats the losses an
  uninterrupted run would have had.
  """
  import orbax.checkpoint as ocp
  out = pathlib.Path(out_dir).resolve()
  out.mkdir(parents=True, exist_ok=True)
  (out / "vdim_config.json").write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))
  trainer = VdimTrainer(cfg, devices)
  total = trainer.num_steps
  mngr = _checkpoint_manager(out / "checkpoints", cfg)
  metrics_path = out / METRICS_FILE
  state = trainer.init_state()
  start = 0
  latest = checkpoint.latest_step(mngr, bool(cfg.checkpoint.resume))
  if latest is not None:
    state = mngr.restore(latest, args=ocp.args.StandardRestore(trainer.abstract_state()))
    start = int(state["step"])
    log.info("resumed from %s at step %d", out / "checkpoints", start)
  history = _read_metrics(metrics_path, start)
  metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
  print(f"vdim: {cfg.name}: {len(trainer.images)} images from {cfg.data.source!r}, batch "
        f"{trainer.batch_size}, {total} steps (from {start}), {trainer.num_params:,} trainable "
        f"parameters, mesh {dict(trainer.mesh.shape)}", flush=True)

  every, log_every = int(cfg.checkpoint.every), max(int(cfg.log_every), 1)
  times, losses, last = [], [], (history[-1] if history else {})
  with open(metrics_path, "a") as mf:
    t_prev = time.perf_counter()
    for step, images in vdim_data.batches(trainer.images, start, total, trainer.batch_size,
                                          cfg.seed, cfg.data.workers):
      state, metrics = trainer.step(state, images)
      row = {"step": step + 1, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
      now = time.perf_counter()
      times.append(now - t_prev)
      t_prev = now
      losses.append(row["loss"])
      mf.write(json.dumps(row) + "\n")
      mf.flush()
      last = row
      done = step + 1
      if done % log_every == 0 or done == total or done == start + 1:
        print(f"vdim step {done}/{total} loss {row['loss']:.5f} rec4x {row['rec_4x']:.5f} "
              f"rec2x {row['rec_2x']:.5f} crf4x {row.get('crf_4x', 0.0):.4f} "
              f"crf2x {row.get('crf_2x', 0.0):.4f} |g| {row['grad_norm']:.3e} "
              f"{times[-1]:.3f} s/step", flush=True)
      if done % every == 0 or done == total:
        mngr.save(done, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()
  mngr.close()
  steady = times[1:] or times
  return {**last, "steps_run": len(losses), "losses": losses,
          "step_time_s": float(np.median(steady)) if steady else None,
          "bad_images": len(trainer.images.bad), "checkpoint_dir": str(out / "checkpoints")}
