"""LLaVA-format JSON + image folder -> an ArrayRecord dataset (a TFDS `GeneratorBasedBuilder`).

Written with `file_format="array_record"` and read back with `builder.as_data_source()`, so neither
writing nor reading needs tensorflow (environment.md). One record per JSON entry, in JSON order
(`disable_shuffling=True`, keys are the entry indices), so the ArrayRecord source and the JSON
source give the training pipeline the same records and therefore the same samples. Bad entries are
written too, with the reason, and excluded by the pipeline's metadata pass exactly as the JSON
source would exclude them.

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

import numpy as np

from hiwin_jax.data import pipeline

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
      source = pipeline.JsonSource(self._json_path, self._image_folder)
      for i in range(len(source)):
        yield i, _example(source, i)

  LlavaConversations.__name__ = "LlavaConversations"
  return LlavaConversations


def _example(source: pipeline.JsonSource, i: int) -> dict:
  raw = source.raw(i)
  out = {"id": "", "image": b"", "image_path": "", "conversations": "null", "width": 0,
         "height": 0, "error": ""}
  if isinstance(raw, dict):
    out["id"] = "" if raw.get("id") is None else str(raw.get("id"))
    image = raw.get("image")
    out["image_path"] = image if isinstance(image, str) else ""
    out["conversations"] = json.dumps(raw.get("conversations"))
  try:
    record = pipeline.parse_record(raw)
  except pipeline.RecordError as e:
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
    out["width"], out["height"] = pipeline.header_size(out["image"])
  except pipeline.HeaderError as e:
    out["error"] = f"unreadable_image: {e}"
  return out


def build(json_path: str, image_folder: str, out_dir: str) -> str:
  """Writes the ArrayRecord dataset under `out_dir`; returns the folder to read it from
  (`out_dir/llava_conversations/1.0.0`, the `data.array_record_dir` of `pipeline.data_config`)."""
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
