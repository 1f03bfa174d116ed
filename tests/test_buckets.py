"""Shape buckets: coverage of every legal grid, packing, and batch assembly."""

import numpy as np
import pytest

from hiwin_jax.data import buckets, layout

R2 = layout.TokenLayout("r2", 12, newline_token=13, comma_token=29892)


def test_default_buckets_hold_every_legal_grid():
  canvases = buckets.default_buckets()
  assert len(canvases) <= 16
  for h in range(2, 289):
    for w in range(2, 289):
      if h * w <= 576:
        hc, wc = canvases[buckets.assign_bucket(h, w, canvases)]
        assert h <= hc and w <= wc
  assert canvases[buckets.assign_bucket(24, 24, canvases)] == (24, 24)
  with pytest.raises(ValueError, match="no shape bucket holds a 300x2"):
    buckets.assign_bucket(300, 2, canvases)


@pytest.mark.parametrize("n,slots", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 6), (6, 6), (7, 8),
                                     (9, 12), (13, 16), (17, 24)])
def test_slot_counts_come_from_a_small_set(n, slots):
  assert buckets.slot_count(n) == slots


def test_pack_places_items_top_left_and_records_grids():
  rng = np.random.default_rng(0)
  items = [rng.standard_normal((14 * h, 14 * w, 3)).astype(np.float32)
           for h, w in [(24, 24), (27, 20), (24, 24), (19, 29), (24, 24)]]
  packed = buckets.pack_items(items, buckets.default_buckets())
  assert sorted(packed.flat_index.tolist()) == sorted(set(packed.flat_index.tolist()))
  offsets = np.cumsum([0] + [len(b["grid"]) for b in packed.buckets])
  for k, px in enumerate(items):
    entry = np.searchsorted(offsets, packed.flat_index[k], side="right") - 1
    slot = packed.flat_index[k] - offsets[entry]
    bucket = packed.buckets[entry]
    h, w = px.shape[0] // 14, px.shape[1] // 14
    assert tuple(bucket["grid"][slot]) == (h, w)
    np.testing.assert_array_equal(bucket["pixels"][slot, :14 * h, :14 * w], px)
    assert not bucket["pixels"][slot, 14 * h:].any() and not bucket["pixels"][slot, :, 14 * w:].any()
  square = packed.buckets[packed.bucket_ids.index(0)]
  assert square["pixels"].shape[0] == 3 and (square["grid"] > 0).all()  # 3 items -> 3 slots


def test_make_batch_maps_sample_item_tokens_to_flat_indices():
  rng = np.random.default_rng(1)
  items_a = [rng.standard_normal((14 * 27, 14 * 20, 3)).astype(np.float32) for _ in range(2)]
  items_a.append(rng.standard_normal((14 * 19, 14 * 29, 3)).astype(np.float32))
  items_b = [rng.standard_normal((14 * 24, 14 * 24, 3)).astype(np.float32)]
  seq_a = layout.splice(np.array([1, layout.IMAGE_TOKEN_INDEX, 5]), None,
                        [layout.image_layout((2, 1), R2)])
  seq_b = layout.splice(np.array([1, 9, layout.IMAGE_TOKEN_INDEX]), None,
                        [layout.image_layout(None, R2)])
  batch = buckets.make_batch([(seq_a, items_a), (seq_b, items_b)], buckets.default_buckets(),
                             seq_len=600, tokens_per_item=144)
  assert batch["input_ids"].shape == (2, 600)
  assert batch["attention_mask"][0].sum() == len(seq_a.input_ids)
  packed = buckets.pack_items(items_a + items_b, buckets.default_buckets())
  # Sample b's 144 tokens are its only item, which is item 3 of the batch.
  tok_b = batch["image_token"][1][batch["image_token"][1] >= 0]
  assert list(tok_b) == list(packed.flat_index[3] * 144 + np.arange(144))
  # Sample a's second slice (item 1) follows its first slice and a separator (R2).
  tok_a = batch["image_token"][0]
  assert tok_a[1 + 145] == packed.flat_index[1] * 144
  assert (batch["labels"][batch["image_token"] >= 0] == -100).all()
  assert (batch["image_token"][~batch["attention_mask"]] == -1).all()
