"""The offline demo's synthetic task: small coloured marks in large images, and its tokenizer.

Every image has one size (default 672x336, which `slicing.plan_slices(672, 336, 7)` cuts into
two 336x336 slices, exact crops of the image, plus a 462x224 overview), a light grey textured
background (grey shapes, or a lightened grayscale scikit-image photo) and ONE small coloured mark
(a square or disc of 16-28 px, a few % of the image side) lying entirely in the left or the
right half. Two questions are asked about it:

  colour  "What colour is the small mark?"                -> red | green | blue | yellow (25%)
  side    "Which side of the image is the small mark on?" -> left | right              (50%)

The background is colourless, so the colour answer is only in the mark's pixels; the side
answer says which slice holds the mark. In the overview the mark shrinks to 11-19 px, about one
ViT patch.

`write_task` writes the images and LLaVA-format files:
  images/train_00000.png ...   the training images (stage 1 and stage 2 use the same ones)
  images/eval_00000.png ...    held-out images (a separate random stream: they do not change
                               with n_train)
  pretrain.json   stage 1, `plain` template: [{"id", "image", "conversations": [
                  {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]}]
  sft.json        stage 2, `vicuna_v1` template: both questions about the image in random order,
                  two rounds: human "<image>\\n" + question, gpt answer, human question, gpt answer
  warmup.json     text only, `vicuna_v1`: sft.json's conversations with the image replaced by a
                  caption of it ("A small red mark on the left side.\\n" + question, ...): a
                  text warm-up that teaches a from-scratch LLM the answer format and to take the
                  answer from its context (what a pretrained LLM brings to LLaVA's stage 2)
  eval.jsonl      LLaVA question file, two lines per held-out image: {"question_id", "image",
                  "text" (the question without "<image>"; LLaVA's model_vqa prepends
                  "<image>\\n"), "category" ("colour" | "side"), "answer"}
  marks.json      {image: {"colour", "side", "shape", "box": [left, top, right, bottom)}}, the
                  ground truth of every image (right/bottom exclusive, PIL's crop convention)
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
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from hiwin_jax.data import conversation as conv
from hiwin_jax.data import slicing
from hiwin_jax.data.tokenizer import IMAGE_TOKEN, LlamaSpmTokenizer

DEFAULT_IMAGE_SIZE = (672, 336)  # (width, height): two 336x336 slices + a 462x224 overview
DEFAULT_MARK_SIZE = (16, 28)     # inclusive range of the mark's side in pixels
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 80, 230), "yellow": (240, 205, 20)}
SIDES = ("left", "right")
SHAPES = ("square", "disc")
QUESTIONS = {"colour": "What colour is the small mark?",
             "side": "Which side of the image is the small mark on?"}
ANSWERS: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "side": SIDES}
CAPTIONS = ("A small {colour} mark on the {side} side.",
            "There is a small {colour} mark on the {side}.",
            "A {colour} mark, {side} side.")
BACKGROUNDS = ("shapes", "photo", "plain")
# Grayscale-able photos bundled with scikit-image (no download).
_PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel")
_MARGIN = 6  # px between the mark and the image border / the vertical centre line

# Split streams of one seed: images of a split never depend on the other split's size.
_TRAIN, _EVAL = 0, 1
TOKENIZER_VOCAB_SIZE = 512


@dataclasses.dataclass(frozen=True)
class Mark:
  """The ground truth of one image. box: (left, top, right, bottom), right/bottom exclusive."""
  colour: str
  side: str
  shape: str
  box: tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
  """Paths written by `write_task` and what the task asks.

  answers: category -> the possible answers ("colour": 4 colours, "side": left/right).
  grid: the (cols, rows) slice grid of every image at max_slice_nums=7 (None = not sliced).
  """
  folder: pathlib.Path
  image_folder: pathlib.Path
  pretrain_json: pathlib.Path
  sft_json: pathlib.Path
  warmup_json: pathlib.Path
  eval_jsonl: pathlib.Path
  marks_json: pathlib.Path
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
  """A light, colourless, textured background: uint8 [H, W], about 120..250.

  "shapes": overlapping grey rectangles, ellipses and lines (larger than a mark) on a flat grey;
  flat regions keep the PNGs at a few kB. "photo": a lightened grayscale crop of a
  scikit-image photo (~60-90 kB per PNG). "plain": one random grey level (the mark is the only
  structure: the easiest variant, for models trained from scratch in minutes).
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
  for _ in range(int(rng.integers(10, 18))):
    kind_of_shape = int(rng.integers(3))
    x, y = int(rng.integers(-40, width)), int(rng.integers(-40, height))
    w, h = int(rng.integers(40, 220)), int(rng.integers(40, 160))
    shade = int(np.clip(base + rng.integers(-40, 30), 120, 250))
    if kind_of_shape == 0:
      draw.rectangle((x, y, x + w, y + h), fill=shade)
    elif kind_of_shape == 1:
      draw.ellipse((x, y, x + w, y + h), fill=shade)
    else:
      dy = h if rng.integers(2) else -h
      draw.line((x, y, x + w, y + dy), fill=shade, width=int(rng.integers(1, 5)))
  return np.asarray(image)


def _place_mark(rng: np.random.Generator, size: tuple[int, int], side: str,
                mark_size: tuple[int, int]) -> tuple[int, int, int, int]:
  """A box of side in [mark_size] entirely inside the `side` half, _MARGIN px from its edges."""
  width, height = size
  side_px = int(rng.integers(mark_size[0], mark_size[1] + 1))
  half = width // 2
  lo = _MARGIN if side == "left" else half + _MARGIN
  hi = half - _MARGIN - side_px if side == "left" else width - _MARGIN - side_px
  x = int(rng.integers(lo, hi + 1))
  y = int(rng.integers(_MARGIN, height - _MARGIN - side_px + 1))
  return x, y, x + side_px, y + side_px


def render_image(rng: np.random.Generator, colour: str, side: str,
                 image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
                 mark_size: tuple[int, int] = DEFAULT_MARK_SIZE,
                 background: str = "shapes", marks: int = 1) -> tuple[Image.Image, Mark]:
  """One RGB image with `marks` small marks of one `colour` in its `side` half, and the first
  mark's ground truth (the others have the same colour, side and shape; they may overlap).

  The marks are drawn in the exact RGB of COLOURS[colour] without antialiasing, so their pixels
  can be found again by equality.
  """
  gray = _background(rng, image_size, background)
  image = Image.fromarray(np.repeat(gray[..., None], 3, axis=2), mode="RGB")
  boxes = [_place_mark(rng, image_size, side, mark_size) for _ in range(marks)]
  shape = SHAPES[int(rng.integers(len(SHAPES)))]
  draw = ImageDraw.Draw(image)
  for box in boxes[::-1]:  # the first mark drawn last: its box is entirely its colour
    corners = (box[0], box[1], box[2] - 1, box[3] - 1)  # ImageDraw boxes are inclusive
    if shape == "square":
      draw.rectangle(corners, fill=COLOURS[colour])
    else:
      draw.ellipse(corners, fill=COLOURS[colour])
  return image, Mark(colour, side, shape, boxes[0])


def balanced_labels(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
  """n (colour, side) pairs in random order: every colour and every side within one of n/4 and
  n/2 times, each of the 8 pairs exactly n/8 times when 8 divides n."""
  colours, n_colours = tuple(COLOURS), len(COLOURS)
  # k -> colour (k + k // 4) % 4, side k % 2: any 4 consecutive k cover the 4 colours and both
  # sides twice, any 8 cover the 8 pairs once.
  pairs = [(colours[(k + k // n_colours) % n_colours], SIDES[k % 2]) for k in range(n)]
  return [pairs[i] for i in rng.permutation(n)]


def _caption(rng: np.random.Generator, mark: Mark) -> str:
  return CAPTIONS[int(rng.integers(len(CAPTIONS)))].format(colour=mark.colour, side=mark.side)


def _write_png(image: Image.Image, path: pathlib.Path) -> None:
  # compress_level 1: ~5 ms per image; PIL's default 6 is 1.5-3x slower for 2x smaller files.
  image.save(path, format="PNG", compress_level=1)


def _check_args(n_train: int, n_eval: int, image_size: Sequence[int],
                mark_size: Sequence[int], background: str) -> tuple[tuple[int, int],
                                                                   tuple[int, int]]:
  if n_train < 0 or n_eval < 0:
    raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
  if background not in BACKGROUNDS:
    raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
  width, height = (int(v) for v in image_size)
  lo, hi = (int(v) for v in mark_size)
  if not 1 <= lo <= hi:
    raise ValueError(f"mark_size must be (min, max) with 1 <= min <= max, got {tuple(mark_size)}")
  if width // 2 < hi + 2 * _MARGIN or height < hi + 2 * _MARGIN:
    raise ValueError(f"image_size {width}x{height} is too small for marks of up to {hi} px: each "
                     f"half must hold the mark plus {_MARGIN} px on both sides")
  return (width, height), (lo, hi)


def write_task(folder: str | os.PathLike, n_train: int, n_eval: int, seed: int,
               image_size: Sequence[int] = DEFAULT_IMAGE_SIZE,
               mark_size: Sequence[int] = DEFAULT_MARK_SIZE,
               background: str = "shapes",
               scale_resolution: int = slicing.SCALE_RESOLUTION,
               n_marks: int = 1) -> SyntheticTask:
  """Writes the task's images and LLaVA json files into `folder` (see the module docstring).

  Args:
    folder: created if missing; existing files of the same names are overwritten.
    n_train: training images (one pretrain caption, one two-round SFT sample and its text-only
      warm-up copy each).
    n_eval: held-out images (two eval.jsonl questions each).
    seed: everything written is a function of it.
    image_size: (width, height) of every image; one size means one compiled program per stage.
    mark_size: (min, max) side of the mark in pixels.
    background: "shapes" (grey shapes on grey, a few kB per PNG) or "photo" (lightened
      grayscale scikit-image photo crops, ~60-90 kB per PNG).
    scale_resolution: the model's ViT input side (the slicer's unit; only `grid` depends on it).
    n_marks: small marks per image, all of the answer's colour and side (more marks: more image
      tokens carry the answer, an easier task for a model trained from scratch).
  Returns:
    The paths, the answer set per category and the slice grid of the image size.
  """
  size, marks_range = _check_args(n_train, n_eval, image_size, mark_size, background)
  folder = pathlib.Path(folder)
  image_folder = folder / "images"
  image_folder.mkdir(parents=True, exist_ok=True)
  plan = slicing.plan_slices(*size, slicing.TRAIN_MAX_SLICE_NUMS, scale_resolution)

  pretrain, sft, warmup, eval_records, marks = [], [], [], [], {}
  for split, prefix, n in ((_TRAIN, "train", n_train), (_EVAL, "eval", n_eval)):
    labels = balanced_labels(n, np.random.default_rng([seed, split]))
    for i, (colour, side) in enumerate(labels):
      rng = np.random.default_rng([seed, split, i])
      image, mark = render_image(rng, colour, side, size, marks_range, background,
                                 n_marks)
      name = f"{prefix}_{i:05d}"
      image_file = f"{name}.png"
      _write_png(image, image_folder / image_file)
      marks[image_file] = {"colour": mark.colour, "side": mark.side, "shape": mark.shape,
                           "box": list(mark.box)}
      truth = {"colour": mark.colour, "side": mark.side}
      if split == _TRAIN:
        pretrain.append({"id": name, "image": image_file, "conversations": [
            {"from": conv.HUMAN, "value": IMAGE_TOKEN},
            {"from": conv.GPT, "value": _caption(rng, mark)}]})
        order = list(QUESTIONS) if rng.integers(2) == 0 else list(QUESTIONS)[::-1]
        turns = []
        for k, category in enumerate(order):
          question = QUESTIONS[category]
          turns.append({"from": conv.HUMAN,
                        "value": f"{IMAGE_TOKEN}\n{question}" if k == 0 else question})
          turns.append({"from": conv.GPT, "value": truth[category]})
        sft.append({"id": name, "image": image_file, "conversations": turns})
        text_turns = [dict(t) for t in turns]
        text_turns[0]["value"] = text_turns[0]["value"].replace(IMAGE_TOKEN, _caption(rng, mark))
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
                                                ("marks_json", "marks.json"))}
  _write_json(paths["pretrain_json"], pretrain)
  _write_json(paths["sft_json"], sft)
  _write_json(paths["warmup_json"], warmup)
  _write_json(paths["marks_json"], marks)
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
