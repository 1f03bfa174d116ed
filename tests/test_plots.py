"""Every figure function of `hiwin_jax.plots` writes a readable, non-empty PNG of its content."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hiwin_jax import plots


def _png(path, min_size=(300, 200)):
  with Image.open(path) as image:
    assert image.format == "PNG" and image.width >= min_size[0] and image.height >= min_size[1]
    pixels = np.asarray(image.convert("L"))
  assert pixels.std() > 5, f"{path.name} is blank"


def _scores(acc):
  return {"accuracy": acc, "chance": 0.3, "n": 8, "per_category": {
      "colour": {"accuracy": acc, "chance": 0.25, "n": 4},
      "pattern": {"accuracy": acc / 2, "chance": 1 / 3, "n": 4}}}


def test_loss_png_with_and_without_learning_rate(tmp_path):
  steps = list(range(1, 41))
  losses = [5.0 * 0.9 ** s for s in steps]
  _png(plots.write_loss_png(tmp_path / "a.png", steps, losses, "run", lrs=[1e-3] * 40))
  _png(plots.write_loss_png(tmp_path / "b.png", steps[:1], losses[:1]))


def test_stage_curves_accuracy_bars_and_examples(tmp_path):
  stages = [{"name": f"stage {k}", "steps": [1, 2, 3], "losses": [3.0, 2.0, 1.5],
             "lr": [0.0, 1e-3, 5e-4]} for k in range(3)]
  _png(plots.stage_loss_curves(tmp_path / "curves.png", stages, "loss"), (900, 200))
  _png(plots.accuracy_bars(tmp_path / "bars.png",
                           {"untrained": _scores(0.0), "baseline": _scores(0.5),
                            "full": _scores(1.0)}))
  image = tmp_path / "image.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(image)
  views = {"slice": np.zeros((16, 16, 3), np.uint8), "overview": np.ones((8, 8, 3), np.uint8)}
  examples = [{"image": image, "box": (4, 4, 40, 30), "views": views, "question": "Which?",
               "truth": "red", "answers": {"baseline": "blue", "full": "red"},
               "right": {"baseline": False, "full": True}}] * 3
  _png(plots.examples_grid(tmp_path / "grid.png", examples, columns=3, title="examples"))
  with pytest.raises(ValueError, match="at least one"):
    plots.examples_grid(tmp_path / "none.png", [])
