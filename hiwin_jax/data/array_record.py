"""The prepared dataset: a LLaVA json + image folder written once as ArrayRecord files
(`build`, `hiwin data build`), and its reader (`ArrayRecordSource`).

Layout of the folder `build` writes (what `data.array_record_dir` names):
  prepared.json              the manifest: format, version, shard files with their counts, the
                             content digest, counts of bad entries by reason, the source's paths
  records-00000.array_record ...  one record per JSON entry, in JSON order (so both sources give
                             the same plan and the same batches): the entry as compact JSON
                             {"id", "image", "conversations", "at": [image shard, slot] | null,
                             "size": [w, h] | null, "error": "reason: message" | ""}
  images-00000.array_record ...   each distinct image file once, its encoded bytes as stored on
                             disk (ArrayRecord, uncompressed: JPEG/PNG are compressed already)
  cache/                     the metadata pass's cache (`data.cache_dir` unset), written by runs

Only an image that resolves inside the image folder, is a regular file, declares at most
`max_pixels` pixels in its header and then decodes completely is stored; anything else is kept
as the entry's error and counted like the JSON source counts it. A file outside the folder is
never opened. The digest hashes the JSON's bytes and every stored image's bytes (and the pixel
budget): the same inputs give the same digest, whatever the folder's name or the worker count,
so later runs and every host find their metadata cache by content.

Written in three passes over the cores of the host (`parallel.run_tasks`), never holding the
parsed entries: (A) entries -> image paths, checked for containment; (B) each distinct image
read once, validated and written to its image shard; (C) entries -> record shards. Reading uses
`ArrayRecordReader.seek` + `read` per record: the reader's `read([i])` (what grain's
`ArrayRecordDataSource` calls) costs time in proportion to the records of the file per call
(BUILD_NOTES.md, issue 16).

Host-side code (numpy, PIL, array_record): no jax import.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import threading
from typing import Any

import numpy as np

from hiwin_jax import outputs
from hiwin_jax.data import image, parallel, sources

FORMAT = "hiwin-prepared-llava"
VERSION = 2
MANIFEST = "prepared.json"
# What `hiwin data build --overwrite` may replace: a folder holding only an earlier build's files
# and the metadata cache training keeps beside them (`loader.cache_dir`: `cache/`).
PREPARED_DATASET = outputs.OutputKind("a prepared dataset of `hiwin data build`",
                                      (MANIFEST, "records-*.array_record",
                                       "images-*.array_record", "cache"))
RECORDS_PER_SHARD = 16384
IMAGES_PER_SHARD = 4096
_OPEN_READERS = 64  # per process; a pod-sized dataset has hundreds of image shards


def _arm():
  from array_record.python import array_record_module
  return array_record_module


# --- writing ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Build:
  """What every task of the build needs (sent once to each worker process)."""
  source: sources.JsonSource
  folder: str  # real path of the image folder
  max_pixels: int


def _entry(build: _Build, i: int) -> tuple[Any, sources.Record | None, str]:
  raw = build.source.raw(i)
  try:
    return raw, sources.parse_record(raw), ""
  except sources.RecordError as e:
    return raw, None, f"bad_record: {e}"


def _pass_a(build: _Build, span: tuple[int, int]) -> list[tuple[str | None, str]]:
  """Per entry: (real image path to read or None, error or "")."""
  out = []
  for i in range(*span):
    _, record, error = _entry(build, i)
    path = None
    if record is not None and record.image_path is not None:
      try:
        path = sources.resolve_image(build.folder, record.image_path)
      except sources.SampleError as e:
        error = f"{e.reason}: {e.message}"
    out.append((path, error))
  return out


def _validated(path: str, max_pixels: int) -> tuple[bytes, tuple[int, int]]:
  """The bytes of an image file we would train on, and its size; SampleError otherwise."""
  sources.regular_file(path)
  try:
    width, height = sources.header_size(path)
  except sources.HeaderError as e:
    raise sources.SampleError(e.reason, f"{path}: {e}") from None
  if width * height > max_pixels:
    raise sources.SampleError("too_many_pixels", f"{path} is {width}x{height} = "
                              f"{width * height:,} pixels, more than the budget of {max_pixels:,}")
  with open(path, "rb") as f:
    data = f.read()
  try:
    image.load_image(data, name=path, max_pixels=max_pixels)
    size = sources.header_size(data)
  except (image.ImageError, sources.HeaderError) as e:
    raise sources.SampleError("unreadable_image", str(e)) from None
  return data, size


def _pass_b(build: _Build, task: tuple[str, list[str]]) -> list[tuple[int, list | None, str, str]]:
  """Writes one image shard; per image: (slot or -1, size, error, content hash)."""
  out_path, paths = task
  writer = _arm().ArrayRecordWriter(out_path, "group_size:1,uncompressed")
  out, slot = [], 0
  try:
    for path in paths:
      try:
        data, size = _validated(path, build.max_pixels)
      except sources.SampleError as e:
        out.append((-1, None, f"{e.reason}: {e.message}", ""))
        continue
      writer.write(data)
      out.append((slot, list(size), "", hashlib.blake2b(data, digest_size=20).hexdigest()))
      slot += 1
  finally:
    writer.close()
  return out


def _pass_c(build: _Build, task: tuple[str, int, int, list, dict]) -> collections.Counter:
  """Writes one record shard; returns the errors by reason."""
  out_path, lo, hi, where, images = task
  writer = _arm().ArrayRecordWriter(out_path, "group_size:1")
  counts = collections.Counter()
  try:
    for i, (error, image_id) in zip(range(lo, hi), where):
      raw, record, _ = _entry(build, i)
      at = size = None
      if not error and image_id >= 0:
        shard, slot, size, error = images[image_id]
        at = [shard, slot] if not error else None
      if error:
        counts[error.partition(":")[0]] += 1
      rid = "" if not isinstance(raw, dict) or raw.get("id") is None else str(raw["id"])
      entry = {"id": rid, "error": error}
      if record is not None:
        entry.update(image=record.image_path, conversations=record.conversations, at=at,
                     size=size)
      writer.write(json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode())
  finally:
    writer.close()
  return counts


def build(json_path: str | os.PathLike, image_folder: str | os.PathLike,
          out_dir: str | os.PathLike, *, max_pixels: int = image.MAX_IMAGE_PIXELS,
          workers: int = 0, overwrite: bool = False) -> str:
  """Writes the prepared dataset of a LLaVA json + image folder to `out_dir` (module
  docstring) and returns its path (the `data.array_record_dir` of `config.data_config`).

  The folder appears complete or not at all (outputs.atomic_folder). An existing non-empty
  `out_dir` is an outputs.OutputError unless `overwrite`, and then only if it holds nothing but
  an earlier prepared dataset (PREPARED_DATASET). `workers`: processes (0: one per core).
  Raises sources.DataFileError for a malformed json or a missing image folder."""
  json_path = os.fspath(json_path)
  folder = sources.image_folder(image_folder)
  with outputs.atomic_folder(out_dir, PREPARED_DATASET, overwrite=overwrite,
                             flag="--out") as tmp:
    source = sources.JsonSource(json_path, folder, index_dir=tmp / "index")
    num = len(source)  # the streaming scan: entries' byte ranges, none kept
    state = _Build(source, folder, int(max_pixels))
    spans = [(lo, min(lo + RECORDS_PER_SHARD, num)) for lo in range(0, num, RECORDS_PER_SHARD)]

    # A: image paths; each distinct file gets an id in the order of first use.
    ids: dict[str, int] = {}
    image_id = np.full(num, -1, np.int64)
    errors: dict[int, str] = {}
    for (lo, _), part in zip(spans, parallel.run_tasks(_pass_a, state, spans, workers=workers)):
      for i, (path, error) in enumerate(part, lo):
        if error:
          errors[i] = error
        elif path is not None:
          image_id[i] = ids.setdefault(path, len(ids))
    paths = list(ids)
    del ids
    hasher = hashlib.blake2b(digest_size=20)
    hasher.update(json.dumps([FORMAT, VERSION, source.digest, int(max_pixels),
                              sorted((i, e.partition(":")[0]) for i, e in errors.items())]
                             ).encode())
    hasher.update(image_id.tobytes())

    # B: each distinct image once, into its shard.
    image_files, images = [], []
    b_tasks = [(str(tmp / f"images-{k:05d}.array_record"), paths[lo:lo + IMAGES_PER_SHARD])
               for k, lo in enumerate(range(0, len(paths), IMAGES_PER_SHARD))]
    for k, part in enumerate(parallel.run_tasks(_pass_b, state, b_tasks, workers=workers)):
      for slot, size, error, content in part:
        images.append((k, slot, size, error))
        hasher.update(f"{content or error.partition(':')[0]}\n".encode())
      image_files.append([pathlib.Path(b_tasks[k][0]).name, sum(s >= 0 for s, *_ in part)])

    # C: the records, with where their image is.
    c_tasks = []
    for k, (lo, hi) in enumerate(spans):
      used = {int(j): images[j] for j in np.unique(image_id[lo:hi]) if j >= 0}
      where = [(errors.get(i, ""), int(image_id[i])) for i in range(lo, hi)]
      c_tasks.append((str(tmp / f"records-{k:05d}.array_record"), lo, hi, where, used))
    counts = collections.Counter()
    for part in parallel.run_tasks(_pass_c, state, c_tasks, workers=workers):
      counts.update(part)
    record_files = [[pathlib.Path(t[0]).name, t[2] - t[1]] for t in c_tasks]

    shutil.rmtree(tmp / "index")
    manifest = {"format": FORMAT, "version": VERSION, "digest": hasher.hexdigest(),
                "num_records": num, "num_images": sum(n for _, n in image_files),
                "records": record_files, "images": image_files, "max_pixels": int(max_pixels),
                "errors": dict(sorted(counts.items())),
                "source": {"json": os.path.abspath(json_path), "image_folder": folder}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
  return os.path.abspath(out_dir)


# --- reading ------------------------------------------------------------------------------------

def read_manifest(dataset_dir: str | os.PathLike) -> dict:
  """The manifest of a prepared dataset; sources.DataFileError (one line) if there is none."""
  path = pathlib.Path(dataset_dir)
  if (path / "dataset_info.json").is_file() or (path / "llava_conversations").is_dir():
    raise sources.DataFileError(f"{path}: an ArrayRecord dataset of an older hiwin (TFDS "
                                "layout); rebuild it with `hiwin data build`")
  try:
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise sources.DataFileError(f"{path}: no prepared dataset here (no {MANIFEST}; write one "
                                "with `hiwin data build`)") from None
  except (OSError, ValueError) as e:
    raise sources.DataFileError(f"{path / MANIFEST}: unreadable ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise sources.DataFileError(f"{path / MANIFEST}: not a hiwin prepared dataset manifest")
  if manifest.get("version") != VERSION:
    raise sources.DataFileError(f"{path / MANIFEST}: version {manifest.get('version')}, this "
                                f"hiwin reads version {VERSION}; rebuild with `hiwin data build`")
  return manifest


class ArrayRecordSource:
  """A dataset `build` wrote, as a training source (`sources.Source`). Picklable and small: a
  process opens the shard files it reads, at most `_OPEN_READERS` at a time."""

  def __init__(self, dataset_dir: str | os.PathLike):
    self.dataset_dir = os.fspath(dataset_dir)
    self.manifest = read_manifest(self.dataset_dir)
    self._starts = np.cumsum([0] + [n for _, n in self.manifest["records"]])
    self._readers: collections.OrderedDict | None = None
    self._lock = None

  def __getstate__(self):
    return self.__dict__ | {"_readers": None, "_lock": None}

  def _read(self, name: str, index: int) -> bytes:
    if self._lock is None:
      self._lock, self._readers = threading.Lock(), collections.OrderedDict()
    with self._lock:  # grain's reading threads share the readers; seek + read is one step
      reader = self._readers.pop(name, None)
      if reader is None:
        reader = _arm().ArrayRecordReader(os.path.join(self.dataset_dir, name),
                                          "readahead_buffer_size:0")
        if len(self._readers) >= _OPEN_READERS:
          self._readers.popitem(last=False)[1].close()
      self._readers[name] = reader
      reader.seek(index)
      return reader.read()

  def __len__(self) -> int:
    return int(self.manifest["num_records"])

  def content_key(self) -> str:
    return f"prepared {self.manifest['digest']}"

  def entry(self, i: int) -> dict:
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} outside [0, {len(self)})")
    k = int(np.searchsorted(self._starts, i, side="right")) - 1
    return json.loads(self._read(self.manifest["records"][k][0], i - int(self._starts[k])))

  def inspect(self, i: int) -> sources.Inspected:
    entry = self.entry(i)
    if entry["error"]:
      reason, _, message = entry["error"].partition(": ")
      return sources.Inspected(entry["id"], None, reason=reason, message=message)
    record = sources.Record(entry["id"], entry["image"], entry["conversations"])
    return sources.Inspected(entry["id"], record,
                             size=None if entry["size"] is None else tuple(entry["size"]))

  def fetch(self, i: int) -> tuple[sources.Record, Any]:
    """The record and its image (the encoded bytes; None for text-only)."""
    entry = self.entry(i)
    if entry["error"]:
      reason, _, message = entry["error"].partition(": ")
      raise sources.SampleError(reason, message)
    record = sources.Record(entry["id"], entry["image"], entry["conversations"])
    if entry["at"] is None:
      return record, None
    shard, slot = entry["at"]
    return record, self._read(self.manifest["images"][shard][0], slot)
