"""The offline demo's synthetic task: a coloured area whose fine pattern only the slices show.

Every image is 2S x 2S by default (S = `scale_resolution`, the ViT's input side):
`slicing.plan_slices` cuts it into a 2 x 2 grid of S x S slices, exact crops of the image at full
resolution, plus an S x S overview, the whole image at half scale. On a colourless background
lies ONE rectangular area covering a third to a half of the image, filled with a fine two-colour
pattern: one-pixel lines of a colour alternating with white, running across (horizontal) or down
(vertical), or a one-pixel checkerboard (checked). Two questions are asked about it:

  colour   "What colour is the patterned area?"   -> red | green | blue | yellow            (25%)
  pattern  "Is the area's fine pattern horizontal, vertical or checked?"
                                                  -> horizontal | vertical | checked        (33%)

Why only the slices can answer the pattern question: the pattern's period is 2 image pixels. A
slice shows it pixel for pixel (one line per pixel, 7 periods per 14 px ViT patch); the overview
has one pixel per 2 x 2 image pixels, so the period is one overview pixel, below its sampling
limit (2 pixels per period), and the antialiased resize averages every pattern to the same flat
tint, the average of the colour and white. The pattern's contrast fades in over the area's outer
`TAPER` pixels, so not even the area's border tells the patterns apart in the overview. The
colour survives in the tint: the colour question is the control that an overview-only model
(the low-resolution baseline) can answer. `pattern_geometry` computes these scales from the
slicer; tests/test_synthetic.py checks the overviews of the three patterns against each other.

`write_task` writes the images and LLaVA-format files:
  images/train_00000.png ...   the training images (stage 1 and stage 2 use the same ones)
  images/eval_00000.png ...    held-out images (a separate random stream: they do not change
                               with n_train)
  pretrain.json   stage 1, `plain` template: [{"id", "image", "conversations": [
                  {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]}]
  sft.json        stage 2, `vicuna_v1` template: both questions about the image in random order,
                  two rounds: human "<image>\\n" + question, gpt answer, human question, gpt answer
  warmup.json     text only, `vicuna_v1`: sft.json's conversations with the image replaced by a
                  caption of it ("A red area with a fine checked pattern.\\n" + question, ...): a
                  text warm-up that teaches a from-scratch LLM the answer format and to take the
                  answer from its context (what a pretrained LLM brings to LLaVA's stage 2)
  eval.jsonl      LLaVA question file, two lines per held-out image: {"question_id", "image",
                  "text" (the question without "<image>"; LLaVA's model_vqa prepends
                  "<image>\\n"), "category" ("colour" | "pattern"), "answer"}
  areas.json      {image: {"colour", "pattern", "box": [left, top, right, bottom)}}, the ground
                  truth of every image (right/bottom exclusive, PIL's crop convention)
`image` fields are relative to `images/` (LLaVA's --image_folder). Everything is a function of
`seed`: the same call writes byte-identical files.

`make_tokenizer` trains a LLaMA-style SentencePiece BPE model (ids 0-2 = <unk> <s> </s>, bytes
3-258 so "\\n" = 13 as in LLaMA, then merges) small enough for the tiny LLM's 512-row vocabulary
and writes a folder that `LlamaSpmTokenizer` loads. It checks that LLaVA's round arithmetic
holds for it (see `make_tokenizer`). Answers are scored by `hiwin_jax.infer.evaluate.score` (metric
"normalized": " Red." is "red") with `SyntheticTask.chance` as the chance levels.

Host-side code: numpy, PIL, sentencepiece; no jax.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from hiwin_jax.data import conversation as conv
from hiwin_jax.data import slicing
from hiwin_jax.data.tokenizer import IMAGE_TOKEN, LlamaSpmTokenizer

# Ink colours: odd channels, so that the tint (ink + white) / 2 is a whole RGB value.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25), "green": (25, 155, 45), "blue": (25, 75, 225), "yellow": (235, 195, 15)}
PAPER = (255, 255, 255)  # the lines between the ink lines
PATTERNS = ("horizontal", "vertical", "checked")
QUESTIONS = {"colour": "What colour is the patterned area?",
             "pattern": "Is the area's fine pattern horizontal, vertical or checked?"}
DETAIL_CATEGORIES = ("pattern",)  # the questions only the slices can answer
ANSWERS: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "pattern": PATTERNS}
CAPTIONS = ("A {colour} area with a fine {pattern} pattern.",
            "There is a {colour} area; its fine pattern is {pattern}.",
            "A {colour} area, {pattern}.")
BACKGROUNDS = ("plain", "shapes", "photo")
DEFAULT_AREA = (1 / 3, 1 / 2)  # the area's share of the image, drawn uniformly in this range
PATTERN_PERIOD = 2  # image pixels: one ink line, one white line
TAPER = 12  # px: the pattern's contrast rises from 0 at the area's edge to full this far inside
# Grayscale-able photos bundled with scikit-image (no download).
_PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel")

# Split streams of one seed: images of a split never depend on the other split's size.
_TRAIN, _EVAL = 0, 1
TOKENIZER_VOCAB_SIZE = 512


@dataclasses.dataclass(frozen=True)
class Area:
  """The ground truth of one image. box: (left, top, right, bottom), right/bottom exclusive."""
  colour: str
  pattern: str
  box: tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
  """Paths written by `write_task` and what the task asks.

  answers: category -> the possible answers ("colour": 4 colours, "pattern": 3 patterns).
  grid: the (cols, rows) slice grid of every image at max_slice_nums=7 (None = not sliced).
  """
  folder: pathlib.Path
  image_folder: pathlib.Path
  pretrain_json: pathlib.Path
  sft_json: pathlib.Path
  warmup_json: pathlib.Path
  eval_jsonl: pathlib.Path
  areas_json: pathlib.Path
  answers: dict[str, tuple[str, ...]]
  image_size: tuple[int, int]
  grid: tuple[int, int] | None
  n_train: int
  n_eval: int

  @property
  def chance(self) -> dict[str, float]:
    """category -> the accuracy of a uniform guess (1 / its number of answers)."""
    return {category: 1.0 / len(answers) for category, answers in self.answers.items()}

  def eval_records(self) -> list[dict[str, Any]]:
    """The lines of eval.jsonl."""
    return read_eval_records(self.eval_jsonl)

  def areas(self) -> dict[str, dict[str, Any]]:
    """areas.json: image file -> {"colour", "pattern", "box"}."""
    return json.loads(self.areas_json.read_text(encoding="utf-8"))

  def texts(self) -> list[str]:
    """Every text the model will see: rendered stage-1 and stage-2 prompts, eval questions.

    The training corpus of `make_tokenizer`: SFT conversations are rendered with the vicuna_v1
    template, so "USER" after "</s>" and " USER" at the start both occur as in training.
    """
    plain = conv.get_template("plain")
    vicuna = conv.get_template("vicuna_v1")
    out = []
    for sample in json.loads(self.pretrain_json.read_text(encoding="utf-8")):
      out.append(plain.render(conv.parse_conversation(sample["conversations"])))
    for path in (self.sft_json, self.warmup_json):
      for sample in json.loads(path.read_text(encoding="utf-8")):
        messages = conv.parse_conversation(conv.preprocess_multimodal(sample["conversations"]))
        out.append(vicuna.render(messages))
    out.extend(record["text"] for record in self.eval_records())
    return out


# --- geometry ---------------------------------------------------------------------------------


def default_image_size(scale_resolution: int = slicing.SCALE_RESOLUTION) -> tuple[int, int]:
  """2S x 2S: a 2 x 2 grid of S x S slices (exact crops) and an S x S overview at half scale."""
  return 2 * scale_resolution, 2 * scale_resolution


@dataclasses.dataclass(frozen=True)
class PatternGeometry:
  """The pattern as the model sees it (from the slicer's plan for the image size).

  overview_scale / slice_scale: model-input pixels per image pixel in the overview and in the
  slices (slice_scale None: not sliced). *_period: the pattern's period (2 image pixels) in
  those pixels; a period under 2 pixels is beyond the sampling limit (it cannot be shown).
  """
  overview_scale: float
  slice_scale: float | None
  overview_period: float
  slice_period: float | None


def pattern_geometry(image_size: Sequence[int],
                     scale_resolution: int = slicing.SCALE_RESOLUTION) -> PatternGeometry:
  """The scales of the overview and of the slices for an image of `image_size` (the smaller
  of the two axes' scales: a line shrinks at least that much) and the pattern's period there."""
  width, height = (int(v) for v in image_size)
  plan = slicing.plan_slices(width, height, slicing.TRAIN_MAX_SLICE_NUMS, scale_resolution)
  ov = min(plan.overview_size[0] / width, plan.overview_size[1] / height)
  sl = (None if plan.refine_size is None
        else min(plan.refine_size[0] / width, plan.refine_size[1] / height))
  return PatternGeometry(ov, sl, PATTERN_PERIOD * ov, None if sl is None else PATTERN_PERIOD * sl)


# --- images -----------------------------------------------------------------------------------


@functools.cache
def _photo(name: str) -> np.ndarray:
  """A scikit-image sample photo as float32 grayscale [H, W] in 0..255."""
  from skimage import data
  image = np.asarray(getattr(data, name)())
  if image.ndim == 3:
    image = image[..., :3].astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
  return image.astype(np.float32)


def _resize_gray(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bicubic resize of a float [h, w] array to `size` = (width, height)."""
  return np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize(
      size, Image.Resampling.BICUBIC))


def _background(rng: np.random.Generator, size: tuple[int, int], kind: str) -> np.ndarray:
  """A light, colourless background: uint8 [H, W], about 120..250.

  "plain": one random grey level (the area is the only structure: the easiest variant, for
  models trained from scratch in minutes). "shapes": overlapping grey rectangles, ellipses and
  lines on a flat grey; flat regions keep the PNGs small. "photo": a lightened grayscale crop
  of a scikit-image photo (~60-90 kB per 672 px PNG).
  """
  width, height = size
  if kind == "plain":
    return np.full((height, width), int(rng.integers(150, 231)), np.uint8)
  if kind == "photo":
    photo = _photo(_PHOTOS[int(rng.integers(len(_PHOTOS)))])
    ph, pw = photo.shape
    # a crop of the image's aspect ratio, 0.5..1 times the largest, at a random place
    scale = rng.uniform(0.5, 1.0) * min(pw / width, ph / height)
    cw, ch = max(int(width * scale), 8), max(int(height * scale), 8)
    x, y = int(rng.integers(pw - cw + 1)), int(rng.integers(ph - ch + 1))
    gray = 140.0 + 0.35 * _resize_gray(photo[y:y + ch, x:x + cw], size)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
  base = int(rng.integers(190, 221))
  image = Image.new("L", size, base)
  draw = ImageDraw.Draw(image)
  unit = max(width, height) / 672  # shapes scale with the image
  for _ in range(int(rng.integers(10, 18))):
    kind_of_shape = int(rng.integers(3))
    x, y = int(rng.integers(-40 * unit, width)), int(rng.integers(-40 * unit, height))
    w, h = int(rng.integers(40, 220) * unit), int(rng.integers(40, 160) * unit)
    shade = int(np.clip(base + rng.integers(-40, 30), 120, 250))
    if kind_of_shape == 0:
      draw.rectangle((x, y, x + w, y + h), fill=shade)
    elif kind_of_shape == 1:
      draw.ellipse((x, y, x + w, y + h), fill=shade)
    else:
      dy = h if rng.integers(2) else -h
      draw.line((x, y, x + w, y + dy), fill=shade, width=int(rng.integers(1, 5)))
  return np.asarray(image)


def _place_area(rng: np.random.Generator, size: tuple[int, int],
                area: tuple[float, float]) -> tuple[int, int, int, int]:
  """A box covering a share in [area] of the image, aspect ratio 2:3 to 3:2, anywhere inside."""
  width, height = size
  share = rng.uniform(*area) * width * height
  aspect = math.exp(rng.uniform(math.log(2 / 3), math.log(3 / 2)))
  w = min(width, max(1, round(math.sqrt(share * aspect))))
  h = min(height, max(1, round(share / w)))
  x, y = int(rng.integers(width - w + 1)), int(rng.integers(height - h + 1))
  return x, y, x + w, y + h


def pattern_lines(pattern: str, box: Sequence[int]) -> np.ndarray:
  """bool [h, w] over `box` (left, top, right, bottom): True on the ink pixels.

  The lines follow the image's own pixel grid (ink on even rows, even columns, or even x + y),
  so every slice, whose crop starts on an even pixel, shows the pattern in the same phase."""
  left, top, right, bottom = box
  y, x = np.mgrid[top:bottom, left:right]
  if pattern == "horizontal":
    return y % 2 == 0
  if pattern == "vertical":
    return x % 2 == 0
  if pattern == "checked":
    return (x + y) % 2 == 0
  raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def _taper(box: Sequence[int]) -> np.ndarray:
  """float [h, w] in (0, 1]: the pattern's contrast, rising linearly over the outer TAPER px of
  each side (from the box's edge to the pixel centre; the two axes' ramps multiply)."""
  left, top, right, bottom = box
  y, x = np.mgrid[top:bottom, left:right] + 0.5

  def ramp(a, lo, hi):
    return np.minimum(np.minimum(a - lo, hi - a) / TAPER, 1.0)

  return ramp(x, left, right) * ramp(y, top, bottom)


def render_image(rng: np.random.Generator, colour: str, pattern: str,
                 image_size: tuple[int, int], area: tuple[float, float] = DEFAULT_AREA,
                 background: str = "plain", box: Sequence[int] | None = None
                 ) -> tuple[Image.Image, Area]:
  """One RGB image with one `colour` area of the fine `pattern`, and its ground truth.

  Each area pixel is tint + contrast * (ink or paper - tint), tint = (ink + paper) / 2, so a
  full-contrast pixel is exactly COLOURS[colour] or PAPER. `box`: the area's place (default:
  drawn from `rng`, covering a share in `area` of the image)."""
  gray = _background(rng, image_size, background)
  pixels = np.repeat(gray[..., None], 3, axis=2)
  box = tuple(int(v) for v in box) if box is not None else _place_area(rng, image_size, area)
  ink, paper = np.asarray(COLOURS[colour], np.float64), np.asarray(PAPER, np.float64)
  tint, half = (ink + paper) / 2, (ink - paper) / 2
  sign = np.where(pattern_lines(pattern, box), 1.0, -1.0)
  values = tint + (_taper(box) * sign)[..., None] * half
  left, top, right, bottom = box
  pixels[top:bottom, left:right] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
  return Image.fromarray(pixels, mode="RGB"), Area(colour, pattern, box)


def balanced_labels(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
  """n (colour, pattern) pairs in random order: every colour within one of n/4 times, every
  pattern within one of n/3 times, each of the 12 pairs exactly n/12 times when 12 divides n."""
  colours = tuple(COLOURS)
  # k -> colour k % 4, pattern k % 3 (4 and 3 are coprime): any 4 consecutive k cover the 4
  # colours, any 3 the 3 patterns, any 12 the 12 pairs.
  pairs = [(colours[k % len(colours)], PATTERNS[k % len(PATTERNS)]) for k in range(n)]
  return [pairs[i] for i in rng.permutation(n)]


def _caption(rng: np.random.Generator, area: Area) -> str:
  return CAPTIONS[int(rng.integers(len(CAPTIONS)))].format(colour=area.colour,
                                                           pattern=area.pattern)


def _write_png(image: Image.Image, path: pathlib.Path) -> None:
  # compress_level 1: ~5 ms per image; PIL's default 6 is 1.5-3x slower for 2x smaller files.
  image.save(path, format="PNG", compress_level=1)


def _check_args(n_train: int, n_eval: int, size: tuple[int, int], area: Sequence[float],
                background: str) -> tuple[float, float]:
  if n_train < 0 or n_eval < 0:
    raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
  if background not in BACKGROUNDS:
    raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
  lo, hi = (float(v) for v in area)
  if not 0 < lo <= hi <= 1:
    raise ValueError(f"area must be (min, max) shares of the image with 0 < min <= max <= 1, "
                     f"got {tuple(area)}")
  if min(size) < 4 * TAPER:
    raise ValueError(f"image_size {size[0]}x{size[1]} is too small: an area must be wider than "
                     f"the {TAPER} px contrast ramp on both sides")
  return lo, hi


def write_task(folder: str | os.PathLike, n_train: int, n_eval: int, seed: int, *,
               scale_resolution: int = slicing.SCALE_RESOLUTION,
               image_size: Sequence[int] | None = None,
               area: Sequence[float] = DEFAULT_AREA,
               background: str = "plain") -> SyntheticTask:
  """Writes the task's images and LLaVA json files into `folder` (see the module docstring).

  Args:
    folder: created if missing; existing files of the same names are overwritten.
    n_train: training images (one pretrain caption, one two-round SFT sample and its text-only
      warm-up copy each).
    n_eval: held-out images (two eval.jsonl questions each).
    seed: everything written is a function of it.
    scale_resolution: the model's ViT input side (the slicer's unit).
    image_size: (width, height) of every image (default `default_image_size`: the geometry the
      module docstring describes); one size means one compiled program per stage.
    area: (min, max) share of the image the patterned area covers.
    background: "plain" (one grey level), "shapes" or "photo".
  Returns:
    The paths, the answer set per category and the slice grid of the image size.
  """
  size = tuple(int(v) for v in (image_size or default_image_size(scale_resolution)))
  area = _check_args(n_train, n_eval, size, area, background)
  folder = pathlib.Path(folder)
  image_folder = folder / "images"
  image_folder.mkdir(parents=True, exist_ok=True)
  plan = slicing.plan_slices(*size, slicing.TRAIN_MAX_SLICE_NUMS, scale_resolution)

  pretrain, sft, warmup, eval_records, areas = [], [], [], [], {}
  for split, prefix, n in ((_TRAIN, "train", n_train), (_EVAL, "eval", n_eval)):
    labels = balanced_labels(n, np.random.default_rng([seed, split]))
    for i, (colour, pattern) in enumerate(labels):
      rng = np.random.default_rng([seed, split, i])
      image, truth_area = render_image(rng, colour, pattern, size, area, background)
      name = f"{prefix}_{i:05d}"
      image_file = f"{name}.png"
      _write_png(image, image_folder / image_file)
      areas[image_file] = {"colour": colour, "pattern": pattern, "box": list(truth_area.box)}
      truth = {"colour": colour, "pattern": pattern}
      if split == _TRAIN:
        pretrain.append({"id": name, "image": image_file, "conversations": [
            {"from": conv.HUMAN, "value": IMAGE_TOKEN},
            {"from": conv.GPT, "value": _caption(rng, truth_area)}]})
        order = list(QUESTIONS) if rng.integers(2) == 0 else list(QUESTIONS)[::-1]
        turns = []
        for k, category in enumerate(order):
          question = QUESTIONS[category]
          turns.append({"from": conv.HUMAN,
                        "value": f"{IMAGE_TOKEN}\n{question}" if k == 0 else question})
          turns.append({"from": conv.GPT, "value": truth[category]})
        sft.append({"id": name, "image": image_file, "conversations": turns})
        text_turns = [dict(t) for t in turns]
        text_turns[0]["value"] = text_turns[0]["value"].replace(IMAGE_TOKEN,
                                                                _caption(rng, truth_area))
        warmup.append({"id": f"{name}-text", "conversations": text_turns})
      else:
        for category, question in QUESTIONS.items():
          eval_records.append({"question_id": f"{name}-{category}", "image": image_file,
                               "text": question, "category": category,
                               "answer": truth[category]})

  paths = {key: folder / file for key, file in (("pretrain_json", "pretrain.json"),
                                                ("sft_json", "sft.json"),
                                                ("warmup_json", "warmup.json"),
                                                ("eval_jsonl", "eval.jsonl"),
                                                ("areas_json", "areas.json"))}
  _write_json(paths["pretrain_json"], pretrain)
  _write_json(paths["sft_json"], sft)
  _write_json(paths["warmup_json"], warmup)
  _write_json(paths["areas_json"], areas)
  paths["eval_jsonl"].write_text("".join(json.dumps(r) + "\n" for r in eval_records),
                                 encoding="utf-8")
  return SyntheticTask(folder=folder, image_folder=image_folder, answers=dict(ANSWERS),
                       image_size=size, grid=plan.grid, n_train=n_train, n_eval=n_eval, **paths)


def _write_json(path: pathlib.Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


def read_eval_records(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a LLaVA question file (.jsonl); errors name the file and line."""
  records = []
  path = pathlib.Path(path)
  for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as e:
      raise ValueError(f"{path}:{line_no}: not a JSON object ({e})") from e
    for key in ("question_id", "text", "answer"):
      if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{path}:{line_no}: a question record needs '{key}'")
    records.append(record)
  return records


# --- tokenizer --------------------------------------------------------------------------------


# The vicuna_v1 scaffolding, so the template's words are pieces whatever texts are given.
_TEMPLATE_TEXTS = (conv.get_template("vicuna_v1").render(
    [(conv.HUMAN, "Hi?"), (conv.GPT, "Yes."), (conv.HUMAN, "And?"), (conv.GPT, "No.")]),)
_TEMPLATE_COPIES = 16
_ROLE = conv.get_template("vicuna_v1").roles[0]  # "USER"


def _corpus_lines(texts: Iterable[str]) -> list[str]:
  """Sentences for the SentencePiece trainer.

  "\\n" never reaches the trainer, so it stays out of the character vocabulary and encodes to
  its byte piece <0x0A> = 13, as in LLaMA (the slice separator `newline_token` of the configs);
  "<image>" is cut out because it never reaches the tokenizer either.

  " USER" is written as "</s>USER" (the trainer treats "</s>" as a boundary): the model then
  learns "USER" but no piece "▁USER" or "▁U…", so " USER" is two pieces ("▁", "USER") and
  "USER" after "</s>" one, as in LLaMA ("▁US" "ER" vs "USER"). That difference is what the
  non-legacy "-1" of LLaVA's later rounds subtracts.
  """
  lines = []
  for text in list(texts) + list(_TEMPLATE_TEXTS) * _TEMPLATE_COPIES:
    text = text.replace(" " + _ROLE, conv.get_template("vicuna_v1").sep2 + _ROLE)
    for line in text.replace(IMAGE_TOKEN, "\n").split("\n"):
      if line.strip():
        lines.append(line)
  return lines


def _pieces(tok: LlamaSpmTokenizer, text: str) -> list[int]:
  return tok.encode(text, add_bos=False, add_eos=False)


def _check_tokenizer(tok: LlamaSpmTokenizer, single_token_words: Sequence[str]) -> None:
  """Raises ValueError unless LLaVA's label arithmetic holds for `tok` (text-side.md 2, 3).

  Needed: "\\n" is byte piece 13; a trailing space is a lone "▁" that does not merge with what
  precedes it (the "-2" of the instruction length); " USER" is one piece more than "USER"
  after "</s>" (the "-1" of non-legacy rounds after the first, where the round's standalone BOS
  stands in for its "</s>"); each of `single_token_words` is one piece after a space (so an
  answer is one token and accuracy is exact match). Then a two-round vicuna_v1 sample with an
  image must preprocess without a tokenization mismatch.
  """
  problems = []
  newline = _pieces(tok, "\n")
  if newline[-1:] != [13]:
    problems.append(f'"\\n" encodes to {newline}, expected its byte piece 13')
  if _pieces(tok, "Yes: ")[:-1] != _pieces(tok, "Yes:"):
    problems.append("a trailing space is not a lone '▁' piece")
  after_eos = len(_pieces(tok, tok.eos_token + _ROLE)) - 1
  if len(_pieces(tok, _ROLE)) != after_eos + 1:
    problems.append(f"' {_ROLE}' is {len(_pieces(tok, _ROLE))} pieces and '{_ROLE}' after "
                    f"'</s>' {after_eos}; LLaVA's later rounds need one more for the first")
  for word in single_token_words:
    ids = _pieces(tok, word)
    if len(ids) != 1:
      problems.append(f"' {word}' is {len(ids)} pieces, expected one")
  sample = [{"from": conv.HUMAN, "value": f"{IMAGE_TOKEN}\nWhat?"},
            {"from": conv.GPT, "value": "Yes."},
            {"from": conv.HUMAN, "value": "And?"}, {"from": conv.GPT, "value": "No."}]
  example = conv.preprocess(sample, tok, "vicuna_v1", has_image=True)
  if example.mismatch:
    problems.append(f"a two-round vicuna_v1 sample gives {example.warning}")
  if problems:
    raise ValueError(f"tokenizer {tok.folder} breaks LLaVA's label arithmetic: "
                     + "; ".join(problems))


def make_tokenizer(folder: str | os.PathLike, texts: Iterable[str], *,
                   vocab_size: int = TOKENIZER_VOCAB_SIZE, model_max_length: int = 2048,
                   single_token_words: Sequence[str] | None = None) -> LlamaSpmTokenizer:
  """Trains a LLaMA-style SentencePiece BPE tokenizer on `texts` and writes it to `folder`.

  The settings are LLaMA's (BPE, byte fallback, split digits, dummy prefix, no whitespace
  normalisation, identity normaliser; <unk>=0 <s>=1 </s>=2, no pad piece) with at most
  `vocab_size` pieces (fewer if the texts hold fewer). The vicuna_v1 scaffolding (system prompt,
  "USER", "ASSISTANT", "</s>USER") is always added to the corpus. Writes `tokenizer.model`,
  `tokenizer_config.json` (legacy false, add_bos_token true, add_eos_token false,
  `model_max_length`, padding right) and `special_tokens_map.json`, as Vicuna v1.5's folder.

  single_token_words: words that must be single pieces after a space (default: every answer
    of the synthetic task). The result is checked with `conversation.preprocess` on a two-round
    sample; a tokenizer that breaks LLaVA's round arithmetic raises ValueError.
  """
  import sentencepiece as spm

  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  if single_token_words is None:
    single_token_words = [word for answers in ANSWERS.values() for word in answers]
  lines = _corpus_lines(texts)
  if vocab_size < 259 + 1:
    raise ValueError(f"vocab_size {vocab_size} leaves no room beside the 3 special and 256 byte "
                     "pieces")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
      vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True, split_digits=True,
      add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
      normalization_rule_name="identity", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, num_threads=1, minloglevel=2)
  (folder / "tokenizer.model").write_bytes(model.getvalue())

  def special(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}

  config = {"add_bos_token": True, "add_eos_token": False, "bos_token": special("<s>"),
            "eos_token": special("</s>"), "unk_token": special("<unk>"), "pad_token": None,
            "clean_up_tokenization_spaces": False, "legacy": False,
            "model_max_length": int(model_max_length), "padding_side": "right",
            "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}
  _write_json(folder / "tokenizer_config.json", config)
  _write_json(folder / "special_tokens_map.json",
              {"bos_token": special("<s>"), "eos_token": special("</s>"),
               "unk_token": special("<unk>"), "pad_token": "<unk>"})
  tok = LlamaSpmTokenizer(folder)
  _check_tokenizer(tok, single_token_words)
  return tok
