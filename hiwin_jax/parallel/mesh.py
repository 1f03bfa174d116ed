"""The device mesh with axes (`data`, `fsdp`, `tensor`), built from `cfg.mesh`."""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg_mesh, num_devices: int) -> tuple[int, ...]:
  """Resolves a -1 entry to the remaining devices; checks the product is the device count."""
  sizes = [int(cfg_mesh[a]) for a in AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
  if free:
    rest = math.prod(s for s in sizes if s != -1)
    if num_devices % rest:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not divide {num_devices} devices")
    sizes[free[0]] = num_devices // rest
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(cfg_mesh, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with Auto axis types (sharding propagated by the compiler from our annotations)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(cfg_mesh, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
