"""LlamaModel vs transformers' LlamaForCausalLM / Qwen2ForCausalLM; KV cache, conversion, remat."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hiwin_jax import config as C
from hiwin_jax import weights
from hiwin_jax.convert import core, formats, hf_llama
from hiwin_jax.convert.safetensors_io import CheckpointError, SafetensorsReader, write_sharded
from hiwin_jax.models.layers import Precision
from hiwin_jax.models.llama import LlamaModel
from tests.numerics import assert_close, max_rel_err

B, S = 2, 13
TOL = 1e-5
GEOMETRY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
VARIANTS = {
    "llama": ("LlamaForCausalLM", dict(rope_theta=10000.0, rms_norm_eps=1e-5)),
    "qwen2": ("Qwen2ForCausalLM", dict(rope_theta=1e6, rms_norm_eps=1e-6)),
    "qwen2_tied": ("Qwen2ForCausalLM", dict(rope_theta=1e6, rms_norm_eps=1e-6,
                                            tie_word_embeddings=True)),
}


def llm_cfg(**fields):
  cfg = C.llm_config()
  cfg.update(fields)
  return cfg


def batch_inputs(seed: int = 0):
  """ids [B, S]; row 0 right-padded by 2, row 1 left-padded by 3; positions = cumsum(mask) - 1."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, GEOMETRY["vocab_size"], (B, S)).astype(np.int32)
  mask = np.ones((B, S), np.int32)
  mask[0, -2:] = 0
  mask[1, :3] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return ids, mask, positions


def real_rows(x, mask):
  """x [B, S, ...] at the real (unpadded) positions, as one array."""
  return np.asarray(x)[np.asarray(mask).astype(bool)]


@pytest.fixture(scope="module")
def hf_models(torch):
  """name -> (HF model with random weights, its state_dict as numpy, our llm config)."""
  import transformers
  out = {}
  for seed, (name, (cls_name, extra)) in enumerate(VARIANTS.items()):
    torch.manual_seed(seed)
    arch = "llama" if cls_name.startswith("Llama") else "qwen2"
    config = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**GEOMETRY, **extra)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(model).__name__ == cls_name
    with torch.no_grad():
      for key, p in model.named_parameters():
        if "norm" in key:
          p.uniform_(0.5, 1.5)
        else:
          p.normal_(0.0, 0.1)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    cfg = llm_cfg(**hf_llama.hf_config_to_llm(config.to_dict()))
    assert cfg.arch == arch
    out[name] = (model, state, cfg)
  return out


@pytest.fixture(scope="module")
def ours(hf_models):
  """name -> our LlamaModel converted from the HF state_dict (fp32 parity precision)."""
  return {name: formats.model_from_source("hf-llm", core.DictSource(state), cfg,
                                          Precision.parity())
          for name, (_, state, cfg) in hf_models.items()}


def hf_logits(torch, model, ids, mask, positions):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions).long())
  return out.logits.numpy()


# --- numerics against transformers -----------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_hf_with_padding_and_gqa(torch, hf_models, ours, name):
  model, _, _ = hf_models[name]
  ids, mask, positions = batch_inputs()
  expected = hf_logits(torch, model, ids, mask, positions)
  got, cache = ours[name](jnp.asarray(ids), positions=jnp.asarray(positions),
                          attention_mask=jnp.asarray(mask))
  assert cache is None and got.dtype == jnp.float32
  err, where = max_rel_err(real_rows(got, mask), real_rows(expected, mask))
  print(f"{name}: max relative logit error vs HF {err:.2e} at {where}")
  assert_close(real_rows(got, mask), real_rows(expected, mask), TOL, f"{name} logits vs HF")


@pytest.mark.torch
def test_kv_cache_decoding_matches_full_forward(hf_models, ours):
  """Prefill 7 tokens, then 5 single-token steps under jax.jit == one full forward."""
  model = ours["llama"]
  ids, mask, positions = batch_inputs(seed=1)
  ids, mask, positions = ids[:, :12], mask[:, :12], positions[:, :12]
  mask[0] = 1  # row 0 unpadded; row 1 keeps its 3 left pads inside the prefill
  positions[0] = np.arange(12)
  full, _ = model(jnp.asarray(ids), positions=jnp.asarray(positions),
                  attention_mask=jnp.asarray(mask))
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, ids, positions, mask, cache):
    return nnx.merge(graphdef, state)(ids, positions=positions, attention_mask=mask, cache=cache)

  cache = model.init_cache(B, 16)
  pieces = [slice(0, 7)] + [slice(t, t + 1) for t in range(7, 12)]
  steps = []
  for sl in pieces:
    logits, cache = step(state, ids[:, sl], positions[:, sl], mask[:, sl], cache)
    steps.append(logits)
  assert int(cache["index"]) == 12
  np.testing.assert_array_equal(np.asarray(cache["valid"][:, :12]), mask.astype(bool))
  assert not np.asarray(cache["valid"][:, 12:]).any()
  decoded = jnp.concatenate(steps, axis=1)
  err, _ = max_rel_err(real_rows(decoded, mask), real_rows(full, mask))
  print(f"kv-cache decoding vs full forward: max relative error {err:.2e}")
  assert_close(real_rows(decoded, mask), real_rows(full, mask), TOL, "cached decoding")


@pytest.mark.torch
def test_inputs_embeds_path_equals_ids_path(ours):
  model = ours["qwen2"]
  ids, mask, positions = batch_inputs(seed=2)
  kw = dict(positions=jnp.asarray(positions), attention_mask=jnp.asarray(mask))
  from_ids, _ = model(jnp.asarray(ids), **kw)
  from_embeds, _ = model(inputs_embeds=model.embed(jnp.asarray(ids)), **kw)
  np.testing.assert_array_equal(np.asarray(from_embeds), np.asarray(from_ids))
  with pytest.raises(ValueError, match="exactly one"):
    model(jnp.asarray(ids), inputs_embeds=model.embed(jnp.asarray(ids)))


# --- conversion -----------------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_round_trip_is_bit_exact(hf_models, ours, name):
  _, state, cfg = hf_models[name]
  table = hf_llama.llama_table(cfg)
  exported = dict(core.to_torch(table, weights.model_params(ours[name])))
  expected_keys = set(state) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
  assert set(exported) == expected_keys
  for key, value in exported.items():
    assert value.dtype == state[key].dtype and value.shape == state[key].shape, key
    np.testing.assert_array_equal(value, state[key], err_msg=key)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, hf_models, ours):
  """name -> exported folder (small shards, so the index lists several files)."""
  out = {}
  for name in ("llama", "qwen2_tied"):
    folder = tmp_path_factory.mktemp(f"export_{name}")
    formats.export_model("hf-llm", ours[name], hf_models[name][2], folder,
                         max_shard_bytes=200_000)
    out[name] = folder
  return out


@pytest.mark.torch
@pytest.mark.parametrize("name", ["llama", "qwen2_tied"])
def test_export_loads_in_transformers_with_same_logits(torch, hf_models, exported, name):
  import transformers
  folder = exported[name]
  assert len(SafetensorsReader(folder).files) > 1
  loaded = transformers.AutoModelForCausalLM.from_pretrained(
      folder, attn_implementation="eager", dtype=torch.float32).eval()
  assert type(loaded).__name__ == VARIANTS[name][0]
  ids, mask, positions = batch_inputs(seed=3)
  np.testing.assert_array_equal(hf_logits(torch, loaded, ids, mask, positions),
                                hf_logits(torch, hf_models[name][0], ids, mask, positions))


@pytest.mark.torch
def test_import_hf_folder_reproduces_model(tmp_path, hf_models, ours):
  """A folder written by transformers' own save_pretrained imports to the same parameters."""
  model, _, cfg = hf_models["qwen2_tied"]
  model.save_pretrained(tmp_path)
  cfg_in, imported = formats.import_model("hf-llm", tmp_path, Precision.parity())
  assert dict(cfg_in) == dict(cfg)
  want = weights.model_params(ours["qwen2_tied"])
  got = weights.model_params(imported)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  with pytest.raises(CheckpointError, match="num_layers"):
    formats.import_model("hf-llm", tmp_path, cfg=llm_cfg(**{**cfg, "num_layers": 3}))


@pytest.mark.torch
def test_corrupt_or_mismatched_checkpoints_name_the_file_or_key(tmp_path, hf_models, exported):
  truncated = tmp_path / "truncated"
  shutil.copytree(exported["llama"], truncated)
  victim = sorted(truncated.glob("*.safetensors"))[-1]
  victim.write_bytes(victim.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match=victim.name):
    formats.import_model("hf-llm", truncated)

  _, state, cfg = hf_models["llama"]
  config = hf_llama.llm_to_hf_config(cfg)

  def folder_with(tensors, name):
    folder = tmp_path / name
    write_sharded(folder, tensors.items())
    (folder / "config.json").write_text(json.dumps(config))
    return folder

  key = "model.layers.1.self_attn.k_proj.weight"
  bad = dict(state, **{key: np.zeros((33, 64), np.float32)})
  with pytest.raises(CheckpointError, match=rf"wrong_shape.*{key}.*\(33, 64\)"):
    formats.import_model("hf-llm", folder_with(bad, "wrong_shape"))

  missing = {k: v for k, v in state.items() if k != key}
  extra = dict(state, **{"model.layers.0.self_attn.rogue.weight": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError, match=rf"missing keys \(1\): {key}"):
    formats.import_model("hf-llm", folder_with(missing, "missing"))
  with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): .*rogue"):
    formats.import_model("hf-llm", folder_with(extra, "extra"))


def test_hf_config_round_trip_and_rope_spellings():
  for name in ("tiny", "vicuna7b", "qwen2_7b"):
    cfg = C.load_config(name).model.llm
    back = hf_llama.hf_config_to_llm(hf_llama.llm_to_hf_config(cfg))
    assert back == {k: cfg[k] for k in back}, name
  v4 = dict(hf_llama.llm_to_hf_config(C.load_config("qwen2_7b").model.llm))
  del v4["rope_parameters"]
  assert hf_llama.hf_config_to_llm(v4)["rope_theta"] == 1e6
  v4.update(rope_theta=None, rope_scaling=dict(rope_type="default", rope_theta=5e5))
  assert hf_llama.hf_config_to_llm(v4)["rope_theta"] == 5e5
  with pytest.raises(ValueError, match="linear"):
    hf_llama.hf_config_to_llm(dict(v4, rope_scaling=dict(type="linear", factor=2.0)))


# --- remat and attention backends -------------------------------------------------------------

def _tiny_model(**fields):
  cfg = C.load_config("tiny").model.llm
  cfg.update(fields)
  return LlamaModel(cfg, Precision.parity(), rngs=nnx.Rngs(0))


def _remat_grads(remat):
  """Leaves of d(next-token loss)/d(params) of the tiny model with the given remat policy."""
  ids, mask, positions = batch_inputs(seed=4)
  graphdef, params = nnx.split(_tiny_model(remat=remat))

  def loss(params):
    logits, _ = nnx.merge(graphdef, params)(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                            positions=jnp.asarray(positions))
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * mask[:, 1:]) / mask[:, 1:].sum()

  return jax.tree.leaves(jax.jit(jax.grad(loss))(params))


@pytest.fixture(scope="module")
def plain_grads():
  return _remat_grads("none")


@pytest.mark.parametrize("policy", ["full", "minimal_with_context"])
def test_remat_does_not_change_gradients(plain_grads, policy):
  errs = []
  for g_remat, g_plain in zip(_remat_grads(policy), plain_grads, strict=True):
    errs.append(max_rel_err(g_remat, g_plain)[0])
    assert_close(g_remat, g_plain, 1e-6, f"gradient with remat={policy}")
  print(f"remat={policy}: max relative gradient difference {max(errs):.2e}")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the non-GPU error")
def test_cudnn_attention_needs_a_gpu():
  model = _tiny_model(attention="cudnn")
  with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
    model(jnp.zeros((1, 4), jnp.int32))
