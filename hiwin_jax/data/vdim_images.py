"""Images for VDIM pre-training (official-spec §3.7): a folder of photos, or scikit-image's
bundled ones.

The official transform is `Resize(336, NEAREST)` (shorter side), `CenterCrop(336)`, `ToTensor`,
ImageNet normalisation. Batches are a pure function of (seed, step): sample k of step s is item
`perm_e[(s * B + k) % N]` with `perm_e` a permutation drawn from (seed, epoch e), so a resumed run
sees exactly the batches an uninterrupted one would. A file that cannot be decoded is logged with
its name, counted, remembered and replaced by the next good item of the same permutation, which
is again a function of (seed, step) alone.

Host-side code: numpy and PIL only, no jax.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import pathlib
import threading

import numpy as np
from PIL import Image

from hiwin_jax.data.image import ImageError, load_image

log = logging.getLogger("hiwin.vdim")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
SKIMAGE = "skimage"
# Photos shipped inside the scikit-image wheel (no pooch download); grey ones become RGB.
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
                  "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
                  "logo", "moon", "page", "retina", "rocket", "text")


def list_images(folder: str | os.PathLike) -> list[pathlib.Path]:
  """Every image file under `folder` (recursive, by suffix, case-insensitive), sorted."""
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f"VDIM data folder {os.fspath(root)!r} does not exist (set "
                            f"--config.data.source to a folder of images, or to 'skimage')")
  files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
  if not files:
    raise FileNotFoundError(f"VDIM data folder {os.fspath(root)!r} holds no image files "
                            f"(looked for {', '.join(IMAGE_SUFFIXES)})")
  return files


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
  """torchvision `Resize(size, InterpolationMode.NEAREST)` then `CenterCrop(size)` on a PIL image.

  Resize: the shorter side becomes `size`, the longer `int(size * long / short)` (truncated, as
  torchvision's `_compute_resized_output_size`). CenterCrop: top = int(round((h - size) / 2)).
  """
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) != (w, h):
    img = img.resize((new_w, new_h), Image.NEAREST)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def imagenet_normalize(img: Image.Image) -> np.ndarray:
  """`ToTensor()` + `Normalize(ImageNet mean, std)`: [H, W, 3] uint8 RGB -> [H, W, 3] float32."""
  v = np.asarray(img, np.uint8).astype(np.float32) / np.float32(255)
  return (v - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def _skimage_photo(name: str) -> Image.Image:
  from skimage import data
  arr = np.asarray(getattr(data, name)())
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  return Image.fromarray(arr[..., :3].astype(np.uint8))  # logo is RGBA: alpha dropped


class VdimImages:
  """The training images: `source` is a folder (searched recursively) or "skimage"."""

  def __init__(self, source: str, image_size: int):
    if not source:
      raise FileNotFoundError("no VDIM training images configured: set --config.data.source to a "
                              "folder of images (the official run used COCO train2017) or to "
                              "'skimage'")
    self.source = source
    self.image_size = int(image_size)
    self.items: list = list(SKIMAGE_PHOTOS) if source == SKIMAGE else list_images(source)
    self.bad: set[int] = set()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.items)

  def name(self, index: int) -> str:
    item = self.items[index]
    return f"skimage.data.{item}" if self.source == SKIMAGE else os.fspath(item)

  def load(self, index: int) -> np.ndarray:
    """Item `index` as a normalised [S, S, 3] float32 image; raises ImageError if undecodable."""
    item = self.items[index]
    img = _skimage_photo(item) if self.source == SKIMAGE else load_image(item, exif_transpose=False)
    return imagenet_normalize(resize_center_crop(img, self.image_size))

  def permutation(self, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(len(self.items))

  def sample(self, position: int, seed: int) -> np.ndarray:
    """The image at global sample `position` (epoch = position // N), skipping bad files."""
    n = len(self.items)
    epoch, offset = divmod(position, n)
    perm = self.permutation(seed, epoch)
    for k in range(n):
      index = int(perm[(offset + k) % n])
      with self._lock:
        if index in self.bad:
          continue
      try:
        return self.load(index)
      except ImageError as e:
        with self._lock:
          if index not in self.bad:
            self.bad.add(index)
            log.warning("skipping bad image %d/%d (%d so far): %s", index, n, len(self.bad), e)
    raise ImageError(f"none of the {n} images under {self.source!r} can be decoded")

  def batch(self, step: int, batch_size: int, seed: int,
            pool: concurrent.futures.Executor | None = None) -> np.ndarray:
    """Batch of 0-based `step`: [B, S, S, 3] float32."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    if pool is None:
      return np.stack([self.sample(p, seed) for p in positions])
    return np.stack(list(pool.map(lambda p: self.sample(p, seed), positions)))


class VdimBatches:
  """The training iterator of stage 0: `next()` is the [B, S, S, 3] float32 batch of the next
  step (`VdimImages.batch`), decoded by `workers` threads while the previous step trains.

  The state (`get_state`, JSON bytes; `set_state`) is the next step: a batch is a function of
  (seed, step), so a resumed run continues with exactly the batches an uninterrupted one has.
  """

  def __init__(self, images: VdimImages, batch_size: int, seed: int, workers: int,
               num_steps: int):
    self.images, self.batch_size, self.seed = images, int(batch_size), int(seed)
    self.workers, self.num_steps = max(int(workers), 1), int(num_steps)
    self._step = 0
    self._pools: tuple[concurrent.futures.Executor, concurrent.futures.Executor] | None = None
    self._ahead: concurrent.futures.Future | None = None

  def _submit(self, step: int) -> None:
    decode, ahead = self._pools
    self._ahead = (ahead.submit(self.images.batch, step, self.batch_size, self.seed, decode)
                   if step < self.num_steps else None)

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    if self._step >= self.num_steps:
      raise StopIteration
    if self._pools is None:
      self._pools = (concurrent.futures.ThreadPoolExecutor(self.workers),
                     concurrent.futures.ThreadPoolExecutor(1))
      self._submit(self._step)
    batch = self._ahead.result()
    self._step += 1
    self._submit(self._step)
    return batch

  def get_state(self) -> bytes:
    return json.dumps({"step": self._step}).encode()

  def set_state(self, state: bytes | str | dict) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops the decoding threads (after the batch in flight); `next()` starts them again."""
    if self._pools is not None:
      decode, ahead = self._pools
      ahead.shutdown(wait=True, cancel_futures=True)  # first: its batch decodes on `decode`
      decode.shutdown(wait=True)
    self._pools, self._ahead = None, None
