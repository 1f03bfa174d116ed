"""RoIAlign against a literal numpy transcription of torchvision's CPU kernel (spec §4.4).

`numpy_roi_align` walks boxes, bins and samples in the order of torchvision's
`roi_align_forward_kernel_impl` (aligned=False, sampling_ratio=-1), in float32. The window path
and the sample-grid choice are checked against the official formulas written out in float64.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hiwin_jax.models.roi_align import (POOL_CANDIDATES, axis_weights, pooling_size, roi_align,
                                        window_boxes, window_edges, window_weights)
from numerics import assert_close

f32 = np.float32


def numpy_roi_align(features, boxes, output_size):
  """torchvision roi_align(aligned=False, spatial_scale=1, sampling_ratio=-1), one image.

  features [H, W, C], boxes [K, 4] float32 (x1, y1, x2, y2) -> [K, oh, ow, C] float32."""
  oh, ow = output_size
  h, w, c = features.shape
  out = np.zeros((len(boxes), oh, ow, c), f32)
  for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, f32)):
    roi_w = max(f32(x2 - x1), f32(1))
    roi_h = max(f32(y2 - y1), f32(1))
    bin_h, bin_w = f32(roi_h / f32(oh)), f32(roi_w / f32(ow))
    gh, gw = math.ceil(f32(roi_h / f32(oh))), math.ceil(f32(roi_w / f32(ow)))
    count = f32(max(gh * gw, 1))
    for ph in range(oh):
      for pw in range(ow):
        acc = np.zeros(c, f32)
        for iy in range(gh):
          yy = f32(f32(y1 + f32(f32(ph) * bin_h)) + f32(f32(f32(iy + 0.5) * bin_h) / f32(gh)))
          for ix in range(gw):
            xx = f32(f32(x1 + f32(f32(pw) * bin_w)) + f32(f32(f32(ix + 0.5) * bin_w) / f32(gw)))
            y, x = yy, xx
            if y < -1.0 or y > h or x < -1.0 or x > w:
              continue
            y, x = max(y, f32(0)), max(x, f32(0))
            y_low, x_low = int(y), int(x)
            if y_low >= h - 1:
              y_high = y_low = h - 1
              y = f32(y_low)
            else:
              y_high = y_low + 1
            if x_low >= w - 1:
              x_high = x_low = w - 1
              x = f32(x_low)
            else:
              x_high = x_low + 1
            ly, lx = f32(y - y_low), f32(x - x_low)
            hy, hx = f32(1 - ly), f32(1 - lx)
            w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
            acc = acc + (w1 * features[y_low, x_low] + w2 * features[y_low, x_high]
                         + w3 * features[y_high, x_low] + w4 * features[y_high, x_high])
        out[k, ph, pw] = acc / count
  return out


def official_window_boxes(height, width, num_windows=144):
  """`slice_image_feature_minicpm`'s boxes: float64 crop sizes, float32 tensor, then bf16."""
  ratio = height * width / num_windows
  crop_h = math.sqrt(ratio / (width / height))
  crop_w = crop_h * (width / height)
  rows, cols = int(round(height / crop_h)), int(round(width / crop_w))
  assert rows * cols == num_windows
  boxes = [[j * crop_w, i * crop_h, j * crop_w + crop_w, i * crop_h + crop_h]
           for i in range(rows) for j in range(cols)]
  return np.asarray(boxes, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def official_pooling_size(ratio):
  """`cal_best_pooling_size(W / H)` -> (oh, ow)."""
  best, err = None, float("inf")
  for cw, ch in POOL_CANDIDATES:
    e = abs(math.log(ratio) - math.log(cw / ch))
    if e < err:
      best, err = (ch, cw), e
  return best


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
  assert_close(got, numpy_roi_align(features, boxes, output_size), 1e-6, f"roi_align {hw}")


def test_roi_align_bf16_boxes_round_like_the_official_cast():
  rng = np.random.default_rng(3)
  features = rng.standard_normal((40, 70, 3)).astype(np.float32)
  boxes = (rng.uniform(0, 1, (16, 4)) * [70, 40, 70, 40]).astype(np.float32)
  boxes[:, 2:] += boxes[:, :2]
  rounded = boxes.astype(ml_dtypes.bfloat16).astype(np.float32)
  assert np.any(rounded != boxes)
  got = roi_align(jnp.asarray(features), jnp.asarray(boxes), (3, 4), bf16_boxes=True)
  assert_close(got, numpy_roi_align(features, rounded, (3, 4)), 1e-6, "bf16 boxes")


def test_axis_weights_traced_sizes_equal_static_sizes():
  """A traced bin count and map length on a larger canvas give the same weights, zeros past."""
  start = jnp.asarray([-1.5, 0.25, 3.0, 7.5], jnp.float32)
  end = jnp.asarray([2.0, 0.5, 11.0, 40.0], jnp.float32)
  static = jax.jit(lambda: axis_weights(start, end, 3, 9, canvas=9))()
  traced = jax.jit(lambda o, n: axis_weights(start, end, o, n, canvas=14, max_out=4))(3, 9)
  np.testing.assert_array_equal(np.asarray(traced)[:, :3, :9], np.asarray(static))
  assert not np.any(np.asarray(traced)[:, 3:]) and not np.any(np.asarray(traced)[:, :, 9:])


def test_window_edges_match_official_boxes():
  """Our integer rounding of c * W / 12 equals the official float64 -> float32 -> bf16 boxes for
  every map side up to 400, including exact bf16 ties (e.g. 11 * 222 / 12 = 203.5)."""
  sizes = np.arange(1, 401)
  ours = np.asarray(jax.vmap(window_edges)(jnp.asarray(sizes)))             # [400, 13]
  for height in (1, 7, 25, 50, 96, 100, 292):
    for width in sizes:
      boxes = official_window_boxes(height, width)
      np.testing.assert_array_equal(boxes[:12, 0], ours[width - 1, :12], err_msg=f"x1 {width}")
      np.testing.assert_array_equal(boxes[:12, 2], ours[width - 1, 1:], err_msg=f"x2 {width}")
      np.testing.assert_array_equal(boxes[::12, 1], ours[height - 1, :12], err_msg=f"y1 {height}")
  np.testing.assert_array_equal(np.asarray(window_boxes(25, 22)), official_window_boxes(25, 22))


def test_pooling_size_matches_log_ratio_rule():
  sides = np.arange(1, 121)
  hh, ww = np.meshgrid(sides, sides, indexing="ij")
  oh, ow = (np.asarray(a) for a in pooling_size(jnp.asarray(hh), jnp.asarray(ww)))
  for h, w in zip(hh.ravel(), ww.ravel()):
    assert (oh[h - 1, w - 1], ow[h - 1, w - 1]) == official_pooling_size(w / h), (h, w)


# 60 x 148 and 28 x 292 are the 4x levels of overviews 15 x 37 and 7 x 73, where the bf16 box
# rounding gives windows of one level different sample counts (gw in {4, 5} and {3, 4}).
@pytest.mark.parametrize("hw", [(25, 22), (100, 88), (15, 37), (7, 73), (60, 148), (28, 292),
                                (5, 4)])
def test_window_weights_equal_roi_align_on_window_boxes(hw):
  h, w = hw
  rng = np.random.default_rng(h * w)
  features = rng.standard_normal((h, w, 4)).astype(np.float32)
  oh, ow = official_pooling_size(w / h)
  canvas = (h + 3, w + 5)
  ay, ax = jax.jit(lambda *a: window_weights(*a, canvas_hw=canvas))(h, w, oh, ow)
  padded = np.zeros(canvas + (4,), np.float32)
  padded[:h, :w] = features
  got = jnp.einsum("rpy,cqx,yxe->rcpqe", ay, ax, padded, precision="highest")
  got = np.asarray(got)[:, :, :oh, :ow].reshape(144, oh, ow, 4)
  boxes = official_window_boxes(h, w)
  counts = np.ceil(np.maximum(boxes[:, 2] - boxes[:, 0], 1) / np.float32(ow))
  if hw in ((60, 148), (28, 292)):
    assert len(np.unique(counts)) > 1, "expected windows with different sample counts"
  want = np.asarray(roi_align(jnp.asarray(features), jnp.asarray(boxes), (oh, ow)))
  assert_close(got, want, 1e-6, f"windows of {hw}")
  some = rng.choice(144, 12, replace=False)
  assert_close(got[some], numpy_roi_align(features, boxes[some], (oh, ow)), 1e-6,
               f"windows of {hw} vs loops")
