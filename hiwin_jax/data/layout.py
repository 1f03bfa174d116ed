"""Token organisation (official-spec §5): where each image token goes in the LLM sequence.

The model never splices with Python loops: the host builds, per sequence position, either a text
token id or an index into the flat list of image tokens (every item's `grid_size`² Hiwin
outputs), and the model gathers. Separator embeddings ("\\n" after every token row in R1, "," /
"\\n" after every slice in R2) are ordinary text tokens of the trainable embedding table. Every
image-derived position (tokens and separators) gets label -100.

Every number here comes from `cfg.model.projector` through `TokenLayout` (the query grid side,
so tokens per item, and the separator ids), so the host and the model agree whatever the config
says; the official values are 12x12 = 144 tokens and LLaMA's "\\n" = 13, "," = 29892 (spec §1.1).

Layouts (`TokenLayout.layout`), q = grid_size, n = q² tokens per item:
  r1 (the released 7B model, PERMUTE_STRATEGY): the slices' q x q token grids are stitched into one
     (q rows) x (q cols) grid, each grid row ends with "\\n", then one `ind_tokens[0]` token
     ("," if cols > 1 else "\\n"), then the overview's n tokens;
  r2 (branch HEAD: 13B and Qwen2 checkpoints): S_1, ind_1, ..., S_n, ind_n, overview.
Without slicing both are the overview's n tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hiwin_jax.data.conversation import IGNORE_INDEX
from hiwin_jax.data.tokenizer import IMAGE_TOKEN_INDEX

LAYOUTS = ("r1", "r2")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """The host's copy of the token organisation of `cfg.model.projector` (picklable).

  layout: "r1" | "r2"; grid_size: Hiwin's query grid side q (q² tokens per item); newline_token,
  comma_token: the separator ids (the official slicer's `ind_tokens`: "\\n" ends a row of slices,
  "," separates the slices of a row).
  """
  layout: str
  grid_size: int
  newline_token: int
  comma_token: int

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"unknown token layout {self.layout!r}; choose from {LAYOUTS}")
    if self.grid_size < 1:
      raise ValueError(f"projector grid_size must be >= 1, got {self.grid_size}")

  @classmethod
  def from_config(cls, projector) -> TokenLayout:
    """From `cfg.model.projector` (fields layout, grid_size, newline_token, comma_token)."""
    return cls(str(projector.layout), int(projector.grid_size), int(projector.newline_token),
               int(projector.comma_token))

  @property
  def tokens_per_item(self) -> int:
    """Hiwin outputs per slice and per overview."""
    return self.grid_size * self.grid_size


def ind_tokens(grid: tuple[int, int] | None, tokens: TokenLayout) -> list[int]:
  """The separator after each slice, row-major (the official slicer's `ind_tokens`):
  `newline_token` ending a row of slices, `comma_token` otherwise; [] without slicing."""
  if grid is None:
    return []
  cols, rows = grid
  return ([tokens.comma_token] * (cols - 1) + [tokens.newline_token]) * rows


def image_token_count(grid: tuple[int, int] | None, tokens: TokenLayout) -> int:
  """LLM input embeddings that replace the `<image>` placeholder of an image whose slice grid is
  `grid` = (cols, rows) (None: not sliced), spec §5 with q = grid_size, n = q²:
  r1: q·rows·(q·cols + 1) + 1 + n; r2: (n + 1)·cols·rows + n; without slicing n."""
  n, q = tokens.tokens_per_item, tokens.grid_size
  if grid is None:
    return n
  cols, rows = grid
  if tokens.layout == "r1":
    return q * rows * (q * cols + 1) + 1 + n
  return (n + 1) * cols * rows + n


@dataclasses.dataclass(frozen=True)
class ImageLayout:
  """One image's span in the LLM sequence: `token_ids` holds the separator ids (and -1 where an
  image token goes); `item_token` holds `item * n + t` for image tokens (n = tokens per item;
  -1 elsewhere), items numbered slices first (row-major), then the overview."""
  token_ids: np.ndarray
  item_token: np.ndarray

  def __len__(self) -> int:
    return len(self.token_ids)


def image_layout(grid: tuple[int, int] | None, tokens: TokenLayout) -> ImageLayout:
  """The span of one image with `grid` = (cols, rows) of slices (None: no slicing)."""
  q, n = tokens.grid_size, tokens.tokens_per_item
  if grid is None:
    return ImageLayout(np.full(n, -1, np.int32), np.arange(n, dtype=np.int32))
  cols, rows = grid
  slices = cols * rows
  ind = ind_tokens(grid, tokens)
  overview = slices * n + np.arange(n, dtype=np.int32)
  if tokens.layout == "r1":
    # Global grid position (Y, X) -> slice (Y // q, X // q), query (Y % q, X % q).
    y, x = np.meshgrid(np.arange(q * rows), np.arange(q * cols), indexing="ij")
    tok = ((y // q) * cols + x // q) * n + (y % q) * q + x % q
    tok = np.concatenate([tok, np.full((q * rows, 1), -1)], axis=1).reshape(-1)
    ids = np.where(tok < 0, tokens.newline_token, -1)
    ids = np.concatenate([ids, [ind[0]], np.full(n, -1)])
    tok = np.concatenate([tok, [-1], overview])
  else:
    per_slice = [np.concatenate([k * n + np.arange(n), [-1]]) for k in range(slices)]
    tok = np.concatenate(per_slice + [overview])
    ids = np.full(len(tok), -1)
    ids[np.arange(1, slices + 1) * (n + 1) - 1] = ind
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


def renumber_image_tokens(image_token: np.ndarray, flat_index: np.ndarray,
                          tokens_per_item: int) -> np.ndarray:
  """A sample's image token indices (`item * n + t` over its own items, -1 for text) -> indices
  into the batch's flat image tokens: `flat_index[item] * n + t` (n = tokens_per_item)."""
  image_token = np.asarray(image_token)
  t = np.maximum(image_token, 0)
  return np.where(image_token >= 0, flat_index[t // tokens_per_item] * tokens_per_item
                  + t % tokens_per_item, -1)
