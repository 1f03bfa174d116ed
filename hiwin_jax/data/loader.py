"""The training data loader: LLaVA conversations + images -> static-shape batches, through grain.

`make_train_iterator(cfg.data, cfg.model, tokenizer)` is the entry point. Under it:
`sources` (records: a LLaVA json + image folder, or the prepared `array_record` dataset),
`metadata` (one cached, parallel pass over every record: sizes, geometry, spliced lengths, bad
records), `plan` (the global plan: which samples form the global batch of every step, identical
on every process, stored as a `StepTable`) and, here, the loading of a step and the
checkpointable iterator.

Loading (`StepLoader`, runs in grain workers): a global batch of G samples is split into k =
`grad_accum` global micro-batches of G/k, and process p of P takes the p-th contiguous 1/P of
each micro-batch (micro-batch-major rather than process-major: with k = 1 this is samples
[p*b, (p+1)*b), and for any k the process-major concatenation of the processes' micro-batch m is
exactly the micro-batch m that P = 1 produces). A process reads, decodes and slices only the
samples of its share. Per sample: `image.load_image`, then `image.prepare_image` with the
training pre-resize of the planned draw, and `layout.splice`. A sample whose image fails at load
time despite a good header is replaced by a filler copy of the first loadable sample of the
global batch (the one case where a process loads a sample outside its share, so that P processes
still make the single-process batch) and counted (reason `unreadable_image`, `size_mismatch`, or
`outside_image_folder` for a path that no longer resolves inside the image folder).

What a grain worker receives is small whatever the dataset's size: the settings, the tokenizer,
the source (paths) and the step table (paths); it reads the rows of the steps it loads.

Output per step: "input_ids", "image_token", "labels" int32 [k, b/k, S], "attention_mask" bool
[k, b/k, S], "buckets": tuple (ascending configured bucket) of {"pixels": float32 [k, n, 14Hc,
14Wc, 3], "grid": int32 [k, n, 2]}, "meta" (host only). `image_token` numbers items globally:
the global array of bucket j is the process-major concatenation of the local slots, so local
slot s of bucket j on process p is item sum_{j'<j} P*n_{j'} + p*n_j + s, token item*T + t
(T = tokens per item, `cfg.model.projector.grid_size`²). For P = 1 this is
`buckets.make_batch`'s numbering without its slot padding.

Fillers (remainder padding and load failures) have all labels -100: a micro-batch may hold no
supervised token at all, so the loss must divide by max(count, 1).

Host-side code (numpy, PIL, grain): no jax import.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import pathlib
import tempfile

import numpy as np

from hiwin_jax import outputs
from hiwin_jax.data import image, layout, metadata, slicing
from hiwin_jax.data.array_record import ArrayRecordSource
from hiwin_jax.data.conversation import IGNORE_INDEX, preprocess
from hiwin_jax.data.plan import Plan, SampleKey, Settings, StepTable, sample_key
from hiwin_jax.data.sources import JsonSource, SampleError, Source

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Sample:
  id: str
  seq: layout.Sequence
  items: tuple[np.ndarray, ...]  # slices (row-major), then the overview


class StepLoader:
  """grain map: step -> this process's share of the step's global batch (module docstring).
  Picklable and small: the step table and the source are read on demand in each worker.
  `epoch_starts`: the first step of each epoch, then the total (`Plan._starts`)."""

  def __init__(self, steps: StepTable, settings: Settings, source: Source, tokenizer,
               process_index: int = 0, process_count: int = 1, epoch_starts=(0,)):
    g, k, p_count = settings.global_batch_size, settings.grad_accum, process_count
    if g % k or (g // k) % p_count:
      raise ValueError(f"data.global_batch_size={g} must split into grad_accum={k} micro-batches "
                       f"of equal size divisible by process_count={p_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    self.steps, self.settings, self.source, self.tokenizer = steps, settings, source, tokenizer
    self.process_index, self.process_count = process_index, process_count
    self.epoch_starts = tuple(int(x) for x in epoch_starts)
    self.per_micro = g // k // p_count  # samples per process per micro-batch

  def positions(self) -> list[int]:
    """Batch positions of this process, micro-batch-major."""
    s = self.settings
    micro = s.global_batch_size // s.grad_accum
    p0 = self.process_index * self.per_micro
    return [m * micro + p0 + i for m in range(s.grad_accum) for i in range(self.per_micro)]

  def _load(self, member) -> _Sample:
    """One sample from its `plan.STEP_MEMBER` row; SampleError if it cannot be loaded."""
    s = self.settings
    record, image_file = self.source.fetch(int(member["record"]))  # a path or encoded bytes
    has_image = record.image_path is not None
    ex = preprocess(record.conversations, self.tokenizer, s.template, has_image,
                    model_max_length=metadata.NO_TRUNCATION, variant=s.tokens.layout)
    items, layouts = (), []
    if has_image:
      try:
        img = image.load_image(image_file, name=f"{record.id}: {record.image_path}",
                               max_pixels=s.max_pixels)
      except image.ImageError as e:
        raise SampleError("unreadable_image", str(e)) from e
      base = (int(member["width"]), int(member["height"]))
      draw = float(member["draw"])
      expected = base if image.is_textvqa(record.image_path) else s.pre_resize_size(
          base, "", draw)
      pre_resize = functools.partial(self._pre_resize, record=record, draw=draw,
                                     expected=expected)
      span, items = image.prepare_image(img, s.tokens, max_slice_nums=s.max_slice_nums,
                                        scale_resolution=s.scale_resolution,
                                        never_split=not s.slicing, pre_resize=pre_resize)
      layouts = [span]
    seq = layout.splice(ex.input_ids, ex.labels, layouts, pad_id=self.tokenizer.pad_id)
    if len(seq.input_ids) != member["length"]:
      raise SampleError("size_mismatch", f"{record.id}: {len(seq.input_ids)} tokens, the plan "
                        f"expected {member['length']} (image size differs from its header?)")
    return _Sample(record.id, seq, items)

  def _pre_resize(self, img, variant, *, record, draw, expected):
    """The training pre-resize with the planned draw; the result must have the planned size."""
    img = image.train_pre_resize(img, record.image_path, draw, variant=variant,
                                 scale_resolution=self.settings.scale_resolution)
    if img.size != expected:
      raise SampleError("size_mismatch", f"{record.id}: image is {img.size} after the "
                        f"pre-resize, the plan (from its header) expected {expected}")
    return img

  def __call__(self, step: int) -> dict:
    s = self.settings
    step = int(step)
    epoch = int(np.searchsorted(self.epoch_starts, step, side="right")) - 1
    members, code = self.steps.members(step), self.steps.key(step)
    mine = self.positions()
    loaded: dict[int, _Sample | None] = {}
    skipped = collections.Counter()
    for q in mine:
      try:
        loaded[q] = self._load(members[q])
      except SampleError as e:
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
            loaded[q] = self._load(members[q])
          except SampleError as e:
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
      sample, is_filler = loaded[q], bool(members[q]["filler"])
      if sample is None:
        sample, is_filler = stand_in, True
      if is_filler:
        seq = sample.seq
        sample = _Sample(sample.id, layout.Sequence(
            seq.input_ids, seq.image_token, np.full_like(seq.labels, IGNORE_INDEX)), sample.items)
      samples.append(sample)
      ids.append(sample.id)
      fill.append(is_filler)
    key = sample_key(s, code)
    micro = [self._assemble(samples[m * self.per_micro:(m + 1) * self.per_micro], code)
             for m in range(s.grad_accum)]
    out = {name: np.stack([mb[name] for mb in micro])
           for name in ("input_ids", "image_token", "labels", "attention_mask")}
    out["buckets"] = tuple({"pixels": np.stack([mb["buckets"][j]["pixels"] for mb in micro]),
                            "grid": np.stack([mb["buckets"][j]["grid"] for mb in micro])}
                           for j in range(len(micro[0]["buckets"])))
    out["meta"] = {"step": step, "epoch": epoch, "ids": ids, "filler": fill,
                   "key": tuple(key), "load_skipped": dict(skipped)}
    return out

  def _blank(self, code) -> _Sample:
    """A stand-in with the key's shapes: zero pixels filling each canvas, pad text, labels -100,
    no image token (so its attention rows are all text)."""
    ov, sl, n, seq_len = (int(x) for x in code)
    bk = self.settings.buckets
    items = tuple(np.zeros((bk[j][0] * slicing.PATCH_SIZE, bk[j][1] * slicing.PATCH_SIZE, 3),
                           np.float32) for j in (([sl] * n + [ov]) if ov >= 0 else []))
    seq = layout.Sequence(np.full(seq_len, self.tokenizer.pad_id, np.int32),
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
    settings = self.settings
    pad_id = self.tokenizer.pad_id
    out = {"input_ids": np.full((count, seq_len), pad_id, np.int32),
           "image_token": np.full((count, seq_len), -1, np.int32),
           "labels": np.full((count, seq_len), IGNORE_INDEX, np.int32),
           "attention_mask": np.zeros((count, seq_len), bool)}
    pixels = {j: np.zeros((n_local[j], settings.buckets[j][0] * slicing.PATCH_SIZE,
                           settings.buckets[j][1] * slicing.PATCH_SIZE, 3), np.float32)
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
        tok = layout.renumber_image_tokens(tok, flat, settings.tokens.tokens_per_item)
      out["input_ids"][i, :length] = seq.input_ids
      out["image_token"][i, :length] = tok
      out["labels"][i, :length] = seq.labels
      out["attention_mask"][i, :length] = True
    out["buckets"] = tuple({"pixels": pixels[j], "grid": grids[j]} for j in used)
    return out


class TrainIterator:
  """Deterministic, checkpointable iterator over the steps of the plan (grain underneath).

  The state is the next step (plus the load-time skip counters): every step is a pure function of
  the plan, so `set_state` restarts grain at that step, with any number of workers or processes.
  `get_state` returns JSON bytes and `start_prefetch` exists, so grain's orbax handler
  (`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`) saves and restores it.
  """

  def __init__(self, loader: StepLoader, plan: Plan, *, workers: int = 0, prefetch: int = 2,
               start_step: int = 0, keep_alive=None):
    self.loader, self.plan = loader, plan
    self._keep_alive = keep_alive  # the temporary folder the loader's files are in, if any
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


def make_source(data_cfg, index_dir: str | None = None) -> Source:
  """The records of `data.format`: "json" (`data.json` + `data.image_folder`; the byte ranges
  of its entries kept in `index_dir`, else in memory) or "array_record"
  (`data.array_record_dir`, written by `hiwin data build`)."""
  if data_cfg.format == "json":
    return JsonSource(data_cfg.json, data_cfg.image_folder, index_dir)
  if data_cfg.format == "array_record":
    return ArrayRecordSource(data_cfg.array_record_dir)
  raise ValueError(f"data.format must be 'json' or 'array_record', got {data_cfg.format!r}")


def cache_dir(data_cfg) -> str | None:
  """Where the metadata cache, the json index and the step table live: `data.cache_dir`, else
  the prepared dataset's `cache/` folder when it can be written, else None (nothing kept)."""
  if data_cfg.cache_dir:
    return str(data_cfg.cache_dir)
  if data_cfg.format == "array_record":
    folder = pathlib.Path(data_cfg.array_record_dir, "cache")
    try:
      folder.mkdir(exist_ok=True)
      outputs.probe_writable(folder)  # not os.access: it says yes to root on a squashed NFS mount
    except OSError as e:
      log.warning("data: %s cannot be written (%s); the metadata pass is not cached (set "
                  "data.cache_dir)", folder, e.strerror or e)
      return None
    return str(folder)
  return None


def make_plan(data_cfg, model_cfg, tokenizer, source: Source | None = None, *,
              cache: str | None = None, process_index: int = 0, process_count: int = 1
              ) -> tuple[Plan, Source]:
  """The metadata pass (cached in `cache`, default `cache_dir(data_cfg)`; this process's share
  first) and the global plan; returns (plan, source)."""
  settings = Settings.from_configs(data_cfg, model_cfg)
  cache = cache_dir(data_cfg) if cache is None else cache
  source = make_source(data_cfg, cache) if source is None else source
  meta = metadata.scan(source, tokenizer, settings, cache, workers=data_cfg.metadata_workers,
                       process_index=process_index, process_count=process_count)
  return Plan(meta, settings), source


def make_train_iterator(data_cfg, model_cfg, tokenizer, *, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0) -> TrainIterator:
  """The training iterator of `data_cfg` (`cfg.data`, see `config.data_config`) for one process.

  model_cfg: the model config (`cfg.model`: its `projector` gives the token layout, tokens per
  item and separator ids, its `vision` the ViT side; the projector config itself is accepted
  too). tokenizer: a `tokenizer.LlamaSpmTokenizer` or any object with its interface. Every
  process must use the same configs and data; processes sharing `data.cache_dir` share the
  metadata pass.
  """
  cache, tmp = cache_dir(data_cfg), None
  if cache is None:
    tmp = tempfile.TemporaryDirectory(prefix="hiwin-data-")
    cache = tmp.name
  plan, source = make_plan(data_cfg, model_cfg, tokenizer, cache=cache,
                           process_index=process_index, process_count=process_count)
  steps = StepTable.write(plan, cache)
  loader = StepLoader(steps, plan.settings, source, tokenizer, process_index, process_count,
                      plan.epoch_starts)
  return TrainIterator(loader, plan, workers=data_cfg.workers, prefetch=data_cfg.prefetch,
                       start_step=start_step, keep_alive=tmp)
