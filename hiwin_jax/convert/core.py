"""Declarative PyTorch <-> JAX parameter conversion.

A model's conversion is a `KeyTable`: a list of `Rule(torch_key, our_path, transform)`. A torch key
containing `{i}` names one tensor per layer; our side then holds them stacked on a leading `layers`
axis. The same table runs both ways: `to_ours` applies each transform's forward function, tensor by
tensor, into preallocated arrays; `to_torch` yields (key, tensor) pairs with the inverse functions,
as views where possible, so an export streams.

Our paths are the dotted parameter paths of `hiwin_jax.weights` (`layers.self_attn.q_proj.kernel`),
whose `param_targets` / `model_params` / `load_params` give a model's side of a table.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from hiwin_jax.convert.safetensors_io import CheckpointError


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
# nn.Linear.weight (out, in) <-> kernel (in, out)
TRANSPOSE = Transform("transpose", lambda a: a.T, lambda a: a.T)
# nn.Conv2d.weight (O, I, H, W) <-> HWIO
CONV_HWIO = Transform("conv_hwio", lambda a: a.transpose(2, 3, 1, 0),
                      lambda a: a.transpose(3, 2, 0, 1))
# nn.Conv2d 1x1 weight (O, I, 1, 1) <-> dense kernel (I, O)
CONV1X1_DENSE = Transform("conv1x1_dense", lambda a: a[:, :, 0, 0].T,
                          lambda a: a.T[:, :, None, None])


@dataclasses.dataclass(frozen=True)
class Rule:
  torch: str
  ours: str
  transform: Transform = IDENTITY

  @property
  def stacked(self) -> bool:
    return "{i}" in self.torch


@dataclasses.dataclass(frozen=True)
class KeyTable:
  """The rules of one model, plus torch keys that are legitimately ignored on import."""
  name: str
  rules: tuple[Rule, ...]
  ignore: tuple[str, ...] = ()  # substrings of torch keys to skip (non-persistent buffers)

  def torch_keys(self, layers: Mapping[str, int]) -> list[str]:
    """Every torch key, with `layers[rule.ours]` copies of each stacked rule."""
    keys = []
    for r in self.rules:
      keys += [r.torch.format(i=i) for i in range(layers[r.ours])] if r.stacked else [r.torch]
    return keys


def prefixed(table: KeyTable, ours: str = "", torch: str = "") -> KeyTable:
  """`table` with `torch` prepended to every torch key and `ours` to every path (a tower's table
  placed inside a bigger checkpoint and model)."""
  return KeyTable(table.name, tuple(Rule(torch + r.torch, ours + r.ours, r.transform)
                                    for r in table.rules), table.ignore)


class TensorSource(Protocol):
  def keys(self) -> Sequence[str]: ...
  def get(self, key: str) -> np.ndarray: ...


def _fmt(names: Sequence[str], limit: int = 12) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _layer_counts(table: KeyTable, shapes: Mapping[str, tuple]) -> dict[str, int]:
  """Each stacked rule's layer count: the leading (`layers`) dim of its parameter."""
  return {r.ours: shapes[r.ours][0] for r in table.rules if r.stacked}


def check_keys(table: KeyTable, available: Sequence[str], layers: Mapping[str, int],
               where: str) -> None:
  expected = set(table.torch_keys(layers))
  have = set(available)
  missing = expected - have
  unexpected = {k for k in have - expected if not any(s in k for s in table.ignore)}
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
      parts.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    raise CheckpointError(f"{where}: checkpoint does not match the {table.name} layout of this "
                          f"model: " + "; ".join(parts))


def to_ours(table: KeyTable, source: TensorSource, target: Mapping[str, tuple[tuple, np.dtype]],
            where: str = "checkpoint") -> dict[str, np.ndarray]:
  """Reads every tensor of `source` into arrays of our layout.

  `target` maps our path -> (shape, dtype) (from `nnx.eval_shape` of the model); stacked rules
  read as many layers as the parameter's leading dimension. Each torch tensor is read,
  transformed, checked and written into its place, then dropped.
  """
  covered = {r.ours for r in table.rules}
  if covered != set(target):
    raise CheckpointError(f"{table.name} table does not cover the model: "
                          f"unmapped model parameters {_fmt(set(target) - covered)}; "
                          f"table entries without a parameter {_fmt(covered - set(target))}")
  check_keys(table, source.keys(),
             _layer_counts(table, {k: shape for k, (shape, _) in target.items()}), where)
  out = {}
  for rule in table.rules:
    shape, dtype = target[rule.ours]
    per_layer = shape[1:] if rule.stacked else shape
    dest = np.empty(shape, dtype)
    for i in range(shape[0]) if rule.stacked else [None]:
      key = rule.torch.format(i=i)
      stored = source.get(key)
      if stored.dtype.kind in "biu" and np.dtype(dtype).kind not in "biu":
        # A cast would turn integer bit patterns into numbers silently: a relabelled dtype
        # (F32 stored as I32) or the wrong tensor.
        raise CheckpointError(f"{where}: tensor {key!r} is stored as {stored.dtype}, but "
                              f"{rule.ours} is a floating-point parameter")
      value = rule.transform.to_ours(stored)
      if value.shape != tuple(per_layer):
        raise CheckpointError(
            f"{where}: tensor {key!r} has shape {tuple(stored.shape)}, which maps to "
            f"{value.shape} for {rule.ours}; the model needs {tuple(per_layer)}")
      if rule.stacked:
        dest[i] = value
      else:
        dest[...] = value
    out[rule.ours] = dest
  return out


def to_torch(table: KeyTable, params: Mapping[str, np.ndarray],
             dtype: np.dtype | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (torch key, tensor) in table order; `dtype` casts on the way (e.g. to bfloat16)."""
  for rule in table.rules:
    value = params[rule.ours]
    for i in range(value.shape[0]) if rule.stacked else [None]:
      t = rule.transform.to_torch(value[i] if rule.stacked else value)
      yield rule.torch.format(i=i), (t.astype(dtype) if dtype is not None else t)


class DictSource:
  """A `TensorSource` over an in-memory dict (a torch state_dict converted to numpy, tests)."""

  def __init__(self, tensors: Mapping[str, np.ndarray]):
    self.tensors = dict(tensors)

  def keys(self):
    return list(self.tensors)

  def get(self, key):
    return np.asarray(self.tensors[key])


class KeysUnder:
  """The keys of `source` that start with `prefix`, names unchanged (errors quote real keys)."""

  def __init__(self, source: TensorSource, prefix: str):
    self.source, self.prefix = source, prefix

  def keys(self):
    return [k for k in self.source.keys() if k.startswith(self.prefix)]

  def get(self, key):
    return self.source.get(key)
