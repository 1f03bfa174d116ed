"""The metadata pass: every record inspected once, without decoding an image, and cached.

Per record: the JSON layout, the image size from the file header (EXIF orientation applied), the
deterministic TextVQA pre-resize (spec §1.4), the slicing plan (overview only when `data.slicing`
is False: official stage 1 `--single` slices and discards the slices, which leaves exactly the
`never_split` overview, spec §1.3-§1.4), the canvas buckets of the overview and of the slices
(`buckets.default_buckets`) and the exact spliced length (`conversation.preprocess` +
`layout.image_token_count`). Bad records are excluded, logged with their id and counted per
reason (`REASONS`). The result (`plan.Metadata`) is cached under `data.cache_dir`, keyed by the
source, the tokenizer and the settings that change it.

Host-side code (numpy, PIL): no jax import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib

import numpy as np

from hiwin_jax.data import image
from hiwin_jax.data.conversation import ConversationError, preprocess
from hiwin_jax.data.plan import NO_DRAW, Metadata, Settings
from hiwin_jax.data.sources import Inspected, Source
from hiwin_jax.data.tokenizer import IMAGE_TOKEN_INDEX

log = logging.getLogger(__name__)

REASONS = ("bad_record", "missing_image", "unreadable_image", "bad_image_size",
           "bad_conversation", "mismatch", "too_long", "size_mismatch")
NO_TRUNCATION = 1 << 30  # preprocess must see whole conversations: too-long ones are excluded
_META_VERSION = 2
_META_FIELDS = ("index", "width", "height", "has_image", "augmentable", "text_len", "ov", "sl",
                "n", "length")


def _tokenizer_fingerprint(tokenizer) -> list:
  probe = "USER: <image>\nHello, world! 12 ASSISTANT: fine.</s>"
  return [type(tokenizer).__name__, getattr(tokenizer, "vocab_size", None),
          getattr(tokenizer, "legacy", None), list(map(int, tokenizer.encode(probe))),
          list(map(int, tokenizer.tokenizer_image_token(probe)))]


def scan(source: Source, tokenizer, settings: Settings, cache_dir: str | None = None) -> Metadata:
  """The metadata pass over every record (cached in `cache_dir` by source, tokenizer and the
  config fields that change it)."""
  key = json.dumps([_META_VERSION, source.fingerprint(), _tokenizer_fingerprint(tokenizer),
                    settings.template, settings.slicing, settings.max_slice_nums,
                    settings.max_length, dataclasses.astuple(settings.tokens), settings.buckets,
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


def _scan(source: Source, tokenizer, settings: Settings) -> Metadata:
  cols = {k: [] for k in _META_FIELDS}
  counts, excluded = {r: 0 for r in REASONS}, []
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
                    model_max_length=NO_TRUNCATION, variant=settings.tokens.layout)
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
    base = settings.pre_resize_size(got.size, record.image_path, NO_DRAW)
    try:
      ov, sl, n, tokens = settings.geometry(base)
    except ValueError as e:
      return "bad_image_size", str(e), None
    row.update(width=base[0], height=base[1], augmentable=not image.is_textvqa(record.image_path),
               ov=ov, sl=sl, n=n, length=text_len - 1 + tokens)
  if row["length"] > settings.max_length:
    return ("too_long", (f"{row['length']} tokens with the image spliced in, more than "
            f"data.max_length={settings.max_length}"), None)
  return None, "", row
