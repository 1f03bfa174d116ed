"""Stage 0's loss: multi-view reconstruction of frozen CLIP features (official-spec §3.7).

FeatUp's `train_vdim_upsampler.py` as pure functions. For each of `n_jitters` jitters of a step
(the caller sums their gradients, as the official `manual_backward` per jitter does):

    F2, F4   = JBU(CLIP(x), x)                      hierarchical: up2 sees stop_gradient(F2)
    F2, F4   = bilinear(F2, F4 -> image size)
    x~, lr~  = T(x), stop_gradient(CLIP(T(x)))
    d_k      = P(D_k(T(F_k)))                        P: per-sample Gaussian projection C -> 30
    rec_k    = mean((d_k - P(lr~))^2 / (2 s_k^2) + log s_k) / n_jitters,  s_k = ScaleNet_k(lr~)
    crf_k    = SampledCRF(x, P(T(F_k)))              jitter 0 only, weight 0.001
    loss     = (rec_4x + 0.001 crf_4x) + (rec_2x + 0.001 crf_2x)

TV and entropy terms have weight 0 in the official run and are left out. Everything is NHWC.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hiwin_jax.models.clip_vit import ClipVisionTower
from hiwin_jax.models.resize import apply_linear_taps, linear_taps, reflect_pad, resize_bilinear
from hiwin_jax.models.vdim import VdimModel

# SampledCRFLoss(alpha=.1, beta=.15, gamma=.005, w1=10.0, w2=3.0, shift=0.0) of the official run.
CRF_ALPHA, CRF_BETA, CRF_GAMMA, CRF_W1, CRF_W2 = 0.1, 0.15, 0.005, 10.0, 3.0


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """`cfg.train.vdim_loss` (`config.vdim_loss_config`), hashable: it shapes the compiled step."""
  n_jitters: int
  max_pad: int
  max_zoom: float
  projection_dim: int
  crf_weight: float
  crf_samples: int

  @classmethod
  def from_config(cls, lcfg) -> "LossSettings":
    return cls(int(lcfg.n_jitters), int(lcfg.max_pad), float(lcfg.max_zoom),
               int(lcfg.projection_dim), float(lcfg.crf_weight), int(lcfg.crf_samples))


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


def clip_features(clip: ClipVisionTower, pixels: jax.Array) -> jax.Array:
  """Frozen featurizer: pixels [B, S, S, 3] -> hidden_states[select_layer] without CLS as
  [B, S/14, S/14, C] float32, under stop_gradient."""
  b, s, _, _ = pixels.shape
  feats, _ = clip(pixels)
  g = s // clip.patch_size
  return jax.lax.stop_gradient(feats.reshape(b, g, g, -1).astype(jnp.float32))


def jitter_loss(model: VdimModel, clip: ClipVisionTower, images: jax.Array, lr_feats: jax.Array,
                key: jax.Array, first: jax.Array, st: LossSettings) -> tuple[jax.Array, dict]:
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
