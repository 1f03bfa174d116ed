"""Training records and where they come from: the LLaVA json + image folder source.

A source gives the training pipeline random access to raw records: `len(source)`,
`source.inspect(i)` (the record and its image size from the file header, or why it is unusable;
the metadata pass calls it once per record), `source.fetch(i)` (the record and its image, in the
grain workers) and `source.fingerprint()` (what the metadata cache is keyed on). `JsonSource`
reads a LLaVA json and an image folder; `array_record.ArrayRecordSource` reads the same records
from an ArrayRecord dataset. Both give the same records, so the same samples.

Host-side code (numpy, PIL): no jax import.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
from typing import Any, Protocol

from PIL import Image


class RecordError(ValueError):
  """A JSON entry without the LLaVA layout (id, conversations list, optional image path)."""


class HeaderError(ValueError):
  """An image whose header cannot be read."""


@dataclasses.dataclass(frozen=True)
class Record:
  id: str
  image_path: str | None  # as written in the json (relative to the image folder)
  conversations: list


def parse_record(raw: Any) -> Record:
  """Checks the LLaVA json layout of one entry; raises RecordError. The messages themselves are
  checked by `conversation.preprocess` (reason bad_conversation)."""
  if not isinstance(raw, dict):
    raise RecordError(f"an entry must be a JSON object, got {type(raw).__name__}")
  rid = raw.get("id")
  if rid is None or isinstance(rid, bool) or not isinstance(rid, (str, int)):
    raise RecordError(f"entry has no string or integer 'id' (got {rid!r})")
  convs = raw.get("conversations")
  if not isinstance(convs, list):
    raise RecordError(f"entry {rid!r}: 'conversations' must be a list, got "
                      f"{type(convs).__name__}")
  image = raw.get("image")
  if image is not None and (not isinstance(image, str) or not image):
    raise RecordError(f"entry {rid!r}: 'image' must be a non-empty path string, got {image!r}")
  return Record(str(rid), image, convs)


def header_size(source: str | os.PathLike | bytes) -> tuple[int, int]:
  """(width, height) of an image from its header, as `image.load_image` will return it (EXIF
  orientations 5-8 swap the sides). Raises HeaderError."""
  fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
  try:
    with Image.open(fp) as img:
      width, height = img.size
      try:
        orientation = img.getexif().get(0x0112)
      except Exception:  # noqa: BLE001  (corrupt EXIF: load_image keeps the image as stored)
        orientation = None
  except Exception as e:
    raise HeaderError(f"{type(e).__name__}: {e}") from e
  return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


@dataclasses.dataclass(frozen=True)
class Inspected:
  """A record as the metadata pass sees it: `reason` set when it is excluded."""
  id: str
  record: Record | None
  size: tuple[int, int] | None = None
  reason: str | None = None
  message: str = ""


class Source(Protocol):
  """What the metadata pass and the loader need from a source of records (picklable)."""

  def __len__(self) -> int: ...

  def fingerprint(self) -> list: ...

  def inspect(self, i: int) -> Inspected: ...

  def fetch(self, i: int) -> tuple[Record, Any]: ...


def file_fingerprint(paths: list[pathlib.Path]) -> list:
  """[path, size, mtime] of each file, sorted: a source's part of the metadata cache key."""
  out = []
  for p in sorted(paths):
    st = p.stat()
    out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
  return out


class JsonSource:
  """LLaVA json + image folder. The json is parsed lazily (and again in each grain worker)."""

  def __init__(self, json_path: str | os.PathLike, image_folder: str | os.PathLike):
    self.json_path = str(json_path)
    self.image_folder = str(image_folder)
    self._records = None

  def __getstate__(self):
    return {"json_path": self.json_path, "image_folder": self.image_folder, "_records": None}

  def _all(self) -> list:
    if self._records is None:
      with open(self.json_path, encoding="utf-8") as f:
        data = json.load(f)
      if not isinstance(data, list):
        raise ValueError(f"{self.json_path}: expected a JSON list of samples, got "
                         f"{type(data).__name__}")
      self._records = data
    return self._records

  def __len__(self) -> int:
    return len(self._all())

  def raw(self, i: int) -> Any:
    return self._all()[i]

  def image_file(self, rel: str) -> str:
    return os.path.join(self.image_folder, rel)

  def fingerprint(self) -> list:
    return [self.image_folder] + file_fingerprint([pathlib.Path(self.json_path)])

  def inspect(self, i: int) -> Inspected:
    raw = self.raw(i)
    rid = str(raw.get("id")) if isinstance(raw, dict) else ""
    try:
      record = parse_record(raw)
    except RecordError as e:
      return Inspected(rid, None, reason="bad_record", message=str(e))
    if record.image_path is None:
      return Inspected(rid, record)
    path = self.image_file(record.image_path)
    if not os.path.isfile(path):
      return Inspected(rid, record, reason="missing_image", message=f"no file {path}")
    try:
      return Inspected(rid, record, size=header_size(path))
    except HeaderError as e:
      return Inspected(rid, record, reason="unreadable_image", message=f"{path}: {e}")

  def fetch(self, i: int) -> tuple[Record, Any]:
    """The record and its image (a path; None for text-only)."""
    record = parse_record(self.raw(i))
    image = None if record.image_path is None else self.image_file(record.image_path)
    return record, image
