"""`hiwin eval` end to end on a tiny random model: images written here, errors recorded, resume."""

import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hiwin_jax import cli
from hiwin_jax import config as C
from hiwin_jax import weights
from hiwin_jax.infer import evaluate as E
from hiwin_jax.infer import requests as R
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
  records = {r["question_id"]: r for r in E.read_jsonl(answers)}
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
  again = [r for r in E.read_jsonl(answers, strict=False) if r["question_id"] == "q3"]
  assert len(again) == 1 and again[0]["text"] == records["q3"]["text"]  # deterministic greedy


def test_prompt_longer_than_the_context_is_an_error():
  cfg = C.load_config("tiny")
  img = Image.new("RGB", (1000, 700))
  with pytest.raises(R.RequestError, match="longer than the context"):
    R.prepare("Describe.", img, E.ByteTokenizer(), cfg.model, max_context=512, reserve=8)


def test_official_prompt_text():
  prompt = R.official_prompt("What is shown?", has_image=True)
  assert prompt == ("A chat between a curious user and an artificial intelligence assistant. The "
                    "assistant gives helpful, detailed, and polite answers to the user's "
                    "questions. USER: <image>\nWhat is shown? ASSISTANT:")
  assert R.official_prompt("Hi", has_image=False).endswith("USER: Hi ASSISTANT:")


def test_official_prompt_ids_with_the_vicuna_tokenizer():
  import pathlib
  folder = (pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
            / "vicuna-tokenizer")
  if not (folder / "tokenizer.model").is_file():
    pytest.skip(f"no Vicuna tokenizer at {folder}")
  from hiwin_jax.data.tokenizer import LlamaSpmTokenizer
  tok = LlamaSpmTokenizer(folder)
  ids = tok.tokenizer_image_token(R.official_prompt("Hi", has_image=True))
  # text-side.md: "USER: <image>\n" -> 3148 1001 29901 29871 -200 29871 13; ends "ASSISTANT:".
  at = ids.index(-200)
  assert ids[at - 4:at + 3] == [3148, 1001, 29901, 29871, -200, 29871, 13]
  assert ids[-5:] == [319, 1799, 9047, 13566, 29901]
