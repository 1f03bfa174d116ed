"""The slicing plan (official-spec §1.2-1.3: `slice_image_minicpm` and its helpers), the spec's
pseudocode transcribed literally in Python floats and ints."""

from __future__ import annotations

import math

S, P = 336, 14  # slice side and ViT patch size


def ensure_divide(length, p):
  return max(math.floor(length / p) * p, p)


def find_best_resize(w, h, s, p, allow_upscale):
  if w * h > s * s or allow_upscale:
    r = w / h
    h = int(s / math.sqrt(r))
    w = int(h * r)
  return ensure_divide(w, p), ensure_divide(h, p)


def plan(w, h, max_slice_nums, s=S, p=P):
  """(overview, grid, refine, slice) sizes (w, h), grid (cols, rows); None for the last three
  when the image is not sliced."""
  log_ratio = math.log(w / h)
  ratio = w * h / (s * s)
  multiple = min(math.ceil(ratio), max_slice_nums)
  if multiple <= 1:
    return find_best_resize(w, h, s, p, True), None, None, None
  cands = []
  for k in (multiple - 1, multiple, multiple + 1):
    if k != 1 and k <= max_slice_nums:
      cands.append(k)
  overview = find_best_resize(w, h, s, p, False)
  grids = []
  for k in cands:
    for m in range(1, k + 1):
      if k % m == 0:
        grids.append([m, k // m])
  best, best_err = None, float("inf")
  for g in grids:
    err = abs(log_ratio - math.log(g[0] / g[1]))
    if err < best_err:
      best, best_err = g, err
  cols, rows = best
  rw, rh = ensure_divide(w, cols), ensure_divide(h, rows)
  sw, sh = find_best_resize(rw / cols, rh / rows, s, p, True)
  refine = (sw * cols, sh * rows)
  return overview, tuple(best), refine, (refine[0] // cols, refine[1] // rows)
