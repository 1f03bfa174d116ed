"""hiwin_jax.data.image: decoding to RGB, pre-resize rules (§1.4), CLIP normalisation (§1.5)."""

import io
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hiwin_jax.data import image as im
from hiwin_jax.data import slicing

W, H = 40, 24


def _rgb(w=W, h=H, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _palette_image(transparency):
  p = Image.new("P", (W, H))
  p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * (3 * 252))
  p.putdata([i % 4 for i in range(W * H)])
  if transparency:
    p.info["transparency"] = 0
  return p


def _mode_cases():
  rgb = _rgb()
  rgba = np.concatenate([rgb, np.zeros((H, W, 1), np.uint8)], -1)  # fully transparent
  gray = rgb[..., 0]
  return {
      "RGB": (Image.fromarray(rgb), "PNG", rgb),
      "L": (Image.fromarray(gray), "PNG", np.repeat(gray[..., None], 3, -1)),
      "LA": (Image.fromarray(np.stack([gray, gray // 2], -1), mode="LA"), "PNG",
             np.repeat(gray[..., None], 3, -1)),
      "P": (_palette_image(False), "PNG", None),
      "P+transparency": (_palette_image(True), "PNG", None),
      "RGBA": (Image.fromarray(rgba), "PNG", rgb),  # alpha dropped, stored colours kept
      "CMYK": (Image.new("CMYK", (W, H), (0, 255, 0, 0)), "TIFF",
               np.full((H, W, 3), (255, 0, 255))),  # PIL's naive CMYK -> RGB
      "I;16": (Image.fromarray((np.arange(W * H, dtype=np.uint16).reshape(H, W) * 68)), "PNG",
               None),
  }


@pytest.mark.parametrize("mode", list(_mode_cases()))
def test_every_mode_loads_as_rgb(mode, tmp_path):
  img, fmt, expected = _mode_cases()[mode]
  data = _encode(img, fmt)
  path = tmp_path / f"x.{fmt.lower()}"
  path.write_bytes(data)
  for out in (im.load_image(path), im.load_image(data), im.load_image(str(path))):
    assert out.mode == "RGB" and out.size == (W, H), f"{mode}: {out.mode} {out.size}"
    if expected is not None:
      np.testing.assert_array_equal(np.asarray(out), expected, err_msg=mode)


def test_palette_with_transparency_keeps_the_palette_colour():
  out = np.asarray(im.load_image(_encode(_palette_image(True), "PNG")))
  np.testing.assert_array_equal(out[0, :4], [[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]])


def test_sixteen_bit_gray_maps_full_range_to_eight_bit():
  v = np.array([[0, 128, 129, 257, 32896, 65535, 65407, 1000]], np.uint16)
  out = np.asarray(im.load_image(_encode(Image.fromarray(v), "PNG")))
  want = np.round(v / 257).astype(np.uint8)
  np.testing.assert_array_equal(out[..., 0], want)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  # PIL's own convert clips instead: everything >= 255 turns white
  assert np.asarray(Image.fromarray(v).convert("RGB"))[0, 3, 0] == 255


def _oriented_jpeg(orientation):
  arr = np.zeros((H, W, 3), np.uint8)
  arr[:, : W // 2] = (255, 0, 0)  # left half red, right half blue
  arr[:, W // 2:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = orientation
  return _encode(Image.fromarray(arr), "JPEG", exif=exif, quality=95), arr


def test_exif_orientation_6_rotates_clockwise():
  data, arr = _oriented_jpeg(6)
  upright = np.asarray(im.load_image(data)).astype(int)
  assert upright.shape == (W, H, 3)  # portrait now
  want = np.rot90(arr, k=-1).astype(int)  # orientation 6: rotate 90° clockwise to display
  assert np.abs(upright - want).mean() < 4, "content is not rotated clockwise"
  stored = im.load_image(data, exif_transpose=False)  # the official loader's view
  assert stored.size == (W, H)


def _truncated(fmt):
  data = _encode(Image.fromarray(_rgb(64, 64)), fmt)
  return data[: len(data) // 2]


@pytest.mark.parametrize("kind", ["jpeg", "png", "text", "missing"])
def test_bad_files_raise_image_error_naming_the_file(kind, tmp_path):
  path = tmp_path / f"bad_{kind}.img"
  if kind == "jpeg":
    path.write_bytes(_truncated("JPEG"))
  elif kind == "png":
    path.write_bytes(_truncated("PNG"))
  elif kind == "text":
    path.write_text("this is not an image\n")
  with pytest.raises(im.ImageError) as info:
    im.load_image(path)
  assert isinstance(info.value, ValueError)
  msg = str(info.value)
  assert str(path) in msg
  reason = {"jpeg": "truncated", "png": "truncated", "text": "cannot identify",
            "missing": "No such file"}[kind]
  assert reason in msg, msg


def test_bytes_errors_name_the_given_name():
  with pytest.raises(im.ImageError, match="shard-3/sample-17.*truncated"):
    im.load_image(_truncated("JPEG"), name="shard-3/sample-17")
  with pytest.raises(im.ImageError, match="<5 bytes>"):
    im.load_image(b"hello")


def test_resize_keep_ratio_r1_only_upscales_r2_always_rescales():
  small, big = Image.new("RGB", (500, 300)), Image.new("RGB", (2000, 1000))
  assert im.resize_keep_ratio(small, 1024, "r1").size == (1024, int(1024 / 500 * 300))
  assert im.resize_keep_ratio(big, 1024, "r1") is big
  assert im.resize_keep_ratio(Image.new("RGB", (300, 1024)), 1024, "r1").size == (300, 1024)
  assert im.resize_keep_ratio(big, 1024, "r2").size == (1024, 512)
  assert im.resize_keep_ratio(small, 1024, "r2").size == (1024, 614)
  tall = Image.new("RGB", (300, 2000))
  assert im.resize_keep_ratio(tall, 1536, "r2").size == (int(1536 / 2000 * 300), 1536)
  # squares take the "height is the long side" branch; (1024/49)*49 truncates to 1023
  assert im.resize_keep_ratio(Image.new("RGB", (49, 49)), 1024, "r1").size == (1023, 1024)
  with pytest.raises(ValueError, match="variant"):
    im.resize_keep_ratio(small, 1024, "r3")


def test_resize_keep_ratio_r1_resizes_only_when_the_width_grows():
  # Official R1 `resize_image_keep_ratio` resizes iff new_width > width: a tall image whose width
  # truncates back to its own keeps its size although its height is under max_size.
  for size in [(200, 1020), (10, 1000), (1, 2000)]:
    img = Image.new("RGB", size)
    assert im.resize_keep_ratio(img, 1024, "r1") is img, size
  assert im.resize_keep_ratio(Image.new("RGB", (200, 1020)), 1024, "r2").size == (200, 1024)
  assert im.resize_keep_ratio(Image.new("RGB", (300, 1000)), 1024, "r1").size == (307, 1024)


def test_resize_keep_ratio_resamples_bicubic():
  img = Image.fromarray(_rgb(50, 30))
  np.testing.assert_array_equal(np.asarray(im.resize_keep_ratio(img, 100, "r1")),
                                np.asarray(img.resize((100, 60), Image.Resampling.BICUBIC)))


@pytest.mark.parametrize("folder,size", [
    ("playground/data/eval/mme/images", (500, 300)),  # 'mme': no pre-resize
    ("playground/data/eval/MME/MME_Benchmark_release_version", (1024, 614)),  # 'MME' != 'mme'
    ("playground/data/eval/ai2d/images", (500, 300)),
    ("playground/data/eval/textvqa/train_images", (1536, 921)),
    ("playground/data/eval/TextVQA/train_images", (1024, 614)),  # case-sensitive
    ("playground/data/eval/gqa/images", (1024, 614)),
])
def test_eval_folder_rules(folder, size):
  for variant in ("r1", "r2"):  # both upscale a small image
    assert im.eval_pre_resize(Image.new("RGB", (500, 300)), folder, variant).size == size


def test_eval_r1_keeps_large_images_r2_shrinks_them():
  big = Image.new("RGB", (3000, 2000))
  assert im.eval_pre_resize(big, "eval/gqa", variant="r1") is big
  assert im.eval_pre_resize(big, "eval/gqa", variant="r2").size == (1024, 682)
  assert im.eval_pre_resize(big, "eval/textvqa", variant="r2").size == (1536, 1024)


def _six_slice_area_ok(size):
  w, h = size
  return math.ceil(w * h / 336**2) == 6


@pytest.mark.parametrize("size", [(1, 1), (100, 100), (640, 480), (3000, 450), (30, 900)])
def test_train_pre_resize_pushes_towards_six_slices(size):
  img = Image.new("RGB", size)
  out = im.train_pre_resize(img, "coco/train2017/x.jpg", 0.05, variant="r1")
  assert _six_slice_area_ok(out.size), f"{size} -> {out.size}"
  n = slicing.plan_slices(*out.size, 7).num_slices
  assert n in (5, 6, 7)
  if size[0] == size[1]:
    assert n == 6  # [3,2]
  assert im.train_pre_resize(img, "coco/train2017/x.jpg", 0.1, variant="r1") is img


def test_train_pre_resize_leaves_six_slice_images_and_resizes_textvqa():
  six = Image.new("RGB", (1008, 672))
  assert slicing.plan_slices(1008, 672, 7).num_slices == 6
  assert im.train_pre_resize(six, "coco/x.jpg", 0.0, variant="r1") is six
  for variant in ("r1", "r2"):  # the draw plays no part in the TextVQA rule
    out = im.train_pre_resize(Image.new("RGB", (500, 300)), "data/TextVQA/train_images/x.jpg",
                              0.0, variant=variant)
    assert out.size == (1024, 614)
  big = Image.new("RGB", (2000, 1000))
  assert im.train_pre_resize(big, "data/textvqa/x.jpg", 0.0, variant="r1") is big  # R1: up only
  assert im.train_pre_resize(big, "data/textvqa/x.jpg", 0.0, variant="r2").size == (1024, 512)
  # the augmentation is the same in both code states
  assert (im.train_pre_resize(Image.new("RGB", (640, 480)), "x.jpg", 0.0, variant="r2").size
          == im.train_pre_resize(Image.new("RGB", (640, 480)), "x.jpg", 0.0, variant="r1").size)


def test_train_pre_resize_is_reproducible_and_fires_about_ten_percent():
  sizes = [(20 + 7 * i % 300, 15 + 11 * i % 200) for i in range(300)]

  def run(seed):
    rng = np.random.default_rng(seed)
    return [im.train_pre_resize(Image.new("L", s), "vg/x.jpg", rng.random(), variant="r1").size
            for s in sizes]

  a, b, c = run(1), run(1), run(2)
  assert a == b and a != c
  fired = sum(o != s for o, s in zip(a, sizes))
  assert 15 <= fired <= 50, fired  # Binomial(300, 0.1): mean 30


def test_clip_normalize_matches_direct_numpy_and_documented_constants():
  assert im.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
  assert im.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
  arr = _rgb(28, 14)
  arr[0, 0] = (0, 0, 0)
  arr[0, 1] = (255, 255, 255)
  got = im.clip_normalize(Image.fromarray(arr))
  assert got.dtype == np.float32 and got.shape == (14, 28, 3)
  v = (arr / 255.0).astype(np.float32)  # float64 product, one rounding to float32
  want = (v - np.float32([0.48145466, 0.4578275, 0.40821073])) / np.float32(
      [0.26862954, 0.26130258, 0.27577711])
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got[0, 0], -np.array(im.CLIP_MEAN) / im.CLIP_STD, rtol=1e-6)
  np.testing.assert_allclose(got[0, 1], (1 - np.array(im.CLIP_MEAN)) / im.CLIP_STD, rtol=1e-6)
  np.testing.assert_array_equal(im.clip_normalize(arr), got)
  with pytest.raises(ValueError, match="RGB uint8"):
    im.clip_normalize(Image.fromarray(arr).convert("L"))


def test_clip_normalize_matches_transformers_processor_steps():
  transforms = pytest.importorskip("transformers.image_transforms")
  arr = np.random.default_rng(3).integers(0, 256, (14, 42, 3), dtype=np.uint8)
  want = transforms.normalize(transforms.rescale(arr, 1 / 255), im.CLIP_MEAN, im.CLIP_STD)
  assert want.dtype == np.float32
  np.testing.assert_array_equal(im.clip_normalize(arr), want)


def test_data_modules_do_not_import_jax():
  code = ("import sys, hiwin_jax.data.image, hiwin_jax.data.slicing; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout
