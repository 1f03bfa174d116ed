"""Configs load, overrides are typed and checked, derived fields resolve once, every stage
config has one shape, and the mesh shape resolves."""

import ast

import pytest

from hiwin_jax import config
from hiwin_jax.parallel import mesh as mesh_lib

ALL = ["tiny", "vicuna7b", "vicuna13b", "qwen2_7b"]
STAGES = {"vdim_stage0": "vdim", "vdim_stage0_tiny": "vdim", "stage1_pretrain": "pretrain",
          "tiny_stage1": "pretrain", "stage2_sft": "sft", "tiny_stage2": "sft"}


@pytest.mark.parametrize("name", ALL)
def test_every_config_loads_with_consistent_llm_geometry(name):
  cfg = config.load_config(name)
  llm = cfg.model.llm
  assert llm.num_heads % llm.num_kv_heads == 0
  assert cfg.model.vision.hidden_size % cfg.model.vision.num_heads == 0
  assert llm.remat in ("none", "full", "minimal", "save_dots", "save_qkv_proj",
                       "minimal_with_context")


def test_real_configs_have_the_released_dimensions():
  v7 = config.load_config("vicuna7b").model
  assert (v7.llm.hidden_size, v7.llm.num_layers, v7.llm.mlp_dim, v7.llm.vocab_size) == (
      4096, 32, 11008, 32000)
  assert (v7.vision.hidden_size, v7.vision.num_layers, v7.vision.image_size) == (1024, 24, 336)
  q = config.load_config("qwen2_7b").model.llm
  assert (q.num_heads, q.num_kv_heads, q.qkv_bias, q.rope_theta) == (28, 4, True, 1e6)
  assert config.load_config("vicuna13b").model.llm.hidden_size == 5120


@pytest.mark.parametrize("name", ["vicuna7b", "vicuna13b", "qwen2_7b"])
def test_slice_separators_are_llama_ids_for_every_release(name):
  """The official slicer's ind_tokens are 29892 (",") and 13 ("\n") whatever the LLM, and the
  R2 layout branches on exactly those ids: Qwen2 keeps them (embedded with Qwen2's table)."""
  p = config.load_config(name).model.projector
  assert (p.comma_token, p.newline_token) == (29892, 13)
  assert p.layout == ("r1" if name == "vicuna7b" else "r2")


def test_overrides_keep_types_and_reject_unknown_keys():
  cfg = config.load_config("tiny", ["--config.model.llm.num_layers=3", "--config.model.llm.rope_theta=5",
                               "--config.model.precision.dtype=bfloat16", "--config.mesh.fsdp=2"])
  assert cfg.model.llm.num_layers == 3 and cfg.model.llm.rope_theta == 5.0
  assert isinstance(cfg.model.llm.rope_theta, float)
  assert cfg.model.precision.dtype == "bfloat16" and cfg.mesh.fsdp == 2
  with pytest.raises(KeyError, match="model.llm.nope"):
    config.load_config("tiny", ["--config.model.llm.nope=1"])
  with pytest.raises(ValueError, match="cannot parse"):
    config.load_config("tiny", ["--config.model.llm.num_layers=two"])
  with pytest.raises(FileNotFoundError, match="known configs"):
    config.load_config("no_such_config")


@pytest.mark.parametrize("sizes,devices,want", [((1, -1, 1), 8, (1, 8, 1)), ((2, 2, 2), 8, (2, 2, 2)),
                                                ((1, 4, 2), 8, (1, 4, 2)), ((-1, 1, 2), 8, (4, 1, 2))])
def test_mesh_shape_resolves_the_free_axis(sizes, devices, want):
  assert mesh_lib.mesh_shape(dict(zip(mesh_lib.AXES, sizes)), devices) == want


def test_mesh_shape_errors_name_the_mesh():
  with pytest.raises(ValueError, match="needs 4 devices"):
    mesh_lib.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one"):
    mesh_lib.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_the_configs_folder_holds_the_model_and_stage_configs_and_they_import_only_config():
  assert sorted(ALL + list(STAGES)) == config.known_configs()
  for path in config.CONFIG_DIR.glob("*.py"):
    tree = ast.parse(path.read_text())
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}
    assert imported <= {"hiwin_jax"}, (path.name, imported)
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert names <= {"config"}, (path.name, names)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_config_has_the_one_config_shape(name):
  cfg = config.load_config(name)
  assert set(cfg) == {"name", "seed", "model", "mesh", "data", "train", "checkpoint", "init",
                      "export"}
  assert set(cfg.model) == {"vision", "llm", "projector", "precision", "max_length"}
  assert cfg.train.stage == STAGES[name]
  assert {"stage", "num_steps", "log_every", "optimizer"} <= set(cfg.train)
  assert set(cfg.checkpoint) == {"every", "keep", "async_save", "resume"}
  assert cfg.name == name


def test_stage_recipes_carry_the_official_hyperparameters():
  s0, s1, s2 = (config.load_config(n) for n in ("vdim_stage0", "stage1_pretrain", "stage2_sft"))
  assert (s0.train.optimizer.name, s0.train.optimizer.lr, s0.train.optimizer.clip_norm,
          s0.train.optimizer.clip_steps, s0.data.global_batch_size) == ("nadam", 1e-3, 1e-4, 10, 16)
  assert (s0.train.vdim_loss.n_jitters, s0.train.vdim_loss.crf_weight) == (2, 0.001)
  assert (s1.data.template, s1.data.slicing, s1.data.max_length, s1.data.global_batch_size,
          s1.train.optimizer.lr) == ("plain", False, 3072, 256, 1e-3)
  assert list(s1.train.trainable) == ["projector/.*"] and not s1.train.frozen
  assert (s2.data.template, s2.data.slicing, s2.data.max_length, s2.data.global_batch_size,
          s2.train.optimizer.lr) == ("vicuna_v1", True, 4096, 128, 2e-5)
  assert list(s2.train.frozen) == ["projector/pos_embed"]
  for cfg in (s1, s2):
    assert cfg.model.precision.param_dtype == "float32" and cfg.model.precision.dtype == "bfloat16"
    assert cfg.model.max_length == cfg.data.max_length


def test_projector_fields_are_derived_once_after_the_overrides():
  v7 = config.load_config("vicuna7b").model.projector
  assert (v7.embed_dim, v7.kv_dim, v7.num_heads) == (4096, 1024, 32)
  tiny = config.load_config("tiny", ["--config.model.llm.hidden_size=128",
                                     "--config.model.vision.hidden_size=32"]).model.projector
  assert (tiny.embed_dim, tiny.kv_dim, tiny.num_heads) == (128, 32, 4)
  stage = config.load_config("tiny_stage2", ["--config.model.llm.hidden_size=96"])
  assert stage.model.projector.embed_dim == 96
  # A stage recipe starts from the unresolved model config: an override of the tower still
  # moves the derived width.
  assert config.from_file("tiny_stage2").model.projector.embed_dim is None
  with pytest.raises(ValueError, match="num_heads"):
    config.load_config("tiny", ["--config.model.projector.num_heads=5"])


def test_stage0_overrides_use_the_shared_paths():
  cfg = config.load_config("vdim_stage0_tiny", ["--config.train.num_steps=5",
                                                "--config.train.vdim_loss.max_pad=4",
                                                "--config.train.optimizer.lr=2e-3",
                                                "--config.init.vision=/ckpt/clip"])
  assert (cfg.train.num_steps, cfg.train.vdim_loss.max_pad, cfg.train.optimizer.lr) == (5, 4, 2e-3)
  assert cfg.init.vision == "/ckpt/clip" and cfg.model.vision.image_size == 84
  with pytest.raises(KeyError, match="steps"):
    config.load_config("vdim_stage0_tiny", ["--config.steps=5"])


def test_a_saved_model_config_gets_the_fields_added_since():
  saved = config.load_config("tiny").model.to_dict()
  del saved["projector"]["jbu_official_grad_bug"]
  saved["projector"].update(embed_dim=None, kv_dim=None)
  model = config.model_from_dict(saved)
  assert model.projector.jbu_official_grad_bug is False
  assert (model.projector.embed_dim, model.projector.kv_dim) == (64, 64)
