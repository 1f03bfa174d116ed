"""The image token organisation (official-spec §5), restated from the spec.

The slicer's separators after each slice (`ind_tokens`) are ids of the tokenizer's vocabulary:
"," (29892 in LLaMA's) inside a row of slices, "\\n" (13) after the last slice of a row.
"""

from __future__ import annotations

Q, TOKENS = 12, 144  # the Hiwin query grid side and tokens per item


def image_span(grid, ind, layout: str, newline: int = 13) -> list[tuple]:
  """The span that replaces one `<image>`, as ('img', item, token) / ('tok', id) entries; items
  are the slices row-major then the overview (item 0 when `grid` (cols, rows) is None).

  R1: the slices' tokens on one global grid (G[12r + i, 12c + j] = S_{r * cols + c}[12i + j])
  with `newline` after every row of it, then ind[0], then the overview. R2: each slice followed
  by its separator ind[k], then the overview."""
  if grid is None:
    return [("img", 0, t) for t in range(TOKENS)]
  cols, rows = grid
  slices = cols * rows
  out = []
  if layout == "r1":
    for gy in range(Q * rows):
      for gx in range(Q * cols):
        r, i, c, j = gy // Q, gy % Q, gx // Q, gx % Q
        out.append(("img", r * cols + c, Q * i + j))
      out.append(("tok", newline))
    out.append(("tok", ind[0]))
  else:
    for k in range(slices):
      out += [("img", k, t) for t in range(TOKENS)] + [("tok", ind[k])]
  return out + [("img", slices, t) for t in range(TOKENS)]
