"""RoIAlign against a literal numpy transcription of torchvision's CPU kernel (spec §4.4).

`roi_ref.roi_align` (tests/reference/roi_align.py) walks boxes, bins and samples in the order of
torchvision's `roi_align_forward_kernel_impl` (aligned=False, sampling_ratio=-1), in float32. The
window path and the sample-grid choice are checked against the official formulas written out in
float64 (`roi_ref.window_boxes`, `roi_ref.pooling_size`).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hiwin_jax.models.roi_align import (_times, axis_weights, pooling_size, roi_align,
                                        window_boxes, window_edges, window_weights)
from tests.numerics import assert_close
from tests.reference import roi_align as roi_ref


def random_boxes(rng, h, w, k):
  """Boxes inside, straddling and outside the map, sub-pixel, inverted, and bf16-unfriendly."""
  centre = rng.uniform([-3, -3], [w + 3, h + 3], size=(k, 2))
  size = rng.choice([0.3, 0.9, 1.7, 4.0, 9.0, 20.0], size=(k, 2)) * rng.uniform(0.5, 1.5, (k, 2))
  boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
  boxes[0] = [0, 0, w, h]                   # the whole map
  boxes[1] = [-5, -4, -2, -1.5]             # entirely outside (all samples zero)
  boxes[2] = [w - 0.2, h - 0.3, w + 4, h + 2]  # past the bottom-right corner
  boxes[3] = [2.5, 1.25, 2.6, 1.3]          # tiny: enlarged to 1 x 1
  boxes[4] = [3, 2, 1, 0]                   # inverted: roi side max(., 1)
  return boxes.astype(np.float32)


@pytest.mark.parametrize("hw, output_size", [((13, 17), (2, 3)), ((9, 6), (4, 4)),
                                             ((1, 11), (3, 2))])
def test_roi_align_matches_torchvision_loops(hw, output_size):
  rng = np.random.default_rng(sum(hw))
  h, w = hw
  features = rng.standard_normal((h, w, 5)).astype(np.float32)
  boxes = random_boxes(rng, h, w, 24)
  got = roi_align(jnp.asarray(features), jnp.asarray(boxes), output_size)
  assert_close(got, roi_ref.roi_align(features, boxes, output_size), 1e-6, f"roi_align {hw}")


def test_bin_origin_product_is_correctly_rounded():
  """`_times(n, x)` (integer arithmetic) == float32(n * x) for every n < 128."""
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.uniform(0.01, 500, 20000), np.arange(1, 2001) / 8]).astype(np.float32)
  n = np.arange(128, dtype=np.int32)[:, None]
  got = np.asarray(jax.jit(_times)(jnp.asarray(n), jnp.asarray(x)[None]))
  np.testing.assert_array_equal(got, (n * x.astype(np.float64)).astype(np.float32))


@pytest.mark.parametrize("output_size", [(4, 4), (3, 4)])
def test_jitted_roi_align_takes_torchvision_samples_on_large_maps(output_size):
  """Jitted on CPU, the bin origins `start + ph * bin` are torchvision's: the product is rounded
  before the add. A fused multiply-add moves an origin by one ulp, which at coordinates ~100 on a
  checkerboard (neighbours differ by ~2) is ~1e-6 relative; the summation order alone is ~2e-7."""
  rng = np.random.default_rng(1)
  h, w = 150, 170
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  features = (((-1.0) ** (yy + xx))[..., None]
              * (1 + 0.1 * rng.standard_normal((h, w, 1)))).astype(np.float32)
  k = 128
  x1, y1 = rng.uniform(-2, w, k), rng.uniform(-2, h, k)
  boxes = np.stack([x1, y1, x1 + rng.uniform(0.5, 40, k), y1 + rng.uniform(0.5, 40, k)],
                   axis=1).astype(np.float32)
  got = roi_align(jnp.asarray(features), jnp.asarray(boxes), output_size)
  assert_close(got, roi_ref.roi_align(features, boxes, output_size), 5e-7,
               f"jitted roi_align {output_size}")


def test_roi_align_bf16_boxes_round_like_the_official_cast():
  rng = np.random.default_rng(3)
  features = rng.standard_normal((40, 70, 3)).astype(np.float32)
  boxes = (rng.uniform(0, 1, (16, 4)) * [70, 40, 70, 40]).astype(np.float32)
  boxes[:, 2:] += boxes[:, :2]
  rounded = boxes.astype(ml_dtypes.bfloat16).astype(np.float32)
  assert np.any(rounded != boxes)
  got = roi_align(jnp.asarray(features), jnp.asarray(boxes), (3, 4), box_dtype=jnp.bfloat16)
  assert_close(got, roi_ref.roi_align(features, rounded, (3, 4)), 1e-6, "bf16 boxes")


def test_axis_weights_traced_sizes_equal_static_sizes():
  """A traced bin count and map length on a larger canvas give the same weights, zeros past."""
  start = jnp.asarray([-1.5, 0.25, 3.0, 7.5], jnp.float32)
  end = jnp.asarray([2.0, 0.5, 11.0, 40.0], jnp.float32)
  static = jax.jit(lambda: axis_weights(start, end, 3, 9, canvas=9))()
  traced = jax.jit(lambda o, n: axis_weights(start, end, o, n, canvas=14, max_out=4))(3, 9)
  np.testing.assert_array_equal(np.asarray(traced)[:, :3, :9], np.asarray(static))
  assert not np.any(np.asarray(traced)[:, 3:]) and not np.any(np.asarray(traced)[:, :, 9:])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_window_edges_match_official_boxes(dtype):
  """Our c * W / 12 equals the official float64 -> float32 -> feature dtype boxes for every map
  side up to 400, including exact bf16 ties (e.g. 11 * 222 / 12 = 203.5)."""
  sizes = np.arange(1, 401)
  ours = np.asarray(jax.vmap(lambda n: window_edges(n, dtype=dtype, max_length=400))(
      jnp.asarray(sizes)))
  for height in (1, 7, 25, 50, 96, 100, 292):
    for width in sizes:
      boxes = roi_ref.window_boxes(height, width, dtype=dtype)
      np.testing.assert_array_equal(boxes[:12, 0], ours[width - 1, :12], err_msg=f"x1 {width}")
      np.testing.assert_array_equal(boxes[:12, 2], ours[width - 1, 1:], err_msg=f"x2 {width}")
      np.testing.assert_array_equal(boxes[::12, 1], ours[height - 1, :12], err_msg=f"y1 {height}")
  np.testing.assert_array_equal(np.asarray(window_boxes(25, 22, dtype=dtype)),
                                roi_ref.window_boxes(25, 22, dtype=dtype))


@pytest.mark.parametrize("hw", [(20, 27), (16, 36), (8, 10)])
def test_fp32_window_boxes_are_not_bf16_rounded(hw):
  """In float32 the boxes stay float32 (the official casts them to the feature dtype): on grids
  whose edges k * side / 12 are not bf16-representable, the bf16 and float32 boxes differ, and
  the float32 RoIAlign samples are those of the unrounded boxes."""
  h, w = hw
  f32, bf16 = (np.asarray(window_boxes(h, w, dtype=d)) for d in (jnp.float32, jnp.bfloat16))
  assert np.any(f32 != bf16), "these grids have edges that bf16 rounds"
  want = np.asarray([[c * w / 12, r * h / 12, (c + 1) * w / 12, (r + 1) * h / 12]
                     for r in range(12) for c in range(12)], np.float32)
  np.testing.assert_array_equal(f32, want)
  features = np.random.default_rng(h * w).standard_normal((h, w, 3)).astype(np.float32)
  oh, ow = roi_ref.pooling_size(w / h)
  ay, ax = jax.jit(lambda *a: window_weights(*a, canvas_hw=(h, w), dtype=jnp.float32))(h, w, oh,
                                                                                       ow)
  got = jnp.einsum("rpy,cqx,yxe->rcpqe", ay, ax, features, precision="highest")
  got = np.asarray(got)[:, :, :oh, :ow].reshape(144, oh, ow, 3)
  assert_close(got, roi_ref.roi_align(features, want, (oh, ow)), 1e-6, f"fp32 windows of {hw}")


def test_pooling_size_matches_log_ratio_rule():
  sides = np.arange(1, 121)
  hh, ww = np.meshgrid(sides, sides, indexing="ij")
  oh, ow = (np.asarray(a) for a in pooling_size(jnp.asarray(hh), jnp.asarray(ww)))
  for h, w in zip(hh.ravel(), ww.ravel()):
    assert (oh[h - 1, w - 1], ow[h - 1, w - 1]) == roi_ref.pooling_size(w / h), (h, w)


# 60 x 148 and 28 x 292 are the 4x levels of overviews 15 x 37 and 7 x 73, where the bf16 box
# rounding gives windows of one level different sample counts (gw in {4, 5} and {3, 4}).
@pytest.mark.parametrize("hw", [(25, 22), (100, 88), (15, 37), (7, 73), (60, 148), (28, 292),
                                (5, 4)])
def test_window_weights_equal_roi_align_on_window_boxes(hw):
  h, w = hw
  rng = np.random.default_rng(h * w)
  features = rng.standard_normal((h, w, 4)).astype(np.float32)
  oh, ow = roi_ref.pooling_size(w / h)
  canvas = (h + 3, w + 5)
  ay, ax = jax.jit(lambda *a: window_weights(*a, canvas_hw=canvas, dtype=jnp.bfloat16))(
      h, w, oh, ow)
  padded = np.zeros(canvas + (4,), np.float32)
  padded[:h, :w] = features
  got = jnp.einsum("rpy,cqx,yxe->rcpqe", ay, ax, padded, precision="highest")
  got = np.asarray(got)[:, :, :oh, :ow].reshape(144, oh, ow, 4)
  boxes = roi_ref.window_boxes(h, w, dtype=ml_dtypes.bfloat16)
  counts = np.ceil(np.maximum(boxes[:, 2] - boxes[:, 0], 1) / np.float32(ow))
  if hw in ((60, 148), (28, 292)):
    assert len(np.unique(counts)) > 1, "expected windows with different sample counts"
  want = np.asarray(roi_align(jnp.asarray(features), jnp.asarray(boxes), (oh, ow)))
  assert_close(got, want, 1e-6, f"windows of {hw}")
  some = rng.choice(144, 12, replace=False)
  assert_close(got[some], roi_ref.roi_align(features, boxes[some], (oh, ow)), 1e-6,
               f"windows of {hw} vs loops")
