"""Stage 0 (VDIM pre-training, official-spec §3.7): the pieces against their definitions and
PyTorch, then the tiny run on scikit-image's bundled photos (offline) through the shared run loop:
the loss falls, a resumed run repeats the uninterrupted one bit for bit, `hiwin train` saves on
SIGTERM and resumes, TensorBoard / loss.png / summary.json / final/ are written, and CLIP stays
frozen and out of the checkpoint.
"""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hiwin_jax import config, weights
from hiwin_jax.data import vdim_images
from hiwin_jax.models import vdim as vdim_models
from hiwin_jax.models.layers import Precision
from hiwin_jax.models.resize import resize_bilinear
from hiwin_jax.train import loop, optimizers, trainer, vdim, vdim_loss
from tests.numerics import assert_close

ROOT = pathlib.Path(__file__).resolve().parent.parent

TINY_STEPS = 30


def _downsampler(dim=8, final=3, blur=True):
  return vdim_models.AttentionDownsampler(dim, kernel_size=14, final_size=final, blur_attn=blur,
                                   precision=Precision.parity(), rngs=nnx.Rngs(0))


# --- model pieces ------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True])
def test_attention_downsampler_maps_a_constant_map_to_that_constant(train):
  down = _downsampler()
  value = np.float32(0.37)
  hr = jnp.full((2, 42, 42, 8), value)
  out = nnx.jit(lambda d, x, k: d(x, dropout_rng=k))(
      down, hr, jax.random.key(1) if train else None)
  assert out.shape == (2, 3, 3, 8)
  assert_close(out, np.full(out.shape, value), 1e-6, "downsampled constant")


def test_attention_downsampler_with_zero_w_b_and_no_blur_is_the_block_mean():
  down = _downsampler(blur=False)
  down.w[...] = jnp.zeros((14, 14))
  down.b[...] = jnp.zeros((14, 14))
  hr = jax.random.normal(jax.random.key(0), (2, 42, 42, 8))
  want = np.asarray(hr).reshape(2, 3, 14, 3, 14, 8).mean(axis=(2, 4))
  assert_close(down(hr), want, 1e-5, "uniform attention")


def test_attention_downsampler_rejects_a_map_that_is_not_kernel_times_final():
  with pytest.raises(ValueError, match=r"needs \[B, 42, 42, 8\]"):
    _downsampler()(jnp.zeros((1, 40, 40, 8)))


def test_scale_net_is_exp_of_a_small_conv_plus_a_tenth():
  net = vdim_models.ScaleNet(16, precision=Precision.parity(), rngs=nnx.Rngs(0))
  kernel = np.asarray(net.net.kernel[...])
  assert np.abs(kernel).max() <= 0.1 / 4 + 1e-7  # torch default bound 1/sqrt(16), times 0.1
  x = jax.random.normal(jax.random.key(0), (1, 3, 3, 16))
  want = np.exp(np.asarray(x) @ kernel + np.asarray(net.net.bias[...]) + 0.1)
  assert_close(net(x), want, 1e-6, "ScaleNet")


def test_jitter_with_unit_zoom_no_flip_and_no_pad_is_the_identity():
  x = jax.random.normal(jax.random.key(0), (2, 20, 20, 3))
  same = vdim_loss.Jitter(jnp.float32(1.0), jnp.int32(0), jnp.int32(0), jnp.bool_(False))
  np.testing.assert_array_equal(vdim_loss.apply_jitter(x, 0, same), x)
  centre = vdim_loss.Jitter(jnp.float32(1.0), jnp.int32(8), jnp.int32(8), jnp.bool_(False))
  np.testing.assert_array_equal(vdim_loss.apply_jitter(x, 8, centre), x)
  flipped = vdim_loss.Jitter(jnp.float32(1.0), jnp.int32(0), jnp.int32(0), jnp.bool_(True))
  np.testing.assert_array_equal(vdim_loss.apply_jitter(x, 0, flipped), x[:, :, ::-1])


def test_sampled_jitters_stay_in_range_and_are_a_function_of_the_key():
  draws = [vdim_loss.sample_jitter(jax.random.key(i), 84, 84, 8, 2.0) for i in range(64)]
  zooms = np.array([float(d.zoom) for d in draws])
  assert ((zooms == 1.0) | ((zooms >= 1.0) & (zooms < 2.0))).all() and (zooms > 1).any()
  for d in draws:
    valid = int(np.floor((84 + 16) * float(d.zoom))) - 84 + 1
    assert 0 <= int(d.x) < valid and 0 <= int(d.y) < valid
  again = vdim_loss.sample_jitter(jax.random.key(3), 84, 84, 8, 2.0)
  assert all(bool(a == b) for a, b in zip(again, draws[3]))


def test_sampled_crf_loss_is_zero_for_constant_features_and_matches_the_pairwise_form():
  key = jax.random.key(0)
  crf = jax.jit(vdim_loss.sampled_crf_loss, static_argnums=3)
  img = jax.random.normal(jax.random.key(1), (2, 30, 30, 3))
  const = jnp.broadcast_to(jnp.arange(5.0) * 3.7, (2, 30, 30, 5))
  assert float(crf(key, img, const, 200)) == 0.0
  feats = jax.random.normal(jax.random.key(2), (2, 30, 30, 5)) + 4.0
  # The official form: all sample pairs, (|f_i - f_j|^2 * k).mean().
  kr, kc = jax.random.split(key)
  rows, cols = jax.random.randint(kr, (200,), 0, 30), jax.random.randint(kc, (200,), 0, 30)
  xy = np.stack([np.asarray(rows) / 30, np.asarray(cols) / 30])
  dxy = ((xy[:, :, None] - xy[:, None, :]) ** 2).sum(0)
  g, f = np.asarray(img)[:, rows, cols], np.asarray(feats, np.float64)[:, rows, cols]
  drgb = ((g[:, :, None] - g[:, None, :]) ** 2).sum(-1)
  k = 10 * np.exp(-dxy / 0.2 - drgb / 0.3) + 3 * np.exp(-dxy / 0.01)
  want = (((f[:, :, None] - f[:, None, :]) ** 2).sum(-1) * k).mean()
  assert_close(crf(key, img, feats, 200), want, 1e-5, "CRF loss")


def test_random_projection_columns_have_unit_norm_over_channels():
  p = vdim_loss.random_projection(jax.random.key(0), 2, 64, 30)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(p), axis=1), 1.0, rtol=1e-6)


# --- against PyTorch ---------------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("h,out", [(6, 84), (12, 84), (24, 84), (96, 336)])
def test_bilinear_resize_matches_torch_bit_for_bit(torch, h, out):
  x = np.random.default_rng(h).standard_normal((2, h, h, 3)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(out, out),
                                         mode="bilinear", align_corners=False)
  got = np.asarray(resize_bilinear(jnp.asarray(x), (out, out)))
  want = want.permute(0, 2, 3, 1).numpy()
  assert np.array_equal(got, want), f"max abs diff {np.abs(got - want).max():.3e}"
  # jax.image.resize('linear') is the same map for upsampling, up to rounding.
  ji = jax.image.resize(jnp.asarray(x), (2, out, out, 3), "linear", antialias=False)
  assert_close(ji, want, 1e-5, "jax.image.resize linear")


@pytest.mark.torch
def test_jitter_matches_featup_pad_zoom_crop_flip_in_torch(torch):
  F = torch.nn.functional
  x = np.random.default_rng(0).standard_normal((2, 40, 40, 3)).astype(np.float32)
  zoom, xo, yo = 1.5, 11, 17
  padded = F.pad(torch.from_numpy(x).permute(0, 3, 1, 2), [8] * 4, mode="reflect")
  zoomed = F.interpolate(padded, scale_factor=zoom, mode="bilinear")
  want = torch.flip(zoomed[:, :, xo:xo + 40, yo:yo + 40], [3]).permute(0, 2, 3, 1).numpy()
  jit = vdim_loss.Jitter(jnp.float32(zoom), jnp.int32(xo), jnp.int32(yo), jnp.bool_(True))
  # Source positions ~50 px computed with or without torch's FMA differ by an ulp (4e-6 px).
  assert_close(vdim_loss.apply_jitter(jnp.asarray(x), 8, jit), want, 2e-5, "jitter")


@pytest.mark.torch
def test_gaussian_blur_matches_a_reflect_padded_separable_conv_in_torch(torch):
  F = torch.nn.functional
  x = np.random.default_rng(0).standard_normal((2, 20, 20, 4)).astype(np.float32)
  t = torch.arange(5, dtype=torch.float32) - 2
  k = torch.exp(-t ** 2 / 2)
  k = k / k.sum()
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  xt = F.conv2d(F.pad(xt, [2, 2, 0, 0], mode="reflect"), k.reshape(1, 1, 1, 5).repeat(4, 1, 1, 1),
                groups=4)
  xt = F.conv2d(F.pad(xt, [0, 0, 2, 2], mode="reflect"), k.reshape(1, 1, 5, 1).repeat(4, 1, 1, 1),
                groups=4)
  assert_close(vdim_models.gaussian_blur(jnp.asarray(x)), xt.permute(0, 2, 3, 1).numpy(), 1e-6,
               "blur")


@pytest.mark.torch
def test_optimizer_is_torch_nadam_after_lightning_clipping_for_the_first_steps(torch):
  rng = np.random.default_rng(0)
  init = {"a": rng.standard_normal((4, 3)).astype(np.float32),
          "b": rng.standard_normal((5,)).astype(np.float32)}
  grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in init.items()}
           for _ in range(14)]
  tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
  opt = torch.optim.NAdam(list(tp.values()), lr=1e-3)
  for step, g in enumerate(grads):
    for k, p in tp.items():
      p.grad = torch.from_numpy(g[k].copy())
    if step < 10:
      torch.nn.utils.clip_grad_norm_(list(tp.values()), 1e-4)
    opt.step()
  tx = optimizers.make_optimizer(config.nadam_config(), len(grads)).tx
  params = jax.tree.map(jnp.asarray, init)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    params = jax.tree.map(jnp.add, params, updates)
  for k in init:
    assert_close(params[k], tp[k].detach().numpy(), 1e-6, f"param {k}")
    assert not np.allclose(params[k], init[k], atol=1e-3), "the optimizer did not move"


# --- data --------------------------------------------------------------------------------------

def test_folder_images_are_resized_cropped_normalised_and_bad_files_skipped(tmp_path, caplog):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (50, 80, 3), np.uint8)).save(tmp_path / "wide.png")
  (tmp_path / "sub").mkdir()
  Image.fromarray(rng.integers(0, 256, (90, 40), np.uint8)).save(tmp_path / "sub" / "tall.JPG")
  (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
  (tmp_path / "notes.txt").write_text("ignored")
  images = vdim_images.VdimImages(str(tmp_path), 28)
  assert len(images) == 3
  with caplog.at_level(logging.WARNING, logger="hiwin.vdim"):
    batch = images.batch(0, 3, seed=0)
  assert batch.shape == (3, 28, 28, 3) and batch.dtype == np.float32
  assert len(images.bad) == 1 and "broken.jpg" in caplog.text
  np.testing.assert_array_equal(images.batch(0, 3, seed=0), batch)  # a function of (seed, step)
  white = vdim_images.imagenet_normalize(Image.new("RGB", (2, 2), (255, 255, 255)))
  np.testing.assert_allclose(white[0, 0], (1 - np.array([.485, .456, .406])) / [.229, .224, .225],
                             rtol=1e-6)
  crop = vdim_images.resize_center_crop(Image.new("RGB", (80, 50)), 28)
  assert crop.size == (28, 28)


def test_missing_data_folder_names_the_folder():
  with pytest.raises(FileNotFoundError, match="no-such-folder"):
    vdim_images.VdimImages("/no-such-folder", 84)


# --- the tiny run ------------------------------------------------------------------------------

def _tiny(*overrides):
  return config.load_config("vdim_stage0_tiny",
                            [f"--config.train.num_steps={TINY_STEPS}", *overrides])


def _run(out, **kw):
  return loop.run(vdim.VdimTrainer(_tiny(), devices=jax.devices()[:1]), out, **kw)


def _metrics(out) -> list[dict]:
  return [json.loads(line) for line in (out / loop.METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("vdim_tiny")
  return out, _run(out)


@pytest.mark.slow
def test_tiny_run_loss_falls_and_writes_every_run_output(tiny_run):
  out, result = tiny_run
  losses = np.array(result["losses"])
  assert len(losses) == TINY_STEPS and np.isfinite(losses).all()
  first, last = losses[:5].mean(), losses[-5:].mean()
  assert last < first, f"mean loss of the first 5 steps {first:.4f}, of the last 5 {last:.4f}"
  rows = _metrics(out)
  assert [r["step"] for r in rows] == list(range(1, TINY_STEPS + 1))
  assert {"loss", "rec_4x", "rec_2x", "crf_4x", "crf_2x", "grad_norm", "lr",
          "step_time_s"} <= set(rows[0])
  kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [20, 30]  # every 10 steps, the last 2 kept
  assert (out / "loss.png").is_file() and (out / "train_config.json").is_file()
  assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events"
  summary = json.loads((out / "summary.json").read_text())
  assert summary["stopped_at"] is None and summary["steps_run"] == TINY_STEPS
  assert summary["bad_images"] == 0
  # final/ holds the trained JBU under the LLaVA model's paths, as stage 1/2's init.vdim reads
  # it from the run folder's latest checkpoint.
  final, saved = weights.read_params(result["final"])
  assert saved["format"] == "vdim"
  jbu = trainer.vdim_jbu_params(str(out), config.load_config("tiny").model)
  assert set(final) == {f"jbu.{k}" for k in jbu}
  for k, v in jbu.items():
    np.testing.assert_array_equal(final[f"jbu.{k}"], v, err_msg=k)


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run_bit_for_bit(tiny_run, tmp_path):
  _, full = tiny_run
  first = _run(tmp_path, stop_after=5)
  resumed = _run(tmp_path, stop_after=5)
  assert first["stopped_at"] == 5 and first["losses"] == full["losses"][:5]
  assert resumed["start_step"] == 5 and resumed["steps_run"] == 5
  assert resumed["losses"] == full["losses"][5:10], (resumed["losses"], full["losses"][5:10])
  assert [r["step"] for r in _metrics(tmp_path)] == list(range(1, 11))


@pytest.mark.slow
def test_hiwin_train_stage0_saves_on_sigterm_exits_zero_and_resumes(tiny_run, tmp_path):
  steps = 10
  out, log = tmp_path / "run", tmp_path / "log.txt"
  cmd = [sys.executable, "-m", "hiwin_jax.cli", "train", "--config", "vdim_stage0_tiny", "--out",
         str(out), f"--config.train.num_steps={steps}", "--config.checkpoint.every=2"]
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "HIWIN_"))}
  # One CPU device, as tiny_run; the resumed run reuses the first one's compiled step.
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "w"),
                          stderr=subprocess.STDOUT, start_new_session=True)
  deadline = time.monotonic() + 600
  while not (out / "checkpoints" / "2").is_dir():
    if proc.poll() is not None or time.monotonic() > deadline:
      os.killpg(proc.pid, signal.SIGKILL)
      pytest.fail(f"no checkpoint at step 2 (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  stopped_at = summary["stopped_at"]
  assert stopped_at is not None and 2 <= stopped_at < steps, (summary, log.read_text()[-2000:])
  assert "final" not in summary and not (out / "final").exists()
  assert len(_metrics(out)) == stopped_at
  assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events"

  done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stdout[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["stopped_at"] is None and summary["start_step"] == stopped_at, summary
  rows = _metrics(out)
  assert [r["step"] for r in rows] == list(range(1, steps + 1))
  # Another process compiles the same 1-device program with last-bit differences (see
  # test_train_loop.py): compared with the in-process run at 1e-5.
  assert_close(np.array([r["loss"] for r in rows]), np.array(tiny_run[1]["losses"][:steps]),
               1e-5, "stage 0 losses after SIGTERM and resume")


@pytest.mark.slow
def test_clip_is_frozen_not_checkpointed_and_the_jbu_exports_to_official_keys(tiny_run):
  import orbax.checkpoint as ocp
  out, _ = tiny_run
  task = vdim.VdimTrainer(_tiny(), devices=jax.devices()[:1])
  clip_before = jax.tree.map(np.array, task.clip_state)
  state = task.init_state()
  params_before = jax.tree.map(np.array, state["params"])
  for _ in range(2):
    state, _ = task.step(state, next(task.data))
  task.data.close()
  same = jax.tree.map(np.array_equal, clip_before, jax.tree.map(np.array, task.clip_state))
  assert all(jax.tree.leaves(same)), "CLIP parameters changed"
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), params_before,
                       jax.tree.map(np.array, state["params"]))
  assert all(jax.tree.leaves(moved)), "a trainable parameter did not move"
  from hiwin_jax.convert.vdim import export_jbu
  official = export_jbu(task.model(state).upsampler)
  assert len(official) == 22 and official["upsampler.fixup_proj.1.weight"].shape == (64, 64, 1, 1)
  meta = ocp.StandardCheckpointer().metadata(out / "checkpoints" / "30" / "state")
  tree = meta.item_metadata.tree
  assert set(tree) == {"params", "opt_state", "step"}
  assert set(tree["params"]) == {"upsampler", "downsampler", "downsampler_2x", "scale_net",
                                 "scale_net_2x"}


@pytest.mark.torch
def test_export_writes_final_and_the_official_vdim_ckpt_with_the_same_jbu(tmp_path):
  pytest.importorskip("torch")
  from hiwin_jax.convert.vdim import import_vdim
  task = vdim.VdimTrainer(_tiny("--config.export.official=True"), devices=jax.devices()[:1])
  final = task.export(task.init_state(), tmp_path)
  ours, saved = weights.read_params(final)
  assert saved["format"] == "vdim" and saved["model"]["vision"]["image_size"] == 84
  stack = import_vdim(tmp_path / "official" / "vdim.ckpt", Precision(), feat_dim=64)
  back = weights.model_params(stack)
  assert set(ours) == {f"jbu.{k}" for k in back}
  for k, v in back.items():
    np.testing.assert_array_equal(ours[f"jbu.{k}"], v, err_msg=k)
