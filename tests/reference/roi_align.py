"""RoIAlign and the Hiwin window boxes as the official projector computes them (official-spec
§4.4).

`roi_align` walks boxes, bins and samples in the order of torchvision's CPU
`roi_align_forward_kernel_impl` (aligned=False, spatial_scale=1, sampling_ratio=-1), in float32.
An axis-aligned box's samples are the product of one set of rows and one set of columns, so the
same walk, one axis at a time, gives `window_weights`: the RoIAlign of the regular 12 x 12 window
grid as two weight matrices, which the PyTorch Hiwin reference applies with einsums (fast, and
differentiable for the benchmarks' training step). `window_boxes` and `pooling_size` are
`slice_image_feature_minicpm`'s boxes and `cal_best_pooling_size`.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

f32 = np.float32

# `cal_best_pooling_size`'s sample grids (w, h), in the official order (the first of a tie wins).
POOL_CANDIDATES = ((4, 2), (3, 2), (4, 3), (3, 3), (2, 4), (2, 3), (3, 4))


def _axis_samples(start, end, out: int, length: int) -> tuple[list[list[tuple]], int]:
  """torchvision's samples along one axis of a box [start, end] on a map of `length` pixels:
  per bin, the (low, high, weight of low, weight of high) of each sample on the map (samples
  outside [-1, length] read zero and are left out), and the samples per bin (they all count)."""
  roi = max(f32(end - start), f32(1))
  bin_size = f32(roi / f32(out))
  count = math.ceil(f32(roi / f32(out)))
  bins = []
  for p in range(out):
    taps = []
    for i in range(count):
      y = f32(f32(start + f32(f32(p) * bin_size)) + f32(f32(f32(i + 0.5) * bin_size) / f32(count)))
      if y < -1.0 or y > length:
        continue
      y = max(y, f32(0))
      low = int(y)
      if low >= length - 1:
        high = low = length - 1
        y = f32(low)
      else:
        high = low + 1
      frac = f32(y - low)
      taps.append((low, high, f32(1 - frac), frac))
    bins.append(taps)
  return bins, count


def roi_align(features, boxes, output_size) -> np.ndarray:
  """torchvision roi_align(aligned=False, spatial_scale=1, sampling_ratio=-1), one image, sample
  by sample (rows outer, columns inner), then the bin sum divided by the sample count.

  features [H, W, C], boxes [K, 4] float32 (x1, y1, x2, y2) -> [K, oh, ow, C] float32."""
  oh, ow = output_size
  h, w, c = features.shape
  out = np.zeros((len(boxes), oh, ow, c), f32)
  for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, f32)):
    rows, gh = _axis_samples(y1, y2, oh, h)
    cols, gw = _axis_samples(x1, x2, ow, w)
    count = f32(max(gh * gw, 1))
    for ph in range(oh):
      for pw in range(ow):
        acc = np.zeros(c, f32)
        for y_low, y_high, hy, ly in rows[ph]:
          for x_low, x_high, hx, lx in cols[pw]:
            acc = acc + (hy * hx * features[y_low, x_low] + hy * lx * features[y_low, x_high]
                         + ly * hx * features[y_high, x_low] + ly * lx * features[y_high, x_high])
        out[k, ph, pw] = acc / count
  return out


def window_boxes(height: int, width: int, num_windows: int = 144, *, dtype) -> np.ndarray:
  """`slice_image_feature_minicpm`'s windows on an H x W map -> boxes [num_windows, 4] float32
  (x1, y1, x2, y2), row-major: crop sizes in float64, a float32 tensor, then cast to the features'
  `dtype` (numpy or ml_dtypes: bfloat16 in a bf16 run, float32 in an fp32 run) and read back as
  float32 by RoIAlign."""
  ratio = height * width / num_windows
  crop_h = math.sqrt(ratio / (width / height))
  crop_w = crop_h * (width / height)
  rows, cols = int(round(height / crop_h)), int(round(width / crop_w))
  assert rows * cols == num_windows
  boxes = np.asarray([[j * crop_w, i * crop_h, j * crop_w + crop_w, i * crop_h + crop_h]
                      for i in range(rows) for j in range(cols)], np.float32)
  return boxes.astype(dtype).astype(np.float32)


def pooling_size(ratio: float) -> tuple[int, int]:
  """`cal_best_pooling_size(W / H)` -> (oh, ow): the candidate closest in log aspect ratio."""
  best, err = None, float("inf")
  for cw, ch in POOL_CANDIDATES:
    e = abs(math.log(ratio) - math.log(cw / ch))
    if e < err:
      best, err = (ch, cw), e
  return best


def _axis_weights(start, end, out: int, length: int) -> np.ndarray:
  """[out, length]: bin p's mean bilinear weight on each pixel along one axis of a box."""
  bins, count = _axis_samples(start, end, out, length)
  weights = np.zeros((out, length), f32)
  for p, taps in enumerate(bins):
    for low, high, w_low, w_high in taps:
      weights[p, low] += w_low
      weights[p, high] += w_high
  return weights / f32(count)


def window_weights(height: int, width: int, output_size, grid: int = 12, *,
                   dtype) -> tuple[np.ndarray, np.ndarray]:
  """`roi_align` of the grid x grid `window_boxes` (rounded to the feature `dtype`), one axis at a
  time -> (ay [grid, oh, H], ax [grid, ow, W]) float32 with, up to rounding,
    roi_align(f, window_boxes(H, W))[grid * r + c] = einsum("py,qx,yxe->pqe", ay[r], ax[c], f)
  (window (r, c) spans row r's and column c's extent; each axis is divided by its sample count)."""
  boxes = window_boxes(height, width, grid * grid, dtype=dtype)
  oh, ow = output_size
  ay = np.stack([_axis_weights(y1, y2, oh, height) for _, y1, _, y2 in boxes[::grid]])
  ax = np.stack([_axis_weights(x1, x2, ow, width) for x1, _, x2, _ in boxes[:grid]])
  return ay, ax
