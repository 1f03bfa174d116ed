"""LLaVA-UHD v2: pixels -> CLIP ViT -> VDIM (JBU) -> Hiwin -> token layout -> LLaMA -> logits.

Images arrive as items (slices and overviews) grouped into shape buckets: each bucket is a padded
canvas `pixels [n, 14Hc, 14Wc, 3]` with the run-time patch grid `grid [n, 2]` of every item (an
empty slot has grid (0, 0)), so every bucket compiles once whatever its items' sizes. The host
has already laid out the LLM sequence (`hiwin_jax.data.layout`): each position is a text token id
or an index into the flat list of all items' 144 Hiwin tokens (buckets in order, items in order),
and the model gathers them; no Python loop runs over images inside the jitted program.

Batch (a dict of arrays):
  input_ids [B, S] int32      text and separator ids (any id under image tokens)
  image_token [B, S] int32    index into the flat image tokens, -1 for text
  attention_mask [B, S]       1 = real token
  buckets: tuple of {"pixels": [n, 14Hc, 14Wc, 3] float, "grid": [n, 2] int32}
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hiwin_jax.models.clip_vit import ClipVisionTower
from hiwin_jax.models.hiwin import HiwinProjector
from hiwin_jax.models.jbu import JBUStack
from hiwin_jax.models.layers import Precision
from hiwin_jax.models.llama import LlamaModel

Bucket = dict[str, jax.Array]


def tokens_to_canvas(tokens: jax.Array, grid: jax.Array, canvas_hw: tuple[int, int]) -> jax.Array:
  """ViT tokens [n, L, C] (row-major in each item's own (h, w) grid) -> map [n, Hc, Wc, C], the
  item at the top-left and zeros elsewhere (what the official `unflatten(2, [h, w])` gives)."""
  hc, wc = canvas_hw
  h, w = grid[:, 0, None, None], grid[:, 1, None, None]
  y = jnp.arange(hc)[None, :, None]
  x = jnp.arange(wc)[None, None, :]
  valid = (y < h) & (x < w)                                                   # [n, Hc, Wc]
  index = jnp.where(valid, y * w + x, 0).reshape(tokens.shape[0], hc * wc)
  index = jnp.minimum(index, tokens.shape[1] - 1)
  canvas = jnp.take_along_axis(tokens, index[..., None], axis=1)
  canvas = canvas.reshape(tokens.shape[0], hc, wc, tokens.shape[-1])
  return jnp.where(valid[..., None], canvas, jnp.zeros((), canvas.dtype))


class LlavaUHD(nnx.Module):
  """The whole model (`cfg` = `cfg.model`, resolved by `config.load_config`); parameter groups
  `vision`, `jbu`, `projector`, `llm`. Decoding: `hiwin_jax.infer.generate`."""

  def __init__(self, cfg, precision: Precision, *, rngs: nnx.Rngs):
    proj = cfg.projector
    unresolved = [k for k in ("embed_dim", "kv_dim", "num_heads") if proj[k] is None]
    if unresolved:
      raise ValueError(f"model.projector.{unresolved} are not resolved: build the model config "
                       f"with config.load_config (or config.resolve_model)")
    self.patch_size = cfg.vision.patch_size
    # The slicer guarantees <= (336/14)^2 = 576 patches per item, whatever the canvas.
    self.max_patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    self.levels = tuple(s for s in (1, 2, 4) if proj.feature_scale_mask & s)
    if 1 not in self.levels:
      raise ValueError(f"feature_scale_mask {proj.feature_scale_mask} must include the 1x level")
    self.vision = ClipVisionTower(cfg.vision, precision, rngs=rngs)
    self.jbu = JBUStack(proj.kv_dim, scale=proj.jbu_scale, precision=precision,
                        conv_impl=proj.conv_impl,
                        official_grad_bug=bool(proj.jbu_official_grad_bug), rngs=rngs)
    self.projector = HiwinProjector(proj, precision, rngs=rngs)
    self.llm = LlamaModel(cfg.llm, precision, rngs=rngs)

  def encode_bucket(self, pixels: jax.Array, grid: jax.Array, *,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
    """pixels: [n, 14Hc, 14Wc, 3], grid: [n, 2] -> Hiwin tokens [n, 144, E]."""
    p = self.patch_size
    hc, wc = pixels.shape[1] // p, pixels.shape[2] // p
    tokens, _ = self.vision(pixels, grid, min(hc * wc, self.max_patches))      # [n, L, C]
    level1 = tokens_to_canvas(tokens, grid, (hc, wc))
    levels = {1: level1}
    if len(self.levels) > 1:
      up = self.jbu(level1, pixels, grid=grid, dropout_rng=dropout_rng)
      levels.update({2: up["feat2x"], 4: up["feat4x"]})
    return self.projector({s: levels[s] for s in self.levels}, grid)

  def encode_images(self, buckets: Sequence[Bucket], *,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
    """All buckets -> the flat image tokens [sum_b n_b * 144, E] (buckets, items, queries)."""
    rngs = ([None] * len(buckets) if dropout_rng is None
            else list(jax.random.split(dropout_rng, len(buckets))))
    outs = [self.encode_bucket(b["pixels"], b["grid"], dropout_rng=r)
            for b, r in zip(buckets, rngs)]
    return jnp.concatenate([o.reshape(-1, o.shape[-1]) for o in outs], axis=0)

  def embed(self, batch: dict[str, Any], *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """The LLM input embeddings [B, S, E]: text embeddings with the image tokens spliced in."""
    text = self.llm.embed(batch["input_ids"])
    if not batch.get("buckets"):
      return text
    image = self.encode_images(batch["buckets"], dropout_rng=dropout_rng).astype(text.dtype)
    index = batch["image_token"]
    spliced = jnp.take(image, jnp.maximum(index, 0), axis=0)                  # [B, S, E]
    return jnp.where((index >= 0)[..., None], spliced, text)

  def __call__(self, batch: dict[str, Any], *, dropout_rng: jax.Array | None = None,
               cache: dict | None = None, positions: jax.Array | None = None):
    """-> (logits [B, S, V] float32, cache or None); see the module docstring for `batch`."""
    embeds = self.embed(batch, dropout_rng=dropout_rng)
    return self.llm(inputs_embeds=embeds, attention_mask=batch.get("attention_mask"),
                    positions=positions, cache=cache)
