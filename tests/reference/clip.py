"""CLIP ViT-L/14-336 features at any patch grid (official-spec §2.2), in PyTorch, on a
transformers `CLIPVisionModel`: `vit_features` restates the spec on the model's modules (its own
embeddings accept only the trained grid) and runs only the layers used; `hf_features` is the
model's own forward, as the official code calls it."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def vit_features(model, pixels: torch.Tensor, num_layers: int) -> torch.Tensor:
  """pixels (B, 3, 14h, 14w) -> (B, h*w, C): conv patches row-major, CLS, the position table
  bicubic-resized to (h, w) (align_corners=False) unless (h, w) is the trained grid, pre-LN,
  then the first `num_layers` encoder layers; the CLS row dropped."""
  vm = getattr(model, "vision_model", model)
  emb = vm.embeddings
  patches = emb.patch_embedding(pixels)
  b, c, h, w = patches.shape
  table = emb.position_embedding.weight
  g = round((table.shape[0] - 1) ** 0.5)
  if (h, w) == (g, g):
    pos = table
  else:
    grid = table[1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    pos = torch.cat([table[:1], grid.reshape(c, h * w).T])
  x = torch.cat([emb.class_embedding.reshape(1, 1, c).expand(b, 1, c),
                 patches.flatten(2).transpose(1, 2)], 1)
  x = vm.pre_layrnorm(x + pos[None])
  for layer in vm.encoder.layers[:num_layers]:
    x = layer(x, None)
    x = x[0] if isinstance(x, tuple) else x
  return x[:, 1:]


def hf_features(model, pixels: torch.Tensor, layer: int = -2) -> torch.Tensor:
  """transformers' own forward as `CLIPVisionTower.feature_select` uses it: every layer runs,
  hidden_states[layer] without CLS; the position table bicubic-interpolated for other grids.
  pixels (B, 3, 14h, 14w) -> (B, h*w, C)."""
  out = model(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True)
  return out.hidden_states[layer][:, 1:]
