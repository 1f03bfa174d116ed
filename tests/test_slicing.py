"""hiwin_jax.data.slicing against the spec §1.2-§1.3 transcription of tests/reference/slicing.py
and the worked examples of official-spec §1.7."""

import math

import numpy as np
import pytest
from PIL import Image

from hiwin_jax.data import layout, slicing
from tests.reference import slicing as slicing_ref

S, P = 336, 14


def _sizes(n, seed):
  """Seeded sizes: aspect ratio log-uniform in [1:20, 20:1], longer side log-uniform in [1, 5000].
  """
  rng = np.random.default_rng(seed)
  aspect = np.exp(rng.uniform(math.log(1 / 20), math.log(20), n))
  long_side = np.exp(rng.uniform(0, math.log(5000), n))
  out = []
  for a, l in zip(aspect, long_side):
    w, h = (l, l / a) if a >= 1 else (l * a, l)
    out.append((int(np.clip(round(w), 1, 5000)), int(np.clip(round(h), 1, 5000))))
  return out


EDGE_SIZES = [(336, 336), (337, 337), (1, 1), (1, 500), (500, 1), (5000, 1), (1, 5000),
              (5000, 5000),
              (14, 14), (13, 13), (335, 337), (336, 337), (673, 168), (1008, 1008), (1009, 1008),
              (2, 3), (28, 1), (100, 1), (1, 100), (4999, 4998)]
RANDOM_SIZES = _sizes(2400, seed=0)


@pytest.mark.parametrize("max_slice_nums", [7, 9])
def test_plan_matches_reference_on_random_and_edge_sizes(max_slice_nums):
  mismatches = []
  for w, h in EDGE_SIZES + RANDOM_SIZES:
    plan = slicing.plan_slices(w, h, max_slice_nums)
    got = (plan.overview_size, plan.grid, plan.refine_size, plan.slice_size)
    want = slicing_ref.plan(w, h, max_slice_nums)
    if got != want:
      mismatches.append(((w, h), got, want))
  assert not mismatches, f"{len(mismatches)} sizes differ, first: {mismatches[:3]}"


# spec §1.7: input, max_slice_nums, overview, grid, refine, slice, tokens R1, tokens R2
WORKED_EXAMPLES = [
    ((336, 336), (7, 9), (336, 336), None, None, None, 144, 144),
    ((337, 337), (7, 9), (336, 336), (1, 2), (462, 448), (462, 224), 457, 434),
    ((640, 480), (7, 9), (378, 280), (2, 2), (756, 560), (378, 280), 745, 724),
    ((1024, 768), (7, 9), (378, 280), (3, 2), (924, 700), (308, 350), 1033, 1014),
    ((1008, 672), (7, 9), (406, 266), (3, 2), (1008, 672), (336, 336), 1033, 1014),
    ((1024, 1024), (7,), (336, 336), (3, 2), (798, 812), (266, 406), 1033, 1014),
    ((1024, 1024), (9,), (336, 336), (3, 3), (1008, 1008), (336, 336), 1477, 1449),
    ((1920, 1080), (9,), (448, 252), (4, 2), (1232, 700), (308, 350), 1321, 1304),
    ((500, 2000), (9,), (168, 672), (1, 8), (462, 1792), (462, 224), 1393, 1304),
    ((200, 100), (7, 9), (462, 224), None, None, None, 144, 144),
    ((4000, 300), (9,), (1218, 84), (9, 1), (3654, 266), (406, 266), 1453, 1449),
]


@pytest.mark.parametrize("row", WORKED_EXAMPLES, ids=lambda r: f"{r[0][0]}x{r[0][1]}-max{r[1]}")
def test_worked_examples_of_spec_table(row):
  size, maxes, overview, grid, refine, slice_size, tok_r1, tok_r2 = row
  for max_slice_nums in maxes:
    plan = slicing.plan_slices(*size, max_slice_nums)
    assert (plan.overview_size, plan.grid, plan.refine_size, plan.slice_size) == (
        overview, grid, refine, slice_size), f"{size} max={max_slice_nums}: {plan}"
    for order, tok in (("r1", tok_r1), ("r2", tok_r2)):
      assert layout.image_token_count(plan.grid, layout.TokenLayout(order, 12, 13, 29892)) == tok


def test_every_item_is_14_aligned_and_within_576_patches_when_the_grid_is_valid():
  checked = 0
  for w, h in EDGE_SIZES + RANDOM_SIZES:
    for max_slice_nums in (7, 9):
      plan = slicing.plan_slices(w, h, max_slice_nums)
      aspect = max(w / h, h / w)
      try:
        slicing.check_plan(plan)
      except ValueError:
        assert aspect > 100, f"{w}x{h}: an aspect ratio of {aspect:.1f} should be accepted"
        continue
      checked += 1
      items = [plan.overview_size] + ([plan.slice_size] if plan.grid else [])
      for iw, ih in items:
        assert iw % P == 0 and ih % P == 0, f"{w}x{h}: {iw}x{ih} not 14-aligned"
        assert (iw // P) * (ih // P) <= 576, f"{w}x{h}: {iw}x{ih} has more than 576 patches"
        assert min(iw, ih) >= 2 * P
      if plan.grid:
        cols, rows = plan.grid
        assert plan.refine_size == (plan.slice_size[0] * cols, plan.slice_size[1] * rows)
        assert 2 <= cols * rows <= max_slice_nums
        assert w * h > S * S
      else:
        assert w * h <= S * S
  assert checked > 4000


def test_candidate_order_and_first_minimum_wins():
  assert slicing.candidate_grids(2, 9) == [(1, 2), (2, 1), (1, 3), (3, 1)]
  assert slicing.candidate_grids(9, 9) == [(1, 8), (2, 4), (4, 2), (8, 1), (1, 9), (3, 3), (9, 1)]
  # a square image: |ln(1/2)| == |ln(2)| exactly, so the strict '<' keeps the first listed
  assert abs(math.log(1 / 2)) == abs(math.log(2))
  assert slicing.best_grid(100, 100, slicing.candidate_grids(2, 9)) == (1, 2)
  # but |ln(2/3)| is one ulp above |ln(3/2)| (2/3 is rounded), so [3,2] beats the earlier [2,3]:
  # this is why a 1024x1024 image gets [3,2] at max_slice_nums=7 (spec §1.7)
  assert abs(math.log(2 / 3)) > abs(math.log(3 / 2))
  assert slicing.best_grid(100, 100, slicing.candidate_grids(6, 7)) == (3, 2)


def test_helpers_truncate_and_round_down():
  assert slicing.ensure_divide(27, 14) == 14 and slicing.ensure_divide(13, 14) == 14
  assert slicing.ensure_divide(28, 14) == 28 and slicing.ensure_divide(341.9, 14) == 336
  assert slicing.find_best_resize((1024, 768)) == (378, 280)
  assert slicing.find_best_resize((200, 100)) == (200 // 14 * 14, 100 // 14 * 14)  # no upscale
  assert slicing.find_best_resize((200, 100), allow_upscale=True) == (462, 224)
  assert slicing.get_refine_size((1024, 768), (3, 2)) == (924, 700)


def _test_image(w, h, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
  noise = rng.integers(0, 40, (h, w, 3))
  return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size,max_slice_nums",
                         [((640, 480), 9), ((500, 2000), 9), ((337, 337), 7)])
def test_slice_image_cuts_the_refine_image_row_major(size, max_slice_nums):
  img = _test_image(*size)
  res = slicing.slice_image(img, max_slice_nums)
  plan = slicing.plan_slices(*size, max_slice_nums)
  cols, rows = plan.grid
  assert res.grid == plan.grid and res.plan == plan
  assert res.overview.size == plan.overview_size
  overview = img.resize(plan.overview_size, Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(np.asarray(res.overview), np.asarray(overview))
  refine = np.asarray(img.resize(plan.refine_size, Image.Resampling.BICUBIC))
  sw, sh = plan.slice_size
  assert len(res.slices) == cols * rows
  for k, piece in enumerate(res.slices):
    y, x = divmod(k, cols)
    assert piece.size == (sw, sh)
    cell = refine[y * sh:(y + 1) * sh, x * sw:(x + 1) * sw]
    np.testing.assert_array_equal(np.asarray(piece), cell,
                                  err_msg=f"slice {k} is not cell (row {y}, col {x})")
  assert res.overview_patches == (plan.overview_size[1] // 14, plan.overview_size[0] // 14)
  assert res.slice_patches == (sh // 14, sw // 14)


def test_slice_image_without_slicing():
  res = slicing.slice_image(_test_image(200, 100), 9)
  assert res.grid is None and res.slices == []
  assert res.slice_patches is None
  assert res.overview.size == (462, 224) and res.overview_patches == (16, 33)
  res = slicing.slice_image(_test_image(640, 480), 9, never_split=True)
  assert res.grid is None and res.overview.size == (378, 280)


def test_one_pixel_image_is_upscaled_to_a_full_overview():
  res = slicing.slice_image(Image.new("RGB", (1, 1), (12, 34, 56)), 9)
  assert res.overview.size == (336, 336) and res.grid is None
  assert np.all(np.asarray(res.overview) == (12, 34, 56))


@pytest.mark.parametrize("size,grid", [((1, 500), (536, 1)), ((5000, 1), (1, 1428))])
def test_extreme_aspect_ratio_raises_a_clear_error(size, grid):
  img = Image.new("RGB", size)
  with pytest.raises(ValueError) as info:
    slicing.slice_image(img, 9)
  msg = str(info.value)
  assert f"{size[0]}x{size[1]} px image" in msg and f"{grid[0]}x{grid[1]}" in msg
  assert "at least 2 patches per side" in msg
  res = slicing.slice_image(img, 9, min_patches_per_side=None)  # the official behaviour
  assert res.overview_patches == grid


def test_check_patch_grid():
  slicing.check_patch_grid(2, 288, "x")
  slicing.check_patch_grid(24, 24, "x")
  with pytest.raises(ValueError, match="thing: its ViT patch grid is 1x30"):
    slicing.check_patch_grid(1, 30, "thing")
  with pytest.raises(ValueError, match="577 patches"):
    slicing.check_patch_grid(1, 577, "thing", min_per_side=1)
