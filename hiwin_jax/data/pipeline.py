"""Training data pipeline: LLaVA conversations + images -> static-shape batches, through grain.

Static shapes across processes come from a *global plan* that every process computes identically:

1. Metadata pass (`scan`, cached under `data.cache_dir`): per record, the JSON layout, the image
   size from the file header (EXIF orientation applied, no decode), the slicing plan (overview only
   when `data.slicing` is False: official stage 1 `--single` slices and discards the slices, which
   leaves exactly the `never_split` overview, spec §1.3-§1.4), the canvas buckets of the overview
   and of the slices (`buckets.default_buckets`) and the exact spliced length (`preprocess` +
   `image_token_count`). Bad records are excluded, logged with their id and counted per reason
   (`REASONS`).
2. Sample key = (overview canvas, slice canvas, number of slices, sequence length rounded up to
   `data.seq_multiple`, capped at `data.max_length`). A global batch holds samples of one key
   only, so its shapes are fully static with no padded item slots.
3. Epoch plan (`Plan.epoch`): the training pre-resize of spec §1.4 (the 10% "towards 6 slices"
   rescale) is drawn per (seed, epoch, record) here, on sizes only, because it changes the key;
   an augmented variant that would exceed `max_length` or the buckets keeps its original size.
   Samples are grouped by key, shuffled within keys, cut into global batches; a key's remainder
   is padded with *filler* copies of its own samples whose labels are all -100 (`remainder="pad"`,
   default: every sample is seen each epoch) or dropped (`"drop"`). The batch order is shuffled.
   Epochs follow each other; step t is a pure function of (metadata, config, t).
4. Loading (`StepLoader`, runs in grain workers): a global batch of G samples is split into k =
   `grad_accum` global micro-batches of G/k, and process p of P takes the p-th contiguous 1/P of
   each micro-batch (micro-batch-major rather than process-major: with k = 1 this is samples
   [p*b, (p+1)*b), and for any k the process-major concatenation of the processes' micro-batch m
   is exactly the micro-batch m that P = 1 produces). Per sample: `load_image`, `train_pre_resize`
   with the planned draw, `slice_image`, `clip_normalize`, `preprocess`, `splice`. A sample whose
   image fails at load time despite a good header is replaced by a filler copy of another sample
   of the batch and counted (reason `unreadable_image` or `size_mismatch`).
5. Output per step: "input_ids", "image_token", "labels" int32 [k, b/k, S], "attention_mask" bool
   [k, b/k, S], "buckets": tuple (ascending configured bucket) of {"pixels": float32 [k, n, 14Hc,
   14Wc, 3], "grid": int32 [k, n, 2]}, "meta" (host only). `image_token` numbers items globally:
   the global array of bucket j is the process-major concatenation of the local slots, so local
   slot s of bucket j on process p is item sum_{j'<j} P*n_{j'} + p*n_j + s, token item*144 + t.
   For P = 1 this is `buckets.make_batch`'s numbering without its slot padding.

Fillers (remainder padding and load failures) have all labels -100: a micro-batch may hold no
supervised token at all, so the loss must divide by max(count, 1).

Host-side code (numpy, PIL, grain): no jax import.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from PIL import Image

from hiwin_jax.data import buckets as bucket_lib
from hiwin_jax.data import image as image_lib
from hiwin_jax.data import layout as layout_lib
from hiwin_jax.data import slicing
from hiwin_jax.data.conversation import IGNORE_INDEX, ConversationError, preprocess
from hiwin_jax.data.tokenizer import IMAGE_TOKEN_INDEX, LlamaSpmTokenizer

log = logging.getLogger(__name__)

REASONS = ("bad_record", "missing_image", "unreadable_image", "bad_image_size",
           "bad_conversation", "mismatch", "too_long", "size_mismatch")
_NO_TRUNCATION = 1 << 30  # preprocess must see whole conversations: too-long ones are excluded
_META_VERSION = 1


def data_config() -> ml_collections.ConfigDict:
  """Fields of `cfg.data` for the LLaVA training stages (stage 1: template plain, slicing False,
  max_length 3072; stage 2: vicuna_v1, slicing True, 4096)."""
  return ml_collections.ConfigDict({
      "format": "json",            # "json" (LLaVA json + image folder) | "array_record"
      "json": "",                  # LLaVA-format json: [{id, image, conversations}]
      "image_folder": "",          # the json's "image" paths are relative to this folder
      "array_record_dir": "",      # written by `hiwin data build`
      "tokenizer": "",             # folder with tokenizer.model (+ tokenizer_config.json)
      "template": "vicuna_v1",     # plain | vicuna_v1 | qwen_1_5
      "slicing": True,             # False: overview only (official stage 1 `--single True`)
      "max_slice_nums": slicing.TRAIN_MAX_SLICE_NUMS,
      "max_length": 4096,          # longer spliced samples are excluded (reason too_long)
      "seq_multiple": 128,         # sequence length bucket granularity
      "global_batch_size": 128,    # samples per optimizer step over all processes
      "grad_accum": 1,             # micro-batches per step (leading axis of every array)
      "seed": 0,
      "shuffle": True,
      "remainder": "pad",          # "pad" (filler samples, labels -100) | "drop"
      "workers": 0,                # grain worker processes; 0 = in the training process
      "prefetch": 2,               # steps prefetched (per worker)
      "cache_dir": "",             # metadata cache; "" = no cache
      "epochs": 1,
  })


def load_tokenizer(path: str | os.PathLike) -> LlamaSpmTokenizer:
  """The LLaMA-style SentencePiece tokenizer of a folder holding `tokenizer.model`."""
  return LlamaSpmTokenizer(path)


# --- records and sources -------------------------------------------------------------------------

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


def _file_fingerprint(paths: list[pathlib.Path]) -> list:
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
    return [self.image_folder] + _file_fingerprint([pathlib.Path(self.json_path)])

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


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class ArrayRecordSource:
  """The ArrayRecord dataset of `tfds_llava.build`, read without tensorflow."""

  def __init__(self, dataset_dir: str | os.PathLike):
    self.dataset_dir = str(dataset_dir)
    self._ds = None

  def __getstate__(self):
    return {"dataset_dir": self.dataset_dir, "_ds": None}

  def _data(self):
    if self._ds is None:
      from hiwin_jax.data import tfds_llava
      self._ds = tfds_llava.data_source(self.dataset_dir)
    return self._ds

  def __len__(self) -> int:
    return len(self._data())

  def fingerprint(self) -> list:
    return _file_fingerprint([p for p in pathlib.Path(self.dataset_dir).rglob("*") if p.is_file()])

  def _row(self, i: int) -> tuple[dict, Record | None]:
    row = self._data()[i]
    error = _text(row["error"])
    if error:
      return row, None
    path = _text(row["image_path"])
    return row, Record(_text(row["id"]), path or None, json.loads(_text(row["conversations"])))

  def inspect(self, i: int) -> Inspected:
    row, record = self._row(i)
    rid = _text(row["id"])
    if record is None:
      reason, _, message = _text(row["error"]).partition(": ")
      return Inspected(rid, None, reason=reason, message=message)
    if record.image_path is None:
      return Inspected(rid, record)
    return Inspected(rid, record, size=(int(row["width"]), int(row["height"])))

  def fetch(self, i: int) -> tuple[Record, Any]:
    row, record = self._row(i)
    if record is None:
      raise RecordError(_text(row["error"]))
    return record, (None if record.image_path is None else bytes(row["image"]))


def make_source(data_cfg) -> JsonSource | ArrayRecordSource:
  if data_cfg.format == "json":
    return JsonSource(data_cfg.json, data_cfg.image_folder)
  if data_cfg.format == "array_record":
    return ArrayRecordSource(data_cfg.array_record_dir)
  raise ValueError(f"data.format must be 'json' or 'array_record', got {data_cfg.format!r}")


# --- geometry ------------------------------------------------------------------------------------

class _SizeOnly:
  """Stands in for a PIL image in `train_pre_resize`: the same size arithmetic, no pixels."""

  def __init__(self, size):
    self.size = (int(size[0]), int(size[1]))

  def resize(self, size, resample=None):
    del resample
    return _SizeOnly(size)


class _Draw:
  """A `rng` for `train_pre_resize` whose one `random()` draw was made by the plan."""

  def __init__(self, value: float):
    self.value = float(value)

  def random(self) -> float:
    return self.value


_NO_DRAW = 1.0  # >= TRAIN_RESIZE_PROB: never augments


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the plan and the loader need from the data and model configs (picklable)."""
  template: str
  slicing: bool
  max_slice_nums: int
  max_length: int
  seq_multiple: int
  global_batch_size: int
  grad_accum: int
  seed: int
  shuffle: bool
  remainder: str
  epochs: int
  layout: str
  newline_token: int
  comma_token: int
  buckets: tuple[tuple[int, int], ...]
  scale_resolution: int = slicing.SCALE_RESOLUTION  # the ViT's input side (model.vision)

  @classmethod
  def from_configs(cls, data_cfg, model_cfg) -> Settings:
    proj = model_cfg.projector if "projector" in model_cfg else model_cfg
    side = (int(model_cfg.vision.image_size) if "vision" in model_cfg
            else slicing.SCALE_RESOLUTION)
    if data_cfg.remainder not in ("pad", "drop"):
      raise ValueError(f"data.remainder must be 'pad' or 'drop', got {data_cfg.remainder!r}")
    return cls(str(data_cfg.template), bool(data_cfg.slicing), int(data_cfg.max_slice_nums),
               int(data_cfg.max_length), int(data_cfg.seq_multiple),
               int(data_cfg.global_batch_size), int(data_cfg.grad_accum), int(data_cfg.seed),
               bool(data_cfg.shuffle), str(data_cfg.remainder), int(data_cfg.epochs),
               str(proj.layout), int(proj.newline_token), int(proj.comma_token),
               bucket_lib.default_buckets((side // slicing.PATCH_SIZE) ** 2), side)

  def plan_slices(self, size) -> slicing.SlicePlan:
    return slicing.plan_slices(size[0], size[1], self.max_slice_nums, self.scale_resolution,
                               never_split=not self.slicing)

  def geometry(self, size) -> tuple[int, int, int, int]:
    """(overview bucket, slice bucket or -1, slices, image tokens) of an image of `size` as the
    slicer sees it; ValueError when the model cannot take it."""
    plan = self.plan_slices(size)
    slicing.check_plan(plan)
    ov = bucket_lib.assign_bucket(*plan.overview_patches, self.buckets)
    sl = -1 if plan.grid is None else bucket_lib.assign_bucket(*plan.slice_patches, self.buckets)
    return ov, sl, plan.num_slices, slicing.image_token_count(plan, self.layout)

  def seq_bucket(self, length):
    m = self.seq_multiple
    return np.minimum(-(-np.asarray(length) // m) * m, self.max_length)


def _is_textvqa(path: str | None) -> bool:
  return path is not None and ("TextVQA" in path or "textvqa" in path)


def _tokenizer_fingerprint(tokenizer) -> list:
  probe = "USER: <image>\nHello, world! 12 ASSISTANT: fine.</s>"
  return [type(tokenizer).__name__, getattr(tokenizer, "vocab_size", None),
          getattr(tokenizer, "legacy", None), list(map(int, tokenizer.encode(probe))),
          list(map(int, tokenizer.tokenizer_image_token(probe)))]


# --- metadata pass -------------------------------------------------------------------------------

_META_FIELDS = ("index", "width", "height", "has_image", "augmentable", "text_len", "ov", "sl",
                "n", "length")


@dataclasses.dataclass
class Metadata:
  """Per kept record (arrays of equal length; `index` is the record's position in the source):
  base size (after the deterministic TextVQA pre-resize), base geometry and spliced length."""
  num_records: int
  arrays: dict[str, np.ndarray]
  counts: dict[str, int]
  excluded: list  # [record index, id, reason, message]

  def __len__(self) -> int:
    return len(self.arrays["index"])


def _empty_counts() -> dict[str, int]:
  return {r: 0 for r in REASONS}


def scan(source, tokenizer, settings: Settings, cache_dir: str | None = None) -> Metadata:
  """The metadata pass over every record (cached in `cache_dir` by source, tokenizer and the
  config fields that change it)."""
  key = json.dumps([_META_VERSION, source.fingerprint(), _tokenizer_fingerprint(tokenizer),
                    settings.template, settings.slicing, settings.max_slice_nums,
                    settings.max_length, settings.layout, settings.buckets,
                    settings.scale_resolution])
  digest = hashlib.sha1(key.encode()).hexdigest()[:20]
  cache = pathlib.Path(cache_dir) / f"hiwin-data-meta-{digest}" if cache_dir else None
  if cache is not None and (cache.with_suffix(".json")).is_file():
    info = json.loads(cache.with_suffix(".json").read_text())
    with np.load(cache.with_suffix(".npz")) as z:
      arrays = {k: z[k] for k in _META_FIELDS}
    meta = Metadata(info["num_records"], arrays, info["counts"], info["excluded"])
    log.info("data metadata from cache %s: %d of %d records kept", cache, len(meta),
             meta.num_records)
    return meta
  meta = _scan(source, tokenizer, settings)
  if cache is not None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".{cache.name}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **meta.arrays)
    os.replace(tmp, cache.with_suffix(".npz"))
    tmp_json = cache.parent / f".{cache.name}.{os.getpid()}.tmp.json"
    tmp_json.write_text(json.dumps({"num_records": meta.num_records, "counts": meta.counts,
                                    "excluded": meta.excluded}))
    os.replace(tmp_json, cache.with_suffix(".json"))  # written last: marks the cache complete
  return meta


def _scan(source, tokenizer, settings: Settings) -> Metadata:
  cols = {k: [] for k in _META_FIELDS}
  counts, excluded = _empty_counts(), []
  num = len(source)
  for i in range(num):
    got = source.inspect(i)
    reason, message = got.reason, got.message
    if reason is None:
      reason, message, row = _check_sample(got, tokenizer, settings)
    if reason is not None:
      counts[reason] = counts.get(reason, 0) + 1
      excluded.append([i, got.id, reason, message])
      log.warning("data: excluding sample %r (record %d): %s: %s", got.id, i, reason, message)
      continue
    cols["index"].append(i)
    for k, v in row.items():
      cols[k].append(v)
  dtypes = {"index": np.int64, "has_image": bool, "augmentable": bool}
  arrays = {k: np.asarray(v, dtypes.get(k, np.int32)) for k, v in cols.items()}
  log.info("data: %d of %d records kept; excluded: %s", len(arrays["index"]), num,
           {k: v for k, v in counts.items() if v})
  return Metadata(num, arrays, counts, excluded)


def _check_sample(got: Inspected, tokenizer, settings: Settings):
  record = got.record
  has_image = record.image_path is not None
  try:
    ex = preprocess(record.conversations, tokenizer, settings.template, has_image,
                    model_max_length=_NO_TRUNCATION)
  except ConversationError as e:
    return "bad_conversation", str(e), None
  if has_image and int(np.count_nonzero(ex.input_ids == IMAGE_TOKEN_INDEX)) != 1:
    return ("bad_conversation", ("a sample with an image needs exactly one '<image>' in its "
            "messages"), None)
  if ex.mismatch:
    return "mismatch", ex.warning, None
  text_len = len(ex.input_ids)
  row = {"width": 0, "height": 0, "has_image": has_image, "augmentable": False,
         "text_len": text_len, "ov": -1, "sl": -1, "n": 0, "length": text_len}
  if has_image:
    base = image_lib.train_pre_resize(_SizeOnly(got.size), record.image_path, _Draw(_NO_DRAW),
                                      scale_resolution=settings.scale_resolution).size
    try:
      ov, sl, n, tokens = settings.geometry(base)
    except ValueError as e:
      return "bad_image_size", str(e), None
    row.update(width=base[0], height=base[1], augmentable=not _is_textvqa(record.image_path),
               ov=ov, sl=sl, n=n, length=text_len - 1 + tokens)
  if row["length"] > settings.max_length:
    return ("too_long", (f"{row['length']} tokens with the image spliced in, more than "
            f"data.max_length={settings.max_length}"), None)
  return None, "", row


# --- the global plan -----------------------------------------------------------------------------

class SampleKey(NamedTuple):
  """The shape class of a sample: canvases (Hc, Wc) in patches (None: no such items)."""
  overview: tuple[int, int] | None
  slices: tuple[int, int] | None
  num_slices: int
  seq_len: int


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """keys [nb, 4] (ov, sl, n, seq_len), members [nb, G] (positions in the metadata arrays),
  filler [nb, G], and per metadata position this epoch's pre-resize draw and spliced length."""
  keys: np.ndarray
  members: np.ndarray
  filler: np.ndarray
  draw: np.ndarray
  length: np.ndarray


class Plan:
  """The global plan: a pure function of (metadata, settings); identical on every process."""

  def __init__(self, meta: Metadata, settings: Settings):
    if len(meta) == 0:
      raise ValueError("no usable training samples: every record was excluded "
                       f"({ {k: v for k, v in meta.counts.items() if v} })")
    self.meta, self.settings = meta, settings
    self._cache: collections.OrderedDict[int, EpochPlan] = collections.OrderedDict()
    steps, keys = [], set()
    for e in range(max(settings.epochs, 1)):
      ep = self.epoch(e)
      steps.append(len(ep.keys))
      keys.update(map(tuple, ep.keys.tolist()))
    self.steps_per_epoch = tuple(steps)
    self._starts = np.cumsum([0] + steps)
    self.key_codes = tuple(sorted(keys))

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = collections.OrderedDict()
    return state

  @property
  def num_steps(self) -> int:
    return int(self._starts[-1])

  def sample_key(self, code) -> SampleKey:
    ov, sl, n, s = (int(x) for x in code)
    bk = self.settings.buckets
    return SampleKey(bk[ov] if ov >= 0 else None, bk[sl] if sl >= 0 else None, n, s)

  @property
  def keys(self) -> list[SampleKey]:
    return [self.sample_key(c) for c in self.key_codes]

  def locate(self, step: int) -> tuple[int, int]:
    if not 0 <= step < self.num_steps:
      raise IndexError(f"step {step} outside the plan's {self.num_steps} steps")
    epoch = int(np.searchsorted(self._starts, step, side="right")) - 1
    return epoch, step - int(self._starts[epoch])

  def epoch(self, e: int) -> EpochPlan:
    if e in self._cache:
      self._cache.move_to_end(e)
      return self._cache[e]
    ep = self._make_epoch(e)
    self._cache[e] = ep
    while len(self._cache) > 2:
      self._cache.popitem(last=False)
    return ep

  def _make_epoch(self, e: int) -> EpochPlan:
    s, a = self.settings, self.meta.arrays
    num = len(self.meta)
    ov, sl, n, length = (a[k].copy() for k in ("ov", "sl", "n", "length"))
    all_draws = np.random.default_rng([s.seed, e, 0]).random(self.meta.num_records)
    draws = np.full(num, _NO_DRAW)
    candidates = a["augmentable"] & (all_draws[a["index"]] < image_lib.TRAIN_RESIZE_PROB)
    for pos in np.flatnonzero(candidates):
      d = float(all_draws[a["index"][pos]])
      base = (int(a["width"][pos]), int(a["height"][pos]))
      new = image_lib.train_pre_resize(_SizeOnly(base), "", _Draw(d),
                                       scale_resolution=s.scale_resolution).size
      if new == base:
        continue
      try:
        g_ov, g_sl, g_n, tokens = s.geometry(new)
      except ValueError:
        continue
      new_len = int(a["text_len"][pos]) - 1 + tokens
      if new_len > s.max_length:
        continue
      draws[pos] = d
      ov[pos], sl[pos], n[pos], length[pos] = g_ov, g_sl, g_n, new_len
    codes = np.stack([ov, sl, n, s.seq_bucket(length)], axis=1).astype(np.int64)
    uniq, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1])
    rng = np.random.default_rng([s.seed, e, 1])
    g = s.global_batch_size
    keys, members, filler = [], [], []
    for u, group in enumerate(groups):
      if s.shuffle:
        group = rng.permutation(group)
      full = len(group) // g
      for b in range(full):
        keys.append(uniq[u])
        members.append(group[b * g:(b + 1) * g])
        filler.append(np.zeros(g, bool))
      rem = len(group) - full * g
      if rem and s.remainder == "pad":
        pad = group[np.arange(g - rem) % len(group)]
        keys.append(uniq[u])
        members.append(np.concatenate([group[full * g:], pad]))
        filler.append(np.arange(g) >= rem)
    if not keys:
      raise ValueError(f"epoch {e} has no full batch of {g} samples per key and "
                       "data.remainder='drop'; use 'pad' or a smaller global batch")
    perm = rng.permutation(len(keys)) if s.shuffle else np.arange(len(keys))
    return EpochPlan(np.asarray(keys, np.int64)[perm], np.asarray(members, np.int64)[perm],
                     np.asarray(filler, bool)[perm], draws, length)


# --- loading a step ------------------------------------------------------------------------------

class _LoadError(Exception):

  def __init__(self, reason: str, message: str):
    super().__init__(f"{reason}: {message}")
    self.reason, self.message = reason, message


@dataclasses.dataclass
class _Sample:
  id: str
  seq: layout_lib.Sequence
  items: list[np.ndarray]  # slices (row-major), then the overview


class StepLoader:
  """grain map: step -> this process's share of the step's global batch (module docstring §4-5).
  Picklable; the plan's epochs are recomputed lazily in each worker."""

  def __init__(self, plan: Plan, source, tokenizer, process_index: int = 0,
               process_count: int = 1):
    s = plan.settings
    g, k, p_count = s.global_batch_size, s.grad_accum, process_count
    if g % k or (g // k) % p_count:
      raise ValueError(f"data.global_batch_size={g} must split into grad_accum={k} micro-batches "
                       f"of equal size divisible by process_count={p_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    self.plan, self.source, self.tokenizer = plan, source, tokenizer
    self.process_index, self.process_count = process_index, process_count
    self.per_micro = g // k // p_count  # samples per process per micro-batch

  def positions(self) -> list[int]:
    """Batch positions of this process, micro-batch-major."""
    s = self.plan.settings
    micro = s.global_batch_size // s.grad_accum
    p0 = self.process_index * self.per_micro
    return [m * micro + p0 + i for m in range(s.grad_accum) for i in range(self.per_micro)]

  def _load(self, pos: int, ep: EpochPlan) -> _Sample:
    s, a = self.plan.settings, self.plan.meta.arrays
    record, image = self.source.fetch(int(a["index"][pos]))
    has_image = record.image_path is not None
    ex = preprocess(record.conversations, self.tokenizer, s.template, has_image,
                    model_max_length=_NO_TRUNCATION)
    items, layouts = [], []
    if has_image:
      try:
        img = image_lib.load_image(image, name=f"{record.id}: {record.image_path}")
      except image_lib.ImageError as e:
        raise _LoadError("unreadable_image", str(e)) from e
      img = image_lib.train_pre_resize(img, record.image_path, _Draw(ep.draw[pos]),
                                       scale_resolution=s.scale_resolution)
      base = (int(a["width"][pos]), int(a["height"][pos]))
      expected = base if _is_textvqa(record.image_path) else image_lib.train_pre_resize(
          _SizeOnly(base), "", _Draw(ep.draw[pos]), scale_resolution=s.scale_resolution).size
      if img.size != expected:
        raise _LoadError("size_mismatch", f"{record.id}: image is {img.size} after the "
                         f"pre-resize, the plan (from its header) expected {expected}")
      res = slicing.slice_image(img, s.max_slice_nums, s.scale_resolution,
                                never_split=not s.slicing)
      items = [image_lib.clip_normalize(x) for x in res.slices + [res.overview]]
      layouts = [layout_lib.image_layout(res.grid, s.layout, s.newline_token, s.comma_token)]
    seq = layout_lib.splice(ex.input_ids, ex.labels, layouts, pad_id=self.tokenizer.pad_id)
    if len(seq.input_ids) != ep.length[pos]:
      raise _LoadError("size_mismatch", f"{record.id}: {len(seq.input_ids)} tokens, the plan "
                       f"expected {ep.length[pos]} (image size differs from its header?)")
    return _Sample(record.id, seq, items)

  def __call__(self, step: int) -> dict:
    plan, s = self.plan, self.plan.settings
    epoch, b = plan.locate(int(step))
    ep = plan.epoch(epoch)
    members, filler, code = ep.members[b], ep.filler[b], ep.keys[b]
    mine = self.positions()
    loaded: dict[int, _Sample | None] = {}
    skipped = collections.Counter()
    for q in mine:
      try:
        loaded[q] = self._load(int(members[q]), ep)
      except _LoadError as e:
        loaded[q] = None
        skipped[e.reason] += 1
        log.warning("data: step %d: replacing sample by a filler: %s", step, e)
    stand_in = None
    if any(loaded[q] is None for q in mine):
      # The first loadable sample of the global batch, whatever the process split (so P
      # processes together still produce the single-process batch); loaded here if not ours.
      for q in range(len(members)):
        if q not in loaded:
          try:
            loaded[q] = self._load(int(members[q]), ep)
          except _LoadError as e:
            loaded[q] = None
            log.warning("data: step %d: %s", step, e)
        if loaded[q] is not None:
          stand_in = loaded[q]
          break
      if stand_in is None:  # every sample of the batch failed: a blank of the same shapes
        log.warning("data: step %d: no sample of the batch could be loaded; using a blank "
                    "filler batch", step)
        stand_in = self._blank(code)
    samples, ids, fill = [], [], []
    for q in mine:
      sample, is_filler = loaded[q], bool(filler[q])
      if sample is None:
        sample, is_filler = stand_in, True
      if is_filler:
        seq = sample.seq
        sample = _Sample(sample.id, layout_lib.Sequence(
            seq.input_ids, seq.image_token, np.full_like(seq.labels, IGNORE_INDEX)), sample.items)
      samples.append(sample)
      ids.append(sample.id)
      fill.append(is_filler)
    key = plan.sample_key(code)
    micro = [self._assemble(samples[m * self.per_micro:(m + 1) * self.per_micro], code)
             for m in range(s.grad_accum)]
    out = {name: np.stack([mb[name] for mb in micro])
           for name in ("input_ids", "image_token", "labels", "attention_mask")}
    out["buckets"] = tuple({"pixels": np.stack([mb["buckets"][j]["pixels"] for mb in micro]),
                            "grid": np.stack([mb["buckets"][j]["grid"] for mb in micro])}
                           for j in range(len(micro[0]["buckets"])))
    out["meta"] = {"step": int(step), "epoch": epoch, "ids": ids, "filler": fill,
                   "key": tuple(key), "load_skipped": dict(skipped)}
    return out

  def _blank(self, code) -> _Sample:
    """A stand-in with the key's shapes: zero pixels filling each canvas, pad text, labels -100,
    no image token (so its attention rows are all text)."""
    ov, sl, n, seq_len = (int(x) for x in code)
    bk = self.plan.settings.buckets
    items = [np.zeros((bk[j][0] * slicing.PATCH_SIZE, bk[j][1] * slicing.PATCH_SIZE, 3),
                      np.float32) for j in (([sl] * n + [ov]) if ov >= 0 else [])]
    seq = layout_lib.Sequence(np.full(seq_len, self.tokenizer.pad_id, np.int32),
                              np.full(seq_len, -1, np.int32),
                              np.full(seq_len, IGNORE_INDEX, np.int32))
    return _Sample("", seq, items)

  def _assemble(self, samples: list[_Sample], code) -> dict:
    """One micro-batch of this process: fully static shapes, global item numbering."""
    ov, sl, n, seq_len = (int(x) for x in code)
    item_bucket = ([sl] * n + [ov]) if ov >= 0 else []
    used = sorted(set(item_bucket))
    per_sample = {j: item_bucket.count(j) for j in used}
    rank = [item_bucket[:q].count(j) for q, j in enumerate(item_bucket)]
    count, pc, p = len(samples), self.process_count, self.process_index
    n_local = {j: count * per_sample[j] for j in used}
    base, acc = {}, 0
    for j in used:
      base[j] = acc
      acc += pc * n_local[j]
    pad_id = self.tokenizer.pad_id
    out = {"input_ids": np.full((count, seq_len), pad_id, np.int32),
           "image_token": np.full((count, seq_len), -1, np.int32),
           "labels": np.full((count, seq_len), IGNORE_INDEX, np.int32),
           "attention_mask": np.zeros((count, seq_len), bool)}
    pixels = {j: np.zeros((n_local[j], self.plan.settings.buckets[j][0] * slicing.PATCH_SIZE,
                           self.plan.settings.buckets[j][1] * slicing.PATCH_SIZE, 3), np.float32)
              for j in used}
    grids = {j: np.zeros((n_local[j], 2), np.int32) for j in used}
    for i, sample in enumerate(samples):
      flat = np.zeros(len(item_bucket), np.int64)
      for q, (j, px) in enumerate(zip(item_bucket, sample.items)):
        slot = i * per_sample[j] + rank[q]
        h, w = px.shape[0], px.shape[1]
        pixels[j][slot, :h, :w] = px
        grids[j][slot] = (h // slicing.PATCH_SIZE, w // slicing.PATCH_SIZE)
        flat[q] = base[j] + p * n_local[j] + slot
      seq = sample.seq
      length = len(seq.input_ids)
      tok = seq.image_token
      if item_bucket:
        t = np.maximum(tok, 0)
        tok = np.where(tok >= 0, flat[t // slicing.TOKENS_PER_ITEM] * slicing.TOKENS_PER_ITEM
                       + t % slicing.TOKENS_PER_ITEM, -1)
      out["input_ids"][i, :length] = seq.input_ids
      out["image_token"][i, :length] = tok
      out["labels"][i, :length] = seq.labels
      out["attention_mask"][i, :length] = True
    out["buckets"] = tuple({"pixels": pixels[j], "grid": grids[j]} for j in used)
    return out


# --- the iterator --------------------------------------------------------------------------------

class TrainIterator:
  """Deterministic, checkpointable iterator over the steps of the plan (grain underneath).

  The state is the next step (plus the load-time skip counters): every step is a pure function of
  the plan, so `set_state` restarts grain at that step, with any number of workers or processes.
  `get_state` returns JSON bytes and `start_prefetch` exists, so grain's orbax handler
  (`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`) saves and restores it.
  """

  def __init__(self, loader: StepLoader, *, workers: int = 0, prefetch: int = 2,
               start_step: int = 0):
    self.loader, self.plan = loader, loader.plan
    self.workers, self.prefetch = int(workers), int(prefetch)
    self._step = int(start_step)
    self._load_skipped: collections.Counter = collections.Counter()
    self._it = None

  # the plan's facts
  @property
  def num_steps_per_epoch(self) -> int:
    """Steps of epoch 0 (later epochs can differ by a few: the pre-resize draw moves samples
    between keys; `steps_per_epoch` has them all)."""
    return self.plan.steps_per_epoch[0]

  @property
  def steps_per_epoch(self) -> tuple[int, ...]:
    return self.plan.steps_per_epoch

  @property
  def num_steps(self) -> int:
    return self.plan.num_steps

  @property
  def keys(self) -> list[SampleKey]:
    return self.plan.keys

  @property
  def step(self) -> int:
    return self._step

  @property
  def skipped(self) -> dict[str, int]:
    """Samples skipped, by reason: the metadata pass's (global) plus this process's load-time."""
    out = dict(self.plan.meta.counts)
    for k, v in self._load_skipped.items():
      out[k] = out.get(k, 0) + v
    return out

  def _build(self):
    import grain
    ds = grain.MapDataset.range(self._step, self.plan.num_steps).map(self.loader)
    buffer = max(self.prefetch, 1)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=min(buffer, 8),
                                                 prefetch_buffer_size=buffer))
    if self.workers > 0:
      _mark_absl_flags_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                             per_worker_buffer_size=buffer))
    return iter(it_ds)

  def start_prefetch(self) -> None:
    if self._it is None and self._step < self.plan.num_steps:
      self._it = self._build()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._step >= self.plan.num_steps:
      raise StopIteration
    self.start_prefetch()
    batch = next(self._it)
    if batch["meta"]["step"] != self._step:
      raise RuntimeError(f"data pipeline out of order: got step {batch['meta']['step']}, "
                         f"expected {self._step}")
    self._step += 1
    self._load_skipped.update(batch["meta"]["load_skipped"])
    batch["meta"]["skipped"] = self.skipped
    return batch

  def get_state(self) -> bytes:
    return json.dumps({"step": self._step, "load_skipped": dict(self._load_skipped),
                       "num_steps": self.plan.num_steps}).encode()

  def set_state(self, state: bytes | str | dict) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if state.get("num_steps", self.plan.num_steps) != self.plan.num_steps:
      log.warning("data: restoring an iterator state from a plan of %d steps into one of %d "
                  "(data or config changed?)", state["num_steps"], self.plan.num_steps)
    self.close()
    self._step = int(state["step"])
    self._load_skipped = collections.Counter(state.get("load_skipped", {}))

  def close(self) -> None:
    self._it = None


def _mark_absl_flags_parsed() -> None:
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_plan(data_cfg, model_cfg, tokenizer, source=None) -> tuple[Plan, Any]:
  """The metadata pass (cached) and the global plan; returns (plan, source)."""
  settings = Settings.from_configs(data_cfg, model_cfg)
  source = make_source(data_cfg) if source is None else source
  meta = scan(source, tokenizer, settings, data_cfg.cache_dir or None)
  return Plan(meta, settings), source


def make_train_iterator(data_cfg, model_cfg, tokenizer, *, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0) -> TrainIterator:
  """The training iterator of `data_cfg` (see `data_config`) for one process.

  model_cfg: the model config (its `projector` gives the token layout and separator ids; the
  projector config itself is accepted too). tokenizer: a `LlamaSpmTokenizer` or any object with
  its interface (`load_tokenizer`). Every process must use the same configs and data.
  """
  plan, source = make_plan(data_cfg, model_cfg, tokenizer)
  loader = StepLoader(plan, source, tokenizer, process_index, process_count)
  return TrainIterator(loader, workers=data_cfg.workers, prefetch=data_cfg.prefetch,
                       start_step=start_step)
