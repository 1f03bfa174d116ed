"""The Hiwin projector in PyTorch (`AdaptSpatialResampler.forward_with_featup` minus the VDIM),
written from official-spec §4.3-4.5, fp32.

Parameters carry the official names (spec §8.2), so an official `mm_projector` state dict loads
as is. Items come in groups of one patch grid, as `get_group_keys` batches them, each level at its
exact size (no canvas): per level the `features_{s}x_projector` Linear, `ln_kv`
(LayerNorm(eps=1e-6)), the position table bicubic-resized to the level (`F.interpolate`,
align_corners=False) and the level embedding; RoIAlign of the 12 x 12 window boxes with
torchvision's sampling rule (tests/reference/roi_align.py); then `compute_atten` over every item:
keys and values zero-padded to the longest item with a key_padding_mask, one
`nn.MultiheadAttention` (batch_first=False, each query token its own batch element) called once
per query set, `ln_proj`, `cat_proj`, `ln_post`, `@ proj`.

The window boxes are rounded to the features' dtype before RoIAlign, as the official code does
(spec §4.4): bfloat16 in a bf16 module, nothing more in float32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tests.reference import roi_align

GRID, QUERY_SETS = 12, 4


def _windows(features: torch.Tensor, ay: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
  """features (B, H, W, E), window weights ay (12, oh, H), ax (12, ow, W) -> (B * 144, oh * ow,
  E): each window's RoIAlign bins, windows row-major, bins row-major. RoIAlign runs in float32 on
  `features.float()` and its output is cast back to the features' dtype, as the official does."""
  b, _, _, e = features.shape
  rows = torch.einsum("rpy,byxe->brpxe", ay, features.float())
  bins = torch.einsum("cqx,brpxe->brcpqe", ax, rows).to(features.dtype)
  return bins.reshape(b * ay.shape[0] * ax.shape[0], ay.shape[1] * ax.shape[1], e)


class Hiwin(nn.Module):
  """kv_dim C (the ViT width), embed_dim E, num_heads; `scales` the levels of feature_scale_mask
  (1x, 2x, 4x for 7). Random init; load real or test weights with `load_state_dict`."""

  def __init__(self, kv_dim: int, embed_dim: int, num_heads: int, scales=(1, 2, 4)):
    super().__init__()
    e, q = embed_dim, GRID * GRID
    self.scales = tuple(scales)
    self.pos_embed = nn.Parameter(0.02 * torch.randn(q, e))
    for s in self.scales:
      setattr(self, f"feature_{s}x_embedding", nn.Parameter(torch.zeros(1, 1, e)))
      setattr(self, f"features_{s}x_projector", nn.Linear(kv_dim, e))
    for k in range(1, QUERY_SETS + 1):
      setattr(self, f"query_{k}", nn.Parameter(0.02 * torch.randn(q, e)))
    self.attn = nn.MultiheadAttention(e, num_heads)
    self.ln_q, self.ln_kv, self.ln_proj, self.ln_post = (nn.LayerNorm(e, eps=1e-6)
                                                         for _ in range(4))
    self.cat_proj = nn.Linear(QUERY_SETS * e, e)
    self.proj = nn.Parameter(e ** -0.5 * torch.randn(e, e))

  def group_keys(self, levels: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One group of same-grid items (`get_group_keys`): levels {s: (B, C, H_s, W_s)} -> keys,
    values (B * 144, L, E), windows row-major; a window's samples level by level, bins row-major."""
    keys, values = [], []
    for s in self.scales:
      f = levels[s]
      h, w = f.shape[-2:]
      x = self.ln_kv(getattr(self, f"features_{s}x_projector")(f.permute(0, 2, 3, 1)))
      # `get_abs_pos`: the table resized in float32, then cast to its own dtype.
      pos = F.interpolate(self.pos_embed.float().reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2),
                          size=(h, w), mode="bicubic", align_corners=False).to(x.dtype)
      key = x + pos[0].permute(1, 2, 0) + getattr(self, f"feature_{s}x_embedding")[0]
      ay, ax = (torch.from_numpy(a).to(x.device) for a in roi_align.window_weights(
          h, w, roi_align.pooling_size(w / h), GRID,
          dtype=ml_dtypes.bfloat16 if x.dtype == torch.bfloat16 else np.float32))
      keys.append(_windows(key, ay, ax))
      values.append(_windows(x, ay, ax))
    return torch.cat(keys, 1), torch.cat(values, 1)

  def attend(self, keys, values) -> torch.Tensor:
    """`compute_atten` over every item: the groups' keys and values -> (N, 144, E)."""
    l_max = max(k.shape[1] for k in keys)
    pad = lambda a: F.pad(a, (0, 0, 0, l_max - a.shape[1]))
    k_all = torch.cat([pad(k) for k in keys]).transpose(0, 1)                  # (L, N*144, E)
    v_all = torch.cat([pad(v) for v in values]).transpose(0, 1)
    mask = torch.cat([torch.arange(l_max, device=k.device)[None, :].expand(k.shape[0], -1)
                      >= k.shape[1] for k in keys])                             # (N*144, L)
    n = mask.shape[0] // (GRID * GRID)
    outs = []
    for k in range(1, QUERY_SETS + 1):
      q = (self.ln_q(getattr(self, f"query_{k}")) + self.pos_embed).repeat(n, 1)  # (N*144, E)
      o, _ = self.attn(q[None], k_all, v_all, key_padding_mask=mask)
      outs.append(self.ln_proj(o[0]))
    z = self.ln_post(self.cat_proj(torch.cat(outs, -1))) @ self.proj
    return z.reshape(n, GRID * GRID, -1)

  def forward(self, groups) -> torch.Tensor:
    """groups: [{s: (B_g, C, H_s, W_s)}, ...] -> (sum of B_g, 144, E), items in group order."""
    keys, values = zip(*(self.group_keys(levels) for levels in groups))
    return self.attend(keys, values)
