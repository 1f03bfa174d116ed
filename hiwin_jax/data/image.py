"""Image loading, the official pre-resize rules, the CLIP normalisation (spec §1.4-§1.5) and
`prepare_image`, the one per-image chain (pre-resize, slicing, normalisation, token span) that the
training loader and the inference requests share.

Host-side code: numpy and PIL only, no jax (it runs in grain worker processes).
"""

from __future__ import annotations

import io
import math
import os
from typing import Callable, Literal

import numpy as np
from PIL import Image, ImageOps

from hiwin_jax.data import layout, slicing

# CLIPImageProcessor of openai/clip-vit-large-patch14-336 (not the ImageNet statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_RESCALE = 1 / 255

# Pixel budget: an image whose header declares more pixels is refused before it is decoded (a
# 600 dpi A3 scan has 70M; PIL itself refuses above 2 x Image.MAX_IMAGE_PIXELS = 179M).
MAX_IMAGE_PIXELS = 150_000_000

TRAIN_TEXTVQA_MAX_SIZE = 1024
EVAL_TEXTVQA_MAX_SIZE = 1536
EVAL_DEFAULT_MAX_SIZE = 1024
TRAIN_RESIZE_PROB = 0.1
TRAIN_TARGET_SLICES = 6

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

Variant = Literal["r1", "r2"]  # the official code state (spec §0.1): cfg.model.projector.layout
Size = tuple[int, int]  # (width, height)


class ImageError(ValueError):
  """An image that cannot be decoded; the message names the file (or the given name) and why."""


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview, *,
               name: str | None = None, exif_transpose: bool = True,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
  """Decode an image file (path or encoded bytes) to a fully loaded RGB PIL image.

  Mode handling, chosen to match the official loader `Image.open(path).convert('RGB')` wherever
  that gives a sensible image:
  - RGB, L, 1, CMYK (PIL's naive conversion, no ICC profile), P and P with transparency: PIL's
    `convert('RGB')`.
  - RGBA, LA, PA: alpha is *dropped*, not composited: transparent pixels keep whatever colour they
    store (often black). This is what the official model was trained and evaluated with.
  - 16-bit grayscale (I;16, I;16B, ...; also 32-bit "I", read as 16-bit data): each value v is
    mapped to round(v / 257), i.e. 0..65535 onto 0..255. PIL's `convert('RGB')` clips at 255
    instead, which turns almost every 16-bit image white; this deviates from the official loader
    on purpose.
  - EXIF orientation is applied (`ImageOps.exif_transpose`) when `exif_transpose=True` (default),
    so a phone photo is upright. The official loader does NOT do this; pass False to reproduce it
    for an evaluation that must match the official numbers. A malformed EXIF block leaves the
    image as stored rather than failing.

  Raises ImageError (a ValueError) naming `name` (default: the path, or "<N bytes>") and the
  reason for a missing, unreadable, non-image or truncated file, or for a header declaring more
  than `max_pixels` pixels (checked before any pixel is decoded). Truncation is detected as long
  as `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is left False (this module never sets it).
  """
  if isinstance(source, (bytes, bytearray, memoryview)):
    data = bytes(source)
    label = name if name is not None else f"<{len(data)} bytes>"
    fp = io.BytesIO(data)
  else:
    label = name if name is not None else os.fspath(source)
    fp = source
  try:
    with Image.open(fp) as img:
      width, height = img.size
      if width * height > max_pixels:
        raise ImageError(f"image {label!r} is {width}x{height} = {width * height:,} pixels, more "
                         f"than the budget of {max_pixels:,} (not decoded)")
      img.load()
      if exif_transpose:
        img = _exif_transpose(img)
      return _to_rgb(img)
  except ImageError:
    raise
  except Exception as e:  # any decoder failure is a property of this file, not of the program
    raise ImageError(f"cannot load image {label!r}: {type(e).__name__}: {e}") from e


def _exif_transpose(img: Image.Image) -> Image.Image:
  try:
    return ImageOps.exif_transpose(img)
  except Exception:  # a corrupt EXIF block should not cost a sample
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
  if img.mode in _SIXTEEN_BIT_MODES:
    v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    return Image.fromarray(((v + 128) // 257).astype(np.uint8)).convert("RGB")
  return img.convert("RGB")


def keep_ratio_size(size: Size, max_size: int, variant: Variant) -> Size:
  """The size official `resize_image_keep_ratio` gives an image of `size` (`size` itself when it
  leaves the image alone).

  The longer side becomes max_size, the other `int(max_size / long * short)` (truncated; clamped
  to >= 1 where the official code would ask PIL for a zero-sized image). A square counts as
  "height is the long side", so e.g. 49x49 becomes 1023x1024 because (1024/49)*49 < 1024 in
  floats, as in the official code. "r1" (7B release) resizes only when the new width exceeds the
  old one: it only upscales, and a tall image whose width would not grow after the truncation
  (e.g. 200x1020 at 1024) is kept. "r2" (branch HEAD) always rescales, up or down (spec §0.1).
  """
  if variant not in ("r1", "r2"):
    raise ValueError(f"variant must be 'r1' or 'r2', got {variant!r}")
  width, height = size
  if width > height:
    new = (max_size, max(1, int(max_size / width * height)))
  else:
    new = (max(1, int(max_size / height * width)), max_size)
  if variant == "r1" and new[0] <= width:
    return (width, height)
  return new


def resize_keep_ratio(img: Image.Image, max_size: int, variant: Variant) -> Image.Image:
  """Official `resize_image_keep_ratio` (BICUBIC) to `keep_ratio_size`; an image it keeps is
  returned as is (the same object)."""
  size = keep_ratio_size(img.size, max_size, variant)
  return img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)


def is_textvqa(path: str | None) -> bool:
  """Training images with the TextVQA pre-resize: the path names 'TextVQA' or 'textvqa'."""
  return path is not None and ("TextVQA" in path or "textvqa" in path)


def train_pre_resize_size(size: Size, path: str, draw: float, *, variant: Variant,
                          scale_resolution: int = slicing.SCALE_RESOLUTION) -> Size:
  """The size `train_pre_resize` gives an image of `size`, computed without pixels."""
  if is_textvqa(path):
    return keep_ratio_size(size, TRAIN_TEXTVQA_MAX_SIZE, variant)
  width, height = size
  plan = slicing.plan_slices(width, height, slicing.TRAIN_MAX_SLICE_NUMS, scale_resolution)
  if draw < TRAIN_RESIZE_PROB and plan.num_slices != TRAIN_TARGET_SLICES:
    s = scale_resolution
    r = math.sqrt(TRAIN_TARGET_SLICES * s * s / (width * height))
    return max(1, int(width * r)), max(1, int(height * r))
  return (width, height)


def train_pre_resize(img: Image.Image, path: str, draw: float, *, variant: Variant,
                     scale_resolution: int = slicing.SCALE_RESOLUTION) -> Image.Image:
  """Training-time pre-resize before slicing (`LazySupervisedDataset`, spec §1.4 steps 1-2).

  - A path containing 'TextVQA' or 'textvqa': `resize_keep_ratio(img, 1024, variant)`; `draw`
    is not used.
  - Otherwise, if `draw` < 0.1 and the image does not already give 6 slices at
    max_slice_nums=7, the image is rescaled (BICUBIC) by r = sqrt(6·336² / (W·H)) to
    (int(W·r), int(H·r)) (each clamped to >= 1), so its area is under 6·336² and the slicer's
    candidate counts become 5, 6, 7 (336 = `scale_resolution`, the ViT's input side).
  `draw` is the official code's one `random.random()` per sample (drawn from Python's global
  `random` there); a caller draws it reproducibly. Both code states train this way; `variant`
  only changes the TextVQA resize (R1 upscales only, R2 always rescales).
  An image the rule keeps is returned as is (the same object).
  """
  size = train_pre_resize_size(img.size, path, draw, variant=variant,
                               scale_resolution=scale_resolution)
  return img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)


def eval_pre_resize(img: Image.Image, image_folder: str, variant: Variant) -> Image.Image:
  """Evaluation-time pre-resize (`model_vqa_loader.py`, spec §1.4), chosen by the folder name.

  Case-sensitive substring rules, first match wins: 'mme' or 'ai2d' -> unchanged (so the usual
  ".../MME/..." folder does NOT match and gets the default); 'textvqa' -> `resize_keep_ratio`
  to 1536; anything else -> `resize_keep_ratio` to 1024.
  """
  if "mme" in image_folder or "ai2d" in image_folder:
    return img
  max_size = EVAL_TEXTVQA_MAX_SIZE if "textvqa" in image_folder else EVAL_DEFAULT_MAX_SIZE
  return resize_keep_ratio(img, max_size, variant)


def clip_normalize(img: Image.Image | np.ndarray) -> np.ndarray:
  """CLIPImageProcessor rescale + normalize, [H, W, 3] uint8 RGB -> [H, W, 3] float32 (NHWC order).

  As transformers does it: v = float32(uint8 * (1/255)) with the product in float64, then
  (v - mean) / std in float32 with float32 mean/std. No resize or crop (the slicer already made
  14-aligned sizes). The official code returns CHW; transpose(2, 0, 1) gives exactly that.
  """
  arr = np.asarray(img)
  if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
    mode = f" (PIL mode {img.mode})" if isinstance(img, Image.Image) else ""
    raise ValueError(f"clip_normalize expects an RGB uint8 [H, W, 3] image, got dtype {arr.dtype} "
                     f"shape {arr.shape}{mode}")
  v = (arr.astype(np.float64) * CLIP_RESCALE).astype(np.float32)
  return (v - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def prepare_image(img: Image.Image, tokens: layout.TokenLayout, *, max_slice_nums: int,
                  scale_resolution: int, never_split: bool = False,
                  pre_resize: Callable[..., Image.Image] | None = None,
                  ) -> tuple[layout.ImageLayout, tuple[np.ndarray, ...]]:
  """One loaded image -> (its span in the LLM sequence, its items), as training and evaluation
  both prepare it (spec §1.3-§1.5, §5).

  `pre_resize(img, variant=tokens.layout)` (the training or the evaluation rule; None: none),
  `slicing.slice_image`, `clip_normalize` of the slices (row-major) and then the overview
  (items: float32 [14h, 14w, 3] each), and `layout.image_layout` of the slice grid. The
  pre-resize variant is the token layout's: both name the official code state (spec §0.1), so
  an R2 model (13B, Qwen2) gets R2's rule.
  """
  if pre_resize is not None:
    img = pre_resize(img, variant=tokens.layout)
  res = slicing.slice_image(img, max_slice_nums, scale_resolution, never_split=never_split)
  items = tuple(clip_normalize(x) for x in res.slices + [res.overview])
  return layout.image_layout(res.grid, tokens), items
