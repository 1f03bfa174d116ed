"""Official LLaVA-UHD v2 checkpoint layout (spec §8.2-§8.3) <-> our parameters.

The official key list comes from tests/reference/checkpoint.py, written from the spec's tables
independently of the converter.
"""

import json

import ml_dtypes
import numpy as np
import pytest

from hiwin_jax import config as C
from hiwin_jax.convert import llava_uhd
from hiwin_jax.convert.safetensors_io import CheckpointError, write_sharded
from tests.reference.checkpoint import (assert_export_holds, config_json, config_json_r2,
                                        model_shapes, official_shapes)


def tiny_model_cfg():
  cfg = C.load_config("tiny").model
  return cfg


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
  cfg = tiny_model_cfg()
  cfg.llm.num_kv_heads = cfg.llm.num_heads  # Vicuna has no GQA; the table covers MHA
  rng = np.random.default_rng(0)
  tensors = {k: rng.standard_normal(s).astype(ml_dtypes.bfloat16)
             for k, s in sorted(model_shapes(cfg).items())}
  folder = tmp_path_factory.mktemp("official")
  write_sharded(folder, tensors.items(), max_shard_bytes=400_000)
  (folder / "config.json").write_text(json.dumps(config_json(cfg)))
  return folder, tensors, cfg


def test_official_checkpoint_round_trips_bit_exact(official_folder, tmp_path):
  folder, tensors, cfg_in = official_folder
  cfg, params = llava_uhd.import_official(folder, dtype="bfloat16", cfg_model=cfg_in)
  assert cfg.projector.layout == "r1" and cfg.projector.feature_scale_mask == 7
  assert cfg.vision.select_layer == -2
  back = dict(llava_uhd.official_tensors(params, cfg))
  assert set(back) == set(tensors)
  dead = (llava_uhd.DEAD_CLIP, llava_uhd.CHANNEL_NORM)
  for key, value in tensors.items():
    assert back[key].shape == value.shape, key
    if not key.startswith(dead):
      np.testing.assert_array_equal(back[key].view(np.uint16), value.view(np.uint16),
                                    err_msg=key)
  # The dead featurizer copy is filled from our ViT (the spec allows any values).
  np.testing.assert_array_equal(back[llava_uhd.DEAD_CLIP + "embeddings.class_embedding"],
                                params["vision.class_embedding"])
  out = llava_uhd.export_official(params, cfg, tmp_path / "export")
  cfg2, params2 = llava_uhd.import_official(out, dtype="bfloat16", cfg_model=cfg_in)
  assert cfg2.to_dict() == cfg.to_dict()
  for key in params:
    np.testing.assert_array_equal(params2[key], params[key], err_msg=key)


@pytest.mark.usefixtures("torch")  # the .bin is a torch.save file
def test_mm_projector_bin_round_trips(official_folder, tmp_path):
  folder, _, cfg_in = official_folder
  cfg, params = llava_uhd.import_official(folder, dtype="bfloat16", cfg_model=cfg_in)
  path = llava_uhd.export_projector(params, cfg, tmp_path / "mm_projector.bin")
  proj = llava_uhd.import_projector(path, cfg, dtype="bfloat16")
  assert set(proj) == {k for k in params if k.startswith(("projector.", "jbu."))}
  for key, value in proj.items():
    np.testing.assert_array_equal(value, params[key], err_msg=key)


@pytest.mark.usefixtures("torch")
def test_projector_file_from_the_projector_parameters_alone(official_folder, tmp_path):
  """A stage-1 user holds only `projector.*` and `jbu.*`: the released file's every key and
  shape (the dead featurizer copy zero-filled), as .bin and .safetensors, and back bit-exact."""
  from hiwin_jax.convert import vdim
  folder, tensors, cfg_in = official_folder
  cfg, params = llava_uhd.import_official(folder, dtype="bfloat16", cfg_model=cfg_in)
  alone = {k: v for k, v in params.items() if k.startswith(("projector.", "jbu."))}
  path = llava_uhd.export_projector(alone, cfg, tmp_path / "mm_projector.bin", safetensors=True)
  released = {k: v for k, v in tensors.items() if k.startswith(llava_uhd.PROJ)}
  written = vdim.read_torch_tensors(path, llava_uhd.PROJ)
  assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in released.items()}
  assert not written[llava_uhd.DEAD_CLIP + "embeddings.class_embedding"].any()
  for file in (path, tmp_path / "mm_projector.safetensors"):
    back = llava_uhd.import_projector(file, cfg, dtype="bfloat16")
    assert set(back) == set(alone), file
    for key, value in back.items():
      np.testing.assert_array_equal(value.view(np.uint16), alone[key].view(np.uint16),
                                    err_msg=f"{file.name}: {key}")


def test_missing_or_misshaped_official_keys_are_named(official_folder, tmp_path):
  folder, tensors, cfg = official_folder
  bad = dict(tensors)
  bad["model.mm_projector.cat_proj.weight"] = np.zeros((3, 3), ml_dtypes.bfloat16)
  del bad["model.mm_projector.query_3"]
  out = tmp_path / "bad"
  write_sharded(out, sorted(bad.items()))
  (out / "config.json").write_text(json.dumps(config_json(cfg)))
  with pytest.raises(CheckpointError, match="query_3"):
    llava_uhd.import_official(out, cfg_model=cfg)
  del bad["model.mm_projector.cat_proj.weight"]
  bad["model.mm_projector.query_3"] = tensors["model.mm_projector.query_3"]
  bad["model.mm_projector.cat_proj.weight"] = np.zeros((3, 3), ml_dtypes.bfloat16)
  out = tmp_path / "bad_shape"
  write_sharded(out, sorted(bad.items()))
  (out / "config.json").write_text(json.dumps(config_json(cfg)))
  with pytest.raises(CheckpointError, match=r"cat_proj.weight.*\(3, 3\)"):
    llava_uhd.import_official(out, cfg_model=cfg)


def test_7b_export_has_exactly_the_official_keys_and_parameter_counts():
  """Spec §8.2: 176,653,490 projector parameters outside upsampler.model.*, 1,062,066 JBU."""
  cfg = C.load_config("vicuna7b").model
  targets = llava_uhd._targets(cfg)
  # Zero-stride arrays: the 7B parameter tree without allocating it.
  params = {k: np.broadcast_to(np.zeros((), np.float32), shape) for k, (shape, _) in
            targets.items()}
  got = {k: v.shape for k, v in llava_uhd.official_tensors(params, cfg)}
  want = official_shapes(4096, 1024, 32, 32000, 11008, 24, 4096)
  assert got == want
  proj = sum(int(np.prod(s)) for k, s in got.items()
             if k.startswith(llava_uhd.PROJ)
             and not k.startswith(llava_uhd.PROJ + "upsampler.model."))
  jbu = sum(int(np.prod(s)) for k, s in got.items() if k.startswith(llava_uhd.JBU))
  assert (proj, jbu) == (176_653_490, 1_062_066)


def test_config_json_round_trip_and_r2():
  cfg = C.load_config("vicuna7b").model
  base = C.base_config().model
  back = llava_uhd.config_from_json(llava_uhd.config_to_json(cfg, "bfloat16"), base)
  for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "vocab_size",
                "rope_theta", "rms_norm_eps", "tie_embeddings"):
    assert back.llm[field] == cfg.llm[field], field
  assert back.projector.to_dict() == cfg.projector.to_dict()
  assert back.max_length == cfg.max_length
  r2 = C.load_config("qwen2_7b").model
  js = llava_uhd.config_to_json(r2, "bfloat16")
  assert js["mm_projector_type"] == "adapt_spatial_resampler_v2" and js["feature_scale_mask"] == 5
  back = llava_uhd.config_from_json(js, C.base_config().model)
  assert (back.projector.layout, back.llm.arch, back.llm.num_kv_heads) == ("r2", "qwen2", 4)
  with pytest.raises(CheckpointError, match="model_type"):
    llava_uhd.config_from_json({"model_type": "bert"})


# --- the R2 releases: Vicuna-13B and Qwen2-7B-Instruct ------------------------------------------

# (config, LLM width, layers, vocab, mlp, k/v width, q/k/v bias, projector heads)
RELEASES = {"vicuna13b": (5120, 40, 32000, 13824, 5120, False, 40),
            "qwen2_7b": (3584, 28, 152064, 18944, 4 * 128, True, 28)}


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_r2_release_exports_have_exactly_the_official_keys_and_shapes(name):
  """The release geometry (eval_shape of the model, no weights allocated) exports exactly the
  official key list at the official shapes: Qwen2's GQA 28/4 k/v (512 wide) with q/k/v biases
  and an untied head; 13B's 40 layers at 5120."""
  e, layers, vocab, mlp, kv, bias, heads = RELEASES[name]
  cfg = C.load_config(name).model
  assert cfg.projector.num_heads == heads == e // 128  # the official embed_dim // 128
  targets = llava_uhd._targets(cfg)
  params = {k: np.broadcast_to(np.zeros((), np.float32), shape) for k, (shape, _) in
            targets.items()}
  got = {k: v.shape for k, v in llava_uhd.official_tensors(params, cfg)}
  assert got == official_shapes(e, 1024, layers, vocab, mlp, 24, 4096, kv=kv, qkv_bias=bias)


def tiny_release(name):
  """The release config with every width and depth shrunk (real key names, R2, GQA and biases
  kept): the overrides `hiwin convert --config <release>` gets in the round-trip test."""
  overrides = ["--config.model.vision.hidden_size=64", "--config.model.vision.num_layers=2",
               "--config.model.vision.num_heads=4", "--config.model.vision.mlp_dim=128",
               "--config.model.llm.hidden_size=64", "--config.model.llm.num_layers=2",
               "--config.model.llm.num_heads=4", "--config.model.llm.head_dim=16",
               "--config.model.llm.mlp_dim=96", "--config.model.llm.vocab_size=300",
               "--config.model.projector.embed_dim=64", "--config.model.projector.num_heads=4",
               "--config.model.projector.kv_dim=64",
               f"--config.model.llm.num_kv_heads={2 if name == 'qwen2_7b' else 4}"]
  return C.load_config(name, overrides).model, overrides


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_hiwin_convert_round_trips_r2_releases_bit_exact(name, tmp_path):
  """`hiwin convert import/export --format llava-uhd --config <release>`: an official-layout
  folder (sharded safetensors, real key names, the release's config.json) comes back bit-exact,
  with the release's architecture read from its config.json."""
  from hiwin_jax import cli, weights
  cfg, overrides = tiny_release(name)
  rng = np.random.default_rng(5)
  tensors = {k: rng.standard_normal(s).astype(ml_dtypes.bfloat16)
             for k, s in sorted(model_shapes(cfg).items())}
  if name == "qwen2_7b":
    assert "model.layers.1.self_attn.k_proj.bias" in tensors
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
  src = tmp_path / "official"
  write_sharded(src, tensors.items(), max_shard_bytes=300_000)
  (src / "config.json").write_text(json.dumps(config_json_r2(cfg, qwen2=name == "qwen2_7b")))
  assert cli.main(["convert", "import", "--format", "llava-uhd", "--config", name, *overrides,
                   "--input", str(src), "--output", str(tmp_path / "ours")]) == 0
  _, saved = weights.read_params(tmp_path / "ours")
  llm = saved["model"]["llm"]
  assert saved["model"]["projector"]["layout"] == "r2"
  assert saved["model"]["projector"]["feature_scale_mask"] == 5
  if name == "qwen2_7b":
    assert (llm["arch"], llm["qkv_bias"], llm["num_kv_heads"], llm["rope_theta"],
            llm["tie_embeddings"]) == ("qwen2", True, 2, 1e6, False)
  assert cli.main(["convert", "export", "--format", "llava-uhd", "--input",
                   str(tmp_path / "ours"), "--output", str(tmp_path / "back")]) == 0
  assert_export_holds(tmp_path / "back", tensors)
  js = json.loads((tmp_path / "back" / "config.json").read_text())
  assert js["mm_projector_type"] == "adapt_spatial_resampler_v2"
  assert js["model_type"] == ("llava_qwen" if name == "qwen2_7b" else "llava_llama")
