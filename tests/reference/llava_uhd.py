"""LLaVA-UHD v2 composed from the references, as the official code runs it, in PyTorch.

`item_features` is the vision path of `encode_images` (official-spec §2-§4): items grouped by
patch grid as the official code batches them, per group the ViT features -> JBU 2x, 4x (+ the 4x
fix-up) -> the Hiwin keys and values, then one attention over every item. `image_embeddings` and
`splice` are the text side: the image span that replaces one `<image>` (§5) and
`prepare_inputs_labels_for_multimodal` for one sample (§6.3).
"""

from __future__ import annotations

import numpy as np
import torch

from tests.reference import layout

PATCH = 14
IMAGE_TOKEN_INDEX, IGNORE_INDEX = -200, -100  # the official `<image>` placeholder, label mask


def item_features(vit, jbu, hiwin, groups) -> torch.Tensor:
  """vit: pixels (B, 3, 14h, 14w) -> layer features (B, h*w, C), row-major; jbu:
  tests/reference/jbu.py `JBU4xStack`; hiwin: tests/reference/hiwin.py `Hiwin`; groups: NCHW
  pixels of same-grid items, one tensor per group -> (items in group order, 144, E)."""
  keys, values = [], []
  for px in groups:
    h, w = px.shape[-2] // PATCH, px.shape[-1] // PATCH
    f1 = vit(px).transpose(1, 2).unflatten(2, (h, w))                         # (B, C, h, w)
    f2, f4 = jbu(f1, px)
    k, v = hiwin.group_keys({1: f1, 2: f2, 4: f4})
    keys.append(k)
    values.append(v)
  return hiwin.attend(keys, values)


def image_embeddings(tokens, grid, ind, layout_name: str, newline: int, embed) -> torch.Tensor:
  """Spec §5: tokens (n_slices + 1, 144, E) (slices row-major, then the overview), grid (cols,
  rows) or None, ind the separator id after each slice, embed: token id -> (E,) -> [n, E]."""
  return torch.stack([tokens[entry[1], entry[2]] if entry[0] == "img" else embed(entry[1])
                      for entry in layout.image_span(grid, ind, layout_name, newline)])


def splice(embed_tokens, ids, labels, spans, max_length: int):
  """Spec §6.3 for one sample: the text between `<image>` placeholders through `embed_tokens`,
  image span k (from `image_embeddings`) in place of placeholder k with labels IGNORE_INDEX, cut
  to max_length -> (embeddings [n, E], labels [n])."""
  cuts = [-1] + list(np.flatnonzero(ids == IMAGE_TOKEN_INDEX)) + [len(ids)]
  assert len(cuts) == len(spans) + 2, "one span per <image>"
  parts, lab = [], []
  for k in range(len(cuts) - 1):
    parts.append(embed_tokens(torch.from_numpy(ids[cuts[k] + 1:cuts[k + 1]]).long()))
    lab.append(labels[cuts[k] + 1:cuts[k + 1]])
    if k < len(spans):
      parts.append(spans[k])
      lab.append(np.full(len(spans[k]), IGNORE_INDEX))
  return torch.cat(parts)[:max_length], np.concatenate(lab)[:max_length]
