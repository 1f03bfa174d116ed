"""VDIM (JBU stack) conversion: official Lightning .ckpt / mm_projector.bin <-> JBUStack."""

import pathlib
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from hiwin_jax import weights
from hiwin_jax.convert.safetensors_io import CheckpointError
from hiwin_jax.convert.vdim import (MM_PROJECTOR_PREFIX, UPSAMPLER_PREFIX, export_jbu,
                                    import_vdim, jbu_arrays, jbu_shapes, load_jbu,
                                    read_torch_tensors, write_vdim_ckpt)
from hiwin_jax.models.jbu import JBUStack
from hiwin_jax.models.layers import Precision

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch

C = 16


def official_upsampler(feat_dim, prefix, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {k: np.asarray(rng.standard_normal(shape), np.float32).astype(dtype)
          for k, shape in jbu_shapes(feat_dim, prefix=prefix).items()}


def t(a):
  a = np.asarray(a, order="C")
  if a.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(a)


def save_lightning_ckpt(path, upsampler, feat_dim):
  """What VDIM pre-training writes (spec §3.7), with small stand-ins for the ignored modules."""
  state = {k: t(v) for k, v in upsampler.items()}
  for down in ("downsampler", "downsampler_2x"):
    state.update({f"{down}.w": torch.randn(14, 14), f"{down}.b": torch.randn(14, 14),
                  f"{down}.attention_net.1.weight": torch.randn(1, feat_dim),
                  f"{down}.attention_net.1.bias": torch.randn(1)})
  for net in ("scale_net", "scale_net_2x"):
    state.update({f"{net}.net.weight": torch.randn(1, feat_dim, 1, 1),
                  f"{net}.net.bias": torch.randn(1)})
  for tower in ("model", "validation_model"):
    state[f"{tower}.vision_tower.vision_model.embeddings.class_embedding"] = torch.randn(feat_dim)
  state.update(linear_acc=torch.zeros(()), linear_iou=torch.zeros(()))
  torch.save({"epoch": 0, "global_step": 500, "pytorch-lightning_version": "2.1.3",
              "state_dict": state, "loops": {"fit_loop": {"epoch_progress": {"current": 1}}},
              "callbacks": {}, "lr_schedulers": [],
              "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(3)}},
                                    "param_groups": [{"lr": 1e-3, "params": [0]}]}]}, path)


def new_stack(feat_dim=C, precision=None):
  return JBUStack(feat_dim, precision=precision or Precision.parity(), rngs=nnx.Rngs(0))


def assert_bit_exact(got, want):
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
    assert np.array_equal(np.asarray(got[k]).reshape(-1).view(np.uint8),
                          np.asarray(want[k]).reshape(-1).view(np.uint8)), k


def test_lightning_ckpt_round_trip_is_bit_exact(tmp_path):
  upsampler = official_upsampler(C, UPSAMPLER_PREFIX)
  save_lightning_ckpt(tmp_path / "vdim.ckpt", upsampler, C)

  read = read_torch_tensors(tmp_path / "vdim.ckpt")  # drops downsampler, scale_net, model, ...
  assert_bit_exact(read, upsampler)
  stack = new_stack()
  load_jbu(stack, read)
  np.testing.assert_array_equal(stack.up2.fixup_proj_0.kernel[...],
                                upsampler["upsampler.up2.fixup_proj.0.weight"][:, :, 0, 0].T)
  assert stack.up1.range_temp[...].shape == ()
  exported = export_jbu(stack)
  assert_bit_exact(exported, upsampler)

  write_vdim_ckpt(tmp_path / "ours.ckpt", exported)
  ckpt = torch.load(tmp_path / "ours.ckpt", map_location="cpu", weights_only=True)
  assert {"epoch", "global_step", "pytorch-lightning_version", "state_dict"} <= set(ckpt)
  assert_bit_exact(read_torch_tensors(tmp_path / "ours.ckpt"), upsampler)
  stack2 = import_vdim(tmp_path / "ours.ckpt", Precision.parity(), feat_dim=C)
  assert_bit_exact(export_jbu(stack2), upsampler)


def test_mm_projector_prefix_round_trip_is_bit_exact_in_bf16(tmp_path):
  # mm_projector.bin is a plain bf16 state dict holding the whole projector.
  upsampler = official_upsampler(C, MM_PROJECTOR_PREFIX, seed=1, dtype=ml_dtypes.bfloat16)
  state = {k: t(v) for k, v in upsampler.items()}
  state["model.mm_projector.pos_embed"] = torch.randn(144, 8).bfloat16()
  state["model.mm_projector.upsampler.model.1.norm.weight"] = torch.randn(C).bfloat16()
  state["model.mm_projector.query_1"] = torch.randn(144, 8).bfloat16()
  torch.save(state, tmp_path / "mm_projector.bin")

  read = read_torch_tensors(tmp_path / "mm_projector.bin", MM_PROJECTOR_PREFIX)
  assert_bit_exact(read, upsampler)
  stack = new_stack()
  load_jbu(stack, read, prefix=MM_PROJECTOR_PREFIX)
  assert_bit_exact(export_jbu(stack, MM_PROJECTOR_PREFIX, dtype=ml_dtypes.bfloat16), upsampler)
  bf16_stack = new_stack(precision=Precision(jnp.bfloat16, jnp.bfloat16))
  load_jbu(bf16_stack, read, prefix=MM_PROJECTOR_PREFIX)
  assert_bit_exact(export_jbu(bf16_stack, MM_PROJECTOR_PREFIX), upsampler)
  # The same tensors under the Lightning prefix convert to the same parameters.
  renamed = {UPSAMPLER_PREFIX + k[len(MM_PROJECTOR_PREFIX):]: v for k, v in read.items()}
  targets = weights.param_targets(stack)
  a = jbu_arrays(read, targets, prefix=MM_PROJECTOR_PREFIX)
  b = jbu_arrays(renamed, targets)
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_wrong_shape_or_missing_tensor_raises_naming_the_key():
  targets = weights.param_targets(new_stack())
  bad = official_upsampler(C, UPSAMPLER_PREFIX)
  bad["upsampler.up2.fixup_proj.0.weight"] = np.zeros((49, 51, 1, 1), np.float32)
  with pytest.raises(CheckpointError, match=r"upsampler\.up2\.fixup_proj\.0\.weight"):
    jbu_arrays(bad, targets)
  missing = official_upsampler(C, UPSAMPLER_PREFIX)
  del missing["upsampler.up1.sigma_spatial"]
  with pytest.raises(CheckpointError, match=r"upsampler\.up1\.sigma_spatial"):
    jbu_arrays(missing, targets)
  wrong_width = official_upsampler(2 * C, UPSAMPLER_PREFIX)
  with pytest.raises(CheckpointError, match=r"upsampler\.fixup_proj\.1\.weight"):
    jbu_arrays(wrong_width, targets)


def test_real_4x_stack_has_1062066_parameters_and_official_shapes():
  stack = nnx.eval_shape(lambda: JBUStack(1024, precision=Precision.parity(), rngs=nnx.Rngs(0)))
  targets = weights.param_targets(stack)
  assert sum(int(np.prod(s)) for s, _ in targets.values()) == 1_062_066
  shapes = jbu_shapes(1024, prefix=MM_PROJECTOR_PREFIX)
  assert sum(int(np.prod(s)) for s in shapes.values()) == 1_062_066
  assert shapes["model.mm_projector.upsampler.upsampler.fixup_proj.1.weight"] == (1024, 1024, 1, 1)
  assert shapes["model.mm_projector.upsampler.upsampler.up1.fixup_proj.0.weight"] == (49, 52, 1, 1)
  zeros = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  arrays = jbu_arrays(zeros, targets, prefix=MM_PROJECTOR_PREFIX)  # every shape maps
  assert arrays["fixup_proj.kernel"].shape == (1024, 1024)


class NotAWeight:
  pass


def test_reader_refuses_arbitrary_pickles_and_explains_missing_torch(tmp_path, monkeypatch):
  torch.save({"state_dict": {"upsampler.up1.range_temp": torch.zeros(())},
              "hyper_parameters": NotAWeight()}, tmp_path / "evil.ckpt")
  with pytest.raises(CheckpointError, match="weights_only"):
    read_torch_tensors(tmp_path / "evil.ckpt")
  torch.save({"state_dict": {"model.x": torch.zeros(1)}}, tmp_path / "empty.ckpt")
  with pytest.raises(CheckpointError, match="no tensor key starts with 'upsampler.'"):
    read_torch_tensors(tmp_path / "empty.ckpt")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(CheckpointError, match="needs torch"):
    read_torch_tensors(pathlib.Path(tmp_path / "empty.ckpt"))
