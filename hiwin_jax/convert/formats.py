"""HF checkpoint folders <-> our towers, for every format (`hiwin convert` and the Python API).

A `Format` bundles a model's key table, its config.json translation and its tower class. Import
builds no model: the target shapes come from `nnx.eval_shape` of the tower, and each torch tensor
is read (memory-mapped), transformed and written into its preallocated array, so converting a 7B
checkpoint holds one copy of the weights plus one tensor. Export streams the other way.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import ml_dtypes
import numpy as np

from hiwin_jax import config, outputs, weights
from hiwin_jax.convert import core, hf_clip, hf_llama
from hiwin_jax.convert.safetensors_io import (CheckpointError, SafetensorsReader,
                                              read_checkpoint_json, write_sharded)

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}


def np_dtype(name: str | None) -> np.dtype | None:
  if name is None:
    return None
  if name not in NP_DTYPES:
    raise ValueError(f"dtype {name!r}: choose from {sorted(NP_DTYPES)}")
  return NP_DTYPES[name]


def dtype_name(dtype: np.dtype) -> str:
  return next(n for n, d in NP_DTYPES.items() if d == np.dtype(dtype))


@dataclasses.dataclass(frozen=True)
class Format:
  section: str                                   # config section: "llm" or "vision"
  schema: Callable[[], Any]                      # default ConfigDict of the section
  from_hf_config: Callable[[dict], dict]         # config.json -> section fields
  to_hf_config: Callable[[Any, str], dict]       # section, dtype name -> config.json
  table: Callable[[Any, str], core.KeyTable]     # section, torch key prefix -> table
  model: Callable[..., Any]                      # section, precision -> tower module
  prefixes: tuple[str, ...] = ("",)              # accepted key prefixes; export writes the first


def _llm_model(cfg, precision=None):
  from flax import nnx
  from hiwin_jax.models.layers import Precision
  from hiwin_jax.models.llama import LlamaModel
  return LlamaModel(cfg, precision or Precision(), rngs=nnx.Rngs(0))


def _clip_model(cfg, precision=None):
  from flax import nnx
  from hiwin_jax.models.clip_vit import ClipVisionTower
  from hiwin_jax.models.layers import Precision
  return ClipVisionTower(cfg, precision or Precision(), rngs=nnx.Rngs(0))


FORMATS = {
    "hf-llm": Format("llm", config.llm_config, hf_llama.hf_config_to_llm, hf_llama.llm_to_hf_config,
                     lambda cfg, prefix: hf_llama.llama_table(cfg), _llm_model),
    # transformers 5 saves CLIPVisionModel without the `vision_model.` prefix; accept both.
    "hf-clip": Format("vision", config.vision_config, hf_clip.hf_config_to_vision,
                      hf_clip.vision_to_hf_config,
                      lambda cfg, prefix: hf_clip.clip_table(cfg, prefix=prefix), _clip_model,
                      prefixes=(hf_clip.HF_PREFIX, "")),
}


def _hf_fields(f: Format, path: pathlib.Path) -> dict | None:
  """Section fields from the config.json in `path` (a folder) or beside it (a file), or None."""
  cfg_path = (path if path.is_dir() else path.parent) / "config.json"
  if not cfg_path.is_file():
    return None
  hf = read_checkpoint_json(cfg_path, "HF model config")
  try:
    return f.from_hf_config(hf)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{cfg_path}: cannot use this HF config: {type(e).__name__} "
                          f"{e}") from None


def resolve_config(fmt: str, path: str | pathlib.Path, cfg=None):
  """The section config for the checkpoint at `path`: the given `cfg` (whose geometry must agree
  with config.json when there is one), else the schema updated from config.json."""
  f = FORMATS[fmt]
  path = pathlib.Path(path)
  found = _hf_fields(f, path)
  if cfg is None:
    if found is None:
      raise CheckpointError(f"{path}: no config.json next to the weights; pass a {f.section} "
                            f"config")
    cfg = f.schema()
    cfg.update(found)
  elif found is not None:
    diff = {k: (cfg[k], v) for k, v in found.items() if k in cfg and cfg[k] != v}
    if diff:
      raise CheckpointError(
          f"{path}: config.json disagrees with the given {f.section} config: " +
          ", ".join(f"{k}: ours {a!r}, checkpoint {b!r}" for k, (a, b) in diff.items()))
  return cfg


def params_from_source(fmt: str, source: core.TensorSource, cfg, dtype=None, prefix: str = "",
                       where: str = "checkpoint") -> dict[str, np.ndarray]:
  """Dotted path -> numpy array in our layout, read tensor by tensor from `source` (torch key
  names, each starting with `prefix`). `dtype` (a numpy dtype or its name) casts; by default each
  array gets its parameter's dtype."""
  from flax import nnx
  f = FORMATS[fmt]
  targets = weights.param_targets(nnx.eval_shape(lambda: f.model(cfg)))
  if dtype is not None:
    dtype = np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    targets = {k: (shape, dtype) for k, (shape, _) in targets.items()}
  return core.to_ours(f.table(cfg, prefix), source, targets, where=where)


def model_from_source(fmt: str, source: core.TensorSource, cfg, precision=None,
                      prefix: str = "", where: str = "checkpoint"):
  """The tower of `fmt` holding the tensors of `source` (a state_dict as a `DictSource`, a
  checkpoint folder, a `KeysUnder` view inside a larger checkpoint). The model is created
  abstractly and filled array by array, so the weights exist once at a time."""
  from flax import nnx
  model = nnx.eval_shape(lambda: FORMATS[fmt].model(cfg, precision))
  weights.load_params(model, params_from_source(fmt, source, cfg, prefix=prefix, where=where))
  return model


def _open(fmt: str, path: str | pathlib.Path):
  """The reader of `path` restricted to the first of the format's prefixes its keys use."""
  reader = SafetensorsReader(path)
  prefix = next(p for p in FORMATS[fmt].prefixes if any(k.startswith(p) for k in reader.keys()))
  return core.KeysUnder(reader, prefix), prefix


def import_params(fmt: str, path: str | pathlib.Path, dtype: str | None = None, cfg=None):
  """(section config, dotted path -> numpy array) of the HF checkpoint at `path`.

  `path` is a folder (sharded with an index, or single files) or one .safetensors file; keys
  with and without the format's prefixes are accepted (a full CLIPModel file's text tower is
  skipped). `dtype` casts the stored tensors; by default the model's parameter dtype (float32).
  """
  cfg = resolve_config(fmt, path, cfg)
  source, prefix = _open(fmt, path)
  return cfg, params_from_source(fmt, source, cfg, dtype, prefix, where=str(path))


def import_model(fmt: str, path: str | pathlib.Path, precision=None, cfg=None):
  """(section config, tower module) of the HF checkpoint at `path`."""
  cfg = resolve_config(fmt, path, cfg)
  source, prefix = _open(fmt, path)
  return cfg, model_from_source(fmt, source, cfg, precision, prefix, where=str(path))


def export_params(fmt: str, params: dict[str, np.ndarray], cfg, folder: str | pathlib.Path,
                  dtype: str | None = None, max_shard_bytes: int = 5 * 2 ** 30, *,
                  overwrite: bool = False) -> pathlib.Path:
  """Writes config.json + sharded safetensors that transformers' `from_pretrained` loads. The
  folder appears complete or not at all; a non-empty one is refused unless `overwrite` (then
  replaced whole, if it holds only model files: `outputs.MODEL_FOLDER`)."""
  f = FORMATS[fmt]
  name = dtype or dtype_name(next(iter(params.values())).dtype)
  with outputs.atomic_folder(folder, outputs.MODEL_FOLDER, overwrite=overwrite) as tmp:
    write_sharded(tmp, core.to_torch(f.table(cfg, f.prefixes[0]), params, np_dtype(dtype)),
                  max_shard_bytes)
    (tmp / "config.json").write_text(json.dumps(f.to_hf_config(cfg, name), indent=2))
  return pathlib.Path(folder)


def export_model(fmt: str, model, cfg, folder: str | pathlib.Path, dtype: str | None = None,
                 max_shard_bytes: int = 5 * 2 ** 30, *, overwrite: bool = False) -> pathlib.Path:
  return export_params(fmt, weights.model_params(model), cfg, folder, dtype, max_shard_bytes,
                       overwrite=overwrite)
