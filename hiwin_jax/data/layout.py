"""Token organisation (official-spec §5): where each image token goes in the LLM sequence.

The model never splices with Python loops: the host builds, per sequence position, either a text
token id or an index into the flat list of image tokens (every item's 144 Hiwin outputs), and
the model gathers. Separator embeddings ("\\n" = 13 after every token row in R1, "," / "\\n" after
every slice in R2) are ordinary text tokens of the trainable embedding table. Every image-derived
position (tokens and separators) gets label -100.

Layouts (`layout`):
  r1 (the released 7B model, PERMUTE_STRATEGY): the slices' 12x12 token grids are stitched into one
     (12 rows) x (12 cols) grid, each grid row ends with "\\n", then one `ind_tokens[0]` token
     ("," if cols > 1 else "\\n"), then the overview's 144 tokens;
  r2 (branch HEAD: 13B and Qwen2 checkpoints): S_1, ind_1, ..., S_n, ind_n, overview.
Without slicing both are the overview's 144 tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hiwin_jax.data.slicing import COMMA_TOKEN, NEWLINE_TOKEN, TOKENS_PER_ITEM
from hiwin_jax.data.slicing import QUERIES_PER_SIDE as QUERY_GRID
from hiwin_jax.data.tokenizer import IMAGE_TOKEN_INDEX

IGNORE_INDEX = -100
LAYOUTS = ("r1", "r2")


@dataclasses.dataclass(frozen=True)
class ImageLayout:
  """One image's span in the LLM sequence: `token_ids` holds the separator ids (and -1 where an
  image token goes); `item_token` holds `item * 144 + t` for image tokens (and -1 elsewhere),
  items numbered slices first (row-major), then the overview."""
  token_ids: np.ndarray
  item_token: np.ndarray

  def __len__(self) -> int:
    return len(self.token_ids)


def image_layout(grid: tuple[int, int] | None, layout: str, newline_token: int = NEWLINE_TOKEN,
                 comma_token: int = COMMA_TOKEN) -> ImageLayout:
  """The span of one image with `grid` = (cols, rows) of slices (None: no slicing).

  The separators after each slice (`ind_tokens` of the official slicer) are "\n" at the end of a
  slice row and "," otherwise; their ids are the vocabulary's (LLaMA's by default).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown token layout {layout!r}; choose from {LAYOUTS}")
  q, n = QUERY_GRID, TOKENS_PER_ITEM
  if grid is None:
    return ImageLayout(np.full(n, -1, np.int32), np.arange(n, dtype=np.int32))
  cols, rows = grid
  slices = cols * rows
  ind_tokens = [newline_token if x == cols - 1 else comma_token
                for _ in range(rows) for x in range(cols)]
  overview = slices * n + np.arange(n, dtype=np.int32)
  if layout == "r1":
    # Global grid position (Y, X) -> slice (Y // 12, X // 12), query (Y % 12, X % 12).
    y, x = np.meshgrid(np.arange(q * rows), np.arange(q * cols), indexing="ij")
    tok = ((y // q) * cols + x // q) * n + (y % q) * q + x % q
    tok = np.concatenate([tok, np.full((q * rows, 1), -1)], axis=1).reshape(-1)
    ids = np.where(tok < 0, newline_token, -1)
    ids = np.concatenate([ids, [ind_tokens[0]], np.full(n, -1)])
    tok = np.concatenate([tok, [-1], overview])
  else:
    per_slice = [np.concatenate([k * n + np.arange(n), [-1]]) for k in range(slices)]
    tok = np.concatenate(per_slice + [overview])
    ids = np.full(len(tok), -1)
    ids[np.arange(1, slices + 1) * (n + 1) - 1] = ind_tokens
  return ImageLayout(ids.astype(np.int32), tok.astype(np.int32))


@dataclasses.dataclass(frozen=True)
class Sequence:
  """One spliced sample: `input_ids` (text ids, separator ids, and `pad_id` under image tokens),
  `image_token` (index into this sample's image tokens or -1), `labels`."""
  input_ids: np.ndarray
  image_token: np.ndarray
  labels: np.ndarray


def splice(ids: np.ndarray, labels: np.ndarray | None, images: list[ImageLayout],
           max_length: int | None = None, pad_id: int = 0) -> Sequence:
  """Replaces each IMAGE_TOKEN_INDEX in `ids` by the next image's span (spec §6.3).

  The image token indices of the k-th image are offset by the image tokens of the images before
  it. Labels of image-derived positions are IGNORE_INDEX. Truncates to `max_length` after
  expansion (`tokenizer_model_max_length`), as the official code does.
  """
  ids = np.asarray(ids)
  labels = np.full(len(ids), IGNORE_INDEX) if labels is None else np.asarray(labels)
  places = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
  if len(places) != len(images):
    raise ValueError(f"{len(places)} <image> placeholders but {len(images)} images")
  out_ids, out_tok, out_lab = [], [], []
  start, offset = 0, 0
  for place, img in zip(places, images):
    out_ids += [ids[start:place], np.where(img.token_ids < 0, pad_id, img.token_ids)]
    out_tok += [np.full(place - start, -1), np.where(img.item_token < 0, -1,
                                                     img.item_token + offset)]
    out_lab += [labels[start:place], np.full(len(img), IGNORE_INDEX)]
    offset += int(img.item_token.max()) + 1
    start = place + 1
  out_ids.append(ids[start:])
  out_tok.append(np.full(len(ids) - start, -1))
  out_lab.append(labels[start:])
  cat = lambda parts: np.concatenate(parts).astype(np.int32)[:max_length]
  return Sequence(cat(out_ids), cat(out_tok), cat(out_lab))
