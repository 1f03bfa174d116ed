"""Token organisation (spec §5) against its re-statement in tests/reference/layout.py."""

import numpy as np
import pytest

from hiwin_jax.data import layout as Lay
from tests.reference import layout as layout_ref

GRIDS = [None, (1, 2), (2, 1), (2, 2), (3, 2), (1, 8), (9, 1), (4, 2)]


def ind_tokens(grid):
  cols, rows = grid
  return [Lay.NEWLINE_TOKEN if x == cols - 1 else 29892 for _ in range(rows) for x in range(cols)]


@pytest.mark.parametrize("layout", Lay.LAYOUTS)
@pytest.mark.parametrize("grid", GRIDS)
def test_layout_matches_the_official_order_and_counts(grid, layout):
  ind = [] if grid is None else ind_tokens(grid)
  got = Lay.image_layout(grid, layout)
  want = layout_ref.image_span(grid, ind, layout)
  assert len(got) == len(want)
  for k, item in enumerate(want):
    if item[0] == "img":
      assert got.item_token[k] == item[1] * 144 + item[2] and got.token_ids[k] == -1, k
    else:
      assert got.token_ids[k] == item[1] and got.item_token[k] == -1, k
  if grid is None:
    assert len(got) == 144
  else:
    cols, rows = grid
    expected = 12 * rows * (12 * cols + 1) + 1 + 144 if layout == "r1" else 145 * cols * rows + 144
    assert len(got) == expected
    if layout == "r1":  # "," after the grid, but "\n" when there is a single slice column
      assert got.token_ids[-145] == (29892 if cols > 1 else 13)


def test_splice_places_images_masks_labels_and_offsets_items():
  a = Lay.image_layout((2, 1), "r2")
  b = Lay.image_layout(None, "r2")
  ids = np.array([1, 5, Lay.IMAGE_TOKEN_INDEX, 7, Lay.IMAGE_TOKEN_INDEX, 8, 9])
  labels = np.array([-100, -100, -100, 7, -100, 8, 9])
  seq = Lay.splice(ids, labels, [a, b])
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
  trunc = Lay.splice(ids, labels, [a, b], max_length=10)
  assert len(trunc.input_ids) == 10


def test_splice_rejects_placeholder_count_mismatch():
  with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
    Lay.splice(np.array([Lay.IMAGE_TOKEN_INDEX] * 2), None, [Lay.image_layout(None, "r1")])
  with pytest.raises(ValueError, match="unknown token layout"):
    Lay.image_layout((2, 2), "r3")


def test_separator_ids_follow_the_vocabulary_and_the_official_slicer():
  from hiwin_jax.data import slicing
  plan = slicing.plan_slices(1024, 768, 9)
  official = Lay.image_layout(plan.grid, "r2")
  assert [t for t in official.token_ids if t >= 0] == list(plan.ind_tokens)
  custom = Lay.image_layout(plan.grid, "r2", newline_token=7, comma_token=9)
  assert sorted(set(custom.token_ids) - {-1}) == [7, 9]
