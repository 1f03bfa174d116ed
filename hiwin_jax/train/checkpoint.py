"""Parameter checkpoints (orbax): what `hiwin convert` writes and every command can restore.

The on-disk tree is the model's parameter state as a nested dict of arrays (paths as in
`nnx.state(model, nnx.Param)`), plus a JSON sidecar with the config that built the model, so a
checkpoint folder is self-describing.
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

CONFIG_NAME = "hiwin_config.json"


def _nest(flat: Mapping[str, np.ndarray]) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def write_params(folder: str | pathlib.Path, params: Mapping[str, np.ndarray],
                config: Mapping | None = None) -> pathlib.Path:
  """Writes `params` (dotted path -> numpy or jax array, sharded over any number of processes:
  every process calls this) to `folder/params`, and `config` beside it (process 0)."""
  folder = pathlib.Path(folder).resolve()
  folder.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(folder / "params", _nest(params), force=True)
    ckptr.wait_until_finished()
  if config is not None and jax.process_index() == 0:
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
  return folder


def read_params(folder: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict | None]:
  """(dotted path -> numpy array, the saved config dict or None)."""
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
  return flatten_tree(tree), config


def latest_step(mngr, resume: bool) -> int | None:
  """The step of the newest checkpoint an orbax CheckpointManager holds, None for a fresh run;
  a clear error when the folder holds checkpoints and `resume` is False (no silent overwrite)."""
  latest = mngr.latest_step()
  if latest is not None and not resume:
    raise FileExistsError(f"{mngr.directory} already holds checkpoints (latest step {latest}) "
                          f"and checkpoint.resume is False: choose another output folder or "
                          f"resume")
  return latest
