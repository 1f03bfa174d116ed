"""LLaVA-UHD adaptive slicing (`slice_image_minicpm` of the official `llava/slice_process.py`).

An image becomes one overview (its whole content at about 336² pixels) plus, when its area exceeds
336², a grid of equally sized slices cut from a resized copy of the original ("refine" image).
Every side is a multiple of the ViT patch size 14. See spec §1.2-§1.3 and §10 items 1-2.

The arithmetic reproduces Python's exactly (float division, `int()` truncation toward zero,
`ensure_divide` rounding *down*, strict-`<` grid search), because one pixel more or less changes the
ViT patch grid. All geometry lives in `plan_slices`, which touches no pixels; `slice_image` applies
a plan to a PIL image with `Image.Resampling.BICUBIC` (which antialiases when downscaling).

Sizes follow PIL: `(width, height)`. Patch grids follow the model: `(h, w)` = (rows, cols) of
14-pixel patches. Host-side code: numpy and PIL only, no jax (it runs in grain worker processes).
"""

from __future__ import annotations

import dataclasses
import math
import operator

from PIL import Image

SCALE_RESOLUTION = 336  # CLIP ViT-L/14-336 input side
PATCH_SIZE = 14
TRAIN_MAX_SLICE_NUMS = 7
EVAL_MAX_SLICE_NUMS = 9

Size = tuple[int, int]


def ensure_divide(length: float, patch_size: int) -> int:
  """max(floor(length / patch_size) * patch_size, patch_size): round down, >= patch_size."""
  return max(math.floor(length / patch_size) * patch_size, patch_size)


def find_best_resize(size: tuple[float, float], scale_resolution: int = SCALE_RESOLUTION,
                     patch_size: int = PATCH_SIZE, allow_upscale: bool = False) -> Size:
  """A size of area <= scale_resolution² with the aspect ratio of `size`, 14-aligned (patch_size).

  Only rescales when the area exceeds scale_resolution² or `allow_upscale`; the new height is
  `int(S / sqrt(W/H))` and the new width `int(height * W/H)`, both truncated, then both sides go
  through `ensure_divide` (so a side never drops below one patch).
  """
  width, height = size
  if width * height > scale_resolution * scale_resolution or allow_upscale:
    r = width / height
    height = int(scale_resolution / math.sqrt(r))
    width = int(height * r)
  return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(size: Size, grid: Size, scale_resolution: int = SCALE_RESOLUTION,
                    patch_size: int = PATCH_SIZE, allow_upscale: bool = True) -> Size:
  """Size of the image the slices are cut from: `grid` (cols, rows) times one slice size.

  The original size is first rounded down to multiples of the grid counts, then one cell (a float
  size) is renormalised to area ~scale_resolution² by `find_best_resize`.
  """
  width, height = size
  cols, rows = grid
  cell = (ensure_divide(width, cols) / cols, ensure_divide(height, rows) / rows)
  cell_w, cell_h = find_best_resize(cell, scale_resolution, patch_size, allow_upscale=allow_upscale)
  return cell_w * cols, cell_h * rows


def candidate_grids(multiple: int, max_slice_nums: int) -> list[Size]:
  """Grids (cols, rows) in the official search order: k in (multiple-1, multiple, multiple+1)
  without 1 and without k > max_slice_nums, then cols ascending among the divisors of k."""
  counts = [k for k in (multiple - 1, multiple, multiple + 1) if k != 1 and k <= max_slice_nums]
  return [(m, k // m) for k in counts for m in range(1, k + 1) if k % m == 0]


def best_grid(width: int, height: int, grids: list[Size]) -> Size:
  """The grid whose aspect ratio is closest to the image's in log space; the first minimum wins."""
  log_ratio = math.log(width / height)
  best, best_err = None, math.inf
  for cols, rows in grids:
    err = abs(log_ratio - math.log(cols / rows))
    if err < best_err:
      best, best_err = (cols, rows), err
  return best


@dataclasses.dataclass(frozen=True)
class SlicePlan:
  """Geometry of one image's overview and slices; sizes are (width, height) in pixels.

  `grid`, `refine_size` and `slice_size` are None when the image is not sliced (area <= 336², or
  never_split, or max_slice_nums <= 1).
  """
  image_size: Size
  overview_size: Size
  grid: Size | None  # (cols, rows)
  refine_size: Size | None
  slice_size: Size | None
  patch_size: int = PATCH_SIZE
  scale_resolution: int = SCALE_RESOLUTION

  @property
  def num_slices(self) -> int:
    return 0 if self.grid is None else self.grid[0] * self.grid[1]

  @property
  def overview_patches(self) -> Size:
    """(h, w) ViT patch grid of the overview."""
    return self.overview_size[1] // self.patch_size, self.overview_size[0] // self.patch_size

  @property
  def slice_patches(self) -> Size | None:
    """(h, w) ViT patch grid of every slice; None without slicing."""
    if self.slice_size is None:
      return None
    return self.slice_size[1] // self.patch_size, self.slice_size[0] // self.patch_size

  @property
  def slice_boxes(self) -> list[tuple[int, int, int, int]]:
    """PIL crop boxes (left, upper, right, lower) in the refine image, row-major."""
    if self.grid is None:
      return []
    (cols, rows), (sw, sh) = self.grid, self.slice_size
    return [(x * sw, y * sh, (x + 1) * sw, (y + 1) * sh) for y in range(rows) for x in range(cols)]


def plan_slices(width: int, height: int, max_slice_nums: int,
                scale_resolution: int = SCALE_RESOLUTION, patch_size: int = PATCH_SIZE,
                never_split: bool = False) -> SlicePlan:
  """The geometry `slice_image` uses, computed without pixels (spec §1.3).

  An image is sliced iff min(ceil(W*H / S²), max_slice_nums) > 1 and not never_split, i.e. any
  image with area > S² when max_slice_nums >= 2. Then the overview keeps the aspect ratio at area
  ~S² and the grid comes from `candidate_grids`/`best_grid`; otherwise the overview is resized
  (up or down) to area ~S².
  """
  width, height = operator.index(width), operator.index(height)
  if width < 1 or height < 1:
    raise ValueError(f"image size must be positive, got {width}x{height}")
  size = (width, height)
  multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
  if multiple <= 1 or never_split:
    overview = find_best_resize(size, scale_resolution, patch_size, allow_upscale=True)
    return SlicePlan(size, overview, None, None, None, patch_size, scale_resolution)
  overview = find_best_resize(size, scale_resolution, patch_size, allow_upscale=False)
  grid = best_grid(width, height, candidate_grids(multiple, max_slice_nums))
  refine = get_refine_size(size, grid, scale_resolution, patch_size, allow_upscale=True)
  slice_size = (refine[0] // grid[0], refine[1] // grid[1])
  return SlicePlan(size, overview, grid, refine, slice_size, patch_size, scale_resolution)


def check_patch_grid(h: int, w: int, what: str, *, min_per_side: int = 2,
                     max_patches: int = (SCALE_RESOLUTION // PATCH_SIZE) ** 2) -> None:
  """Raise ValueError unless an (h, w) patch grid is one the vision model can take.

  The JBU detail-injection upsampler needs >= 2 patches along each side (it pools and upsamples
  the grid), and the ViT's shape buckets hold at most 576 = 24² patches. `what` describes the
  image (its pixel size and origin) for the message.
  """
  if min(h, w) < min_per_side:
    raise ValueError(
        f"{what}: its ViT patch grid is {h}x{w} (rows x cols), but the model needs at least "
        f"{min_per_side} patches per side (the JBU upsampler pools and upsamples the grid); "
        f"the image's aspect ratio is too extreme for 14-pixel patches at ~336² pixels")
  if h * w > max_patches:
    raise ValueError(
        f"{what}: its ViT patch grid is {h}x{w} (rows x cols) = {h * w} patches, more than the "
        f"{max_patches} a slice or overview may have")


def check_plan(plan: SlicePlan, min_patches_per_side: int = 2) -> None:
  """`check_patch_grid` on the overview and the slices of a plan, naming the image size."""
  (width, height), ps = plan.image_size, plan.patch_size
  max_patches = (plan.scale_resolution // ps) ** 2
  aspect = max(width / height, height / width)
  image = f"{width}x{height} px image (aspect ratio {aspect:.1f}:1)"
  ow, oh = plan.overview_size
  check_patch_grid(oh // ps, ow // ps, f"the {ow}x{oh} px overview of a {image}",
                   min_per_side=min_patches_per_side, max_patches=max_patches)
  if plan.slice_size is not None:
    sw, sh = plan.slice_size
    check_patch_grid(sh // ps, sw // ps, f"the {sw}x{sh} px slices of a {image}",
                     min_per_side=min_patches_per_side, max_patches=max_patches)


@dataclasses.dataclass(frozen=True)
class SliceResult:
  """Output of `slice_image`: the overview and the slices (row-major). The separators the
  official function also returns are token layout: `layout.ind_tokens`."""
  overview: Image.Image
  slices: list[Image.Image]
  grid: Size | None  # (cols, rows)
  plan: SlicePlan

  @property
  def overview_patches(self) -> Size:
    """(h, w) ViT patch grid of the overview."""
    return self.plan.overview_patches

  @property
  def slice_patches(self) -> Size | None:
    """(h, w) ViT patch grid of each slice; None without slicing."""
    return self.plan.slice_patches


def slice_image(image: Image.Image, max_slice_nums: int, scale_resolution: int = SCALE_RESOLUTION,
                patch_size: int = PATCH_SIZE, never_split: bool = False, *,
                min_patches_per_side: int | None = 2) -> SliceResult:
  """Official `slice_image_minicpm`: overview + row-major slices, all resized with PIL BICUBIC.

  The overview and the refine image are both resized from the original `image` (not from each
  other); slices are crops of the refine image. With `min_patches_per_side` set, the plan is checked
  before any pixel is touched and an image whose overview or slices would have fewer patches per
  side (or more than 576 patches) raises ValueError naming its size and grid: only extreme aspect
  ratios do (beyond about 144:1; e.g. 1x500 px: a 14x7504 px overview, a 536x1 grid). None gives
  the official behaviour for any size. Tiny images are fine: 1x1 px is upscaled to a 336x336
  overview (24x24 patches), as the official code does.
  """
  plan = plan_slices(image.width, image.height, max_slice_nums, scale_resolution, patch_size,
                     never_split)
  if min_patches_per_side is not None:
    check_plan(plan, min_patches_per_side)
  overview = image.resize(plan.overview_size, Image.Resampling.BICUBIC)
  slices = []
  if plan.grid is not None:
    refine = image.resize(plan.refine_size, Image.Resampling.BICUBIC)
    slices = [refine.crop(box) for box in plan.slice_boxes]
  return SliceResult(overview, slices, plan.grid, plan)

