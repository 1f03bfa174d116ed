"""Static shapes: items (slices and overviews) padded into a small set of canvas buckets.

A bucket is a canvas of (Hc, Wc) patches. Every item goes into the smallest-area bucket that holds
its (h, w) patch grid, at the top-left of the canvas, with its grid recorded so the model knows
its valid region. The default buckets are aspect classes: class k holds the grids whose w/h lies
in [s^(k-1/2), s^(k+1/2)); with h*w <= 576 such a grid has h <= sqrt(576 / r_min) and
w <= sqrt(576 * r_max), so the class's canvas is exactly that and every legal grid has a bucket,
at most sqrt(s) larger in area than needed.

A batch holds, per bucket that occurs, the items padded to a slot count from 1, 2, 3, 4, 6, 8, 12,
... (empty slots have grid (0, 0)), so the number of distinct compiled programs stays bounded by
the buckets and slot sizes in use. The model addresses an item's tokens (`grid_size`² of them,
144 in the official model) by its flat index (buckets in order, then slots).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from hiwin_jax.data import layout
from hiwin_jax.data.slicing import PATCH_SIZE as PATCH

MAX_PATCHES = 576


def default_buckets(max_patches: int = MAX_PATCHES, ratio_step: float = 2.0,
                    max_ratio: float = 144.0) -> tuple[tuple[int, int], ...]:
  """Aspect-class canvases (Hc, Wc) covering every grid with h*w <= max_patches, h, w >= 2,
  plus the exact square grid (24x24 for CLIP-L/14-336), the most common item."""
  k_max = math.ceil(math.log(max_ratio) / math.log(ratio_step) - 0.5)
  side = math.isqrt(max_patches)
  out = [(side, side)]
  for k in range(-k_max, k_max + 1):
    r_lo, r_hi = ratio_step ** (k - 0.5), ratio_step ** (k + 0.5)
    hc = min(int(math.sqrt(max_patches / r_lo) + 1e-9), max_patches // 2)
    wc = min(int(math.sqrt(max_patches * r_hi) + 1e-9), max_patches // 2)
    out.append((hc, wc))
  return tuple(out)


def model_buckets(vision_cfg) -> tuple[tuple[int, int], ...]:
  """The default buckets for a ViT config: items hold at most (image_size / patch_size)^2
  patches (576 for CLIP-L/14-336)."""
  return default_buckets((int(vision_cfg.image_size) // int(vision_cfg.patch_size)) ** 2)


def assign_bucket(h: int, w: int, buckets: Sequence[tuple[int, int]]) -> int:
  """Index of the smallest-area bucket whose canvas holds an (h, w) grid."""
  fits = [(hc * wc, i) for i, (hc, wc) in enumerate(buckets) if h <= hc and w <= wc]
  if not fits:
    raise ValueError(f"no shape bucket holds a {h}x{w} patch grid; buckets (Hc, Wc): "
                     f"{list(buckets)}")
  return min(fits)[1]


def slot_count(n: int) -> int:
  """Items -> padded slots: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 * 2^k: a
  bounded number of shapes, at most a third of the slots empty, 6 slices padded to exactly 6)."""
  p = 1 << max(n - 1, 0).bit_length()
  return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


@dataclasses.dataclass(frozen=True)
class PackedItems:
  """Per-bucket arrays for the model, and where each input item landed."""
  buckets: tuple[dict[str, np.ndarray], ...]  # {"pixels": [n, 14Hc, 14Wc, 3], "grid": [n, 2]}
  bucket_ids: tuple[int, ...]                 # which configured bucket each entry is
  flat_index: np.ndarray                      # input item -> flat item index in the model


def pack_items(items: Sequence[np.ndarray], buckets: Sequence[tuple[int, int]]) -> PackedItems:
  """items: normalised pixels [14h, 14w, 3] each -> canvases grouped by bucket."""
  grids = []
  for k, px in enumerate(items):
    if px.shape[0] % PATCH or px.shape[1] % PATCH:
      raise ValueError(f"item {k}: pixels {px.shape[:2]} are not multiples of {PATCH}")
    grids.append((px.shape[0] // PATCH, px.shape[1] // PATCH))
  which = [assign_bucket(h, w, buckets) for h, w in grids]
  used = sorted(set(which))
  out, flat_index, offset = [], np.zeros(len(items), np.int32), 0
  for b in used:
    members = [k for k, x in enumerate(which) if x == b]
    hc, wc = buckets[b]
    n = slot_count(len(members))
    pixels = np.zeros((n, hc * PATCH, wc * PATCH, 3), np.float32)
    grid = np.zeros((n, 2), np.int32)
    for slot, k in enumerate(members):
      h, w = grids[k]
      pixels[slot, :h * PATCH, :w * PATCH] = items[k]
      grid[slot] = (h, w)
      flat_index[k] = offset + slot
    out.append({"pixels": pixels, "grid": grid})
    offset += n
  return PackedItems(tuple(out), tuple(used), flat_index)


def make_batch(samples: Sequence[tuple[object, Sequence[np.ndarray]]],
               buckets: Sequence[tuple[int, int]], seq_len: int, *, tokens_per_item: int,
               pad_id: int = 0) -> dict:
  """Model batch from spliced samples: each `(sequence, items)` pairs a `layout.Sequence` (its
  `image_token` indexes the sample's own items, `item * tokens_per_item + t`) with the sample's
  items' pixels in that order. Sequences are right-padded (or cut) to the static `seq_len`.
  tokens_per_item: `layout.TokenLayout.from_config(cfg.model.projector).tokens_per_item`."""
  all_items = [px for _, items in samples for px in items]
  packed = pack_items(all_items, buckets) if all_items else None
  b = len(samples)
  batch = {"input_ids": np.full((b, seq_len), pad_id, np.int32),
           "image_token": np.full((b, seq_len), -1, np.int32),
           "labels": np.full((b, seq_len), layout.IGNORE_INDEX, np.int32),
           "attention_mask": np.zeros((b, seq_len), bool)}
  first = 0
  for i, (seq, items) in enumerate(samples):
    n = min(len(seq.input_ids), seq_len)
    tok = seq.image_token[:n]
    if items:
      tok = layout.renumber_image_tokens(tok, packed.flat_index[first:first + len(items)],
                                         tokens_per_item)
    first += len(items)
    batch["input_ids"][i, :n] = seq.input_ids[:n]
    batch["image_token"][i, :n] = tok
    batch["labels"][i, :n] = seq.labels[:n]
    batch["attention_mask"][i, :n] = True
  batch["buckets"] = packed.buckets if packed else ()
  return batch
