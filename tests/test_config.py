"""Configs load, overrides are typed and checked, and the mesh shape resolves."""

import pytest

from hiwin_jax import config as C
from hiwin_jax.parallel import mesh as M

ALL = ["tiny", "vicuna7b", "vicuna13b", "qwen2_7b"]


@pytest.mark.parametrize("name", ALL)
def test_every_config_loads_with_consistent_llm_geometry(name):
  cfg = C.load_config(name)
  llm = cfg.model.llm
  assert llm.num_heads % llm.num_kv_heads == 0
  assert cfg.model.vision.hidden_size % cfg.model.vision.num_heads == 0
  assert llm.remat in ("none", "full", "minimal", "save_dots", "save_qkv_proj",
                       "minimal_with_context")


def test_real_configs_have_the_released_dimensions():
  v7 = C.load_config("vicuna7b").model
  assert (v7.llm.hidden_size, v7.llm.num_layers, v7.llm.mlp_dim, v7.llm.vocab_size) == (
      4096, 32, 11008, 32000)
  assert (v7.vision.hidden_size, v7.vision.num_layers, v7.vision.image_size) == (1024, 24, 336)
  q = C.load_config("qwen2_7b").model.llm
  assert (q.num_heads, q.num_kv_heads, q.qkv_bias, q.rope_theta) == (28, 4, True, 1e6)
  assert C.load_config("vicuna13b").model.llm.hidden_size == 5120


def test_overrides_keep_types_and_reject_unknown_keys():
  cfg = C.load_config("tiny", ["--config.model.llm.num_layers=3", "--config.model.llm.rope_theta=5",
                               "--config.model.precision.dtype=bfloat16", "--config.mesh.fsdp=2"])
  assert cfg.model.llm.num_layers == 3 and cfg.model.llm.rope_theta == 5.0
  assert isinstance(cfg.model.llm.rope_theta, float)
  assert cfg.model.precision.dtype == "bfloat16" and cfg.mesh.fsdp == 2
  with pytest.raises(KeyError, match="model.llm.nope"):
    C.load_config("tiny", ["--config.model.llm.nope=1"])
  with pytest.raises(ValueError, match="cannot parse"):
    C.load_config("tiny", ["--config.model.llm.num_layers=two"])
  with pytest.raises(FileNotFoundError, match="known configs"):
    C.load_config("no_such_config")


@pytest.mark.parametrize("sizes,devices,want", [((1, -1, 1), 8, (1, 8, 1)), ((2, 2, 2), 8, (2, 2, 2)),
                                                ((1, 4, 2), 8, (1, 4, 2)), ((-1, 1, 2), 8, (4, 1, 2))])
def test_mesh_shape_resolves_the_free_axis(sizes, devices, want):
  assert M.mesh_shape(dict(zip(M.AXES, sizes)), devices) == want


def test_mesh_shape_errors_name_the_mesh():
  with pytest.raises(ValueError, match="needs 4 devices"):
    M.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one"):
    M.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
