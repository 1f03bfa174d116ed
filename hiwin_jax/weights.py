"""Parameters by path, parameter checkpoints, and a model built from saved weights.

The neutral layer under `train/`, `infer/` and the converters: none of them reads or names
parameters any other way.

Paths. A parameter is named by its path in the model's `nnx.State` (`nnx.state(model,
nnx.Param)`), which is also its path in a pure dict of that state (`nnx.to_pure_dict`) and in a
jax key path: "."-joined (`llm.layers.mlp.down_proj.kernel`) in checkpoints and conversion
tables, "/"-joined (`llm/layers/mlp/down_proj/kernel`) in the training rules of
`cfg.train.trainable`.

Checkpoints. A parameter checkpoint folder holds `params/` (orbax: the nested tree of arrays)
and `hiwin_config.json` (the config that built the model, with its `format`), so it is
self-describing: `hiwin convert` writes one, a training run's `final/` is one.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

CONFIG_NAME = "hiwin_config.json"


# --- paths ------------------------------------------------------------------------------------

def path_str(path: Sequence[Any], sep: str = ".") -> str:
  """"a.b.c" from an nnx path (strings and ints) or a jax key path (DictKey, SequenceKey, ...)."""
  return sep.join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def flatten(tree: Any, sep: str = ".") -> dict[str, Any]:
  """Path -> leaf of a nested dict (a pure nnx state, an orbax-restored tree)."""
  return {path_str(p, sep): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nest(flat: Mapping[str, Any]) -> dict:
  """The inverse of `flatten` for dotted paths: {"a.b": x} -> {"a": {"b": x}}."""
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _param_vars(model) -> dict[str, nnx.Variable]:
  return {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_targets(model) -> dict[str, tuple[tuple, np.dtype]]:
  """Dotted path -> (shape, dtype) of every parameter of an (abstract or real) nnx model."""
  return {k: (tuple(v.get_value().shape), np.dtype(v.get_value().dtype))
          for k, v in _param_vars(model).items()}


def model_params(model) -> dict[str, np.ndarray]:
  """Dotted path -> host numpy array of every parameter (gathered if sharded)."""
  return {k: np.asarray(v.get_value()) for k, v in _param_vars(model).items()}


def load_params(model, arrays: dict[str, Any], *, partial: bool = False) -> None:
  """Moves `arrays` (dotted path -> array) into the model's parameters, each in its parameter's
  dtype and, for a model placed on a mesh, its sharding.

  Every parameter must be named unless `partial` (then the others keep their values); a path
  the model lacks or a shape that differs is an error. `arrays` is emptied as it goes, so each
  host array is freed once its parameter holds it: peak memory stays at one copy of the model
  plus one tensor.
  """
  state = nnx.state(model, nnx.Param)
  params = {path_str(p): v for p, v in nnx.to_flat_state(state)}
  unknown = sorted(set(arrays) - set(params))
  if unknown:
    raise KeyError(f"{len(unknown)} parameter paths the model does not have, e.g. {unknown[:5]}")
  missing = sorted(set(params) - set(arrays))
  if missing and not partial:
    raise KeyError(f"{len(missing)} parameters of the model are not given, e.g. {missing[:5]}")
  for key in list(arrays):
    var, value = params[key], arrays.pop(key)
    old = var.get_value()
    if tuple(np.shape(value)) != tuple(old.shape):
      raise ValueError(f"parameter {key}: shape {tuple(np.shape(value))}, the model expects "
                       f"{tuple(old.shape)}")
    host = np.asarray(value).astype(old.dtype, copy=False)
    var.set_value(jax.device_put(host, getattr(old, "sharding", None)))
  nnx.update(model, state)


# --- parameter checkpoints --------------------------------------------------------------------

def write_params(folder: str | pathlib.Path, params: Mapping[str, Any],
                 config: Mapping | None = None) -> pathlib.Path:
  """Writes `params` (dotted path -> numpy or jax array, sharded over any number of processes:
  every process calls this) to `folder/params`, and `config` beside it (process 0)."""
  import orbax.checkpoint as ocp
  folder = pathlib.Path(folder).resolve()
  folder.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(folder / "params", nest(params), force=True)
    ckptr.wait_until_finished()
  if config is not None and jax.process_index() == 0:
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
  return folder


def read_params(folder: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict | None]:
  """(dotted path -> numpy array, the saved config dict or None)."""
  import orbax.checkpoint as ocp
  folder = pathlib.Path(folder).resolve()
  if not (folder / "params").is_dir():
    raise FileNotFoundError(f"{folder}: not a hiwin parameter checkpoint (no params/ folder)")
  # Restored as host numpy arrays: the saved shardings name the writer's devices (another
  # device count or a multi-process run's ids), which need not exist here.
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(folder / "params").item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(folder / "params", args=ocp.args.PyTreeRestore(restore_args=args))
  cfg_path = folder / CONFIG_NAME
  config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
  return {k: np.asarray(v) for k, v in flatten(tree).items()}, config


# --- models -----------------------------------------------------------------------------------

def load_model(checkpoint: str | pathlib.Path, config_name: str = "vicuna7b",
               overrides: Sequence[str] = (), dtype: str | None = None):
  """(LlavaUHD, cfg.model) from a hiwin checkpoint folder (params/ + hiwin_config.json with
  format "llava-uhd") or an official PyTorch LLaVA-UHD folder (config.json + safetensors,
  converted on the fly; the config `config_name` with `overrides` supplies the ViT geometry the
  official config.json does not record, and `dtype` the parameter dtype)."""
  from hiwin_jax import config
  from hiwin_jax.models.layers import Precision
  from hiwin_jax.models.llava_uhd import LlavaUHD
  folder = pathlib.Path(checkpoint)
  if (folder / "params").is_dir():
    params, saved = read_params(folder)
    if not saved or saved.get("format") != "llava-uhd":
      raise FileNotFoundError(f"{folder}: not a hiwin llava-uhd checkpoint (its {CONFIG_NAME} "
                              f"says format {saved and saved.get('format')!r})")
    cfg_model = config.model_from_dict(saved["model"])
  elif (folder / "config.json").is_file():
    # Imported here: the converters read parameter trees through this module.
    from hiwin_jax.convert import llava_uhd
    base = config.load_config(config_name, overrides).model
    cfg_model, params = llava_uhd.import_official(folder, dtype, base)
  else:
    raise FileNotFoundError(f"{folder}: neither a hiwin checkpoint (params/) nor an official "
                            "LLaVA-UHD folder (config.json + safetensors)")
  model = nnx.eval_shape(lambda: LlavaUHD(cfg_model, Precision.from_config(cfg_model.precision),
                                          rngs=nnx.Rngs(0)))
  load_params(model, params)
  return model, cfg_model
