"""Token organisation (spec §5) against its re-statement in tests/reference/layout.py."""

import numpy as np
import pytest

from hiwin_jax.data import layout, slicing
from tests.reference import layout as layout_ref

GRIDS = [None, (1, 2), (2, 1), (2, 2), (3, 2), (1, 8), (9, 1), (4, 2)]


def official(name, grid_size=12):
  """The token layout of the official checkpoints: LLaMA's "\n" = 13 and "," = 29892."""
  return layout.TokenLayout(name, grid_size, newline_token=13, comma_token=29892)


def ind_tokens(grid):
  """The official slicer's `ind_tokens` (spec §1.3): 13 ends a row of slices, else 29892."""
  cols, rows = grid
  return [13 if x == cols - 1 else 29892 for _ in range(rows) for x in range(cols)]


@pytest.mark.parametrize("order", layout.LAYOUTS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("q", [12, 8])
def test_layout_matches_the_official_order_and_counts(grid, order, q):
  ind = [] if grid is None else ind_tokens(grid)
  tokens = official(order, grid_size=q)
  got = layout.image_layout(grid, tokens)
  want = layout_ref.image_span(grid, ind, order, q=q)
  n = q * q
  assert len(got) == len(want) == layout.image_token_count(grid, tokens)
  for k, item in enumerate(want):
    if item[0] == "img":
      assert got.item_token[k] == item[1] * n + item[2] and got.token_ids[k] == -1, k
    else:
      assert got.token_ids[k] == item[1] and got.item_token[k] == -1, k
  if grid is None:
    assert len(got) == n
  else:
    cols, rows = grid
    expected = q * rows * (q * cols + 1) + 1 + n if order == "r1" else (n + 1) * cols * rows + n
    assert len(got) == expected
    if order == "r1":  # "," after the grid, but "\n" when there is a single slice column
      assert got.token_ids[-n - 1] == (29892 if cols > 1 else 13)


def test_splice_places_images_masks_labels_and_offsets_items():
  a = layout.image_layout((2, 1), official("r2"))
  b = layout.image_layout(None, official("r2"))
  ids = np.array([1, 5, layout.IMAGE_TOKEN_INDEX, 7, layout.IMAGE_TOKEN_INDEX, 8, 9])
  labels = np.array([-100, -100, -100, 7, -100, 8, 9])
  seq = layout.splice(ids, labels, [a, b])
  n_a = len(a)
  assert len(seq.input_ids) == 6 + n_a + 144 - 1 - 1 + 1
  assert list(seq.input_ids[:2]) == [1, 5] and seq.input_ids[2 + n_a] == 7
  img = seq.image_token >= 0
  assert (seq.labels[img] == -100).all()
  assert (seq.labels[2:2 + n_a] == -100).all()  # separators too
  assert list(seq.labels[-2:]) == [8, 9]
  # The second image's tokens index after the first image's 3 items.
  second = seq.image_token[3 + n_a:3 + n_a + 144]
  assert list(second) == list(range(3 * 144, 4 * 144))
  assert list(seq.input_ids[2 + 144:2 + 145]) == [29892]
  trunc = layout.splice(ids, labels, [a, b], max_length=10)
  assert len(trunc.input_ids) == 10


def test_splice_rejects_placeholder_count_mismatch():
  with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
    layout.splice(np.array([layout.IMAGE_TOKEN_INDEX] * 2), None,
                  [layout.image_layout(None, official("r1"))])
  with pytest.raises(ValueError, match="unknown token layout"):
    official("r3")


def test_separator_ids_follow_the_vocabulary_and_the_official_slicer():
  plan = slicing.plan_slices(1024, 768, 9)
  span = layout.image_layout(plan.grid, official("r2"))
  assert [t for t in span.token_ids if t >= 0] == ind_tokens(plan.grid)
  custom = layout.image_layout(plan.grid, layout.TokenLayout("r2", 12, 7, 9))
  assert sorted(set(custom.token_ids) - {-1}) == [7, 9]


def test_ind_tokens_of_a_single_column_end_every_row_with_newline():
  assert layout.ind_tokens(slicing.plan_slices(500, 2000, 9).grid, official("r1")) == [13] * 8
  assert layout.ind_tokens(slicing.plan_slices(4000, 300, 9).grid,
                           official("r1")) == [29892] * 8 + [13]
  assert layout.ind_tokens(None, official("r1")) == []


def test_token_counts():
  grid = slicing.plan_slices(1024, 768, 9).grid
  assert layout.image_token_count(grid, official("r1")) == 12 * 2 * 37 + 145
  assert layout.image_token_count(grid, official("r2")) == 145 * 6 + 144
  assert layout.image_token_count(grid, official("r2", grid_size=8)) == 65 * 6 + 64


def test_token_layout_reads_the_projector_config():
  from hiwin_jax import config
  projector = config.projector_config()
  projector.update(grid_size=8, layout="r2", comma_token=11)
  tokens = layout.TokenLayout.from_config(projector)
  assert tokens == layout.TokenLayout("r2", 8, 13, 11) and tokens.tokens_per_item == 64


def test_renumbering_maps_each_item_to_its_flat_index():
  tok = np.array([-1, 0, 1, 3, -1, 4, 7, 8, 11])  # items of 4 tokens: 0, 0, 0, 1, 1, 1, 2, 2
  flat = np.array([5, 2, 9])
  got = layout.renumber_image_tokens(tok, flat, tokens_per_item=4)
  np.testing.assert_array_equal(got, [-1, 20, 21, 23, -1, 8, 11, 36, 39])
