"""The offline demo's synthetic task: files, ground truth, the detail claim (computed from the
slicer), tokenizer and LLaVA label masks."""

import collections
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from hiwin_jax.data import conversation as conv
from hiwin_jax.data import slicing
from hiwin_jax.data import synthetic
from hiwin_jax.data.tokenizer import IMAGE_TOKEN_INDEX, LlamaSpmTokenizer

N_TRAIN, N_EVAL = 24, 12  # multiples of 12: every (colour, pattern) pair equally often
VIEW = 112  # the demo's ViT input side: 224x224 images, 2 x 2 slices of 112 px, 112 px overview


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  return synthetic.write_task(tmp_path_factory.mktemp("task"), N_TRAIN, N_EVAL, seed=3,
                              scale_resolution=VIEW)


@pytest.fixture(scope="module")
def tok(task, tmp_path_factory):
  return synthetic.make_tokenizer(tmp_path_factory.mktemp("tok"), task.texts())


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


def _load(path):
  return json.loads(pathlib.Path(path).read_text())


def test_image_size_slices_into_a_2x2_grid_of_exact_crops(task):
  plan = slicing.plan_slices(*task.image_size, slicing.TRAIN_MAX_SLICE_NUMS, VIEW)
  assert task.image_size == (2 * VIEW, 2 * VIEW)
  assert task.grid == plan.grid == (2, 2)
  assert plan.refine_size == task.image_size  # slices are crops of the image, not resized
  assert plan.slice_size == plan.overview_size == (VIEW, VIEW)
  for record in _load(task.pretrain_json)[:2]:
    with Image.open(task.image_folder / record["image"]) as image:
      assert image.size == task.image_size and image.mode == "RGB"


def test_write_task_is_deterministic_for_a_seed(task, tmp_path):
  again = synthetic.write_task(tmp_path / "again", N_TRAIN, N_EVAL, seed=3,
                                 scale_resolution=VIEW)
  assert _files(again.folder) == _files(task.folder)
  other = synthetic.write_task(tmp_path / "other", N_TRAIN, N_EVAL, seed=4,
                                 scale_resolution=VIEW)
  assert _files(other.folder) != _files(task.folder)
  # held-out images come from their own stream: they do not depend on n_train
  fewer = synthetic.write_task(tmp_path / "fewer", 4, N_EVAL, seed=3,
                                 scale_resolution=VIEW)
  evals = {k: v for k, v in _files(task.folder).items() if k.startswith("images/eval_")}
  assert evals and evals == {k: v for k, v in _files(fewer.folder).items()
                             if k.startswith("images/eval_")}
  assert fewer.eval_jsonl.read_bytes() == task.eval_jsonl.read_bytes()


def test_answers_are_balanced_across_classes(task):
  sft = _load(task.sft_json)
  by_question = collections.defaultdict(collections.Counter)
  for s in sft:
    turns = s["conversations"]
    for question, answer in ((turns[0]["value"], turns[1]["value"]),
                             (turns[2]["value"], turns[3]["value"])):
      by_question[question.removeprefix("<image>\n")][answer] += 1
  assert by_question[synthetic.QUESTIONS["colour"]] == {c: N_TRAIN // 4 for c in synthetic.COLOURS}
  assert by_question[synthetic.QUESTIONS["pattern"]] == {
      p: N_TRAIN // 3 for p in synthetic.PATTERNS}
  areas = task.areas()
  pairs = collections.Counter((a["colour"], a["pattern"]) for name, a in areas.items()
                              if name.startswith("train_"))
  assert pairs == {(c, p): N_TRAIN // 12 for c in synthetic.COLOURS for p in synthetic.PATTERNS}
  evals = collections.Counter((r["category"], r["answer"]) for r in task.eval_records())
  assert evals == {**{("colour", c): N_EVAL // 4 for c in synthetic.COLOURS},
                   **{("pattern", p): N_EVAL // 3 for p in synthetic.PATTERNS}}
  for n in (5, 10, 13):
    labels = synthetic.balanced_labels(n, np.random.default_rng(0))
    for counts in (collections.Counter(c for c, _ in labels),
                   collections.Counter(p for _, p in labels)):
      assert max(counts.values()) - min(counts.values()) <= 1, (n, counts)
  # the two questions come in both orders
  assert len({s["conversations"][0]["value"] for s in sft}) == 2


def test_warmup_is_the_sft_text_with_a_true_caption_for_the_image(task):
  sft, warmup, areas = _load(task.sft_json), _load(task.warmup_json), task.areas()
  assert len(warmup) == len(sft) == N_TRAIN
  for image_sample, text_sample in zip(sft, warmup):
    assert "image" not in text_sample and text_sample["id"] == image_sample["id"] + "-text"
    first, *rest = text_sample["conversations"]
    assert rest == image_sample["conversations"][1:]
    caption, question = first["value"].split("\n")
    assert "<image>" not in first["value"]
    assert image_sample["conversations"][0]["value"] == "<image>\n" + question
    area = areas[image_sample["image"]]
    assert caption in {c.format(colour=area["colour"], pattern=area["pattern"])
                       for c in synthetic.CAPTIONS}


def _check_area(image: np.ndarray, area: dict, where: str) -> None:
  """The area's full-contrast core shows exactly the ink colour and white in the pattern's
  layout; everything outside the box is colourless."""
  left, top, right, bottom = area["box"]
  width, height = image.shape[1], image.shape[0]
  share = (right - left) * (bottom - top) / (width * height)
  assert synthetic.DEFAULT_AREA[0] - 0.02 <= share <= synthetic.DEFAULT_AREA[1] + 0.02, where
  t = synthetic.TAPER
  core_box = (left + t, top + t, right - t, bottom - t)
  core = image[core_box[1]:core_box[3], core_box[0]:core_box[2]]
  ink = synthetic.pattern_lines(area["pattern"], core_box)
  assert np.all(core[ink] == synthetic.COLOURS[area["colour"]]), where
  assert np.all(core[~ink] == synthetic.PAPER), where
  outside = image.copy()
  outside[top:bottom, left:right] = 128
  assert np.all(outside.max(-1) == outside.min(-1)), f"{where}: the background is not colourless"


@pytest.mark.parametrize("background", ["plain", "photo"])
def test_area_is_in_the_image_at_the_recorded_place_colour_and_pattern(task, tmp_path,
                                                                       background):
  if background == "photo":
    task = synthetic.write_task(tmp_path, 3, 3, seed=0, background="photo",
                                scale_resolution=VIEW)
  areas = task.areas()
  assert len(areas) == task.n_train + task.n_eval
  for name, area in areas.items():
    with Image.open(task.image_folder / name) as image:
      _check_area(np.asarray(image), area, name)
  # the texts say what the image shows
  for record in _load(task.pretrain_json):
    area = areas[record["image"]]
    caption = record["conversations"][1]["value"]
    assert f" {area['colour']} " in caption and area["pattern"] in caption, (record["id"], caption)
  for record in task.eval_records():
    assert record["answer"] == areas[record["image"]][record["category"]], record


def test_the_pattern_shows_in_the_slices_and_vanishes_in_the_overview():
  """The claim the demo rests on, computed from the slicer's own output at the demo's scale:
  the same area in the three patterns gives overviews that differ by at most 2 grey levels
  (rounding), but slices that differ by >= 200 over a full-contrast core of >= 1 ViT patch."""
  size = synthetic.default_image_size(VIEW)
  geometry = synthetic.pattern_geometry(size, VIEW)
  assert geometry.overview_period < 2 <= geometry.slice_period  # below / at the sampling limit
  patch = slicing.PATCH_SIZE
  for k in range(4):
    box = synthetic._place_area(np.random.default_rng(k), size, synthetic.DEFAULT_AREA)
    core = min(box[2] - box[0], box[3] - box[1]) - 2 * synthetic.TAPER
    assert core * geometry.slice_scale >= patch, (box, core)
    colour = list(synthetic.COLOURS)[k]
    results = []
    for pattern in synthetic.PATTERNS:
      image, _ = synthetic.render_image(np.random.default_rng(0), colour, pattern, size, box=box)
      result = slicing.slice_image(image, slicing.TRAIN_MAX_SLICE_NUMS, VIEW)
      assert result.grid == (2, 2)
      refine = np.concatenate([np.concatenate([np.asarray(s, np.int32) for s in row], 1)
                               for row in (result.slices[:2], result.slices[2:])], 0)
      results.append((np.asarray(result.overview, np.int32), refine))
    for i in range(3):
      for j in range(i + 1, 3):
        (ov_i, sl_i), (ov_j, sl_j) = results[i], results[j]
        assert np.abs(ov_i - ov_j).max() <= 2, (box, colour, i, j)
        assert np.abs(sl_i - sl_j).max() >= 200, (box, colour, i, j)


def test_tokenizer_fits_the_tiny_vocab_and_keeps_llama_ids(tok, task):
  assert isinstance(tok, LlamaSpmTokenizer) and not tok.legacy
  assert tok.vocab_size <= 512
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
  assert tok.encode("\n", add_bos=False)[-1] == 13  # the configs' slice separator
  config = _load(tok.folder / "tokenizer_config.json")
  assert config["legacy"] is False and config["add_bos_token"] and not config["add_eos_token"]
  for words in task.answers.values():
    for word in words:
      ids = tok.encode(word, add_bos=False)
      assert len(ids) == 1 and tok.decode(ids + [tok.eos_id]) == word, (word, ids)


def test_tokenizer_training_is_deterministic(task, tok, tmp_path):
  again = synthetic.make_tokenizer(tmp_path, task.texts())
  model = "tokenizer.model"
  assert (again.folder / model).read_bytes() == (tok.folder / model).read_bytes()


def _supervised(example):
  return [int(i) for i, label in zip(example.input_ids, example.labels)
          if label != conv.IGNORE_INDEX]


def test_vicuna_sft_supervises_exactly_the_answers_and_eos(task, tok):
  for sample in _load(task.sft_json):
    example = conv.preprocess(sample["conversations"], tok, "vicuna_v1", has_image=True)
    assert not example.mismatch, (sample["id"], example.warning)
    assert list(example.input_ids).count(IMAGE_TOKEN_INDEX) == 1
    answers = [turn["value"] for turn in sample["conversations"] if turn["from"] == "gpt"]
    expected = [i for answer in answers for i in tok.encode(answer, add_bos=False) + [tok.eos_id]]
    assert _supervised(example) == expected, sample["id"]
    # supervised positions are exactly the answers' own positions in the full sequence
    labels = example.labels
    assert np.array_equal(labels[labels != conv.IGNORE_INDEX],
                          example.input_ids[labels != conv.IGNORE_INDEX])
    decoded = tok.decode(_supervised(example), skip_special_tokens=False)
    assert decoded == "</s> ".join(answers) + "</s>"


def test_plain_pretraining_supervises_caption_and_newline(task, tok):
  for sample in _load(task.pretrain_json):
    example = conv.preprocess(sample["conversations"], tok, "plain", has_image=True)
    assert list(example.input_ids[:2]) == [tok.bos_id, IMAGE_TOKEN_INDEX]
    assert list(example.labels[:2]) == [conv.IGNORE_INDEX] * 2
    assert _supervised(example) == [int(i) for i in example.input_ids[2:]]
    assert example.input_ids[-1] == 13
    assert tok.decode(_supervised(example)) == sample["conversations"][1]["value"] + "\n"


def test_eval_prompt_ends_at_the_assistant_colon(task, tok):
  record = task.eval_records()[0]
  prompt = conv.build_prompt([{"from": "human", "value": "<image>\n" + record["text"]}],
                             "vicuna_v1")
  ids = tok.tokenizer_image_token(prompt)
  assert ids.count(IMAGE_TOKEN_INDEX) == 1
  assert tok.decode(ids[-2:]) == "ASSISTANT:"


def test_a_tokenizer_that_breaks_the_round_arithmetic_is_refused(task, tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="' xylophone' is .* pieces"):
    synthetic.make_tokenizer(tmp_path / "a", task.texts(), single_token_words=["xylophone"])
  # Without the " USER" -> "</s>USER" rewrite the model learns "▁USER": later rounds mismatch.
  monkeypatch.setattr(synthetic, "_ROLE", "NOBODY")
  with pytest.raises(ValueError, match="tokenization mismatch"):
    synthetic.make_tokenizer(tmp_path / "b", task.texts())


def test_answers_are_scored_by_exact_match_after_normalising(task, tmp_path):
  from hiwin_jax.infer import evaluate
  records = task.eval_records()
  truth = {r["question_id"]: r["answer"] for r in records}

  def score(texts, **kw):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q, "text": t}) + "\n"
                               for q, t in texts.items()))
    return evaluate.score(task.eval_jsonl, answers, "normalized", **kw)

  perfect = score(truth, chance=task.chance)
  assert perfect["score"] == 1.0 and perfect["scored"] == 2 * N_EVAL
  assert perfect["chance"] == pytest.approx((1 / 4 + 1 / 3) / 2)
  assert perfect["per_category"]["colour"] == {"score": 1.0, "scored": N_EVAL, "chance": 0.25}
  assert score({k: f"  {v.upper()}. " for k, v in truth.items()})["score"] == 1.0
  flip = {"horizontal": "vertical", "vertical": "checked", "checked": "horizontal"}
  wrong = {r["question_id"]: flip[r["answer"]] if r["category"] == "pattern" else r["answer"]
           for r in records}
  result = score(wrong)
  assert result["per_category"]["pattern"]["score"] == 0.0 and "chance" not in result
  assert result["per_category"]["colour"]["score"] == 1.0 and result["score"] == 0.5
  assert score({k: "red is it" for k in truth})["score"] == 0.0
  assert score({})["unanswered"] == 2 * N_EVAL
  with pytest.raises(ValueError, match="no chance level for the categories \\['pattern'\\]"):
    score(truth, chance={"colour": 0.25})


def test_bad_arguments_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="image_size 40x40 is too small"):
    synthetic.write_task(tmp_path, 1, 1, 0, image_size=(40, 40))
  with pytest.raises(ValueError, match="area must be"):
    synthetic.write_task(tmp_path, 1, 1, 0, area=(0.5, 0.2))
  with pytest.raises(ValueError, match="background must be"):
    synthetic.write_task(tmp_path, 1, 1, 0, background="plaid")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question_id": 1, "text": "x", "answer": "red"}\n{oops\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    synthetic.read_eval_records(bad)
