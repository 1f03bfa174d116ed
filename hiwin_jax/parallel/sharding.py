"""Logical axis names -> mesh `PartitionSpec`s, and helpers that shard model states.

Rules are a list of `(logical_name, mesh_axes)` from the config (`cfg.mesh.rules`), where
`mesh_axes` is None, one mesh axis name, or a tuple of them. A dimension is sharded over the mesh
axes its rule names, skipping axes already used by an earlier dimension of the same array, axes of
size 1, and trailing axes whose product does not divide the dimension (tiny test models stay
runnable on any mesh; `unsharded_report` lists what ended up replicated).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterable, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]
_RULES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("hiwin_rules", default=None)


def rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
  out = {}
  for name, axes in rules:
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    out[name] = tuple(axes)
  return out


def logical_to_spec(logical: Iterable[str | None], rules: Rules | dict, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """The mesh PartitionSpec of an array whose dims have the given logical names."""
  table = rules if isinstance(rules, dict) else rules_dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no rule in the mesh rules {sorted(table)}")
    axes = [a for a in table[name] if a not in used and mesh.shape.get(a, 1) > 1]
    if shape is not None:
      while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return PartitionSpec(*spec)


def _logical_axes(var: nnx.Variable) -> tuple:
  return tuple(var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
  """A tree like `state` (of arrays or ShapeDtypeStructs) holding each leaf's NamedSharding."""
  table = rules_dict(rules)

  def one(var):
    value = var.get_value()
    return var.replace(NamedSharding(
        mesh, logical_to_spec(_logical_axes(var), table, mesh, value.shape)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
  """Places every array of `state` on the mesh according to its logical axes."""
  return jax.device_put(state, state_shardings(state, mesh, rules))


def create_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Rules) -> nnx.Module:
  """Builds a model directly in its sharded layout: no device ever holds the whole model."""
  abstract = nnx.eval_shape(make_model)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  @jax.jit
  def init():
    return nnx.state(make_model())

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def unsharded_report(state: nnx.State, min_size: int = 2 ** 16) -> list[str]:
  """Parameters with at least `min_size` elements that ended up fully replicated although their
  logical axes name a shardable dimension (parameters declared all-None, like the JBU's tiny
  kernel MLPs, are replicated by design and not reported)."""
  out = []
  for path, var in nnx.to_flat_state(state):
    value = var.get_value()
    if (value.size >= min_size and value.sharding.is_fully_replicated
        and any(a is not None for a in _logical_axes(var))):
      out.append(f"{'.'.join(map(str, path))} {value.shape}")
  return out


@contextlib.contextmanager
def use_rules(rules: Rules):
  """Makes `rules` the table that `constrain` uses for activations inside this context."""
  token = _RULES.set(rules_dict(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def mesh_axes(logical: str, size: int) -> tuple[str, ...]:
  """The mesh axes a dimension of `size` named `logical` is sharded over in this context (as
  `constrain` would shard it); empty without a mesh or rules in context. Callers that must
  `shard_map` a kernel (Pallas) over that dimension use it as the axis names of the map."""
  table = _RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if table is None or mesh.empty:
    return ()
  spec = logical_to_spec([logical], table, mesh, (size,))[0]
  if spec is None:
    return ()
  return (spec,) if isinstance(spec, str) else tuple(spec)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op without a mesh or rules in context."""
  table = _RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if table is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, table, mesh, x.shape))
