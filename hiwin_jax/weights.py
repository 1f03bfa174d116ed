"""Parameters by path, parameter checkpoints, and a model built from saved weights.

The neutral layer under `train/`, `infer/` and the converters: none of them reads or names
parameters any other way.

Paths. A parameter is named by its path in the model's `nnx.State` (`nnx.state(model,
nnx.Param)`), which is also its path in a pure dict of that state (`nnx.to_pure_dict`) and in a
jax key path: "."-joined (`llm.layers.mlp.down_proj.kernel`) in checkpoints and conversion
tables, "/"-joined (`llm/layers/mlp/down_proj/kernel`) in the training rules of
`cfg.train.trainable`.

Checkpoints. A parameter checkpoint folder holds `params/` (orbax: the nested tree of arrays),
`hiwin_config.json` (the config that built the model, with its `format`), so it is
self-describing, and `hiwin_checksums.json` (size and SHA-256 of each file of `params/`, checked
before it is read): `hiwin convert` writes one, a training run's `final/` is one.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from hiwin_jax import outputs
from hiwin_jax.convert.safetensors_io import CheckpointError, read_checkpoint_json

log = logging.getLogger("hiwin.weights")
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
  the model lacks (CheckpointError) or a shape that differs is an error. `arrays` is emptied as
  it goes, so each host array is freed once its parameter holds it: peak memory stays at one
  copy of the model plus one tensor.
  """
  state = nnx.state(model, nnx.Param)
  params = {path_str(p): v for p, v in nnx.to_flat_state(state)}
  unknown = sorted(set(arrays) - set(params))
  if unknown:
    raise CheckpointError(f"{len(unknown)} parameter paths the model does not have, e.g. "
                          f"{unknown[:5]}")
  missing = sorted(set(params) - set(arrays))
  if missing and not partial:
    raise CheckpointError(f"{len(missing)} parameters of the model are not given, e.g. "
                          f"{missing[:5]}")
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

def _barrier(name: str) -> None:
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)


def write_params(folder: str | pathlib.Path, params: Mapping[str, Any],
                 config: Mapping | None = None, *, overwrite: bool = False) -> pathlib.Path:
  """Writes `params` (dotted path -> numpy or jax array, sharded over any number of processes:
  every process calls this) to `folder/params`, `config` beside it and the checksums of
  `params/` (process 0).

  The folder appears complete or not at all (`outputs.atomic_folder`); an existing non-empty
  `folder` is refused unless `overwrite` (then replaced whole, if it holds only a checkpoint).
  """
  import orbax.checkpoint as ocp
  primary = jax.process_index() == 0
  with outputs.atomic_folder(folder, outputs.HIWIN_CHECKPOINT, overwrite=overwrite,
                             primary=primary,
                             barrier=_barrier if jax.process_count() > 1 else None) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / "params", nest(params))
      ckptr.wait_until_finished()
    if primary:
      if config is not None:
        outputs.write_text(tmp / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
      outputs.record_checksums(tmp, include=["params"])
  return pathlib.Path(folder).resolve()


def config_shapes(saved: Mapping) -> dict[str, tuple[int, ...]] | None:
  """Dotted path -> shape of every parameter of the model a checkpoint's `hiwin_config.json`
  describes (None for a format no model here is built from). Raises what building it raises."""
  fmt = saved.get("format")
  if fmt in ("llava-uhd", "vdim"):
    from hiwin_jax import config
    from hiwin_jax.models.layers import Precision
    from hiwin_jax.models.llava_uhd import LlavaUHD
    cfg = config.model_from_dict(saved["model"])
    model = nnx.eval_shape(lambda: LlavaUHD(cfg, Precision(), rngs=nnx.Rngs(0)))
    # Stage 0's export is the JBU alone, under the paths it has inside the whole model.
    keep = ("jbu.",) if fmt == "vdim" else ("",)
  elif fmt in ("hf-llm", "hf-clip"):
    from hiwin_jax.convert import formats  # the converters read parameter trees through here
    f = formats.FORMATS[fmt]
    cfg = f.schema()
    cfg.update(saved[f.section])
    model = nnx.eval_shape(lambda: f.model(cfg))
    keep = ("",)
  else:
    return None
  return {k: shape for k, (shape, _) in param_targets(model).items() if k.startswith(keep)}


def _check_config_shapes(folder: pathlib.Path, saved: Mapping,
                         stored: Mapping[str, tuple[int, ...]]) -> None:
  """`hiwin_config.json` must describe the model whose parameters are stored: a config edited
  (or a folder assembled) by hand would otherwise build one model and load another's weights."""
  where = folder / CONFIG_NAME
  try:
    expected = config_shapes(saved)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise CheckpointError(f"{where}: does not describe a model ({type(e).__name__}: "
                          f"{e})") from None
  if expected is None:
    return
  differ = sorted(k for k in set(expected) & set(stored) if tuple(expected[k]) != stored[k])
  missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
  if differ or missing or extra:
    parts = [f"{k} is stored as {stored[k]}, the config builds {tuple(expected[k])}"
             for k in differ[:3]]
    if missing:
      parts.append(f"{len(missing)} parameters of the config are not stored, e.g. {missing[0]}")
    if extra:
      parts.append(f"{len(extra)} stored parameters are not in the config's model, e.g. "
                   f"{extra[0]}")
    raise CheckpointError(f"{where} disagrees with the parameters stored in {folder / 'params'}"
                          f": " + "; ".join(parts))


def read_params(folder: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict | None]:
  """(dotted path -> numpy array, the saved config dict or None).

  Before any array is read: the files of `params/` are checked against their recorded checksums,
  and the stored shapes against the model `hiwin_config.json` describes.
  """
  import orbax.checkpoint as ocp
  folder = pathlib.Path(folder).resolve()
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder}: no such folder")
  if not (folder / "params").is_dir():
    raise FileNotFoundError(f"{folder}: not a hiwin parameter checkpoint (no params/ folder)")
  if outputs.has_checksums(folder):
    outputs.verify_checksums(folder)
  else:
    log.warning("%s has no %s (written before hiwin recorded checksums): its files are not "
                "verified", folder, outputs.CHECKSUMS_NAME)
  cfg_path = folder / CONFIG_NAME
  config = (read_checkpoint_json(cfg_path, "hiwin checkpoint config") if cfg_path.is_file()
            else None)
  # Restored as host numpy arrays: the saved shardings name the writer's devices (another
  # device count or a multi-process run's ids), which need not exist here.
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(folder / "params").item_metadata.tree
  if config is not None:
    _check_config_shapes(folder, config, {k: tuple(m.shape) for k, m in flatten(meta).items()})
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(folder / "params", args=ocp.args.PyTreeRestore(restore_args=args))
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
