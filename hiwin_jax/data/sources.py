"""Training records and where they come from: the LLaVA json + image folder source.

A source gives the training pipeline random access to raw records: `len(source)`,
`source.inspect(i)` (the record and its image size from the file header, or why it is unusable;
the metadata pass calls it once per record), `source.fetch(i)` (the record and its image, in the
grain workers) and `source.content_key()` (what the metadata cache is keyed on). `JsonSource`
reads a LLaVA json and an image folder; `array_record.ArrayRecordSource` reads the same records
from a prepared dataset (`hiwin data build`). Both give the same records, so the same samples.

A source never holds the list of records: `JsonSource` finds the byte range of every entry in one
streaming pass (`scan_json_list`, cached by the file's content hash) and parses an entry when it
is asked for it. A record's image path must resolve, after `..` and symlinks, inside the image
folder (`resolve_image`); anything else is the bad sample `outside_image_folder` and is never
opened.

Host-side code (numpy, PIL): no jax import.
"""

from __future__ import annotations

import array
import codecs
import dataclasses
import io
import json
import os
import pathlib
import re
import stat
import struct
from typing import Any, Protocol

import numpy as np
from PIL import Image

from hiwin_jax import outputs
from hiwin_jax.data import npy_files


class DataFileError(ValueError):
  """A data file that cannot be read as what it should be (malformed or non-UTF-8 JSON, not a
  list of entries, a missing image folder); the message is one line naming the file and what is
  wrong."""


class RecordError(ValueError):
  """A JSON entry without the LLaVA layout (id, conversations list, optional image path)."""


class HeaderError(ValueError):
  """An image whose header cannot be read (`reason` "unreadable_image"), or that PIL refuses to
  open for its pixel count ("too_many_pixels")."""

  def __init__(self, message: str, reason: str = "unreadable_image"):
    super().__init__(message)
    self.reason = reason


class SampleError(Exception):
  """A sample that cannot be used, with the reason it is counted under (`metadata.REASONS`)."""

  def __init__(self, reason: str, message: str):
    super().__init__(f"{reason}: {message}")
    self.reason, self.message = reason, message


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
  if image is not None and (not isinstance(image, str) or not image or "\0" in image):
    raise RecordError(f"entry {rid!r}: 'image' must be a non-empty path string, got {image!r}")
  return Record(str(rid), image, convs)


def image_folder(folder: str | os.PathLike) -> str:
  """The real path of an image folder (symlinks resolved); DataFileError if it is not one."""
  real = os.path.realpath(folder)
  if not os.path.isdir(real):
    raise DataFileError(f"image folder {os.fspath(folder)!r} does not exist or is not a folder")
  return real


def resolve_image(folder_real: str, rel: str) -> str:
  """The real path of image `rel` of a record, which must lie inside `folder_real` (the real path
  of the image folder) after `..` and symlinks are resolved. Raises SampleError
  ("outside_image_folder") without touching the file otherwise; only the folders on the way are
  looked up."""
  full = os.path.realpath(os.path.join(folder_real, rel))
  if os.path.commonpath([folder_real, full]) != folder_real:
    raise SampleError("outside_image_folder",
                      f"image path {rel!r} resolves to {full}, outside the image folder "
                      f"{folder_real}")
  return full


def regular_file(path: str) -> os.stat_result:
  """`os.stat` of an image file; SampleError unless it is a regular file (a FIFO or a device
  would block or never end when read)."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise SampleError("missing_image", f"no file {path}") from None
  except OSError as e:
    raise SampleError("unreadable_image", f"{path}: {e.strerror}") from None
  if not stat.S_ISREG(st.st_mode):
    raise SampleError("missing_image", f"{path} is not a regular file")
  return st


def _png_trailing_exif(fp) -> bytes | None:
  """The eXIf chunk of a PNG, found by walking the chunk headers (no pixel data is read).
  PIL reads an eXIf chunk behind the image data only when it decodes the image."""
  fp.seek(8)
  while True:
    head = fp.read(8)
    if len(head) < 8:
      return None
    length, kind = struct.unpack(">I4s", head)
    if kind == b"eXIf":
      data = fp.read(length)
      return data if data.startswith(b"Exif\0\0") else b"Exif\0\0" + data
    if kind == b"IEND":
      return None
    fp.seek(length + 4, io.SEEK_CUR)


def _orientation(img: Image.Image, source) -> int | None:
  try:
    if img.format == "PNG" and "exif" not in img.info:
      if isinstance(source, (bytes, bytearray)):
        data = _png_trailing_exif(io.BytesIO(source))
      else:
        with open(source, "rb") as f:
          data = _png_trailing_exif(f)
      if data is None:
        return None
      exif = Image.Exif()
      exif.load(data)
    else:
      exif = img.getexif()
    return exif.get(0x0112)
  except Exception:  # noqa: BLE001  (corrupt EXIF: load_image keeps the image as stored)
    return None


def header_size(source: str | os.PathLike | bytes) -> tuple[int, int]:
  """(width, height) of an image from its header, as `image.load_image` will return it (EXIF
  orientations 5-8 swap the sides); no pixel data is decoded. Raises HeaderError."""
  fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
  try:
    with Image.open(fp) as img:
      width, height = img.size
      orientation = _orientation(img, source)
  except Image.DecompressionBombError as e:
    raise HeaderError(f"{type(e).__name__}: {e}", "too_many_pixels") from e
  except Exception as e:
    raise HeaderError(f"{type(e).__name__}: {e}") from e
  return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


@dataclasses.dataclass(frozen=True)
class Inspected:
  """A record as the metadata pass sees it: `reason` set when it is excluded. `image`: the
  image file read (JsonSource), with `stat` = (size, mtime_ns) at that time, so a cache of
  this result can tell when the file changed."""
  id: str
  record: Record | None
  size: tuple[int, int] | None = None
  reason: str | None = None
  message: str = ""
  image: str | None = None
  stat: tuple[int, int] | None = None


class Source(Protocol):
  """What the metadata pass and the loader need from a source of records (picklable, small:
  a grain worker receives it whole)."""

  def __len__(self) -> int: ...

  def content_key(self) -> str: ...

  def inspect(self, i: int) -> Inspected: ...

  def fetch(self, i: int) -> tuple[Record, Any]: ...


# --- the JSON list, one entry at a time ---------------------------------------------------------

_CHUNK = 1 << 23
_MAX_ENTRY = 1 << 26  # chars; an entry that does not parse within this is malformed
_WS = re.compile(r"[ \t\n\r]*")


class _Stream:
  """UTF-8 text of a file in chunks, with the byte offset, line and column of the cursor."""

  def __init__(self, f, path: str):
    self.f, self.path = f, path
    self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
    self.text, self.pos, self.eof = "", 0, False
    self.byte, self.read_bytes, self.line, self.col = 0, 0, 1, 0

  def fill(self) -> None:
    """Appends the next chunk (at least as much as is buffered, so retries stay linear)."""
    self.text = self.text[self.pos:]
    self.pos = 0
    data = self.f.read(max(_CHUNK, len(self.text)))
    pending = len(self.decoder.getstate()[0])
    try:
      self.text += self.decoder.decode(data, final=not data)
    except UnicodeDecodeError as e:
      where = self.read_bytes - pending + e.start
      raise DataFileError(f"{self.path}: not UTF-8 text: {e.reason} at byte {where}") from None
    self.read_bytes += len(data)
    self.eof = not data

  def at_end(self) -> bool:
    return self.pos == len(self.text) and self.eof

  def skip_ws(self) -> None:
    while True:
      self.advance(_WS.match(self.text, self.pos).end())
      if self.pos < len(self.text) or self.eof:
        return
      self.fill()

  def advance(self, end: int) -> None:
    seg = self.text[self.pos:end]
    newline = seg.rfind("\n")
    if newline >= 0:
      self.line += seg.count("\n")
      self.col = len(seg) - newline - 1
    else:
      self.col += len(seg)
    self.byte += len(seg.encode("utf-8"))
    self.pos = end

  def error(self, at: int, what: str) -> DataFileError:
    seg = self.text[self.pos:at]
    newline = seg.rfind("\n")
    col = (self.col + len(seg) if newline < 0 else len(seg) - newline - 1) + 1
    return DataFileError(f"{self.path}: line {self.line + seg.count(chr(10))} column {col} "
                         f"(byte {self.byte + len(seg.encode('utf-8'))}): {what}")


def _found(text: str, pos: int) -> str:
  if pos >= len(text):
    return "the end of the file"
  return {"{": "a JSON object", '"': "a JSON string"}.get(text[pos], f"{text[pos]!r}")


def scan_json_list(path: str | os.PathLike) -> np.ndarray:
  """Byte ranges int64 [N, 2] (start, end) of the entries of a file holding one JSON list, in
  one streaming pass that parses each entry and keeps none (memory: one chunk). A UTF-8 BOM is
  allowed. Raises DataFileError, one line naming the file, where and what, for non-UTF-8 text,
  malformed JSON, a top level that is not a list, a truncated file or data after the list."""
  path = os.fspath(path)
  decoder = json.JSONDecoder()
  ranges = array.array("q")
  with open(path, "rb") as f:
    s = _Stream(f, path)
    s.fill()
    if s.text.startswith("\ufeff"):
      s.advance(1)
    s.skip_ws()
    if s.at_end():
      raise DataFileError(f"{path}: the file is empty (expected a JSON list of entries)")
    if s.text[s.pos] != "[":
      raise s.error(s.pos, f"expected a JSON list of entries ('['), found {_found(s.text, s.pos)}")
    s.advance(s.pos + 1)
    s.skip_ws()
    closed = s.pos < len(s.text) and s.text[s.pos] == "]"
    if closed:
      s.advance(s.pos + 1)
    n = 0
    while not closed:
      while True:
        try:
          end = decoder.raw_decode(s.text, s.pos)[1]
          if end < len(s.text) or s.eof:
            break
        except json.JSONDecodeError as e:
          if s.eof or len(s.text) - s.pos > _MAX_ENTRY:
            raise s.error(e.pos, f"entry {n} is not valid JSON: {e.msg}") from None
        s.fill()
      start = s.byte
      s.advance(end)
      ranges.extend((start, s.byte))
      n += 1
      s.skip_ws()
      if s.at_end():
        raise s.error(s.pos, f"the list ends after entry {n - 1} without its closing ']' "
                             "(truncated file?)")
      sep = s.text[s.pos]
      if sep not in ",]":
        raise s.error(s.pos, f"expected ',' or ']' after entry {n - 1}, found "
                             f"{_found(s.text, s.pos)}")
      s.advance(s.pos + 1)
      closed = sep == "]"
      if not closed:
        s.skip_ws()
    s.skip_ws()
    if not s.at_end():
      raise s.error(s.pos, f"unexpected {_found(s.text, s.pos)} after the list's closing ']'")
  return np.frombuffer(ranges, np.int64).reshape(-1, 2).copy()


class JsonSource:
  """LLaVA json + image folder, read one entry at a time (module docstring).

  `index_dir`: where the entries' byte ranges are kept (`json-<content hash>.npy`, found again
  by later runs and processes); None keeps them in memory (and pickles them to grain workers)."""

  def __init__(self, json_path: str | os.PathLike, image_folder: str | os.PathLike,
               index_dir: str | os.PathLike | None = None):
    self.json_path = os.fspath(json_path)
    self.image_folder = os.fspath(image_folder)
    self.index_dir = None if index_dir is None else os.fspath(index_dir)
    self._digest = self._folder = None
    self._index: npy_files.RowFile | np.ndarray | None = None
    self._file = None

  def __getstate__(self):
    return self.__dict__ | {"_file": None}

  def _open(self):
    if self._index is None:
      if not os.path.isfile(self.json_path):
        raise DataFileError(f"data json {self.json_path!r} does not exist or is not a file")
      self._folder = image_folder(self.image_folder)
      self._digest = outputs.file_digest(self.json_path, "blake2b", digest_size=20)
      if self.index_dir is None:
        self._index = scan_json_list(self.json_path)
      else:
        path = pathlib.Path(self.index_dir, f"json-{self._digest}.npy")
        if not path.is_file():
          path.parent.mkdir(parents=True, exist_ok=True)
          npy_files.save_atomic(path, scan_json_list(self.json_path))
        self._index = npy_files.RowFile(path)
    if self._file is None:
      self._file = open(self.json_path, "rb", buffering=0)  # kept: one pread per entry
    return self._index

  def __len__(self) -> int:
    return len(self._open())

  def raw(self, i: int) -> Any:
    start, end = (int(x) for x in self._open()[i])
    return json.loads(os.pread(self._file.fileno(), end - start, start))

  @property
  def digest(self) -> str:
    """The json file's content hash."""
    self._open()
    return self._digest

  def content_key(self) -> str:
    return f"json {self.digest} images {self._folder}"

  def _image(self, record: Record) -> tuple[str, os.stat_result]:
    path = resolve_image(self._folder, record.image_path)
    return path, regular_file(path)

  def inspect(self, i: int) -> Inspected:
    raw = self.raw(i)
    rid = str(raw.get("id")) if isinstance(raw, dict) else ""
    try:
      record = parse_record(raw)
    except RecordError as e:
      return Inspected(rid, None, reason="bad_record", message=str(e))
    if record.image_path is None:
      return Inspected(rid, record)
    try:
      path, st = self._image(record)
    except SampleError as e:
      return Inspected(rid, record, reason=e.reason, message=e.message)
    seen = (st.st_size, st.st_mtime_ns)
    try:
      return Inspected(rid, record, size=header_size(path), image=path, stat=seen)
    except HeaderError as e:
      return Inspected(rid, record, reason=e.reason, message=f"{path}: {e}", image=path,
                       stat=seen)

  def fetch(self, i: int) -> tuple[Record, Any]:
    """The record and its image (a path inside the image folder; None for text-only).
    Raises SampleError when the image path no longer resolves to a file inside the folder."""
    record = parse_record(self.raw(i))
    return record, (None if record.image_path is None else self._image(record)[0])
