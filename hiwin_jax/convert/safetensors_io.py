"""Streaming safetensors reader and writer on numpy (bf16 through ml_dtypes), no torch needed.

The reader memory-maps each file and returns one tensor at a time, so converting a 7B checkpoint
never holds more than the target model plus one tensor. The writer streams tensors to disk in the
order given. Both accept HF's sharded layout (`model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint file is unreadable, or its keys or shapes are not what the model needs."""


class SafetensorsFile:
  """One `.safetensors` file: `keys()`, `shape(key)`, `get(key)` (a read-only memory map)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes)")
      (n,) = struct.unpack("<Q", raw)
      if n > size - 8:
        raise CheckpointError(f"{self.path}: corrupt safetensors header (claims {n} bytes, "
                              f"file has {size})")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from e
    self.metadata = header.pop("__metadata__", {}) or {}
    self._entries = header
    self._base = 8 + n
    for key, e in header.items():
      begin, end = e["data_offsets"]
      if e["dtype"] not in DTYPES:
        raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {e['dtype']}")
      want = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
      if end - begin != want or self._base + end > size:
        raise CheckpointError(f"{self.path}: tensor {key!r} data is truncated or corrupt "
                              f"(shape {e['shape']}, bytes {begin}..{end}, file {size})")
    self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._entries[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    e = self._entries[key]
    begin, end = e["data_offsets"]
    flat = self._map[self._base + begin:self._base + end]
    return flat.view(DTYPES[e["dtype"]]).reshape(e["shape"])


class SafetensorsReader:
  """All tensors of a checkpoint folder (sharded with an index, or single files) or one file."""

  def __init__(self, path: str | os.PathLike):
    path = pathlib.Path(path)
    if path.is_file():
      files = [path]
    elif (path / INDEX_NAME).is_file():
      index = json.loads((path / INDEX_NAME).read_text())
      files = [path / f for f in sorted(set(index["weight_map"].values()))]
    else:
      files = sorted(path.glob("*.safetensors"))
    if not files:
      raise CheckpointError(f"{path}: no .safetensors files found")
    self.files = [SafetensorsFile(f) for f in files]
    self._where: dict[str, SafetensorsFile] = {}
    for f in self.files:
      for k in f.keys():
        if k in self._where:
          raise CheckpointError(f"tensor {k!r} appears in both {self._where[k].path} and {f.path}")
        self._where[k] = f

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._where[key].shape(key)

  def get(self, key: str) -> np.ndarray:
    return self._where[key].get(key)


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes one file; `tensors` may be a generator (shapes are read first, data streamed)."""
  items = list(tensors)
  header, offset = {}, 0
  for key, a in items:
    nbytes = a.size * a.dtype.itemsize
    header[key] = {"dtype": _NAMES[np.dtype(a.dtype)], "shape": list(a.shape),
                   "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = pathlib.Path(str(path) + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, a in items:
      f.write(np.ascontiguousarray(a).tobytes())
  os.replace(tmp, path)


def write_sharded(folder: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int = 5 * 2 ** 30) -> None:
  """HF layout: `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`.

  Tensors are grouped in order into shards of at most `max_shard_bytes`; only the shard being
  filled is referenced, so `tensors` can be a generator over a model larger than RAM allows twice.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  shard_keys: list[list[str]] = []
  current: list[tuple[str, np.ndarray]] = []
  size = total = 0

  def flush():
    write_safetensors(folder / f"shard-{len(shard_keys):05d}.tmp", current, {"format": "pt"})
    shard_keys.append([k for k, _ in current])

  for key, a in tensors:
    nbytes = a.size * a.dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      flush()
      current, size = [], 0
    current.append((key, a))
    size += nbytes
    total += nbytes
  flush()
  n = len(shard_keys)
  weight_map = {}
  for i, keys in enumerate(shard_keys):
    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(folder / f"shard-{i:05d}.tmp", folder / final)
    weight_map.update(dict.fromkeys(keys, final))
  (folder / INDEX_NAME).write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
