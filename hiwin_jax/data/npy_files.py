"""Arrays on disk for the data pipeline: written atomically, read one row at a time.

What the grain workers of a host read per sample (the JSON index, the step table) lives in `.npy`
files that `RowFile` reads with `os.pread`, one row per call: a worker holds the rows it is
working on and nothing in proportion to the dataset (a memory map would do the same in private
memory but still count every page it touched in the worker's RSS).

Host-side code (numpy): no jax import.
"""

from __future__ import annotations

import os

import numpy as np

from hiwin_jax import outputs


def save_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
  """`np.save` into a temporary sibling, then renamed over `path`: a reader (another process or
  host sharing the folder) sees the whole file or none."""
  with outputs.atomic_file(path, "wb") as f:
    np.save(f, array, allow_pickle=False)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
  """`data` into a temporary sibling, then renamed over `path`."""
  with outputs.atomic_file(path, "wb") as f:
    f.write(data)


class RowFile:
  """Rows `a[i]` of the array in a `.npy` file, read on demand (picklable: the path travels, the
  file is opened again in each process). `shape`: the array's shape."""

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    with open(self.path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
      self._offset = f.tell()
    if fortran or dtype.hasobject:
      raise ValueError(f"{self.path}: expected a C-ordered array without objects")
    self.shape, self.dtype = tuple(shape), dtype
    self._row_shape = self.shape[1:]
    self._row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * dtype.itemsize
    self._file = None

  def __getstate__(self):
    return self.__dict__ | {"_file": None}

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, i: int) -> np.ndarray:
    i = int(i)
    if not 0 <= i < self.shape[0]:
      raise IndexError(f"row {i} outside [0, {self.shape[0]}) of {self.path}")
    if self._file is None:
      self._file = open(self.path, "rb", buffering=0)  # kept open: one pread per row
    data = os.pread(self._file.fileno(), self._row_bytes, self._offset + i * self._row_bytes)
    return np.frombuffer(data, self.dtype).reshape(self._row_shape)

  def read_all(self) -> np.ndarray:
    return np.load(self.path, allow_pickle=False)
