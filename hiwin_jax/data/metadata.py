"""The metadata pass: every record inspected once, without decoding an image, and cached.

Per record: the JSON layout, the image's containment in its folder, the image size from the file
header (EXIF orientation applied) within the pixel budget, the deterministic TextVQA pre-resize
(spec §1.4), the slicing plan (overview only when `data.slicing` is False: official stage 1
`--single` slices and discards the slices, which leaves exactly the `never_split` overview, spec
§1.3-§1.4), the canvas buckets of the overview and of the slices (`buckets.default_buckets`) and
the exact spliced length (`conversation.preprocess` + `layout.image_token_count`). Bad records
are excluded and counted per reason (`REASONS`); the list, with ids and messages, is logged in
part and written whole to `excluded.jsonl` beside the cache.

Parallel and resumable: the records are cut into shards of `SHARD_RECORDS`; each shard is
computed by one of the host's worker processes (`parallel.run_tasks`, all cores by default) and
written as its own file, so an interrupted pass resumes with the shards not yet written. With
several processes (hosts) sharing the cache folder, process p computes the shards s with
s % P == p first, then waits for the others' shards while their processes are alive (each
touches its marker file), and computes whatever is still missing itself: a folder that is not
shared, or a process that died, costs time but never a wrong result.

Keyed by content: the folder name hashes the source's content key (the json's content hash and
the image folder, or the prepared dataset's digest), the tokenizer and the settings that change
the result. A shard of a JSON source also records (size, mtime) of every image file it read; a
later run re-stats them and recomputes exactly the shards whose images changed.

Host-side code (numpy, PIL): no jax import.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import pathlib
import tempfile
import time

import numpy as np

from hiwin_jax.data import image, npy_files, parallel
from hiwin_jax.data.conversation import ConversationError, preprocess
from hiwin_jax.data.plan import NO_DRAW, Metadata, Settings
from hiwin_jax.data.sources import Inspected, Source
from hiwin_jax.data.tokenizer import IMAGE_TOKEN_INDEX

log = logging.getLogger(__name__)

REASONS = ("bad_record", "outside_image_folder", "missing_image", "unreadable_image",
           "too_many_pixels", "bad_image_size", "bad_conversation", "mismatch", "too_long",
           "size_mismatch")
NO_TRUNCATION = 1 << 30  # preprocess must see whole conversations: too-long ones are excluded
SHARD_RECORDS = 8192
ALIVE_S = 600  # a process whose marker is older than this is presumed dead
_META_VERSION = 3
_META_FIELDS = ("index", "width", "height", "has_image", "augmentable", "text_len", "ov", "sl",
                "n", "length")
_DTYPES = {"index": np.int64, "has_image": bool, "augmentable": bool}
_SHOWN = 20  # excluded samples logged one by one


def _tokenizer_fingerprint(tokenizer) -> list:
  probe = "USER: <image>\nHello, world! 12 ASSISTANT: fine.</s>"
  return [type(tokenizer).__name__, getattr(tokenizer, "vocab_size", None),
          getattr(tokenizer, "legacy", None), list(map(int, tokenizer.encode(probe))),
          list(map(int, tokenizer.tokenizer_image_token(probe)))]


def cache_key(source: Source, tokenizer, settings: Settings, shard_records: int) -> str:
  """The content key of a metadata pass (the name of its cache folder)."""
  key = json.dumps([_META_VERSION, source.content_key(), _tokenizer_fingerprint(tokenizer),
                    settings.template, settings.slicing, settings.max_slice_nums,
                    settings.max_length, dataclasses.astuple(settings.tokens), settings.buckets,
                    settings.scale_resolution, settings.max_pixels, shard_records])
  return hashlib.blake2b(key.encode(), digest_size=10).hexdigest()


def scan(source: Source, tokenizer, settings: Settings, cache_dir: str | None = None, *,
         workers: int = 0, process_index: int = 0, process_count: int = 1,
         shard_records: int | None = None) -> Metadata:
  """The metadata pass over every record (module docstring). `cache_dir`: the folder of the
  cache (None: a temporary one, removed afterwards); `workers`: processes on this host (0: one
  per core); `process_index`/`process_count`: this process's share when several processes
  (hosts) share `cache_dir`; `shard_records`: default `SHARD_RECORDS`."""
  shard_records = shard_records or SHARD_RECORDS
  if cache_dir is None:
    with tempfile.TemporaryDirectory(prefix="hiwin-meta-") as tmp:
      return scan(source, tokenizer, settings, tmp, workers=workers,
                  process_index=process_index, process_count=process_count,
                  shard_records=shard_records)
  num = len(source)
  folder = pathlib.Path(cache_dir, f"meta-{cache_key(source, tokenizer, settings, shard_records)}")
  folder.mkdir(parents=True, exist_ok=True)
  spans = [(lo, min(lo + shard_records, num)) for lo in range(0, num, shard_records)]
  files = [folder / f"shard-{s:05d}-of-{len(spans):05d}.npz" for s in range(len(spans))]
  marker = folder / f"process-{process_index}-of-{process_count}"
  marker.touch()
  # Taken before the check: a file the other host rewrites after it differs from this.
  before = [_identity(f) for f in files]
  todo = [s for s, f in enumerate(files) if not _usable(f)]
  if todo:
    log.info("data: metadata pass over %d of %d shards of %d records (%s)", len(todo),
             len(spans), shard_records, folder)
    t0 = time.perf_counter()
    mine = [s for s in todo if s % process_count == process_index]
    _compute(mine, spans, files, source, tokenizer, settings, workers, marker)
    others = [s for s in todo if s % process_count != process_index]
    while others:
      # Written by the other host once it differs from what was there (an outdated file of an
      # earlier pass exists all along: mere existence would merge it).
      others = [s for s in others if _identity(files[s]) == before[s]]
      peers = [folder / f"process-{p}-of-{process_count}" for p in range(process_count)]
      if others and all(_peer_alive(m) for m in peers):
        marker.touch()
        time.sleep(1.0)
        continue
      _compute(others, spans, files, source, tokenizer, settings, workers, marker)
      break
    log.info("data: metadata pass done in %.1f s", time.perf_counter() - t0)
  meta = _merge(files, num)
  _report(meta, folder, fresh=bool(todo))
  return meta


def _peer_alive(marker: pathlib.Path) -> bool:
  try:
    return time.time() - marker.stat().st_mtime < ALIVE_S
  except FileNotFoundError:
    return False


def _identity(file: pathlib.Path) -> tuple[int, int, int] | None:
  """(inode, mtime, size) of a file, None if there is none: a file renamed into place (how
  shard files are written) has a new one."""
  try:
    st = file.stat()
  except FileNotFoundError:
    return None
  return st.st_ino, st.st_mtime_ns, st.st_size


def _stat(path: str) -> tuple[int, int]:
  try:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
  except OSError:
    return -1, -1


def _usable(file: pathlib.Path) -> bool:
  """A shard file exists and none of the image files it read has changed since."""
  if not file.is_file():
    return False
  with np.load(file) as z:
    paths = json.loads(z["image_paths"].tobytes())
    stats = z["image_stats"]
  if not paths:
    return True
  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # stat latency (network disks)
    now = np.asarray(list(pool.map(_stat, paths, chunksize=256)), np.int64)
  return bool(np.array_equal(now, stats))


def _compute(shards, spans, files, source, tokenizer, settings, workers, marker) -> None:
  tasks = [(spans[s][0], spans[s][1], str(files[s])) for s in shards]
  for _ in parallel.run_tasks(_scan_shard, (source, tokenizer, settings), tasks,
                              workers=workers):
    marker.touch()


def _scan_shard(state: tuple[Source, object, Settings], task: tuple[int, int, str]) -> None:
  """Inspects records [lo, hi) and writes the shard's file."""
  source, tokenizer, settings = state
  lo, hi, out = task
  cols = {k: [] for k in _META_FIELDS}
  excluded, images = [], {}
  for i in range(lo, hi):
    got = source.inspect(i)
    if got.image is not None:
      images[got.image] = got.stat
    reason, message = got.reason, got.message
    if reason is None:
      reason, message, row = _check_sample(got, tokenizer, settings)
    if reason is not None:
      excluded.append([i, got.id, reason, message])
      continue
    cols["index"].append(i)
    for k, v in row.items():
      cols[k].append(v)
  arrays = {k: np.asarray(v, _DTYPES.get(k, np.int32)) for k, v in cols.items()}
  buf = io.BytesIO()
  np.savez(buf, **arrays, excluded=_as_bytes(excluded), image_paths=_as_bytes(list(images)),
           image_stats=np.asarray(list(images.values()), np.int64).reshape(-1, 2))
  npy_files.write_atomic(out, buf.getvalue())


def _as_bytes(obj) -> np.ndarray:
  return np.frombuffer(json.dumps(obj).encode(), np.uint8)


def _merge(files: list[pathlib.Path], num: int) -> Metadata:
  cols = {k: [] for k in _META_FIELDS}
  excluded = []
  for f in files:
    with np.load(f) as z:
      for k in _META_FIELDS:
        cols[k].append(z[k])
      excluded += json.loads(z["excluded"].tobytes())
  arrays = {k: (np.concatenate(v) if v else np.zeros(0, _DTYPES.get(k, np.int32)))
            for k, v in cols.items()}
  counts = {r: 0 for r in REASONS}
  for _, _, reason, _ in excluded:
    counts[reason] = counts.get(reason, 0) + 1
  return Metadata(num, arrays, counts, excluded)


def _report(meta: Metadata, folder: pathlib.Path, fresh: bool) -> None:
  if fresh:
    for i, rid, reason, message in meta.excluded[:_SHOWN]:
      log.warning("data: excluding sample %r (record %d): %s: %s", rid, i, reason, message)
    lines = "".join(json.dumps(dict(zip(("record", "id", "reason", "message"), e))) + "\n"
                    for e in meta.excluded)
    npy_files.write_atomic(folder / "excluded.jsonl", lines.encode())
  log.info("data: %d of %d records kept%s; excluded: %s%s", len(meta), meta.num_records,
           "" if fresh else " (metadata from cache)",
           {k: v for k, v in meta.counts.items() if v},
           f" (all listed in {folder / 'excluded.jsonl'})" if meta.excluded else "")


@functools.lru_cache(maxsize=1 << 16)
def _geometry(settings: Settings, size: tuple[int, int]):
  try:
    return settings.geometry(size)
  except ValueError as e:
    return str(e)


def _check_sample(got: Inspected, tokenizer, settings: Settings):
  record = got.record
  has_image = record.image_path is not None
  if has_image and got.size[0] * got.size[1] > settings.max_pixels:
    return ("too_many_pixels", f"{got.size[0]}x{got.size[1]} = {got.size[0] * got.size[1]:,} "
            f"pixels, more than data.max_image_pixels={settings.max_pixels:,}", None)
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
    geometry = _geometry(settings, base)
    if isinstance(geometry, str):
      return "bad_image_size", geometry, None
    ov, sl, n, tokens = geometry
    row.update(width=base[0], height=base[1], augmentable=not image.is_textvqa(record.image_path),
               ov=ov, sl=sl, n=n, length=text_len - 1 + tokens)
  if row["length"] > settings.max_length:
    return ("too_long", (f"{row['length']} tokens with the image spliced in, more than "
            f"data.max_length={settings.max_length}"), None)
  return None, "", row
