"""The ArrayRecord dataset of LLaVA conversations: its writer (`build`, a TFDS
`GeneratorBasedBuilder` over a LLaVA json + image folder) and its reader (`ArrayRecordSource`).

Written with `file_format="array_record"` and read back with `builder.as_data_source()`, so neither
writing nor reading needs tensorflow. One record per JSON entry, in JSON order
(`disable_shuffling=True`, keys are the entry indices), so `ArrayRecordSource` and
`sources.JsonSource` give the training pipeline the same records and therefore the same samples.
Bad entries are written too, with the reason, and excluded by the metadata pass exactly as the
JSON source would exclude them.

Features (bytes-valued as read back by the data source):
  id           the entry's id (str(id); "" when the entry has none)
  image        the image file's encoded bytes, as stored on disk (b"" for text-only or missing)
  image_path   the entry's "image" field ("" for text-only); kept for path-dependent rules
               (the TextVQA pre-resize)
  conversations  the entry's "conversations" as a JSON string
  width, height  image size from the file header, EXIF orientation applied (0 when unknown)
  error        "" or "<reason>: <message>" for a bad record / missing / unreadable image
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from hiwin_jax.data import sources

DATASET_NAME = "llava_conversations"
VERSION = "1.0.0"


def _tfds():
  import tensorflow_datasets as tfds  # heavy import; only the ArrayRecord paths need it
  return tfds


def _builder_class():
  from etils import epath
  tfds = _tfds()

  class LlavaConversations(tfds.core.GeneratorBasedBuilder):
    """LLaVA JSON conversations and their encoded images, one record per JSON entry."""

    VERSION = tfds.core.Version(VERSION)
    # tfds derives this from the module's package resources, which needs `importlib_resources`
    # (not installed); it only locates optional checksum/metadata files beside the builder.
    code_path = epath.Path(__file__)

    def __init__(self, *, json_path: str | None = None, image_folder: str | None = None, **kw):
      self._json_path = json_path
      self._image_folder = image_folder
      super().__init__(**kw)

    def _info(self):
      f = tfds.features
      return tfds.core.DatasetInfo(
          builder=self,
          description="LLaVA-format conversations with encoded image bytes (hiwin_jax).",
          features=f.FeaturesDict({
              "id": f.Text(),
              "image": f.Tensor(shape=(), dtype=np.object_),
              "image_path": f.Text(),
              "conversations": f.Text(),
              "width": f.Scalar(dtype=np.int32),
              "height": f.Scalar(dtype=np.int32),
              "error": f.Text(),
          }),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      source = sources.JsonSource(self._json_path, self._image_folder)
      for i in range(len(source)):
        yield i, _example(source, i)

  LlavaConversations.__name__ = "LlavaConversations"
  return LlavaConversations


def _example(source: sources.JsonSource, i: int) -> dict:
  raw = source.raw(i)
  out = {"id": "", "image": b"", "image_path": "", "conversations": "null", "width": 0,
         "height": 0, "error": ""}
  if isinstance(raw, dict):
    out["id"] = "" if raw.get("id") is None else str(raw.get("id"))
    image = raw.get("image")
    out["image_path"] = image if isinstance(image, str) else ""
    out["conversations"] = json.dumps(raw.get("conversations"))
  try:
    record = sources.parse_record(raw)
  except sources.RecordError as e:
    out["error"] = f"bad_record: {e}"
    return out
  if record.image_path is None:
    return out
  path = source.image_file(record.image_path)
  if not os.path.isfile(path):
    out["error"] = f"missing_image: no file {path}"
    return out
  out["image"] = pathlib.Path(path).read_bytes()
  try:
    out["width"], out["height"] = sources.header_size(out["image"])
  except sources.HeaderError as e:
    out["error"] = f"unreadable_image: {e}"
  return out


def build(json_path: str, image_folder: str, out_dir: str) -> str:
  """Writes the ArrayRecord dataset under `out_dir`; returns the folder to read it from
  (`out_dir/llava_conversations/1.0.0`, the `data.array_record_dir` of `config.data_config`)."""
  tfds = _tfds()
  builder = _builder_class()(json_path=str(json_path), image_folder=str(image_folder),
                             data_dir=str(out_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return str(builder.data_dir)


def data_source(dataset_dir: str):
  """The random-access `ArrayRecordDataSource` of the "train" split of a dataset `build` wrote
  (`dataset_dir` is the versioned folder, or `out_dir` of `build`)."""
  tfds = _tfds()
  path = pathlib.Path(dataset_dir)
  if not (path / "dataset_info.json").is_file():
    candidate = path / DATASET_NAME / VERSION
    if (candidate / "dataset_info.json").is_file():
      path = candidate
    else:
      raise FileNotFoundError(f"{dataset_dir}: no ArrayRecord dataset here (no dataset_info.json; "
                              f"write one with `hiwin data build`)")
  return tfds.builder_from_directory(str(path)).as_data_source(split="train")


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class ArrayRecordSource:
  """A dataset `build` wrote, as a training source (`sources.Source`), read without tensorflow."""

  def __init__(self, dataset_dir: str | os.PathLike):
    self.dataset_dir = str(dataset_dir)
    self._ds = None

  def __getstate__(self):
    return {"dataset_dir": self.dataset_dir, "_ds": None}

  def _data(self):
    if self._ds is None:
      self._ds = data_source(self.dataset_dir)
    return self._ds

  def __len__(self) -> int:
    return len(self._data())

  def fingerprint(self) -> list:
    return sources.file_fingerprint([p for p in pathlib.Path(self.dataset_dir).rglob("*")
                                     if p.is_file()])

  def _row(self, i: int) -> tuple[dict, sources.Record | None]:
    row = self._data()[i]
    error = _text(row["error"])
    if error:
      return row, None
    path = _text(row["image_path"])
    return row, sources.Record(_text(row["id"]), path or None,
                               json.loads(_text(row["conversations"])))

  def inspect(self, i: int) -> sources.Inspected:
    row, record = self._row(i)
    rid = _text(row["id"])
    if record is None:
      reason, _, message = _text(row["error"]).partition(": ")
      return sources.Inspected(rid, None, reason=reason, message=message)
    if record.image_path is None:
      return sources.Inspected(rid, record)
    return sources.Inspected(rid, record, size=(int(row["width"]), int(row["height"])))

  def fetch(self, i: int) -> tuple[sources.Record, Any]:
    """The record and its image (the encoded bytes; None for text-only)."""
    row, record = self._row(i)
    if record is None:
      raise sources.RecordError(_text(row["error"]))
    return record, (None if record.image_path is None else bytes(row["image"]))
