"""The data pipeline at the scale of the real recipe (issue 16): a streaming json index, the
prepared dataset, a parallel, resumable metadata pass keyed by content, per-process shares, and
workers that hold no record list.

Small PIL-written images in tmp folders; the Vicuna tokenizer of tests/fixtures.
"""

import io
import itertools
import json
import multiprocessing
import os
import pathlib
import pickle
import struct
import threading
import time
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageFile

from hiwin_jax import config as C
from hiwin_jax.data import array_record, image, loader, metadata, npy_files, plan, sources
from hiwin_jax.data.tokenizer import LlamaSpmTokenizer

VICUNA = pathlib.Path(__file__).resolve().parent / "fixtures" / "vicuna-tokenizer"
SIZES = [(200, 100), (300, 300), (337, 337), (640, 480), (240, 640), (700, 200)]
WORDS = "the cat sat on a red mat near two green trees and looked at the sky".split()


def _write(root: pathlib.Path, n: int, n_images: int = 6, seed: int = 0):
  """A LLaVA json of `n` entries (every 7th text-only) over `n_images` images reused by path."""
  images = root / "images"
  images.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for k in range(n_images):
    w, h = SIZES[k % len(SIZES)]
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        images / f"im{k}.{'png' if k % 2 else 'jpg'}")
  entries = []
  for i in range(n):
    answer = " ".join(WORDS[j % len(WORDS)] for j in range(i % 5 + 1, i % 5 + 4 + i % 9))
    image_ = i % 7 != 6
    entry = {"id": f"r{i}", "conversations": [
        {"from": "human", "value": ("<image>\n" if image_ else "") + "What is here?"},
        {"from": "gpt", "value": answer}]}
    if image_:
      k = i % n_images
      entry["image"] = f"im{k}.{'png' if k % 2 else 'jpg'}"
    entries.append(entry)
  path = root / "data.json"
  path.write_text(json.dumps(entries, indent=1))
  return path, images


def _cfgs(json_path, images, **overrides):
  d = C.data_config()
  d.update(json=str(json_path), image_folder=str(images), template="vicuna_v1", max_length=2048,
           seq_multiple=256, global_batch_size=4, grad_accum=2, seed=3, metadata_workers=1)
  d.update(overrides)
  return d, ml_collections.ConfigDict({"projector": C.projector_config()})


def _settings(d, model):
  return plan.Settings.from_configs(d, model)


@pytest.fixture(scope="module")
def tok():
  return LlamaSpmTokenizer(VICUNA)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  root = tmp_path_factory.mktemp("small")
  json_path, images = _write(root, 60)
  prepared = array_record.build(json_path, images, root / "prepared", workers=1)
  return json_path, images, prepared


def _same_meta(a, b):
  assert a.num_records == b.num_records and a.counts == b.counts and a.excluded == b.excluded
  for k in a.arrays:
    np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)


class _Interrupted(Exception):
  pass


class _Recorder:
  """Wraps `metadata._scan_shard`, recording (thread name, first record) per shard computed."""

  def __init__(self, monkeypatch, fail_at: int | None = None):
    self.calls, self.fail_at, self._real = [], fail_at, metadata._scan_shard
    monkeypatch.setattr(metadata, "_scan_shard", self)

  def __call__(self, state, task):
    if self.fail_at is not None and len(self.calls) == self.fail_at:
      raise _Interrupted("stopped")
    self.calls.append((threading.current_thread().name, task[0]))
    return self._real(state, task)


# --- the json index ------------------------------------------------------------------------------

def test_json_index_streams_every_entry_across_chunk_boundaries(tmp_path, monkeypatch):
  """Entries that straddle chunks (multi-byte characters, nesting, numbers, whitespace) are
  found with their exact byte ranges while only a few bytes are buffered at a time."""
  monkeypatch.setattr(sources, "_CHUNK", 5)
  entries = [{"id": 1, "conversations": [{"from": "human", "value": "é∑ 漢字 \\n \"q\""}]},
             12345678, "текст", [1, [2, [3]]], {"nested": {"a": [None, True, 1.5e3]}}, -0.25]
  text = "\ufeff [\n" + ",\n\t ".join(json.dumps(e, ensure_ascii=False) for e in entries) + " ]\n"
  path = tmp_path / "data.json"
  path.write_bytes(text.encode("utf-8"))
  ranges = sources.scan_json_list(path)
  data = path.read_bytes()
  assert [json.loads(data[a:b]) for a, b in ranges] == entries
  source = sources.JsonSource(path, tmp_path, index_dir=tmp_path / "idx")
  assert [source.raw(i) for i in range(len(source))] == entries
  assert list((tmp_path / "idx").glob("json-*.npy"))


def _png_with_trailing_exif(width: int, height: int, orientation: int) -> bytes:
  """A PNG whose eXIf chunk comes after the image data (allowed by the PNG spec)."""
  buf = io.BytesIO()
  Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buf, "PNG")
  png = buf.getvalue()
  exif = Image.Exif()
  exif[0x0112] = orientation
  body = exif.tobytes()
  chunk = struct.pack(">I", len(body)) + b"eXIf" + body
  chunk += struct.pack(">I", zlib.crc32(b"eXIf" + body) & 0xFFFFFFFF)
  iend = png.rindex(b"IEND") - 4
  return png[:iend] + chunk + png[iend:]


def test_png_header_size_reads_a_trailing_exif_without_decoding(tmp_path, monkeypatch):
  data = _png_with_trailing_exif(30, 20, 6)
  (tmp_path / "x.png").write_bytes(data)
  assert image.load_image(data).size == (20, 30)  # rotated
  monkeypatch.setattr(ImageFile.ImageFile, "load",
                      lambda self: pytest.fail("header_size decoded the pixels"))
  assert sources.header_size(tmp_path / "x.png") == sources.header_size(data) == (20, 30)


# --- the metadata pass ---------------------------------------------------------------------------

def test_metadata_pass_in_worker_processes_equals_one_process(small, tok, tmp_path):
  json_path, images, _ = small
  settings = _settings(*_cfgs(json_path, images))
  source = sources.JsonSource(json_path, images)
  one = metadata.scan(source, tok, settings, str(tmp_path / "a"), workers=1, shard_records=8)
  two = metadata.scan(source, tok, settings, str(tmp_path / "b"), workers=2, shard_records=8)
  _same_meta(one, two)
  assert len(list((tmp_path / "b").glob("meta-*/shard-*.npz"))) == 8


def test_an_interrupted_metadata_pass_resumes_with_the_missing_shards(small, tok, tmp_path,
                                                                       monkeypatch):
  json_path, images, _ = small
  settings = _settings(*_cfgs(json_path, images))
  source = sources.JsonSource(json_path, images)
  _Recorder(monkeypatch, fail_at=3)
  with pytest.raises(_Interrupted):
    metadata.scan(source, tok, settings, str(tmp_path), workers=1, shard_records=8)
  monkeypatch.undo()
  again = _Recorder(monkeypatch)
  meta = metadata.scan(source, tok, settings, str(tmp_path), workers=1, shard_records=8)
  assert [first for _, first in again.calls] == [24, 32, 40, 48, 56]
  _same_meta(meta, metadata.scan(source, tok, settings, None, workers=1))


def test_metadata_cache_is_invalidated_when_an_image_file_changes(small, tok, tmp_path,
                                                                   monkeypatch):
  json_path, images, _ = small
  root = tmp_path / "copy"
  json_path, images = _write(root, 60)
  settings = _settings(*_cfgs(json_path, images))
  source = sources.JsonSource(json_path, images)
  first = metadata.scan(source, tok, settings, str(tmp_path / "cache"), workers=1,
                       shard_records=8)
  # im3.png (640x480) is used by records 3, 9, 15, ... (all shards); im5.png only by 5, 11, ...
  rec = _Recorder(monkeypatch)
  Image.new("RGB", (400, 300)).save(images / "im5.png")
  meta = metadata.scan(source, tok, settings, str(tmp_path / "cache"), workers=1,
                       shard_records=8)
  users = {i // 8 * 8 for i in range(60) if i % 7 != 6 and i % 6 == 5}
  assert sorted(first for _, first in rec.calls) == sorted(users)
  a = meta.arrays
  rows = np.isin(a["index"], [i for i in range(60) if i % 7 != 6 and i % 6 == 5])
  assert (a["width"][rows] == 400).all() and (a["height"][rows] == 300).all()
  assert (first.arrays["width"][rows] == 700).all()
  # the same bytes with a new mtime count as a change too
  rec.calls.clear()
  os.utime(images / "im5.png", ns=(time.time_ns(), time.time_ns() + 10**9))
  metadata.scan(source, tok, settings, str(tmp_path / "cache"), workers=1,
                       shard_records=8)
  assert sorted(first for _, first in rec.calls) == sorted(users)
  rec.calls.clear()
  metadata.scan(source, tok, settings, str(tmp_path / "cache"), workers=1,
                       shard_records=8)
  assert rec.calls == []


def test_metadata_cache_is_keyed_by_the_json_content_not_its_size_or_mtime(tmp_path, tok):
  json_path, images = _write(tmp_path, 20)
  settings = _settings(*_cfgs(json_path, images))
  st = json_path.stat()
  before = metadata.scan(sources.JsonSource(json_path, images), tok, settings, str(tmp_path),
                         workers=1)
  text = json_path.read_text()
  json_path.write_text(text.replace('"What is here?"', '"Qzx vq jkwpy?"', 1))  # same length
  os.utime(json_path, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert json_path.stat().st_size == st.st_size
  after = metadata.scan(sources.JsonSource(json_path, images), tok, settings, str(tmp_path),
                        workers=1)
  changed = after.arrays["text_len"] != before.arrays["text_len"]
  np.testing.assert_array_equal(after.arrays["index"][changed], [6])  # the first text-only entry
  assert len(list(tmp_path.glob("meta-*"))) == 2


def test_processes_sharing_the_cache_each_compute_their_share(small, tok, tmp_path,
                                                              monkeypatch):
  """Two processes (here threads) sharing the cache folder: each computes the shards s with
  s % 2 == its index and takes the other's from the folder; a peer presumed dead (its marker
  older than metadata.ALIVE_S) is not waited for."""
  json_path, images, _ = small
  settings = _settings(*_cfgs(json_path, images))
  source = sources.JsonSource(json_path, images)
  folder = tmp_path / f"meta-{metadata.cache_key(source, tok, settings, 8)}"
  folder.mkdir()
  for p in range(2):
    (folder / f"process-{p}-of-2").touch()
  rec = _Recorder(monkeypatch)
  results = {}

  def run(p):
    results[p] = metadata.scan(source, tok, settings, str(tmp_path), workers=1,
                               process_index=p, process_count=2, shard_records=8)

  threads = [threading.Thread(target=run, args=(p,), name=f"p{p}") for p in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  _same_meta(results[0], results[1])
  for p in range(2):
    assert sorted(f for name, f in rec.calls if name == f"p{p}") == list(range(8 * p, 60, 16))
  # a dead peer: process 0 computes everything at once
  rec.calls.clear()
  for f in folder.glob("shard-*"):
    f.unlink()
  old = time.time() - 2 * metadata.ALIVE_S
  os.utime(folder / "process-1-of-2", (old, old))
  t0 = time.perf_counter()
  run(0)
  assert sorted(f for _, f in rec.calls) == list(range(0, 60, 8))
  assert time.perf_counter() - t0 < 60


def test_an_outdated_shard_file_is_not_taken_as_the_other_hosts_work(tok, tmp_path,
                                                                     monkeypatch):
  """Process 0 of 2 finds every shard outdated (an image changed): it computes its share and
  waits for process 1 to rewrite the others, which are there all along; process 1 stops
  (its marker ages past ALIVE_S), so process 0 computes them itself, and never merges the
  outdated ones."""
  json_path, images = _write(tmp_path / "data", 24)
  settings = _settings(*_cfgs(json_path, images))
  source = sources.JsonSource(json_path, images)
  metadata.scan(source, tok, settings, str(tmp_path), workers=1, shard_records=8)
  Image.new("RGB", (400, 300)).save(images / "im3.png")  # used by records of every shard
  folder = tmp_path / f"meta-{metadata.cache_key(source, tok, settings, 8)}"
  (folder / "process-1-of-2").touch()
  monkeypatch.setattr(metadata, "ALIVE_S", 2.0)
  rec = _Recorder(monkeypatch)
  meta = metadata.scan(source, tok, settings, str(tmp_path), workers=1, process_index=0,
                       process_count=2, shard_records=8)
  assert sorted(first for _, first in rec.calls) == [0, 8, 16]
  users = np.isin(meta.arrays["index"], [i for i in range(24) if i % 7 != 6 and i % 6 == 3])
  assert users.sum() >= 3 and (meta.arrays["width"][users] == 400).all()


# --- the prepared dataset ------------------------------------------------------------------------

def test_the_build_does_not_depend_on_the_worker_count(small, tmp_path):
  json_path, images, prepared = small
  again = array_record.build(json_path, images, tmp_path / "p2", workers=2)
  a, b = array_record.read_manifest(prepared), array_record.read_manifest(again)
  assert a["digest"] == b["digest"] and a["num_images"] == b["num_images"] == 6
  ra, rb = array_record.ArrayRecordSource(prepared), array_record.ArrayRecordSource(again)
  assert [ra.entry(i) for i in range(60)] == [rb.entry(i) for i in range(60)]
  assert [ra.fetch(i)[1] for i in range(6)] == [rb.fetch(i)[1] for i in range(6)]


def _concat(batches, axis=1):
  return {k: np.concatenate([b[k] for b in batches], axis) for k in
          ("input_ids", "image_token", "labels", "attention_mask")}


def test_two_processes_give_the_one_process_global_batches_from_the_prepared_form(small, tok):
  json_path, images, prepared = small
  d, model = _cfgs(json_path, images, format="array_record", array_record_dir=prepared)
  one = list(itertools.islice(loader.make_train_iterator(d, model, tok), 5))
  two = [list(itertools.islice(loader.make_train_iterator(d, model, tok, process_index=p,
                                                          process_count=2), 5))
         for p in range(2)]
  assert len(one) == len(two[0]) == len(two[1]) == 5
  for g, a, b in zip(one, *two):
    assert g["meta"]["ids"] == [i for m in range(2) for i in
                                a["meta"]["ids"][m:m + 1] + b["meta"]["ids"][m:m + 1]]
    for k, v in _concat([a, b]).items():
      np.testing.assert_array_equal(v, g[k], err_msg=k)
    for x, y, z in zip(a["buckets"], b["buckets"], g["buckets"], strict=True):
      np.testing.assert_array_equal(np.concatenate([x["pixels"], y["pixels"]], 1), z["pixels"])


def _child(args):
  """One training process of a 2-process run: its batches' arrays and the shards it computed."""
  d, model, p = args
  metadata.SHARD_RECORDS = 8
  computed = []
  real = metadata._scan_shard
  metadata._scan_shard = lambda state, task: computed.append(task[0]) or real(state, task)
  it = loader.make_train_iterator(d, model, LlamaSpmTokenizer(VICUNA), process_index=p,
                                  process_count=2)
  return [_concat([b]) for b in itertools.islice(it, 4)], computed


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "array_record"])
def test_two_os_processes_share_the_metadata_pass_and_make_the_global_batch(small, tok,
                                                                            tmp_path, fmt):
  """Two OS processes, from the JSON source or from the prepared form, with a shared
  `data.cache_dir`: each computes its share of the metadata pass (both are alive: their markers
  are fresh) and their batches concatenate to the one-process ones."""
  json_path, images, prepared = small
  extra = {} if fmt == "json" else {"format": "array_record", "array_record_dir": prepared}
  d, model = _cfgs(json_path, images, cache_dir=str(tmp_path / "cache"), **extra)
  key = metadata.cache_key(loader.make_source(d), tok, _settings(d, model), 8)
  (tmp_path / "cache" / f"meta-{key}").mkdir(parents=True)
  for p in range(2):
    (tmp_path / "cache" / f"meta-{key}" / f"process-{p}-of-2").touch()
  with multiprocessing.get_context("spawn").Pool(2) as pool:
    (a, done_a), (b, done_b) = pool.map(_child, [(d, model, p) for p in range(2)])
  assert done_a == list(range(0, 60, 16)) and done_b == list(range(8, 60, 16))
  d_one, _ = _cfgs(json_path, images, cache_dir=str(tmp_path / "one"), **extra)
  one = list(itertools.islice(loader.make_train_iterator(d_one, model, tok), 4))
  assert len(one) == len(a) == len(b) == 4
  for g, x, y in zip(one, a, b):
    for k, v in _concat([x, y]).items():
      np.testing.assert_array_equal(v, g[k], err_msg=k)


# --- what a worker holds -------------------------------------------------------------------------

class _CountingJson(sources.JsonSource):
  """Records every entry it parses."""
  reads: list

  def raw(self, i):
    self.reads.append(int(i))
    return super().raw(i)


class _CountingPrepared(array_record.ArrayRecordSource):
  """Records every record it reads from the prepared form."""
  reads: list

  def entry(self, i):
    self.reads.append(int(i))
    return super().entry(i)


@pytest.mark.parametrize("fmt", ["json", "array_record"])
def test_a_worker_reads_only_its_share_and_holds_no_record_list(small, tok, tmp_path, fmt,
                                                                monkeypatch):
  json_path, images, prepared = small
  d, model = _cfgs(json_path, images, global_batch_size=8, grad_accum=2)
  source = (_CountingJson(json_path, images, index_dir=tmp_path) if fmt == "json"
            else _CountingPrepared(prepared))
  source.reads = []
  the_plan, _ = loader.make_plan(d, model, tok, source=source, cache=str(tmp_path))
  steps = plan.StepTable.write(the_plan, tmp_path)
  source.reads = []
  worker = pickle.loads(pickle.dumps(loader.StepLoader(steps, the_plan.settings, source, tok, 1,
                                                       2, the_plan.epoch_starts)))
  # what a worker is sent holds nothing in proportion to the records (the json index and the
  # step table travel as paths to row files)
  assert not any(isinstance(v, (np.ndarray, list, dict)) and len(v) >= len(source)
                 for obj in (worker, worker.source, worker.steps) for v in vars(obj).values())
  monkeypatch.setattr(npy_files.RowFile, "read_all",
                      lambda self: pytest.fail(f"a worker read all of {self.path}"))
  for step in (0, 3, 5):
    worker(step)
    mine = steps.members(step)["record"][worker.positions()]
    assert worker.source.reads[-len(mine):] == list(mine)
  assert len(worker.source.reads) == 3 * len(worker.positions()) == 12


def test_what_a_worker_is_sent_does_not_grow_with_the_records(tok, tmp_path):
  def pickled_size(n, fmt):
    root = tmp_path / f"n{n}{fmt}"
    jp, im = _write(root, n)
    extra = {}
    if fmt == "array_record":
      extra = dict(format="array_record",
                   array_record_dir=array_record.build(jp, im, root / "ar", workers=1))
    dd, mm = _cfgs(jp, im, cache_dir=str(root / "cache"), **extra)
    return len(pickle.dumps(loader.make_train_iterator(dd, mm, tok).loader))

  for fmt in ("json", "array_record"):
    assert abs(pickled_size(500, fmt) - pickled_size(50, fmt)) < 64, fmt


# --- the plan -------------------------------------------------------------------------------------

def test_unique_rows_is_numpy_unique_over_rows():
  rng = np.random.default_rng(0)
  codes = np.stack([rng.integers(-1, 9, 5000), rng.integers(-1, 9, 5000), rng.integers(0, 8, 5000),
                    rng.integers(1, 33, 5000) * 128], 1).astype(np.int64)
  uniq, inverse = plan.unique_rows(codes)
  want_uniq, want_inverse = np.unique(codes, axis=0, return_inverse=True)
  np.testing.assert_array_equal(uniq, want_uniq)
  np.testing.assert_array_equal(inverse, want_inverse.reshape(-1))


def test_the_epochs_training_pre_resize_equals_the_per_record_rule(small):
  """Plan.epoch computes the 10% pre-resize per distinct size; the rule is per record."""
  json_path, images, _ = small
  s = _settings(*_cfgs(json_path, images, global_batch_size=2, grad_accum=1))
  rng = np.random.default_rng(0)
  sizes, geo = [], []
  for w, h in rng.integers(40, 2500, (3000, 2)):
    try:
      geo.append(s.geometry(s.pre_resize_size((int(w), int(h)), "", plan.NO_DRAW)))
    except ValueError:
      continue
    sizes.append((int(w), int(h)))
  num = len(sizes)
  text = rng.integers(20, 1500, num)
  arrays = {"index": np.arange(num) * 2, "width": np.array([x[0] for x in sizes], np.int32),
            "height": np.array([x[1] for x in sizes], np.int32), "has_image": np.ones(num, bool),
            "augmentable": rng.random(num) < 0.9, "text_len": text.astype(np.int32),
            "length": (text - 1 + [g[3] for g in geo]).astype(np.int32),
            **{k: np.array([g[j] for g in geo], np.int32) for j, k in enumerate(("ov", "sl", "n"))}}
  meta = plan.Metadata(2 * num, arrays, {}, [])
  the_plan = plan.Plan(meta, s)
  for e in range(2):
    all_draws = np.random.default_rng([s.seed, e, 0]).random(meta.num_records)
    draws, length = np.full(num, plan.NO_DRAW), arrays["length"].copy()
    for pos in range(num):
      d = all_draws[arrays["index"][pos]]
      if not arrays["augmentable"][pos] or d >= image.TRAIN_RESIZE_PROB:
        continue
      new = s.pre_resize_size(sizes[pos], "", d)
      if new == sizes[pos]:
        continue
      try:
        tokens = s.geometry(new)[3]
      except ValueError:
        continue
      if text[pos] - 1 + tokens <= s.max_length:
        draws[pos], length[pos] = d, text[pos] - 1 + tokens
    ep = the_plan.epoch(e)
    assert (draws < 1).sum() > 30
    np.testing.assert_array_equal(ep.draw, draws)
    np.testing.assert_array_equal(ep.length, length)


def test_a_prepared_dataset_whose_cache_cannot_be_written_is_not_cached(tmp_path, caplog,
                                                                       monkeypatch):
  import subprocess
  cache = tmp_path / "prepared" / "cache"
  cache.mkdir(parents=True)
  # os.access answers for the local user, not for the server (root on a root-squashed NFS
  # mount is told yes): only a write tells.
  monkeypatch.setattr(os, "access", lambda *a, **k: True)
  root = os.geteuid() == 0  # as root, permission bits do not stop writes: chattr
  subprocess.run(["chattr", "+i", str(cache)], check=True) if root else cache.chmod(0o555)
  try:
    d = ml_collections.ConfigDict(dict(cache_dir="", format="array_record",
                                       array_record_dir=str(tmp_path / "prepared")))
    assert loader.cache_dir(d) is None
  finally:
    subprocess.run(["chattr", "-i", str(cache)], check=True) if root else cache.chmod(0o755)
  assert "cannot be written" in caplog.text and list(cache.iterdir()) == []
