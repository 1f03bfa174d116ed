"""`hiwin eval` end to end on a tiny random model: images written here, errors recorded, resume."""

import json
import pathlib

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hiwin_jax import cli
from hiwin_jax import config as C
from hiwin_jax import weights
from hiwin_jax.data import image, slicing
from hiwin_jax.infer import evaluate, requests
from hiwin_jax.models.layers import Precision
from hiwin_jax.models.llava_uhd import LlavaUHD

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  cfg = C.load_config("tiny")
  model = LlavaUHD(cfg.model, Precision.from_config(cfg.model.precision), rngs=nnx.Rngs(0))
  weights.write_params(root / "ckpt", weights.model_params(model),
                       {"format": "llava-uhd", "model": cfg.model.to_dict()})
  images = root / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for name, (w, h) in {"a.png": (200, 150), "b.jpg": (500, 300)}.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
  (images / "broken.png").write_bytes(b"not a png")
  questions = [
      dict(question_id=1, image="a.png", text="What is it?", answers=["cat"] * 10),
      dict(question_id=2, image="missing.png", text="Where?", answer="here"),
      dict(question_id="q3", image="b.jpg", text="How many?", answer="2"),
      dict(question_id=4, image="a.png", text="  ", answer="x"),
      dict(question_id=5, image="broken.png", text="Color?", answer="red"),
      dict(question_id=6, text="No image here?", answer="yes"),
  ]
  qfile = root / "questions.jsonl"
  qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
  return root, qfile, images


def run_cli(root, qfile, images, answers, *extra):
  return cli.main(["eval", "--checkpoint", str(root / "ckpt"), "--tokenizer", "bytes",
                   "--questions", str(qfile), "--image-folder", str(images), "--answers",
                   str(answers), "--max-new-tokens", "3", "--batch-size", "4", "--metric", "vqa",
                   "--no-progress", *extra])


def test_eval_records_errors_and_resumes(setup, tmp_path, capsys):
  root, qfile, images = setup
  answers = tmp_path / "answers.jsonl"
  assert run_cli(root, qfile, images, answers) == 0
  first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  records = {r["question_id"]: r for r in evaluate.read_jsonl(answers)}
  assert set(records) == {1, 2, "q3", 4, 5, 6}
  assert "missing.png" in records[2]["error"]
  assert "empty prompt" in records[4]["error"]
  assert "broken.png" in records[5]["error"]
  for qid in (1, "q3", 6):
    assert "error" not in records[qid]
    assert isinstance(records[qid]["text"], str)
  assert first["counts"] == {"asked": 6, "skipped": 0, "errors": 3}
  assert first["score"]["scored"] == 6 and first["score"]["errors"] == 3

  # Resume: nothing left to ask; then drop one answer (and add a truncated line) and rerun.
  assert run_cli(root, qfile, images, answers) == 0
  second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert second["counts"] == {"asked": 0, "skipped": 6, "errors": 0}
  lines = answers.read_text().splitlines()
  kept = [l for l in lines if json.loads(l)["question_id"] != "q3"]
  answers.write_text("\n".join(kept) + '\n{"question_id": "q3", "te')
  assert run_cli(root, qfile, images, answers) == 0
  third = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert third["counts"] == {"asked": 1, "skipped": 5, "errors": 0}
  again = [r for r in evaluate.read_jsonl(answers, strict=False) if r["question_id"] == "q3"]
  assert len(again) == 1 and again[0]["text"] == records["q3"]["text"]  # deterministic greedy


def test_prompt_longer_than_the_context_is_an_error():
  cfg = C.load_config("tiny")
  img = Image.new("RGB", (1000, 700))
  with pytest.raises(requests.RequestError, match="longer than the context"):
    requests.prepare("Describe.", img, evaluate.ByteTokenizer(), cfg.model, max_context=512, reserve=8)


def test_official_prompt_text():
  prompt = requests.official_prompt("What is shown?", has_image=True)
  assert prompt == ("A chat between a curious user and an artificial intelligence assistant. The "
                    "assistant gives helpful, detailed, and polite answers to the user's "
                    "questions. USER: <image>\nWhat is shown? ASSISTANT:")
  assert requests.official_prompt("Hi", has_image=False).endswith("USER: Hi ASSISTANT:")


def test_official_prompt_ids_with_the_vicuna_tokenizer():
  from hiwin_jax.data.tokenizer import LlamaSpmTokenizer
  folder = pathlib.Path(__file__).resolve().parent / "fixtures" / "vicuna-tokenizer"
  tok = LlamaSpmTokenizer(folder)
  ids = tok.tokenizer_image_token(requests.official_prompt("Hi", has_image=True))
  # text-side.md: "USER: <image>\n" -> 3148 1001 29901 29871 -200 29871 13; ends "ASSISTANT:".
  at = ids.index(-200)
  assert ids[at - 4:at + 3] == [3148, 1001, 29901, 29871, -200, 29871, 13]
  assert ids[-5:] == [319, 1799, 9047, 13566, 29901]


# --- the evaluation pre-resize follows the model's code state (spec §0.1, §1.4) ---------------

BIG = (1500, 1100)  # longer side over 1024: R1 keeps it, R2 shrinks it to 1024x750


def _big_image():
  rng = np.random.default_rng(7)
  return Image.fromarray(rng.integers(0, 256, (BIG[1], BIG[0], 3), dtype=np.uint8))


def _expected_items(img, size):
  """The official evaluation items of `img` pre-resized to `size`: slices, then the overview."""
  if img.size != size:
    img = img.resize(size, Image.Resampling.BICUBIC)
  res = slicing.slice_image(img, slicing.EVAL_MAX_SLICE_NUMS)
  return [image.clip_normalize(x) for x in res.slices + [res.overview]]


def _tiny_model_config(variant):
  cfg = C.load_config("tiny", [f"--config.model.projector.layout={variant}"])
  return cfg.model


@pytest.mark.parametrize("variant,size", [("r1", BIG), ("r2", (1024, 750))])
def test_request_pre_resize_follows_the_projector_layout(variant, size):
  img = _big_image()
  p = requests.prepare("What is it?", img, evaluate.ByteTokenizer(), _tiny_model_config(variant),
                       image_folder="playground/data/eval/gqa")
  want = _expected_items(img, size)
  assert len(p.items) == len(want)
  for got, ref in zip(p.items, want):
    np.testing.assert_array_equal(got, ref)


RELEASES = [("vicuna7b", BIG), ("vicuna13b", (1024, 750)), ("qwen2_7b", (1024, 750))]


@pytest.mark.parametrize("name,size", RELEASES)
def test_release_configs_pick_their_code_states_pre_resize(name, size):
  """The release configs carry the rule, not a default argument: the 7B release is R1 (upscale
  only); the 13B and Qwen2 releases are R2 (a 1500x1100 image shrinks to 1024x750), in evaluation
  (`requests.prepare`) and in training (the data plan's TextVQA pre-resize)."""
  from hiwin_jax.data import plan
  cfg = C.load_config(name)
  img = _big_image()
  p = requests.prepare("What is it?", img, evaluate.ByteTokenizer(), cfg.model,
                       image_folder="playground/data/eval/gqa")
  want = _expected_items(img, size)
  assert len(p.items) == len(want)
  for got, ref in zip(p.items, want):
    np.testing.assert_array_equal(got, ref)
  settings = plan.Settings.from_configs(C.data_config(), cfg.model)
  assert settings.pre_resize_size(BIG, "data/TextVQA/train_images/x.jpg", plan.NO_DRAW) == size


@pytest.mark.parametrize("variant,size", [("r1", BIG), ("r2", (1024, 750))])
def test_hiwin_eval_pre_resize_follows_the_projector_layout(variant, size, tmp_path,
                                                            monkeypatch):
  """`answer_questions` (what `hiwin eval` runs) hands the generator the items of the model's
  pre-resize rule."""
  from types import SimpleNamespace

  from hiwin_jax.infer import generate
  batches = []

  class Recorder:
    def __init__(self, model):
      del model

    def __call__(self, batch, gen):
      batches.append(batch)
      rows = len(batch["input_ids"])
      return SimpleNamespace(tokens=np.zeros((rows, 1), np.int32), lengths=np.zeros(rows, int))

  monkeypatch.setattr(generate, "Generator", Recorder)
  folder = tmp_path / "gqa"
  folder.mkdir()
  _big_image().save(folder / "big.png")
  questions = tmp_path / "q.jsonl"
  questions.write_text(json.dumps({"question_id": 1, "image": "big.png", "text": "What?"}) + "\n")
  counts = evaluate.answer_questions(None, evaluate.ByteTokenizer(), _tiny_model_config(variant),
                                     questions, folder, tmp_path / "a.jsonl",
                                     gen=generate.GenerationConfig(max_new_tokens=1),
                                     progress=False)
  assert counts["errors"] == 0 and len(batches) == 1
  got = [(tuple(g), px[:14 * g[0], :14 * g[1]].tobytes()) for b in batches[0]["buckets"]
         for px, g in zip(b["pixels"], b["grid"]) if g[0]]
  want = [((x.shape[0] // 14, x.shape[1] // 14), x.tobytes())
          for x in _expected_items(image.load_image(folder / "big.png"), size)]
  assert sorted(got) == sorted(want)


# --- a Qwen2 model: its chatml prompt and its <|im_end|> stop, by default ---------------------

def test_hiwin_eval_of_a_qwen2_model_asks_in_chatml_and_stops_at_im_end(tmp_path, monkeypatch,
                                                                      capsys):
  """With no --template, `hiwin eval` of a Qwen2 model (here the qwen2_7b release config) asks
  with the official qwen_1_5 prompt tokenized by the Qwen2 tokenizer, and decoding stops at
  <|im_end|>; a Vicuna model keeps vicuna_v1."""
  from types import SimpleNamespace

  from hiwin_jax.infer import generate
  from tests.reference import qwen_text
  golden = {c["name"]: c for c in (json.loads(line) for line in (
      pathlib.Path(__file__).resolve().parent / "fixtures" / "golden"
      / "qwen2_text_cases.jsonl").read_text("utf-8").splitlines())}["inference_text"]
  assert requests.model_template(C.load_config("vicuna13b").model) == "vicuna_v1"
  calls = []

  class Recorder:
    def __init__(self, model):
      del model

    def __call__(self, batch, gen):
      calls.append((batch, gen))
      rows = len(batch["input_ids"])
      return SimpleNamespace(tokens=np.full((rows, 1), gen.eos_token_id, np.int32),
                             lengths=np.ones(rows, int))

  cfg_model = C.load_config("qwen2_7b").model
  monkeypatch.setattr(generate, "Generator", Recorder)
  monkeypatch.setattr(weights, "load_model", lambda *a, **k: (None, cfg_model))
  qfile = tmp_path / "q.jsonl"
  qfile.write_text(json.dumps({"question_id": 1, "text": golden["question"]}) + "\n")
  tok_dir = qwen_text.unpacked_fixture(tmp_path / "tok")
  (tmp_path / "ckpt").mkdir()  # checked to exist; load_model is the stand-in above
  assert cli.main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(tok_dir),
                   "--questions", str(qfile), "--image-folder", str(tmp_path), "--answers",
                   str(tmp_path / "a.jsonl"), "--metric", "none", "--no-progress"]) == 0
  (batch, gen), = calls
  n = len(golden["input_ids"])
  assert batch["input_ids"][0][:n].tolist() == golden["input_ids"]
  assert gen.eos_token_id == 151645  # <|im_end|> of the Qwen2 tokenizer
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counts"]["errors"] == 0
