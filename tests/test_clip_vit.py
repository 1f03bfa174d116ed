"""ClipVisionTower against transformers' CLIPVisionModel and the spec §2.2 reference of
tests/reference/clip.py; conversion."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hiwin_jax import config as C
from hiwin_jax import weights
from hiwin_jax.convert import core, formats, hf_clip
from hiwin_jax.convert.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors
from hiwin_jax.models.clip_vit import ClipVisionTower
from hiwin_jax.models.layers import Precision
from tests.numerics import assert_close, max_rel_err

TOL = 1e-5
HF_GEOMETRY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, image_size=336, patch_size=14, hidden_act="quick_gelu")
GRIDS = [(25, 22), (20, 27), (2, 40)]  # (h, w) patch grids, none of them 24x24
P = 14


def vision_cfg(**fields):
  cfg = C.vision_config()
  cfg.update(fields)
  return cfg


TINY = vision_cfg(hidden_size=64, num_layers=3, num_heads=4, mlp_dim=128)  # = HF_GEOMETRY


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens"))
def _encode(graphdef, state, pixels, grid, num_tokens):
  return nnx.merge(graphdef, state)(pixels, grid, num_tokens)


def encode(model, pixels, grid=None, num_tokens=None):
  """Our tower under jax.jit (one compile per shape, shared by models of the same graph)."""
  graphdef, state = nnx.split(model)
  feats, valid = _encode(graphdef, state, jnp.asarray(pixels),
                         None if grid is None else jnp.asarray(grid, jnp.int32), num_tokens)
  return np.asarray(feats), np.asarray(valid)


def abstract_tower(cfg):
  return nnx.eval_shape(lambda: ClipVisionTower(cfg, Precision.parity(), rngs=nnx.Rngs(0)))


def load(cfg, arrays):
  model = abstract_tower(cfg)
  weights.load_params(model, arrays)
  return model


def random_tower(cfg, seed):
  """A tower with random numpy weights (eager nnx init compiles op by op: seconds on CPU)."""
  rng = np.random.default_rng(seed)
  arrays = {k: (rng.uniform(0.5, 1.5, shape) if k.endswith("scale") else
                rng.normal(0.0, 0.5 if k == "position_embedding" else 0.1, shape)).astype(dtype)
            for k, (shape, dtype) in weights.param_targets(abstract_tower(cfg)).items()}
  return load(cfg, arrays)


def images(seed=0):
  """(h, w) -> CLIP-normalised-like pixels [14h, 14w, 3] for every grid the tests use."""
  rng = np.random.default_rng(seed)
  return {g: rng.normal(size=(P * g[0], P * g[1], 3)).astype(np.float32)
          for g in GRIDS + [(24, 24)]}


@pytest.fixture(scope="module")
def hf(torch):
  """(HF CLIPVisionModel with random weights, its state_dict as numpy, our vision config)."""
  import transformers
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(**HF_GEOMETRY)
  model = transformers.CLIPVisionModel._from_config(
      config, attn_implementation="eager", dtype=torch.float32).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      if "norm" in key or "layrnorm" in key:
        p.uniform_(0.5, 1.5) if key.endswith("weight") else p.normal_(0.0, 0.1)
      elif key.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif "position_embedding" in key:
        p.normal_(0.0, 0.5)  # large enough that a wrong resize shows in the output
  state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  cfg = vision_cfg(**hf_clip.hf_config_to_vision(config.to_dict()))
  return model, state, cfg


@pytest.fixture(scope="module")
def ours(hf):
  _, state, cfg = hf
  return load(cfg, core.to_ours(hf_clip.clip_table(cfg, prefix=""), core.DictSource(state),
                                weights.param_targets(abstract_tower(cfg))))


def hf_features(torch, model, pixels_hwc, layer=-2):
  with torch.no_grad():
    out = model(torch.from_numpy(pixels_hwc.transpose(2, 0, 1)[None].copy()),
                output_hidden_states=True)
  return out.hidden_states[layer][:, 1:].numpy()


def reference_features(torch, model, pixels_hwc, num_layers):
  """tests/reference/clip.py's spec §2.2 features of one image [14h, 14w, 3] -> [1, h*w, C]."""
  from tests.reference import clip as clip_ref
  with torch.no_grad():
    pixels = torch.from_numpy(pixels_hwc.transpose(2, 0, 1)[None].copy())
    return clip_ref.vit_features(model, pixels, num_layers).numpy()


# --- numerics ------------------------------------------------------------------------------------

@pytest.mark.torch
def test_tower_matches_hf_hidden_states_minus_2_on_24x24(torch, hf, ours):
  model, _, _ = hf
  pix = np.stack([images(0)[(24, 24)], images(1)[(24, 24)]])
  feats, valid = encode(ours, pix)
  expected = np.concatenate([hf_features(torch, model, p) for p in pix])
  assert valid.all() and feats.shape == (2, 576, 64)
  assert_close(feats, expected, TOL, "24x24 vs HF hidden_states[-2][:, 1:]")


@pytest.mark.torch
@pytest.mark.parametrize("select_layer", [0, 2])
def test_select_layer_indexes_hidden_states_like_hf(torch, hf, select_layer):
  model, state, cfg = hf
  cfg = vision_cfg(**{**cfg, "select_layer": select_layer})
  tower = load(cfg, core.to_ours(hf_clip.clip_table(cfg, prefix=""), core.DictSource(state),
                                 weights.param_targets(abstract_tower(cfg))))
  pix = images(0)[(24, 24)]
  feats, _ = encode(tower, pix[None])
  assert_close(feats, hf_features(torch, model, pix, select_layer), TOL,
               f"select_layer={select_layer}")


@pytest.mark.torch
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_tower_matches_reference_on_non_square_grids(torch, hf, ours, grid):
  model, _, cfg = hf
  pix = images(0)[grid]
  feats, valid = encode(ours, pix[None])
  expected = reference_features(torch, model, pix, cfg.num_layers - 1)
  assert valid.all() and feats.shape == (1, grid[0] * grid[1], 64)
  assert_close(feats, expected, TOL, f"grid {grid} vs the PyTorch reference")


@pytest.mark.torch
@pytest.mark.parametrize("grid", GRIDS + [(24, 24), (1, 1)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_position_resize_matches_torch_bicubic(torch, grid):
  """The run-time-size resize against F.interpolate(bicubic, align_corners=False) alone."""
  import torch.nn.functional as F
  h, w = grid
  model = random_tower(TINY, 0)
  graphdef, state = nnx.split(model)
  t = jnp.arange(h * w)

  @jax.jit
  def positions(state, hw):  # (h, w) traced: the program serves any grid of this canvas
    return nnx.merge(graphdef, state)._patch_positions(hw[:1], hw[1:], (t // hw[1])[None],
                                                      (t % hw[1])[None], h, w)

  ours = np.asarray(positions(state, jnp.array([h, w])))[0]
  table = torch.from_numpy(np.array(model.position_embedding[...])[1:]).reshape(1, 24, 24, -1)
  ref = F.interpolate(table.permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                      align_corners=False).flatten(2)[0].T.numpy()
  if grid == (24, 24):
    np.testing.assert_array_equal(ours, ref)  # the official code skips the resize here
  assert_close(ours, ref, 1e-6, f"position table resized to {grid}")


def test_padded_mixed_batch_equals_each_item_alone():
  """Items of different grids in one canvas (grid array, jit) give their features alone."""
  model = random_tower(TINY, 3)
  grids = [(25, 22), (24, 24), (2, 40)]
  imgs = images(2)
  canvas = np.full((3, P * 25, P * 40, 3), 7.0, np.float32)  # junk outside each image
  for n, (h, w) in enumerate(grids):
    canvas[n, :P * h, :P * w] = imgs[(h, w)]
  feats, valid = encode(model, canvas, np.array(grids), num_tokens=576)
  assert feats.shape == (3, 576, 64)
  for n, (h, w) in enumerate(grids):
    np.testing.assert_array_equal(valid[n], np.arange(576) < h * w, err_msg=f"valid of {h}x{w}")
    alone, _ = encode(model, imgs[(h, w)][None])
    assert_close(feats[n, :h * w], alone[0], TOL, f"item {h}x{w} in the batch vs alone")


def test_full_canvas_with_extra_token_slots_pads_at_the_end():
  model = random_tower(TINY, 1)
  pix = images(0)[(2, 40)][None]
  feats, valid = encode(model, pix)
  padded, pvalid = encode(model, pix, num_tokens=96)
  assert pvalid.sum() == 80 and pvalid[0, :80].all()
  assert_close(padded[:, :80], feats, TOL, "num_tokens=96 vs 80")


# --- conversion ----------------------------------------------------------------------------------

def _prefixed(state, prefix):
  return {prefix + k: v for k, v in state.items()}


@pytest.mark.torch
@pytest.mark.parametrize("prefix", ["", "vision_model.", "model.vision_tower.vision_tower."
                                                          "vision_model."])
def test_conversion_round_trip_is_bit_exact(hf, prefix):
  _, state, cfg = hf
  state = _prefixed(state, prefix)
  table = hf_clip.clip_table(cfg, prefix=prefix)
  model = load(cfg, core.to_ours(table, core.DictSource(state),
                                 weights.param_targets(abstract_tower(cfg))))
  back = dict(core.to_torch(table, weights.model_params(model)))
  assert set(back) == {k for k in state if "position_ids" not in k}
  for key, value in back.items():
    assert value.dtype == state[key].dtype and value.shape == state[key].shape, key
    np.testing.assert_array_equal(value.view(np.uint32), state[key].view(np.uint32), err_msg=key)


@pytest.mark.torch
@pytest.mark.parametrize("layout", ["save_pretrained", "vision_model_prefix"])
def test_import_reads_both_hf_layouts(hf, ours, tmp_path, layout):
  model, state, cfg = hf
  if layout == "save_pretrained":
    model.save_pretrained(tmp_path)
  else:
    write_safetensors(tmp_path / "model.safetensors",
                      sorted(_prefixed(state, "vision_model.").items()), {"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
  cfg2, imported = formats.import_model("hf-clip", tmp_path, Precision.parity())
  assert {k: cfg2[k] for k in cfg} == dict(cfg)
  a, b = weights.model_params(imported), weights.model_params(ours)
  for key in b:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.torch
def test_export_loads_in_transformers_with_same_hidden_states(torch, hf, ours, tmp_path):
  import transformers
  model, state, cfg = hf
  formats.export_model("hf-clip", ours, cfg, tmp_path, "float32")
  assert all(k.startswith("vision_model.") for k in SafetensorsReader(tmp_path).keys())
  loaded = transformers.CLIPVisionModel.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  for key, value in loaded.state_dict().items():
    if key in state:
      np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)
  pix = images(0)[(24, 24)]
  err, where = max_rel_err(hf_features(torch, loaded, pix), hf_features(torch, model, pix))
  assert err == 0.0, f"exported model differs by {err:.3e} at {where}"


@pytest.mark.torch
def test_export_in_bfloat16_round_trips(hf, ours, tmp_path):
  import ml_dtypes
  _, _, cfg = hf
  formats.export_model("hf-clip", ours, cfg, tmp_path, "bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  _, back = formats.import_model("hf-clip", tmp_path, Precision.parity())
  a, b = weights.model_params(back), weights.model_params(ours)
  for key in b:
    np.testing.assert_array_equal(a[key], b[key].astype(ml_dtypes.bfloat16).astype(np.float32),
                                  err_msg=key)


@pytest.mark.torch
def test_bad_checkpoints_raise_naming_key_and_file(hf, tmp_path):
  _, state, cfg = hf
  good = _prefixed(state, "vision_model.")
  cases = {
      "shape": ({**good, "vision_model.encoder.layers.1.mlp.fc1.weight": np.zeros((3, 64),
                                                                                  np.float32)},
                "vision_model.encoder.layers.1.mlp.fc1.weight"),
      "missing": ({k: v for k, v in good.items() if k != "vision_model.pre_layrnorm.bias"},
                  "vision_model.pre_layrnorm.bias"),
      "unexpected": ({**good, "vision_model.encoder.layers.0.extra": np.zeros(2, np.float32)},
                     "vision_model.encoder.layers.0.extra"),
  }
  for name, (tensors, key) in cases.items():
    path = tmp_path / f"{name}.safetensors"
    write_safetensors(path, sorted(tensors.items()))
    with pytest.raises(CheckpointError) as e:
      formats.import_model("hf-clip", path, Precision.parity(), cfg)
    assert key in str(e.value) and str(path) in str(e.value), (name, str(e.value))
  folder = tmp_path / "other_geometry"
  folder.mkdir()
  write_safetensors(folder / "model.safetensors", sorted(good.items()))
  (folder / "config.json").write_text(json.dumps(hf_clip.vision_to_hf_config(
      vision_cfg(**{**cfg, "num_layers": 2}))))
  with pytest.raises(CheckpointError, match="num_layers: ours 3, checkpoint 2"):
    formats.import_model("hf-clip", folder, Precision.parity(), cfg)


def test_hf_config_round_trip_and_defaults():
  cfg = vision_cfg()
  hf = hf_clip.vision_to_hf_config(cfg)
  assert hf["model_type"] == "clip_vision_model" and hf["hidden_act"] == "quick_gelu"
  assert hf_clip.hf_config_to_vision(hf) == {k: cfg[k] for k in hf_clip.hf_config_to_vision(hf)}
  # A full CLIPConfig whose vision_config lists only non-default fields (the hub's layout).
  full = {"model_type": "clip", "vision_config": {"hidden_size": 1024, "image_size": 336,
                                                  "intermediate_size": 4096, "patch_size": 14,
                                                  "num_attention_heads": 16,
                                                  "num_hidden_layers": 24}}
  assert hf_clip.hf_config_to_vision(full) == {k: cfg[k] for k in hf_clip.hf_config_to_vision(hf)}
  with pytest.raises(CheckpointError, match="gelu"):
    hf_clip.hf_config_to_vision({"hidden_act": "gelu"})
