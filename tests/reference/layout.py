"""The image token organisation (official-spec §5), restated from the spec.

The slicer's separators after each slice (`ind_tokens`) are ids of the tokenizer's vocabulary:
"," (29892 in LLaMA's) inside a row of slices, "\\n" (13) after the last slice of a row.
"""

from __future__ import annotations

Q = 12  # the official Hiwin query grid side (144 tokens per item)


def image_span(grid, ind, layout: str, newline: int = 13, q: int = Q) -> list[tuple]:
  """The span that replaces one `<image>`, as ('img', item, token) / ('tok', id) entries; items
  are the slices row-major then the overview (item 0 when `grid` (cols, rows) is None).

  `q` is the query grid side (q * q tokens per item). R1: the slices' tokens on one global grid
  (G[qr + i, qc + j] = S_{r * cols + c}[qi + j]) with `newline` after every row of it, then
  ind[0], then the overview. R2: each slice followed by its separator ind[k], then the overview."""
  n = q * q
  if grid is None:
    return [("img", 0, t) for t in range(n)]
  cols, rows = grid
  slices = cols * rows
  out = []
  if layout == "r1":
    for gy in range(q * rows):
      for gx in range(q * cols):
        r, i, c, j = gy // q, gy % q, gx // q, gx % q
        out.append(("img", r * cols + c, q * i + j))
      out.append(("tok", newline))
    out.append(("tok", ind[0]))
  else:
    for k in range(slices):
      out += [("img", k, t) for t in range(n)] + [("tok", ind[k])]
  return out + [("img", slices, t) for t in range(n)]
