"""hiwin_jax.models.resize against the PyTorch primitives it reproduces (CPU, fixed seeds)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiwin_jax.models import resize
from tests.numerics import assert_close, max_rel_err

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.torch

# torch's x86 builds with AVX2/AVX512 compute the cubic weights with FMAs, the DEFAULT build not.
FMA = torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.float().numpy().transpose(0, 2, 3, 1)


def _rand(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


BICUBIC_CASES = [((24, 24), (25, 22)), ((24, 24), (2, 40)), ((24, 24), (24, 24)),
                 ((7, 5), (14, 10)), ((13, 17), (5, 3)), ((12, 12), (100, 88)), ((1, 3), (4, 6))]


@pytest.mark.parametrize("in_hw,out_hw", BICUBIC_CASES)
def test_resize_bicubic_fp32(in_hw, out_hw):
  x = _rand((2, *in_hw, 3), seed=sum(in_hw) + sum(out_hw))
  ref = _nhwc(F.interpolate(_nchw(x), size=out_hw, mode="bicubic", align_corners=False))
  got = resize.resize_bicubic(jnp.asarray(x), out_hw, fma=FMA)
  assert got.dtype == jnp.float32
  assert_close(got, ref, 1e-6, f"bicubic {in_hw}->{out_hw}")
  if in_hw == out_hw:
    np.testing.assert_array_equal(np.asarray(got), x)


def test_resize_bicubic_axes_and_jit():
  x = _rand((3, 13, 17), seed=1)  # CHW, spatial axes (1, 2)
  ref = F.interpolate(torch.from_numpy(x)[None], size=(5, 9), mode="bicubic",
                      align_corners=False)[0]
  got = jax.jit(functools.partial(resize.resize_bicubic, out_hw=(5, 9), axes=(1, 2), fma=FMA))(x)
  assert_close(got, ref.numpy(), 1e-6, "bicubic CHW under jit")


def test_resize_bicubic_bf16():
  x = _rand((2, 24, 24, 4), seed=2)
  xb = jnp.asarray(x, jnp.bfloat16)
  ref = _nhwc(F.interpolate(_nchw(np.asarray(xb.astype(jnp.float32))).bfloat16(), size=(25, 22),
                            mode="bicubic", align_corners=False))
  got = resize.resize_bicubic(xb, (25, 22), fma=FMA)
  assert got.dtype == jnp.bfloat16
  assert_close(got.astype(jnp.float32), ref, 1e-2, "bicubic bf16")


def test_cubic_weights_rows_sum_to_one_and_matrix():
  idx, w = resize.cubic_weights(24, 37)
  assert idx.shape == w.shape == (37, 4) and idx.dtype == np.int32
  assert idx.min() >= 0 and idx.max() <= 23
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  x = _rand((24,), seed=3)
  ref = F.interpolate(torch.from_numpy(x)[None, None, None], size=(1, 37), mode="bicubic",
                      align_corners=False)[0, 0, 0].numpy()
  assert_close(resize.resize_bicubic_matrix(24, 37) @ x, ref, 1e-6, "bicubic matrix")


def test_cubic_weights_dynamic_matches_static():
  max_out = 40
  f = jax.jit(lambda n: resize.cubic_weights_dynamic(24, n, max_out))
  for n in (1, 2, 13, 24, 25, 40):
    idx_d, w_d = f(jnp.int32(n))
    idx_s, w_s = resize.cubic_weights(24, n)
    assert idx_d.shape == w_d.shape == (max_out, 4)
    np.testing.assert_array_equal(np.asarray(idx_d)[:n], idx_s)
    np.testing.assert_array_equal(np.asarray(w_d)[:n], w_s)
    assert np.all(np.asarray(w_d)[n:] == 0)
  # Applying the padded rows resizes like the static path (pos-embedding use: 24x24 -> h x w).
  x = _rand((24, 24, 8), seed=4)

  @jax.jit
  def resize_dyn(x, h, w):
    y = resize.apply_cubic_weights(x, *resize.cubic_weights_dynamic(24, w, max_out), axis=1)
    return resize.apply_cubic_weights(y, *resize.cubic_weights_dynamic(24, h, max_out), axis=0)

  got = resize_dyn(x, jnp.int32(25), jnp.int32(22))[:25, :22]
  ref = F.interpolate(torch.from_numpy(x.transpose(2, 0, 1))[None], size=(25, 22), mode="bicubic",
                      align_corners=False)[0].numpy().transpose(1, 2, 0)
  assert_close(got, ref, 1e-6, "dynamic bicubic 24x24->25x22")


POOL_CASES = [((14 * 25, 14 * 22), (50, 44)), ((14 * 25, 14 * 22), (100, 88)), ((10, 7), (3, 4)),
              ((5, 5), (7, 9)), ((24, 24), (1, 1))]


@pytest.mark.parametrize("in_hw,out_hw", POOL_CASES)
def test_adaptive_avg_pool2d_fp32(in_hw, out_hw):
  x = _rand((1, *in_hw, 3), seed=sum(in_hw) + sum(out_hw))
  ref = _nhwc(F.adaptive_avg_pool2d(_nchw(x), out_hw))
  got = jax.jit(functools.partial(resize.adaptive_avg_pool2d, out_hw=out_hw))(x)
  assert_close(got, ref, 1e-6, f"adaptive pool {in_hw}->{out_hw}")


def test_adaptive_avg_pool2d_bf16_and_large_window():
  x = _rand((2, 10, 7, 4), seed=5)
  xb = jnp.asarray(x, jnp.bfloat16)
  ref = _nhwc(F.adaptive_avg_pool2d(_nchw(np.asarray(xb.astype(jnp.float32))).bfloat16(), (3, 4)))
  got = resize.adaptive_avg_pool2d(xb, (3, 4))
  assert got.dtype == jnp.bfloat16
  assert_close(got.astype(jnp.float32), ref, 1e-2, "adaptive pool bf16")
  # Windows of 20x23 > 64 taps take the fori_loop path.
  x = _rand((1, 40, 69, 2), seed=6)
  ref = _nhwc(F.adaptive_avg_pool2d(_nchw(x), (2, 3)))
  assert_close(resize.adaptive_avg_pool2d(x, (2, 3)), ref, 1e-6, "adaptive pool 40x69->2x3")


@pytest.mark.parametrize("shape,pad",
                         [((2, 5, 7, 3), 2), ((1, 3, 3, 1), 2), ((1, 4, 6, 2), (1, 5))])
def test_reflect_pad(shape, pad):
  x = _rand(shape, seed=7)
  ph, pw = (pad, pad) if isinstance(pad, int) else pad
  ref = _nhwc(F.pad(_nchw(x), (pw, pw, ph, ph), mode="reflect"))
  np.testing.assert_array_equal(np.asarray(resize.reflect_pad(jnp.asarray(x), pad)), ref)


def test_reflect_pad_rejects_pad_not_smaller_than_size():
  with pytest.raises(ValueError, match=r"padding 3 .* size 3"):
    resize.reflect_pad(jnp.zeros((1, 3, 8, 1)), 3)


# --- per-item (canvas) variants -----------------------------------------------------------------

# Item lengths in a 6x6 buffer: mixed sizes, a full one, the smallest torch accepts for pad 3
# (length 4), and lengths torch rejects (0 = empty slot, 1, 3), which must only stay finite.
CANVAS_HW = (6, 6)
CANVAS_ITEMS = [(5, 4), (3, 6), (6, 6), (4, 4), (0, 0), (1, 3)]


def _canvas(items, hw, channels, seed, junk=7.0):
  """[N, *hw, C] random items at the top-left, `junk` elsewhere (a value no item contains)."""
  x = np.full((len(items), *hw, channels), junk, np.float32)
  for n, (h, w) in enumerate(items):
    x[n, :h, :w] = _rand((h, w, channels), seed + n)
  return x


def test_reflect_pad_per_item_matches_torch_on_each_item_alone():
  pad = 3
  x = _canvas(CANVAS_ITEMS, CANVAS_HW, 2, seed=20)
  valid = jnp.asarray(CANVAS_ITEMS, jnp.int32)
  got = np.asarray(jax.jit(lambda x, v: resize.reflect_pad_per_item(x, pad, v))(x, valid))
  assert got.shape == (len(CANVAS_ITEMS), CANVAS_HW[0] + 2 * pad, CANVAS_HW[1] + 2 * pad, 2)
  for n, (h, w) in enumerate(CANVAS_ITEMS):
    if min(h, w) > pad:
      ref = _nhwc(F.pad(_nchw(x[n:n + 1, :h, :w]), (pad,) * 4, mode="reflect"))[0]
      np.testing.assert_array_equal(got[n, :h + 2 * pad, :w + 2 * pad], ref, f"item {h}x{w}")
  assert np.isfinite(got).all()  # including the lengths torch rejects (0, 1, 3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_upsample2x_bicubic_matches_torch_on_each_item_alone(dtype):
  x = jnp.asarray(_canvas(CANVAS_ITEMS, CANVAS_HW, 3, seed=30), dtype)
  got = jax.jit(resize.upsample2x_bicubic)(x, jnp.asarray(CANVAS_ITEMS, jnp.int32))
  assert got.shape == (len(CANVAS_ITEMS), 12, 12, 3) and got.dtype == dtype
  got = np.asarray(got.astype(jnp.float32))
  assert np.isfinite(got).all()
  worst = 0.0
  for n, (h, w) in enumerate(CANVAS_ITEMS):
    if h == 0:
      continue
    item = _nchw(np.asarray(x[n:n + 1, :h, :w].astype(jnp.float32)))
    if dtype == jnp.bfloat16:
      item = item.bfloat16()
    ref = _nhwc(F.interpolate(item, size=(2 * h, 2 * w), mode="bicubic", align_corners=False))
    alone = np.asarray(resize.resize_bicubic(x[n:n + 1, :h, :w], (2 * h, 2 * w), fma=FMA)
                       .astype(jnp.float32))
    # The same arithmetic as the static path on the item alone, so the same bits.
    np.testing.assert_array_equal(got[n:n + 1, :2 * h, :2 * w], alone, f"item {h}x{w}")
    err, _ = max_rel_err(got[n:n + 1, :2 * h, :2 * w], ref)
    worst = max(worst, err)
    assert_close(got[n:n + 1, :2 * h, :2 * w], ref, 1e-6 if dtype == jnp.float32 else 1e-2,
                 f"upsample2x item {h}x{w} vs torch")
    assert np.all(got[n] != 7.0), f"item {h}x{w} read outside itself"
  print(f"upsample2x_bicubic {jnp.dtype(dtype).name}: max rel err vs torch {worst:.2e}")


def test_cubic_weights_of_an_exact_2x_do_not_depend_on_the_size():
  for dtype in (np.float32, jnp.bfloat16):
    _, big = resize.cubic_weights(40, 80, dtype)
    for n in range(1, 40):
      np.testing.assert_array_equal(resize.cubic_weights(n, 2 * n, dtype)[1], big[:2 * n])
