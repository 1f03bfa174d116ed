"""Streaming safetensors reader and writer on numpy (bf16 through ml_dtypes), no torch needed.

The reader memory-maps each file and returns one tensor at a time, so converting a 7B checkpoint
never holds more than the target model plus one tensor. The writer streams tensors to disk in the
order given. Both accept HF's sharded layout (`model.safetensors.index.json`).

Files are untrusted input: every header is validated before a byte of data is read, an index
may only name plain file names inside its folder, and errors never quote a file's bytes.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

from hiwin_jax import outputs

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


# safetensors' own bound on the JSON header: a length field beyond it is a corrupt or hostile
# file, refused before anything is allocated.
MAX_HEADER_BYTES = 100_000_000


def _name(key) -> str:
  """A tensor or file name from a file's header, shown in an error: quoted and short (the header
  may be hostile)."""
  text = repr(key)
  return text if len(text) <= 80 else text[:77] + "..."


def read_checkpoint_json(path: str | os.PathLike, what: str) -> dict:
  """The JSON object in `path` (a config.json, an index, hiwin_config.json). A file that is not
  UTF-8 JSON is named with `what` it should be; none of its bytes are shown."""
  path = pathlib.Path(path)
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
  try:
    value = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError:
    raise CheckpointError(f"{path}: the {what} is not UTF-8 text") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: the {what} is not valid JSON (line {e.lineno}, column "
                          f"{e.colno}: {e.msg})") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path}: the {what} must be a JSON object, not a "
                          f"{type(value).__name__}")
  return value


def _no_duplicates(pairs):
  seen = {}
  for key, value in pairs:
    if key in seen:
      raise CheckpointError(f"tensor {_name(key)} is listed twice")
    seen[key] = value
  return seen


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile:
  """One `.safetensors` file: `keys()`, `shape(key)`, `get(key)` (a read-only memory map).

  The whole header is validated before any tensor is read, as the safetensors library does:
  bounded header length, UTF-8 JSON, known dtypes, shape x itemsize = byte length, offsets inside
  the data section, tensors neither overlapping nor leaving gaps, the data section exactly
  covered. A violation is one CheckpointError naming the file, the tensor and the rule.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    try:
      size = self.path.stat().st_size
      with open(self.path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
          raise self._error(f"truncated: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
          raise self._error(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
                            f"(not a safetensors file, or corrupt)")
        if n > size - 8:
          raise self._error(f"header length {n} exceeds the file ({size} bytes): truncated")
        blob = f.read(n)
    except OSError as e:
      raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from None
    header = self._parse(blob)
    self.metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(self.metadata, dict)
            and all(isinstance(v, str) for v in self.metadata.values())):
      raise self._error("__metadata__ must map strings to strings")
    self._base = 8 + n
    self._entries = {key: self._check_entry(key, e, size - self._base)
                     for key, e in header.items()}
    self._check_layout(size - self._base)
    self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if self._entries else None

  def _error(self, rule: str, key=None) -> CheckpointError:
    where = f"tensor {_name(key)}: " if key is not None else ""
    return CheckpointError(f"{self.path}: {where}{rule}")

  def _parse(self, blob: bytes) -> dict:
    try:
      header = json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
      raise self._error("header is not UTF-8 (not a safetensors file, or corrupt)") from None
    except json.JSONDecodeError as e:
      raise self._error(f"header is not valid JSON (column {e.colno}: {e.msg}; not a "
                        f"safetensors file, or corrupt)") from None
    except CheckpointError as e:
      raise self._error(f"header: {e}") from None
    if not isinstance(header, dict):
      raise self._error("header must be a JSON object")
    return header

  def _check_entry(self, key, e, data_bytes: int) -> dict:
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
      raise self._error("entry must have exactly dtype, shape and data_offsets", key)
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
      raise self._error(f"unknown dtype {_name(dtype)} (known: {', '.join(DTYPES)})", key)
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
      raise self._error(f"shape must be a list of non-negative integers, got {_name(shape)}",
                        key)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and 0 <= offsets[0] <= offsets[1]):
      raise self._error(f"data_offsets must be [begin, end] with 0 <= begin <= end, got "
                        f"{_name(offsets)}", key)
    begin, end = offsets
    want = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != want:
      raise self._error(f"shape {shape} x {DTYPES[dtype].itemsize}-byte {dtype} is {want} "
                        f"bytes, but data_offsets [{begin}, {end}] span {end - begin}", key)
    if end > data_bytes:
      raise self._error(f"data_offsets [{begin}, {end}] run past the data section "
                        f"({data_bytes} bytes): out of bounds, or the file is truncated", key)
    return e

  def _check_layout(self, data_bytes: int) -> None:
    """Tensors in offset order tile the data section exactly: no overlap, no gap, no tail."""
    prev_key, prev_end = None, 0
    for key, e in sorted(self._entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
      begin, end = e["data_offsets"]
      if begin < prev_end:
        raise self._error(f"data_offsets [{begin}, {end}] overlap tensor {_name(prev_key)} "
                          f"(which ends at {prev_end})", key)
      if begin > prev_end:
        raise self._error(f"gap: bytes {prev_end}..{begin} before it belong to no tensor", key)
      prev_key, prev_end = key, end
    if prev_end != data_bytes:
      raise self._error(f"data section has {data_bytes} bytes but its tensors cover "
                        f"{prev_end}: {data_bytes - prev_end} trailing bytes belong to no "
                        f"tensor")

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._entries[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    e = self._entries[key]
    begin, end = e["data_offsets"]
    flat = self._map[self._base + begin:self._base + end]
    return flat.view(DTYPES[e["dtype"]]).reshape(e["shape"])


def _shard_name(folder: pathlib.Path, index: pathlib.Path, name) -> pathlib.Path:
  """`folder / name` for a plain `.safetensors` file name from an index; anything that could
  reach outside the folder (a path, `..`, an absolute name) is refused unopened. Shards may be
  symlinks (the HF hub cache links snapshot files to its blob store)."""
  if not (isinstance(name, str) and name.endswith(".safetensors") and name not in (".", "..")
          and not set(name) & {"/", "\\", "\0"} and name == os.path.basename(name)):
    raise CheckpointError(f"{index}: weight_map names {_name(name)}: a shard must be a plain "
                          f".safetensors file name inside {folder}")
  path = folder / name
  if not path.is_file():
    raise CheckpointError(f"{index}: weight_map names {_name(name)}, which is not a file in "
                          f"{folder}")
  return path


def _read_index(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> shard path of a sharded folder's index."""
  index = folder / INDEX_NAME
  weight_map = read_checkpoint_json(index, "safetensors index").get("weight_map")
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{index}: no weight_map object")
  shards = {name: _shard_name(folder, index, name) for name in set(weight_map.values())}
  return {key: shards[name] for key, name in weight_map.items()}


class SafetensorsReader:
  """All tensors of a checkpoint folder (sharded with an index, or single files) or one file."""

  def __init__(self, path: str | os.PathLike):
    path = pathlib.Path(path)
    listed = None
    if path.is_file():
      files = [path]
    elif (path / INDEX_NAME).is_file():
      listed = _read_index(path)
      files = sorted(set(listed.values()))
    elif path.is_dir():
      files = sorted(path.glob("*.safetensors"))
    else:
      raise CheckpointError(f"{path}: no such file or folder")
    if not files:
      raise CheckpointError(f"{path}: no .safetensors files found")
    self.files = [SafetensorsFile(f) for f in files]
    self._where: dict[str, SafetensorsFile] = {}
    for f in self.files:
      for k in f.keys():
        if k in self._where:
          raise CheckpointError(f"tensor {_name(k)} appears in both {self._where[k].path} and "
                                f"{f.path}")
        if listed is not None and listed.get(k) != f.path:
          raise CheckpointError(f"{path / INDEX_NAME}: {f.path.name} holds tensor {_name(k)}, "
                                f"which the weight_map does not place there")
        self._where[k] = f
    if listed is not None and len(self._where) != len(listed):
      absent = sorted(set(listed) - set(self._where))
      raise CheckpointError(f"{path / INDEX_NAME}: weight_map places {_name(absent[0])} in "
                            f"{listed[absent[0]].name}, which does not hold it "
                            f"({len(absent)} such tensors)")

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
  with outputs.atomic_file(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, a in items:
      f.write(np.ascontiguousarray(a).tobytes())


def write_sharded(folder: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int = 5 * 2 ** 30) -> None:
  """HF layout: `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`.

  Tensors are grouped in order into shards of at most `max_shard_bytes`; only the shard being
  filled is referenced, so `tensors` can be a generator over a model larger than RAM allows twice.
  `folder` must hold no safetensors yet: new shards beside old ones would load as a mixture (the
  exporters write into a fresh folder, `outputs.atomic_folder`).
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  old = sorted(p.name for p in folder.glob("*.safetensors*"))
  if old:
    raise CheckpointError(f"{folder}: already holds {', '.join(old[:3])}; write a sharded "
                          f"checkpoint into a new folder")
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
