"""Figures the project writes: training loss curves and the demo's results (matplotlib).

Every function draws on its own `matplotlib.figure.Figure` (no pyplot, no global state, no GUI
backend) and writes one PNG. Inputs are plain Python data (lists, dicts, paths), so a finished
run can be re-plotted from its `metrics.jsonl` and `demo_summary.json`.

Host-side code: matplotlib, numpy, PIL; no jax.
"""

from __future__ import annotations

import os
import pathlib
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from hiwin_jax import outputs

# One colour per model in every demo figure (matplotlib's default cycle, colour-blind safe).
MODEL_COLOURS = {"untrained": "#7f7f7f", "baseline": "#ff7f0e", "full": "#1f77b4"}
_LOSS, _LR = "#1f77b4", "#d62728"
_DPI = 110


def _save(fig: Figure, path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with outputs.atomic_file(path, "wb") as f:  # a reader never sees half a PNG
    fig.savefig(f, format="png", dpi=_DPI, bbox_inches="tight")
  return path


def _loss_axes(ax, steps: Sequence[int], losses: Sequence[float],
               lrs: Sequence[float] | None, title: str) -> None:
  """Loss (log scale when it spans more than a decade) on `ax`, the learning rate on a twin."""
  ax.plot(steps, losses, color=_LOSS, linewidth=1.2)
  finite = np.asarray([v for v in losses if np.isfinite(v)], np.float64)
  if finite.size and finite.min() > 0 and finite.max() / finite.min() > 10:
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (mean cross-entropy per token)", color=_LOSS)
  ax.tick_params(axis="y", colors=_LOSS)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if lrs is not None and len(lrs) == len(steps):
    twin = ax.twinx()
    twin.plot(steps, lrs, color=_LR, linewidth=1.0, linestyle="--")
    twin.set_ylabel("learning rate", color=_LR)
    twin.tick_params(axis="y", colors=_LR)
    twin.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    twin.set_ylim(bottom=0)


def write_loss_png(path: str | os.PathLike, steps: Sequence[int], losses: Sequence[float],
                   title: str = "training loss", lrs: Sequence[float] | None = None
                   ) -> pathlib.Path:
  """One run's loss curve (and its learning rate when `lrs` is given, one per step) as a PNG:
  the training loop's `loss.png`."""
  fig = Figure(figsize=(7, 4))
  _loss_axes(fig.add_subplot(), list(steps), list(losses), lrs, title)
  return _save(fig, path)


def stage_loss_curves(path: str | os.PathLike, stages: Sequence[Mapping[str, Any]],
                      title: str | None = None) -> pathlib.Path:
  """One panel per training stage, side by side.

  stages: [{"name": str, "steps": [int], "losses": [float], "lr": [float] (optional)}, ...],
    e.g. the rows of each stage's metrics.jsonl.
  """
  if not stages:
    raise ValueError("stage_loss_curves needs at least one stage")
  fig = Figure(figsize=(4.2 * len(stages), 3.6), layout="constrained")
  axes = fig.subplots(1, len(stages), squeeze=False)[0]
  for ax, stage in zip(axes, stages):
    _loss_axes(ax, stage["steps"], stage["losses"], stage.get("lr"), stage["name"])
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def accuracy_bars(path: str | os.PathLike, scores: Mapping[str, Mapping[str, Any]],
                  title: str | None = None) -> pathlib.Path:
  """Grouped bars: accuracy of each model per question kind and overall, chance as a line.

  scores: model label -> `synthetic.score` output ({"accuracy", "chance", "per_category":
    {kind: {"accuracy", "chance", "n"}}}); every model must have the same kinds. Labels in
    MODEL_COLOURS get their fixed colour.
  """
  models = list(scores)
  if not models:
    raise ValueError("accuracy_bars needs at least one model")
  kinds = list(next(iter(scores.values()))["per_category"])
  groups = kinds + ["overall"]

  def value(model, group, key):
    s = scores[model]
    return s[key] if group == "overall" else s["per_category"][group][key]

  fig = Figure(figsize=(1.8 + 2.0 * len(groups), 4.0), layout="constrained")
  ax = fig.add_subplot()
  width = 0.8 / len(models)
  x = np.arange(len(groups))
  for i, model in enumerate(models):
    acc = [100 * value(model, g, "accuracy") for g in groups]
    bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, acc, width, label=model,
                  color=MODEL_COLOURS.get(model))
    ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=1)
  for j, g in enumerate(groups):
    chance = 100 * value(models[0], g, "chance")
    ax.hlines(chance, j - 0.45, j + 0.45, colors="black", linestyles=":",
              label="chance" if j == 0 else None)
  n = scores[models[0]]
  ax.set_xticks(x, [f"{g}\n({value(models[0], g, 'n')} questions)" for g in groups])
  ax.set_ylabel("held-out accuracy (%)")
  ax.set_ylim(0, 122)  # room above the 100% bars for their labels and the legend
  ax.set_yticks(range(0, 101, 20))
  ax.legend(loc="upper center", fontsize=8, ncols=len(models) + 1, frameon=False)
  ax.grid(axis="y", alpha=0.3)
  ax.set_title(title or f"held-out accuracy ({n['n']} questions)")
  return _save(fig, path)


def examples_grid(path: str | os.PathLike, examples: Sequence[Mapping[str, Any]],
                  columns: int = 4, title: str | None = None) -> pathlib.Path:
  """Held-out examples: the image (the answer's region boxed), that region's detail as the
  slices and as the overview show it (enlarged, one square per model-input pixel), the
  question, each model's answer and the truth.

  examples: [{"image": path, "box": (left, top, right, bottom) in image pixels,
    "views": {label: uint8 [h, w, 3]} (e.g. {"in its slice": ..., "in the overview": ...}),
    "question": str, "truth": str, "answers": {model label: answer},
    "right": {model label: bool}}, ...]. A right answer is green, a wrong one red.
  """
  if not examples:
    raise ValueError("examples_grid needs at least one example")
  rows = -(-len(examples) // columns)
  fig = Figure(figsize=(3.0 * columns, 4.6 * rows), layout="constrained")
  cells = fig.subfigures(rows, columns, squeeze=False)
  for k, cell in enumerate(cells.flat):
    if k >= len(examples):
      continue
    ex = examples[k]
    with Image.open(ex["image"]) as img:
      image = img.convert("RGB")
    views = list(ex["views"].items())
    axes = cell.subplot_mosaic([["image"] * len(views), [f"view{i}" for i in range(len(views))],
                                ["text"] * len(views)], height_ratios=[2, 1, 1.0])
    axes["image"].imshow(image)
    axes["image"].add_patch(_rectangle(ex["box"]))
    for i, (label, view) in enumerate(views):
      axes[f"view{i}"].imshow(view, interpolation="nearest")
      axes[f"view{i}"].set_title(label, fontsize=7)
    for ax in axes.values():
      ax.set_xticks([])
      ax.set_yticks([])
    text = axes["text"]
    text.axis("off")
    lines = [(line, "black") for line in textwrap.wrap(ex["question"], 42)]
    lines.append((f"truth: {ex['truth']}", "black"))
    for model, answer in ex["answers"].items():
      right = ex["right"][model]
      lines.append((f"{model}: {answer!r} ({'right' if right else 'wrong'})",
                    "#2ca02c" if right else "#d62728"))
    for i, (line, colour) in enumerate(lines):
      text.text(0.0, 1.0 - 0.17 * i, line, color=colour, fontsize=7, va="top",
                transform=text.transAxes)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def _rectangle(box: Sequence[float]):
  from matplotlib.patches import Rectangle
  left, top, right, bottom = box
  return Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                   edgecolor="black", linewidth=1.0)
