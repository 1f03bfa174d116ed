"""The global training plan: which samples form the global batch of every step.

Static shapes across processes come from a plan that every process computes identically, a pure
function of (metadata, settings):

1. Sample key = (overview canvas, slice canvas, number of slices, sequence length rounded up to
   `data.seq_multiple`, capped at `data.max_length`). A global batch holds samples of one key
   only, so its shapes are fully static with no padded item slots.
2. Epoch plan (`Plan.epoch`): the training pre-resize of spec §1.4 (the 10% "towards 6 slices"
   rescale) is drawn per (seed, epoch, record) here, on sizes only, because it changes the key;
   an augmented variant that would exceed `max_length` or the buckets keeps its original size.
   Samples are grouped by key, shuffled within keys, cut into global batches; a key's remainder
   is padded with *filler* copies of its own samples (the loader gives them labels -100;
   `remainder="pad"`, default: every sample is seen each epoch) or dropped (`"drop"`). The batch
   order is shuffled. Epochs follow each other; step t is a pure function of (metadata, config, t).

The metadata (`Metadata`, written by `metadata.scan`) holds, per kept record, its base size,
base geometry and spliced length. `StepTable` is the plan as the loader reads it: per step, the
key and the global batch's members, in files a grain worker reads one step at a time.

Host-side code (numpy): no jax import.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import pathlib
from typing import NamedTuple

import numpy as np

from hiwin_jax.data import buckets, image, layout, npy_files, slicing

NO_DRAW = 1.0  # a pre-resize draw >= image.TRAIN_RESIZE_PROB: never augments


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
  tokens: layout.TokenLayout  # from cfg.model.projector
  buckets: tuple[tuple[int, int], ...]
  scale_resolution: int = slicing.SCALE_RESOLUTION  # the ViT's input side (model.vision)
  max_pixels: int = image.MAX_IMAGE_PIXELS  # the pixel budget of an image's header

  @classmethod
  def from_configs(cls, data_cfg, model_cfg) -> Settings:
    """data_cfg: `cfg.data` (`config.data_config`); model_cfg: `cfg.model` (or its projector
    config alone, with the CLIP-L/14-336 ViT assumed)."""
    proj = model_cfg.projector if "projector" in model_cfg else model_cfg
    side = (int(model_cfg.vision.image_size) if "vision" in model_cfg
            else slicing.SCALE_RESOLUTION)
    if data_cfg.remainder not in ("pad", "drop"):
      raise ValueError(f"data.remainder must be 'pad' or 'drop', got {data_cfg.remainder!r}")
    return cls(str(data_cfg.template), bool(data_cfg.slicing), int(data_cfg.max_slice_nums),
               int(data_cfg.max_length), int(data_cfg.seq_multiple),
               int(data_cfg.global_batch_size), int(data_cfg.grad_accum), int(data_cfg.seed),
               bool(data_cfg.shuffle), str(data_cfg.remainder), int(data_cfg.epochs),
               layout.TokenLayout.from_config(proj),
               buckets.default_buckets((side // slicing.PATCH_SIZE) ** 2), side,
               int(data_cfg.max_image_pixels))

  def plan_slices(self, size) -> slicing.SlicePlan:
    return slicing.plan_slices(size[0], size[1], self.max_slice_nums, self.scale_resolution,
                               never_split=not self.slicing)

  def geometry(self, size) -> tuple[int, int, int, int]:
    """(overview bucket, slice bucket or -1, slices, image tokens) of an image of `size` as the
    slicer sees it; ValueError when the model cannot take it."""
    plan = self.plan_slices(size)
    slicing.check_plan(plan)
    ov = buckets.assign_bucket(*plan.overview_patches, self.buckets)
    sl = (-1 if plan.grid is None
          else buckets.assign_bucket(*plan.slice_patches, self.buckets))
    return ov, sl, plan.num_slices, layout.image_token_count(plan.grid, self.tokens)

  def pre_resize_size(self, size, path: str, draw: float) -> tuple[int, int]:
    """`image.train_pre_resize_size` with this model's variant and ViT side."""
    return image.train_pre_resize_size(size, path, draw, variant=self.tokens.layout,
                                       scale_resolution=self.scale_resolution)

  def seq_bucket(self, length):
    m = self.seq_multiple
    return np.minimum(-(-np.asarray(length) // m) * m, self.max_length)


@dataclasses.dataclass
class Metadata:
  """Per kept record (arrays of equal length; `index` is the record's position in the source):
  base size (after the deterministic TextVQA pre-resize), base geometry and spliced length.
  Fields: index, width, height, has_image, augmentable, text_len, ov, sl, n, length."""
  num_records: int
  arrays: dict[str, np.ndarray]
  counts: dict[str, int]
  excluded: list  # [record index, id, reason, message]

  def __len__(self) -> int:
    return len(self.arrays["index"])


class SampleKey(NamedTuple):
  """The shape class of a sample: canvases (Hc, Wc) in patches (None: no such items)."""
  overview: tuple[int, int] | None
  slices: tuple[int, int] | None
  num_slices: int
  seq_len: int


def sample_key(settings: Settings, code) -> SampleKey:
  """The shapes of a key code (ov, sl, n, seq_len) of the plan."""
  ov, sl, n, s = (int(x) for x in code)
  bk = settings.buckets
  return SampleKey(bk[ov] if ov >= 0 else None, bk[sl] if sl >= 0 else None, n, s)


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

  @property
  def epoch_starts(self) -> tuple[int, ...]:
    """The first step of each epoch, then the total."""
    return tuple(int(x) for x in self._starts)

  def sample_key(self, code) -> SampleKey:
    return sample_key(self.settings, code)

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
    draws = np.full(num, NO_DRAW)
    pos = np.flatnonzero(a["augmentable"] & (all_draws[a["index"]] < image.TRAIN_RESIZE_PROB))
    if len(pos):
      # The augmented size depends on the base size only (any draw below the probability), so
      # the geometry is computed once per distinct size.
      sizes, inv = np.unique(np.stack([a["width"][pos], a["height"][pos]], 1), axis=0,
                             return_inverse=True)
      inv = inv.reshape(-1)
      geo = np.array([_augmented_geometry(s, (int(w), int(h))) for w, h in sizes],
                     np.int64).reshape(-1, 4)
      new_len = a["text_len"][pos].astype(np.int64) - 1 + geo[inv, 3]
      take = (geo[inv, 3] >= 0) & (new_len <= s.max_length)
      pos, inv = pos[take], inv[take]
      draws[pos] = all_draws[a["index"][pos]]
      ov[pos], sl[pos], n[pos], length[pos] = geo[inv, 0], geo[inv, 1], geo[inv, 2], new_len[take]
    codes = np.stack([ov, sl, n, s.seq_bucket(length)], axis=1).astype(np.int64)
    uniq, inverse = unique_rows(codes)
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


def unique_rows(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`np.unique(codes, axis=0, return_inverse=True)` of int64 [N, C] rows >= -1, through one
  int64 per row: its mixed-radix number (columns shifted to >= 0) sorts like the row, so the
  rows and the inverse are the same, without sorting [N, C] records."""
  shifted = codes + 1
  radix = shifted.max(axis=0, initial=0) + 1
  scalar = np.zeros(len(codes), np.int64)
  for c in range(codes.shape[1]):
    scalar = scalar * radix[c] + shifted[:, c]
  _, first, inverse = np.unique(scalar, return_index=True, return_inverse=True)
  return codes[first], inverse.reshape(-1)


@functools.lru_cache(maxsize=1 << 16)
def _augmented_geometry(settings: Settings, base: tuple[int, int]) -> tuple[int, int, int, int]:
  """(ov, sl, n, image tokens) of an image of base size `base` after the 10% training
  pre-resize; -1s when the pre-resize keeps it or the model cannot take the new size."""
  new = settings.pre_resize_size(base, "", 0.0)
  if new == base:
    return (-1, -1, -1, -1)
  try:
    return settings.geometry(new)
  except ValueError:
    return (-1, -1, -1, -1)


STEP_MEMBER = np.dtype([("record", np.int64), ("draw", np.float64), ("length", np.int32),
                        ("width", np.int32), ("height", np.int32), ("filler", np.bool_)])


class StepTable:
  """What loading a step needs, per step of the plan: `key(step)` (ov, sl, n, seq_len) and
  `members(step)` (`STEP_MEMBER` [G]: per sample of the global batch its record index in the
  source, pre-resize draw, planned spliced length, base size and filler flag).

  `StepTable.write(plan, folder)` stores it as two `.npy` files (named by their content) read a
  row at a time (`npy_files.RowFile`): a grain worker holds the rows of the steps it loads, not
  the plan, whatever the dataset's size. Picklable (the paths travel)."""

  def __init__(self, keys, members):
    self._keys, self._members = keys, members

  @staticmethod
  def arrays(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """keys int64 [steps, 4], members STEP_MEMBER [steps, G] of every epoch of `plan`."""
    a = plan.meta.arrays
    keys, members = [], []
    for e in range(len(plan.steps_per_epoch)):
      ep = plan.epoch(e)
      rows = np.empty(ep.members.shape, STEP_MEMBER)
      rows["record"] = a["index"][ep.members]
      rows["draw"] = ep.draw[ep.members]
      rows["length"] = ep.length[ep.members]
      rows["width"], rows["height"] = a["width"][ep.members], a["height"][ep.members]
      rows["filler"] = ep.filler
      keys.append(ep.keys)
      members.append(rows)
    return np.concatenate(keys), np.concatenate(members)

  @classmethod
  def write(cls, plan: Plan, folder: str | os.PathLike) -> StepTable:
    keys, members = cls.arrays(plan)
    digest = hashlib.blake2b(keys.tobytes() + members.tobytes(), digest_size=10).hexdigest()
    paths = [pathlib.Path(folder, f"steps-{digest}-{name}.npy") for name in ("keys", "members")]
    for path, array in zip(paths, (keys, members)):
      if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        npy_files.save_atomic(path, array)
    return cls(*(npy_files.RowFile(p) for p in paths))

  def __len__(self) -> int:
    return len(self._keys)

  def key(self, step: int) -> np.ndarray:
    return self._keys[step]

  def members(self, step: int) -> np.ndarray:
    return self._members[step]
