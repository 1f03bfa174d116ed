"""Hostile data inputs (issue 11, data side): image paths that escape the image folder, files
that are not what they claim, pixel bombs, malformed data JSON and question files.

Each case asserts what the user sees (a count under a named reason, or one error line naming the
file) and, where a file must not be read, that it never was: every file opened in this process
is recorded by an audit hook (`_opened`), so the builds and metadata passes here run with one
worker (in this process).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import struct
import sys
import threading
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from hiwin_jax import cli
from hiwin_jax import config as C
from hiwin_jax.data import image, loader
from hiwin_jax.data.tokenizer import LlamaSpmTokenizer
from hiwin_jax.infer import evaluate

# the 156M-pixel header of the bomb below: PIL warns on opening it, which is what we test
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

VICUNA = pathlib.Path(__file__).resolve().parent / "fixtures" / "vicuna-tokenizer"

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
  if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
    _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


@pytest.fixture(scope="module")
def opened():
  """A context manager recording the real paths of the files opened inside it."""
  sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only inside `watch`

  @contextlib.contextmanager
  def watch():
    global _OPENED
    _OPENED = []
    try:
      yield _OPENED
    finally:
      _OPENED = None
  return watch


@pytest.fixture(scope="module")
def tok():
  return LlamaSpmTokenizer(VICUNA)


def _jpeg(marker: bytes, size=(64, 48)) -> bytes:
  """A JPEG carrying `marker` in a comment segment (so its bytes can be found in an output)."""
  buf = io.BytesIO()
  rng = np.random.default_rng(len(marker))
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(
      buf, "JPEG", comment=marker)
  return buf.getvalue()


def _png(marker: bytes, size=(64, 48)) -> bytes:
  info = PngImagePlugin.PngInfo()
  info.add_text("marker", marker.decode())
  buf = io.BytesIO()
  Image.new("RGB", size, (10, 20, 30)).save(buf, "PNG", pnginfo=info)
  return buf.getvalue()


def _png_header_only(width: int, height: int, marker: bytes) -> bytes:
  """A PNG declaring width x height RGB pixels with a few bytes of image data: what a pixel bomb
  looks like to anything that reads only its header."""
  def chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0,
                                                             0, 0))
          + chunk(b"tEXt", b"marker\0" + marker) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + chunk(b"IEND", b""))


def _entry(rid: str, image_path: str | None) -> dict:
  conv = [{"from": "human", "value": ("<image>\n" if image_path else "") + "What is it?"},
          {"from": "gpt", "value": "A test."}]
  return {"id": rid, "conversations": conv, **({"image": image_path} if image_path else {})}


def _cfgs(json_path, images, **overrides):
  d = C.data_config()
  d.update(json=str(json_path), image_folder=str(images), template="vicuna_v1", max_length=2048,
           seq_multiple=256, global_batch_size=2, grad_accum=1, seed=0, metadata_workers=1,
           remainder="pad")
  d.update(overrides)
  return d, ml_collections.ConfigDict({"projector": C.projector_config()})


def _build(capsys, *argv) -> tuple[int, str, str]:
  rc = cli.main(["data", "build", *map(str, argv)])
  out, err = capsys.readouterr()
  return rc, out, err


def _error_line(err: str) -> str:
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert len(lines) == 1, err
  return lines[0]


def _output_bytes(folder: pathlib.Path) -> bytes:
  return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


# --- image paths that leave the image folder ------------------------------------------------------

@pytest.fixture(scope="module")
def escapes(tmp_path_factory):
  """An image folder whose json names files outside it in every way we know, a few good images
  (one reached through an inner symlink and a `..` that stays inside) and a FIFO."""
  root = tmp_path_factory.mktemp("escape")
  images, outside = root / "images", root / "outside"
  (images / "sub").mkdir(parents=True)
  outside.mkdir()
  (root / "secret.jpg").write_bytes(_jpeg(b"SECRET-SIBLING"))
  (outside / "x.jpg").write_bytes(_jpeg(b"SECRET-IN-DIR"))
  (images / "ok.jpg").write_bytes(_jpeg(b"GOOD-IMAGE"))
  os.symlink(root / "secret.jpg", images / "link.jpg")
  os.symlink(outside, images / "linkdir")
  os.symlink(images / "ok.jpg", images / "sub" / "inner-link.jpg")
  os.mkfifo(images / "fifo.jpg")
  cases = {
      "dotdot": ("../secret.jpg", "outside_image_folder"),
      "absolute": (str(root / "secret.jpg"), "outside_image_folder"),
      "symlink_file": ("link.jpg", "outside_image_folder"),
      "symlink_dir": ("linkdir/x.jpg", "outside_image_folder"),
      "dotdot_deep": ("sub/../../outside/x.jpg", "outside_image_folder"),
      "fifo": ("fifo.jpg", "missing_image"),
  }
  entries = [_entry(name, rel) for name, (rel, _) in cases.items()]
  entries += [_entry("good", "ok.jpg"), _entry("good_dotdot", "sub/../ok.jpg"),
              _entry("good_link", "sub/inner-link.jpg"), _entry("text", None)]
  (root / "data.json").write_text(json.dumps(entries))
  secrets = {str(root / "secret.jpg"), str(outside / "x.jpg"), str(images / "fifo.jpg")}
  return root, cases, {os.path.realpath(s) for s in secrets}


def _unblock_fifo(path: pathlib.Path, done: threading.Event) -> None:
  """Whatever opens the FIFO for reading blocks until a writer comes: come after 20 s and leave
  at once, so a failing run ends with an assertion instead of hanging."""
  if not done.wait(20):
    with contextlib.suppress(OSError):  # no reader: nothing to unblock
      os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@contextlib.contextmanager
def _fifo_guard(path: pathlib.Path):
  done = threading.Event()
  guard = threading.Thread(target=_unblock_fifo, args=(path, done), daemon=True)
  guard.start()
  try:
    yield
  finally:
    done.set()


def test_escaping_image_paths_are_counted_and_never_opened_by_the_metadata_pass(
    escapes, tok, tmp_path, opened):
  root, cases, secrets = escapes
  d, model = _cfgs(root / "data.json", root / "images", cache_dir=str(tmp_path))
  with _fifo_guard(root / "images" / "fifo.jpg"), opened() as files:
    it = loader.make_train_iterator(d, model, tok)
  want = {}
  for _, reason in cases.values():
    want[reason] = want.get(reason, 0) + 1
  assert {k: v for k, v in it.skipped.items() if v} == want
  assert len(it.plan.meta) == 4  # good, good_dotdot, good_link, text
  assert not secrets & set(files), sorted(secrets & set(files))


def test_the_build_stores_no_escaping_image_and_never_opens_one(escapes, tmp_path, capsys,
                                                               opened):
  root, cases, secrets = escapes
  with _fifo_guard(root / "images" / "fifo.jpg"), opened() as files:
    rc, out, err = _build(capsys, "--json", root / "data.json", "--images", root / "images",
                          "--out", tmp_path / "prepared", "--workers", 1)  # in this process
  assert rc == 0, err
  assert not secrets & set(files), sorted(secrets & set(files))
  manifest = json.loads((tmp_path / "prepared" / "prepared.json").read_text())
  assert manifest["errors"] == {"outside_image_folder": 5, "missing_image": 1}
  assert manifest["num_images"] == 1  # ok.jpg, once for its three paths
  stored = _output_bytes(tmp_path / "prepared")
  assert stored.count(b"GOOD-IMAGE") == 1
  assert b"SECRET" not in stored


# --- files that are not the images they claim to be ------------------------------------------------

@pytest.fixture(scope="module")
def impostors(tmp_path_factory):
  root = tmp_path_factory.mktemp("impostors")
  images = root / "images"
  images.mkdir()
  good = _png(b"GOOD-PNG")
  truncated = _jpeg(b"TRUNCATED-JPEG", (320, 240))
  files = {
      "good.png": good,
      "truncated.jpg": truncated[:len(truncated) * 2 // 3],  # a readable header, cut data
      "text.png": b"MARKER-NOT-AN-IMAGE: just some text that claims to be a PNG\n",
      "bomb.png": _png_header_only(13000, 12000, b"MARKER-BOMB"),  # 156M px, PIL would decode
      "empty.jpg": b"",
  }
  for name, data in files.items():
    (images / name).write_bytes(data)
  entries = [_entry(f"e-{name}", name) for name in files]
  entries += [_entry("again", "good.png"), _entry("text", None)]
  (root / "data.json").write_text(json.dumps(entries))
  return root


def test_the_build_stores_only_images_that_decode_within_the_pixel_budget(impostors, tmp_path,
                                                                          capsys, monkeypatch):
  decoded = []
  real_load = ImageFile.ImageFile.load
  monkeypatch.setattr(ImageFile.ImageFile, "load",
                      lambda self: decoded.append(self.size) or real_load(self))
  rc, _, err = _build(capsys, "--json", impostors / "data.json", "--images",
                      impostors / "images", "--out", tmp_path / "prepared")
  assert rc == 0, err
  manifest = json.loads((tmp_path / "prepared" / "prepared.json").read_text())
  assert manifest["num_images"] == 1
  assert manifest["errors"] == {"unreadable_image": 3, "too_many_pixels": 1}
  assert (13000, 12000) not in decoded  # refused from its header
  stored = _output_bytes(tmp_path / "prepared")
  assert stored.count(b"GOOD-PNG") == 1
  assert b"MARKER" not in stored and b"TRUNCATED-JPEG" not in stored


def test_the_builds_pixel_budget_is_a_flag(impostors, tmp_path, capsys):
  rc, _, err = _build(capsys, "--json", impostors / "data.json", "--images",
                      impostors / "images", "--out", tmp_path / "prepared", "--max-pixels",
                      "1000")
  assert rc == 0, err
  manifest = json.loads((tmp_path / "prepared" / "prepared.json").read_text())
  assert manifest["num_images"] == 0 and manifest["errors"]["too_many_pixels"] == 4
  assert b"GOOD-PNG" not in _output_bytes(tmp_path / "prepared")


def test_the_build_replaces_only_an_earlier_build_and_only_with_overwrite(impostors, tmp_path,
                                                                         capsys):
  args = ("--json", impostors / "data.json", "--images", impostors / "images", "--out",
          tmp_path / "prepared", "--max-pixels", "1000")
  assert _build(capsys, *args)[0] == 0
  first = _output_bytes(tmp_path / "prepared")
  rc, _, err = _build(capsys, *args)
  assert rc == 2 and "--out" in _error_line(err) and "--overwrite" in err
  rc, _, err = _build(capsys, *args, "--overwrite")
  assert rc == 0, err
  assert _output_bytes(tmp_path / "prepared") == first  # the build is deterministic
  (tmp_path / "prepared" / "cache").mkdir()  # a training run's metadata cache (loader.cache_dir)
  (tmp_path / "prepared" / "cache" / "x.npz").write_bytes(b"old")
  rc, _, err = _build(capsys, *args, "--overwrite")
  assert rc == 0, err
  assert _output_bytes(tmp_path / "prepared") == first  # the stale cache went with the rest
  (tmp_path / "prepared" / "notes.txt").write_text("mine")
  rc, _, err = _build(capsys, *args, "--overwrite")
  assert rc == 2 and "notes.txt" in _error_line(err)
  assert (tmp_path / "prepared" / "notes.txt").read_text() == "mine"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no temporaries left


def test_the_metadata_pass_refuses_a_pixel_bomb_from_its_header(impostors, tok, tmp_path,
                                                                monkeypatch):
  monkeypatch.setattr(ImageFile.ImageFile, "load",
                      lambda self: pytest.fail(f"decoded an image of {self.size}"))
  d, model = _cfgs(impostors / "data.json", impostors / "images", cache_dir=str(tmp_path))
  it = loader.make_train_iterator(d, model, tok)
  assert it.skipped["too_many_pixels"] == 1
  assert it.skipped["unreadable_image"] == 2  # text.png, empty.jpg (truncated.jpg: at load time)


def test_the_metadata_pass_applies_the_configured_pixel_budget(impostors, tok, tmp_path):
  d, model = _cfgs(impostors / "data.json", impostors / "images", cache_dir=str(tmp_path),
                   max_image_pixels=3000)
  it = loader.make_train_iterator(d, model, tok)
  assert it.skipped["too_many_pixels"] == 1 + 2 + 1  # the bomb, good.png twice, truncated.jpg


def test_load_image_refuses_a_pixel_bomb_before_decoding(impostors, monkeypatch):
  monkeypatch.setattr(ImageFile.ImageFile, "load",
                      lambda self: pytest.fail(f"decoded an image of {self.size}"))
  path = impostors / "images" / "bomb.png"
  with pytest.raises(image.ImageError, match=r"bomb\.png.*13000x12000.*pixels") as e:
    image.load_image(path)
  assert "\n" not in str(e.value)
  with pytest.raises(image.ImageError, match="3,072 pixels"):
    image.load_image(impostors / "images" / "good.png", max_pixels=1000)


# --- data json files that are not a LLaVA list -------------------------------------------------------

BAD_JSON = {
    # name: (file bytes, words the one error line must hold besides the file's name)
    "non_utf8": (b'[{"id": "caf\xe9", "conversations": []}]', ("not UTF-8", "byte 12")),
    "non_utf8_late": (b'[{"id": "a", "conversations": []},\n {"id": "\xff"}]',
                      ("not UTF-8", "byte 44")),
    "syntax": (b'[{"id": "a", "conversations": []},\n {"id": "b",}]',
               ("line 2", "entry 1 is not valid JSON")),
    "truncated": (b'[{"id": "a", "conversations": []}, {"id": "b", "conv',
                  ("entry 1 is not valid JSON",)),
    "unclosed": (b'[{"id": "a", "conversations": []}', ("without its closing ']'",)),
    "not_a_list": (b'{"id": "a", "conversations": []}', ("expected a JSON list",)),
    "empty": (b"", ("empty",)),
    "trailing": (b'[{"id": "a", "conversations": []}] {"id": "b"}',
                 ("after the list's closing ']'",)),
}


@pytest.fixture(scope="module")
def bad_json(tmp_path_factory):
  root = tmp_path_factory.mktemp("badjson")
  (root / "images").mkdir()
  for name, (data, _) in BAD_JSON.items():
    (root / f"{name}.json").write_bytes(data)
  return root


@pytest.mark.parametrize("name", sorted(BAD_JSON))
def test_hiwin_data_build_names_the_file_and_the_fault_of_a_bad_json(name, bad_json, tmp_path,
                                                                    capsys):
  rc, out, err = _build(capsys, "--json", bad_json / f"{name}.json", "--images",
                        bad_json / "images", "--out", tmp_path / "prepared")
  assert rc == 2 and out == ""
  line = _error_line(err)
  assert f"{name}.json" in line, line
  for word in BAD_JSON[name][1]:
    assert word in line, line
  assert "Traceback" not in err
  assert not (tmp_path / "prepared").exists()
  assert [p.name for p in tmp_path.iterdir()] == []  # no half-written sibling either


@pytest.mark.parametrize("name", ["non_utf8", "syntax", "truncated"])
def test_training_on_a_bad_json_is_one_error_naming_the_file(name, bad_json, tok, tmp_path):
  d, model = _cfgs(bad_json / f"{name}.json", bad_json / "images", cache_dir=str(tmp_path))
  with pytest.raises(ValueError) as e:
    loader.make_train_iterator(d, model, tok)
  message = str(e.value)
  assert f"{name}.json" in message and "\n" not in message
  for word in BAD_JSON[name][1]:
    assert word in message


def test_a_prepared_folder_that_is_not_one_is_one_error(tmp_path, tok):
  (tmp_path / "prepared").mkdir()
  d, model = _cfgs("", "", format="array_record", array_record_dir=str(tmp_path / "prepared"),
                   cache_dir=str(tmp_path / "cache"))
  with pytest.raises(ValueError, match=r"prepared: no prepared dataset here.*hiwin data build"):
    loader.make_train_iterator(d, model, tok)


# --- question files ---------------------------------------------------------------------------------

BAD_QUESTIONS = {
    "non_utf8": (b'{"question_id": 1, "text": "ok"}\n{"question_id": 2, "text": "caf\xe9"}\n',
                 ("q.jsonl:2", "not UTF-8")),
    "image_not_a_string": (b'{"question_id": 7, "text": "hi", "image": 5}\n',
                           ("question 7", "'image' must be a string")),
    "text_not_a_string": (b'{"question_id": "a", "text": ["x"]}\n',
                          ("question 'a'", "'text' must be a string")),
}


@pytest.mark.parametrize("name", sorted(BAD_QUESTIONS))
def test_a_bad_question_file_is_one_error_naming_file_and_question(name, tmp_path):
  data, words = BAD_QUESTIONS[name]
  (tmp_path / "q.jsonl").write_bytes(data)
  with pytest.raises(evaluate.QuestionFileError) as e:
    evaluate.read_questions(tmp_path / "q.jsonl")
  message = str(e.value)
  assert "\n" not in message
  for word in words:
    assert word in message, message


def test_a_question_file_with_a_utf8_bom_is_read(tmp_path):
  (tmp_path / "q.jsonl").write_bytes(b'\xef\xbb\xbf{"question_id": 1, "text": "ok"}\n')
  assert evaluate.read_questions(tmp_path / "q.jsonl") == [{"question_id": 1, "text": "ok"}]


def test_eval_answers_an_escaping_image_path_with_an_error_and_never_opens_it(escapes, tmp_path,
                                                                             opened):
  """`hiwin eval`'s questions name images relative to --image-folder like the training data."""
  from flax import nnx

  from hiwin_jax.infer.generate import GenerationConfig
  root, _, secrets = escapes
  names = ["../secret.jpg", str(root / "secret.jpg"), "link.jpg", "linkdir/x.jpg"]
  (tmp_path / "q.jsonl").write_text("".join(
      json.dumps({"question_id": k, "image": name, "text": "What is it?"}) + "\n"
      for k, name in enumerate(names)))
  cfg_model = ml_collections.ConfigDict({"llm": {"max_position_embeddings": 4096}})
  with opened() as files:
    try:  # no tokenizer, an empty model: nothing may get past the image path
      counts = evaluate.answer_questions(
          nnx.Module(), None, cfg_model, tmp_path / "q.jsonl", root / "images",
          tmp_path / "answers.jsonl", gen=GenerationConfig(max_new_tokens=4), progress=False)
    except Exception as e:  # noqa: BLE001  (reported after what was opened)
      counts = e
  assert not secrets & set(files), sorted(secrets & set(files))
  assert isinstance(counts, dict) and counts["errors"] == len(names), counts
  answers = evaluate.read_jsonl(tmp_path / "answers.jsonl")
  assert [a["question_id"] for a in answers] == list(range(len(names)))
  assert all(a["error"].startswith("outside_image_folder") and a["text"] == "" for a in answers)
