"""Hostile and mistaken inputs through `hiwin` (issue 11): crafted safetensors headers, sharded
indexes that reach outside their folder, torch pickles, damaged parameter checkpoints, output
folders that hold other files, bad flags and overrides.

Each case runs the command in-process (`cli.main`) and asserts the exit status, the key words of
the one-line error, and that nothing outside the intended folder was read or changed. The files
are crafted here byte by byte (`st_bytes`), independently of the reader under test.
"""

import json
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from hiwin_jax import cli, config, outputs, weights
from hiwin_jax.convert import formats

# --- helpers ----------------------------------------------------------------------------------

SHARD = "model-00001-of-00001.safetensors"


def st_bytes(header, data: bytes = b"", *, raw_header: bytes | None = None,
             length: int | None = None) -> bytes:
  """A safetensors file: 8-byte little-endian header length, the JSON header, the data."""
  blob = raw_header if raw_header is not None else json.dumps(header).encode()
  return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def f32(name: str, shape, begin: int, end: int | None = None, dtype: str = "F32") -> dict:
  n = int(np.prod(shape)) * 4
  return {name: {"dtype": dtype, "shape": list(shape),
                 "data_offsets": [begin, begin + n if end is None else end]}}


def listing(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
  """Every file under `folder` with its size and mtime: compared before/after a refused command."""
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(folder.rglob("*"))}


def run(argv, capsys) -> tuple[int, str]:
  code = cli.main([str(a) for a in argv])
  err = capsys.readouterr().err.strip()
  return code, err


def assert_one_line(code: int, err: str, *words: str, status: int = 2) -> None:
  assert code == status, err
  lines = err.splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  for w in words:
    assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory) -> pathlib.Path:
  """A tiny CLIPVisionModel folder (config.json, the index, one shard `SHARD`), as `hiwin convert
  export` writes it."""
  vision = config.load_config("tiny").model.vision
  folder = tmp_path_factory.mktemp("clip") / "clip"
  formats.export_model("hf-clip", formats.FORMATS["hf-clip"].model(vision), vision, folder)
  return folder


@pytest.fixture(scope="module")
def clip_checkpoint(clip_export, tmp_path_factory) -> pathlib.Path:
  """The same tower as a hiwin parameter checkpoint (params/, hiwin_config.json, checksums)."""
  folder = tmp_path_factory.mktemp("ours") / "ours"
  assert cli.main(["convert", "import", "--format", "hf-clip", "--input", str(clip_export),
                   "--output", str(folder)]) == 0
  return folder


def import_clip(folder: pathlib.Path, out: pathlib.Path, capsys) -> tuple[int, str]:
  return run(["convert", "import", "--format", "hf-clip", "--input", folder, "--output", out],
             capsys)


# --- safetensors headers ----------------------------------------------------------------------

DATA16 = bytes(range(16))

HEADERS = {
    # case: (file bytes, words of the error)
    "shorter_than_length_field": (b"\x01\x02\x03", ["truncated", "8-byte header length"]),
    "header_length_beyond_limit": (st_bytes({}, length=1 << 40), ["exceeds the", "limit"]),
    "header_length_beyond_file": (st_bytes({}, length=4096), ["exceeds the file", "truncated"]),
    "header_not_utf8": (st_bytes(None, raw_header=b'{"\xff\xfe": 1}'), ["not UTF-8"]),
    "header_not_json": (st_bytes(None, raw_header=b"{not json"), ["not valid JSON"]),
    "header_not_an_object": (st_bytes([1, 2]), ["must be a JSON object"]),
    "unknown_dtype": (st_bytes(f32("w", (2, 2), 0, dtype="F99"), DATA16), ["'w'",
                                                                         "unknown dtype"]),
    "negative_shape": (st_bytes({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}},
                                DATA16), ["'w'", "shape must be"]),
    "shape_times_itemsize_differs": (st_bytes(f32("w", (2, 2), 0, 12), DATA16[:12]),
                                     ["'w'", "16 bytes", "span 12"]),
    "reversed_offsets": (st_bytes({"w": {"dtype": "U8", "shape": [0],
                                         "data_offsets": [8, 4]}}, DATA16),
                         ["'w'", "data_offsets must be"]),
    "offsets_out_of_bounds": (st_bytes(f32("w", (2, 2), 8), DATA16), ["'w'", "past the data"]),
    "overlapping_tensors": (st_bytes({**f32("a", (2, 2), 0), **f32("b", (2, 2), 8)},
                                     DATA16 + DATA16[:8]), ["overlap"]),
    "gap_between_tensors": (st_bytes({**f32("a", (1,), 0), **f32("b", (2,), 8)}, DATA16),
                            ["gap", "bytes 4..8"]),
    "trailing_bytes": (st_bytes(f32("a", (2,), 0), DATA16), ["8 trailing bytes"]),
    "tensor_listed_twice": (st_bytes(None, raw_header=(
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'), data=DATA16[:4]),
                            ["'w'", "listed twice"]),
    "extra_entry_field": (st_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4],
                                          "extra": 1}}, DATA16[:4]),
                          ["exactly dtype, shape and data_offsets"]),
    "metadata_not_strings": (st_bytes({"__metadata__": {"format": 3}, **f32("w", (1,), 0)},
                                      DATA16[:4]), ["__metadata__"]),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_a_crafted_safetensors_header_is_refused_naming_file_and_rule(case, clip_export, tmp_path,
                                                                      capsys):
  data, words = HEADERS[case]
  src = tmp_path / "src"
  src.mkdir()
  shutil.copy(clip_export / "config.json", src)
  (src / "model.safetensors").write_bytes(data)
  code, err = import_clip(src, tmp_path / "out", capsys)
  assert_one_line(code, err, "model.safetensors", *words)
  assert not (tmp_path / "out").exists()


def test_header_errors_never_print_the_files_bytes(clip_export, tmp_path, capsys):
  src = tmp_path / "src"
  src.mkdir()
  shutil.copy(clip_export / "config.json", src)
  secret = "SECRET-TOKEN-1234"
  (src / "model.safetensors").write_bytes(st_bytes(None, raw_header=f"{{{secret}".encode()))
  code, err = import_clip(src, tmp_path / "out", capsys)
  assert_one_line(code, err, "not valid JSON")
  assert secret not in err


def relabel(path: pathlib.Path, new_dtype: str) -> None:
  """Rewrites the dtype of every tensor in a real safetensors file's header."""
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  for k, e in header.items():
    if k != "__metadata__":
      e["dtype"] = new_dtype
  path.write_bytes(st_bytes(header, raw[8 + n:]))


@pytest.mark.parametrize("dtype,words", [("I32", ["stored as int32", "floating-point"]),
                                         ("F16", ["2-byte F16", "span"])])
def test_a_relabelled_dtype_is_refused(dtype, words, clip_export, tmp_path, capsys):
  src = tmp_path / "src"
  shutil.copytree(clip_export, src)
  relabel(src / SHARD, dtype)
  code, err = import_clip(src, tmp_path / "out", capsys)
  assert_one_line(code, err, *words)
  assert not (tmp_path / "out").exists()


# --- sharded indexes --------------------------------------------------------------------------

def sharded_folder(clip_export: pathlib.Path, folder: pathlib.Path, weight_map=None,
                   index_bytes: bytes | None = None) -> pathlib.Path:
  """The tiny CLIP as one shard `model-00001-of-00001.safetensors` with an index whose
  weight_map is `weight_map(keys)` (default: every key in the shard)."""
  folder.mkdir(parents=True)
  shutil.copy(clip_export / "config.json", folder)
  shard = SHARD
  shutil.copy(clip_export / shard, folder / shard)
  raw = (folder / shard).read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  keys = [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]
  wm = {k: shard for k in keys} if weight_map is None else weight_map(keys, shard)
  (folder / "model.safetensors.index.json").write_bytes(
      index_bytes if index_bytes is not None else json.dumps({"weight_map": wm}).encode())
  return folder


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors",
                                  "sub/model.safetensors", "config.json"],
                         ids=["dotdot", "absolute", "subfolder", "not_safetensors"])
def test_a_weight_map_may_only_name_plain_files_inside_the_folder(name, clip_export, tmp_path,
                                                                  capsys):
  # The file it names outside is crafted so that opening it would give a header error instead.
  outside = tmp_path / "outside.safetensors"
  outside.write_bytes(b"\x01\x02\x03")
  before = outside.stat()
  src = sharded_folder(clip_export, tmp_path / "src",
                       lambda keys, shard: {**{k: shard for k in keys[1:]}, keys[0]: name})
  code, err = import_clip(src, tmp_path / "out", capsys)
  assert_one_line(code, err, "model.safetensors.index.json", "weight_map names",
                  "plain .safetensors file name")
  assert outside.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize("case,words", [
    ("missing_shard", ["which is not a file"]),
    ("index_not_json", ["not valid JSON"]),
    ("no_weight_map", ["no weight_map"]),
    ("shard_holds_unlisted_tensor", ["does not place there"]),
    ("listed_tensor_absent", ["does not hold it"]),
])
def test_a_broken_index_is_named(case, words, clip_export, tmp_path, capsys):
  src = tmp_path / "src"
  if case == "missing_shard":
    sharded_folder(clip_export, src, lambda keys, shard: {k: "model-00002.safetensors"
                                                          for k in keys})
  elif case == "index_not_json":
    sharded_folder(clip_export, src, index_bytes=b"{\"weight_map\": ")
  elif case == "no_weight_map":
    sharded_folder(clip_export, src, index_bytes=b"{\"metadata\": {}}")
  elif case == "shard_holds_unlisted_tensor":
    sharded_folder(clip_export, src, lambda keys, shard: {k: shard for k in keys[1:]})
  else:
    sharded_folder(clip_export, src, lambda keys, shard: {**{k: shard for k in keys},
                                                          "ghost.weight": shard})
  code, err = import_clip(src, tmp_path / "out", capsys)
  assert_one_line(code, err, "model.safetensors.index.json", *words)


# --- torch pickles ----------------------------------------------------------------------------

class Payload:
  """Pickles as a call of os.system: torch.load(weights_only=True) must refuse it unrun."""

  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case,words", [
    ("code_payload", ["pickles the object", "system"]),
    ("empty", ["empty or truncated"]),
    ("truncated_archive", ["truncated or corrupt"]),
    ("not_a_pickle", ["not one torch.save writes"]),
    ("missing", ["no such file"]),
])
def test_a_hostile_or_broken_torch_file_is_named_and_nothing_runs(case, words, torch, tmp_path):
  from hiwin_jax.convert import vdim
  from hiwin_jax.convert.safetensors_io import CheckpointError
  path, marker = tmp_path / "vdim.ckpt", tmp_path / "marker"
  if case == "code_payload":
    torch.save({"state_dict": {"upsampler.x": Payload(marker)}}, path)
  elif case == "empty":
    path.write_bytes(b"")
  elif case == "truncated_archive":
    torch.save({"state_dict": {"upsampler.x": torch.zeros(64)}}, path)
    path.write_bytes(path.read_bytes()[:200])
  elif case == "not_a_pickle":
    path.write_bytes(b"\x80\x02not a pickle at all" * 4)
  with pytest.raises(CheckpointError) as e:
    vdim.read_torch_tensors(path)
  message = str(e.value)
  assert str(path) in message and "\n" not in message, message
  assert "weights_only=False" not in message and "Re-running" not in message, message
  for w in words:
    assert w in message, message
  assert not marker.exists(), "the pickle's payload ran"


# --- parameter checkpoints --------------------------------------------------------------------

def params_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in (folder / "params").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def flip_a_byte(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


def edit_config(folder: pathlib.Path, **vision) -> None:
  path = folder / weights.CONFIG_NAME
  saved = json.loads(path.read_text())
  saved["vision"].update(vision)
  path.write_text(json.dumps(saved))


DAMAGE = {
    "flipped_byte": (lambda f: flip_a_byte(params_file(f)), ["SHA-256 mismatch"]),
    "truncated_file": (lambda f: params_file(f).write_bytes(params_file(f).read_bytes()[:10]),
                       ["10 bytes", "truncated"]),
    "missing_file": (lambda f: params_file(f).unlink(), ["missing"]),
    "checksum_names_outside": (
        lambda f: (f / outputs.CHECKSUMS_NAME).write_text(json.dumps(
            {"files": {"../elsewhere": {"size": 1, "sha256": "0"}}})), ["outside"]),
    "config_disagrees_with_shapes": (lambda f: edit_config(f, mlp_dim=24),
                                     ["disagrees with the parameters stored", "mlp"]),
    "config_not_json": (lambda f: (f / weights.CONFIG_NAME).write_bytes(b"{\xff"),
                        ["hiwin checkpoint config", "not UTF-8"]),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_parameter_checkpoint_is_refused_at_export(case, clip_checkpoint, tmp_path,
                                                              capsys):
  damage, words = DAMAGE[case]
  ckpt = tmp_path / "ckpt"
  shutil.copytree(clip_checkpoint, ckpt)
  damage(ckpt)
  code, err = run(["convert", "export", "--format", "hf-clip", "--input", ckpt, "--output",
                   tmp_path / "out"], capsys)
  assert_one_line(code, err, *words)
  assert not (tmp_path / "out").exists()


def test_an_intact_checkpoint_exports(clip_checkpoint, tmp_path, capsys):
  """The control of the table above: the undamaged copy passes every check."""
  ckpt = tmp_path / "ckpt"
  shutil.copytree(clip_checkpoint, ckpt)
  code, err = run(["convert", "export", "--format", "hf-clip", "--input", ckpt, "--output",
                   tmp_path / "out"], capsys)
  assert code == 0, err
  assert (tmp_path / "out" / SHARD).is_file()


# --- outputs ----------------------------------------------------------------------------------

def test_an_output_folder_that_is_not_empty_is_refused_untouched(clip_export, tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  before = listing(out)
  code, err = import_clip(clip_export, out, capsys)
  assert_one_line(code, err, "--output", "not empty", "--overwrite")
  assert listing(out) == before


def test_overwrite_never_deletes_files_the_command_does_not_write(clip_export, clip_checkpoint,
                                                                  tmp_path, capsys):
  out = tmp_path / "out"
  shutil.copytree(clip_checkpoint, out)
  (out / "notes.txt").write_text("mine")
  before = listing(out)
  code, err = run(["convert", "import", "--format", "hf-clip", "--input", clip_export,
                   "--output", out, "--overwrite"], capsys)
  assert_one_line(code, err, "--overwrite replaces only", "notes.txt")
  assert listing(out) == before


def test_an_output_that_is_a_file_is_refused(clip_export, tmp_path, capsys):
  out = tmp_path / "out"
  out.write_text("a file")
  code, err = import_clip(clip_export, out, capsys)
  assert_one_line(code, err, "exists and is not a folder")
  assert out.read_text() == "a file"


def test_overwrite_replaces_a_checkpoint_whole(clip_export, clip_checkpoint, tmp_path, capsys):
  out = tmp_path / "out"
  shutil.copytree(clip_checkpoint, out)
  (out / "params" / "stale_file").write_text("from an older run")
  code, err = run(["convert", "import", "--format", "hf-clip", "--input", clip_export,
                   "--output", out, "--overwrite"], capsys)
  assert code == 0, err
  assert not (out / "params" / "stale_file").exists()
  params, _ = weights.read_params(out)
  expected, _ = weights.read_params(clip_checkpoint)
  assert params.keys() == expected.keys()
  for k in params:
    np.testing.assert_array_equal(params[k], expected[k], err_msg=k)


def test_a_writer_that_fails_leaves_the_old_folder_and_no_temporary(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "config.json").write_text("old")
  with pytest.raises(RuntimeError, match="disk died"):
    with outputs.atomic_folder(out, outputs.MODEL_FOLDER, overwrite=True) as tmp:
      (tmp / "config.json").write_text("new")
      raise RuntimeError("disk died")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert (out / "config.json").read_text() == "old"


def _dead_pid() -> int:
  return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True).stdout)


def test_the_temporaries_of_a_killed_writer_on_this_host_are_removed(tmp_path):
  host, dead = socket.gethostname(), _dead_pid()
  out = tmp_path / "out"
  out.mkdir()
  (out / "config.json").write_text("old")
  left = {f".out.partial-{host}-{dead}-t{dead}", f".out.old-{host}-{dead}-t3",
          f".out.partial-{host}-{dead}"}  # the last: named before temporaries carried the thread
  kept = {f".out.partial-{host}-{os.getppid()}-t1", f".out.partial-elsewhere-{dead}-t1",
          f".other.partial-{host}-{dead}-t1"}  # a live writer, another host's, another output's
  for name in left | kept:
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text("x")
  with outputs.atomic_folder(out, outputs.MODEL_FOLDER, overwrite=True) as tmp:
    (tmp / "config.json").write_text("new")
  assert {p.name for p in tmp_path.iterdir()} == kept | {"out"}
  assert (out / "config.json").read_text() == "new"


def test_threads_of_one_process_writing_one_file_do_not_collide(tmp_path):
  """Two threads of one process write the same file at once (the metadata pass's processes are
  threads in a test): each has its own temporary, and the file ends whole."""
  path, start, errors = tmp_path / "excluded.jsonl", threading.Barrier(2), []

  def write(text):
    try:
      with outputs.atomic_file(path, "w") as f:
        start.wait(10)  # both temporaries exist before either is renamed
        f.write(text)
    except BaseException as e:  # noqa: BLE001 - reported by the assertion below
      errors.append(e)

  threads = [threading.Thread(target=write, args=(t * 1000,)) for t in "ab"]
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  assert not errors
  assert path.read_text() in ("a" * 1000, "b" * 1000)
  assert [p.name for p in tmp_path.iterdir()] == ["excluded.jsonl"]


def test_a_writer_killed_between_its_renames_leaves_the_old_folder_restored(tmp_path):
  old = tmp_path / f".out.old-{socket.gethostname()}-{_dead_pid()}-t1"
  old.mkdir()
  (old / "config.json").write_text("old")
  with pytest.raises(RuntimeError, match="disk died"):
    with outputs.atomic_folder(tmp_path / "out", outputs.MODEL_FOLDER, overwrite=True):
      raise RuntimeError("disk died")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert (tmp_path / "out" / "config.json").read_text() == "old"


def test_exporting_over_an_older_model_leaves_what_transformers_loads_as_the_new_one(tmp_path):
  """An export over a folder holding an older single-file model (as `save_pretrained` writes
  it): no stale model.safetensors stays beside the new shards, and transformers loads the new
  weights."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  vision = config.load_config("tiny").model.vision
  new = {k: np.asarray(v) + 1 for k, v in
         weights.model_params(formats.FORMATS["hf-clip"].model(vision)).items()}
  out = tmp_path / "model"
  hf_config = transformers.CLIPVisionConfig(**formats.FORMATS["hf-clip"].to_hf_config(
      vision, "float32"))
  transformers.CLIPVisionModel(hf_config).save_pretrained(out)
  assert (out / "model.safetensors").is_file()
  with pytest.raises(outputs.OutputError, match="not empty"):
    formats.export_params("hf-clip", new, vision, out)
  formats.export_params("hf-clip", new, vision, out, max_shard_bytes=4096, overwrite=True)
  assert not (out / "model.safetensors").exists()
  assert len(list(out.glob("model-*.safetensors"))) > 1
  loaded = transformers.CLIPVisionModel.from_pretrained(out)
  state = {k.removeprefix("vision_model."): v for k, v in loaded.state_dict().items()}
  theirs = state["post_layernorm.weight"].detach().to(torch.float32).numpy()
  np.testing.assert_array_equal(theirs, new["post_layernorm.scale"])


# --- flags and overrides ----------------------------------------------------------------------

TRAIN = ["train", "--config", "vdim_stage0_tiny"]

OVERRIDES = {
    # case: (override, words of the error)
    "missing_equals": ("--config.train.num_steps", ["--config.key=value"]),
    "not_a_number": ("--config.train.num_steps=ten", ["--config.train.num_steps=ten",
                                                      "cannot parse 'ten' as an integer"]),
    "wrong_type": ("--config.train.num_steps=1.5", ["expected an integer, got '1.5'"]),
    "bool_as_int": ("--config.data.workers=True", ["expected an integer"]),
    "zero_size": ("--config.data.global_batch_size=0", ["--config.data.global_batch_size=0",
                                                        "a positive integer"]),
    "negative_rate": ("--config.train.optimizer.lr=-1e-3", ["a number > 0"]),
    "ratio_out_of_range": ("--config.train.optimizer.b2=1.5", ["a number in [0, 1)"]),
    "unknown_dtype": ("--config.model.precision.dtype=float8", ["float32, bfloat16, float16"]),
    "unknown_remat": ("--config.model.llm.remat=sometimes", ["--config.model.llm.remat",
                                                             "one of"]),
    "unknown_key": ("--config.train.num_stepz=3", ["no config key 'train.num_stepz'"]),
    "unknown_section": ("--config.trian.num_steps=3", ["no config section 'trian'"]),
    "section_as_value": ("--config.train.optimizer=3", ["is a section, not a value"]),
    "heads_do_not_divide": ("--config.model.vision.num_heads=5", ["a divisor of"]),
}


@pytest.mark.parametrize("case", sorted(OVERRIDES))
def test_a_bad_override_is_one_line_naming_the_flag(case, tmp_path, capsys):
  override, words = OVERRIDES[case]
  code, err = run([*TRAIN, "--out", tmp_path / "run", override], capsys)
  assert_one_line(code, err, "hiwin train: error:", *words)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("attention", ["xla", "cudnn", "splash"])
def test_every_llm_attention_the_model_has_is_a_valid_override(attention):
  cfg = config.load_config("tiny", [f"--config.model.llm.attention={attention}"])
  assert cfg.model.llm.attention == attention


def test_an_unknown_llm_attention_names_the_choices():
  with pytest.raises(config.ConfigError, match="--config.model.llm.attention=flash.*splash"):
    config.load_config("tiny", ["--config.model.llm.attention=flash"])


GENERATE_FLAGS = {
    "zero_beams": (["--num-beams", "0"], ["--num-beams", "expected an integer >= 1"]),
    "top_p_above_one": (["--top-p", "7"], ["--top-p", "a number in (0, 1]"]),
    "negative_temperature": (["--temperature", "-1"], ["--temperature", "a number >= 0"]),
    "zero_new_tokens": (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    "unknown_dtype": (["--dtype", "float8"], ["--dtype", "invalid choice: 'float8'"]),
    "unknown_template": (["--template", "nope"], ["--template", "invalid choice: 'nope'"]),
}


@pytest.mark.parametrize("case", sorted(GENERATE_FLAGS))
def test_an_invalid_generate_flag_is_one_line(case, tmp_path, capsys):
  flags, words = GENERATE_FLAGS[case]
  with pytest.raises(SystemExit) as e:
    cli.main(["generate", "--checkpoint", str(tmp_path), "--tokenizer", "bytes", "--prompt",
              "hi", *flags])
  err = capsys.readouterr().err.strip()
  assert_one_line(e.value.code, err, "hiwin generate: error:", *words)


@pytest.mark.parametrize("flags,words", [
    (["--max-pixels", "0"], ["--max-pixels", "expected an integer >= 1, got '0'"]),
    (["--max-pixels", "-5"], ["--max-pixels", "expected an integer >= 1"]),
    (["--workers", "-1"], ["--workers", "expected an integer >= 0, got '-1'"]),
], ids=["zero_pixels", "negative_pixels", "negative_workers"])
def test_an_invalid_data_build_flag_is_one_line(flags, words, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["data", "build", "--json", str(tmp_path / "a.json"), "--images", str(tmp_path),
              "--out", str(tmp_path / "out"), *flags])
  assert_one_line(e.value.code, capsys.readouterr().err.strip(), "hiwin data: error:", *words)
  assert not (tmp_path / "out").exists()


def test_the_pixel_budget_has_one_default(capsys):
  from hiwin_jax.data import image
  args = cli.build_parser().parse_args(["data", "build", "--json", "a", "--images", "b", "--out",
                                        "c"])
  assert args.max_pixels == image.MAX_IMAGE_PIXELS
  with pytest.raises(SystemExit):
    cli.build_parser().parse_args(["data", "--help"])
  assert f"{image.MAX_IMAGE_PIXELS:,}" in capsys.readouterr().out
  assert config.load_config("tiny_stage1").data.max_image_pixels == image.MAX_IMAGE_PIXELS


def test_an_unknown_topology_is_one_line(capsys):
  code, err = run(["aot", "--config", "tiny_stage2", "--topology", "v9z-8"], capsys)
  assert_one_line(code, err, "unknown TPU topology 'v9z-8'")


@pytest.mark.parametrize("argv,words", [
    (["generate", "--checkpoint", "{tmp}/none", "--tokenizer", "bytes", "--prompt", "hi"],
     ["--checkpoint", "none: no such folder"]),
    (["eval", "--checkpoint", "{tmp}", "--tokenizer", "bytes", "--questions", "{tmp}/q.jsonl",
      "--answers", "{tmp}/a.jsonl"], ["--questions", "q.jsonl: no such file"]),
    (["convert", "import", "--format", "hf-clip", "--input", "{tmp}/none", "--output",
      "{tmp}/out"], ["--input", "none: no such file or folder"]),
    (["convert", "export", "--format", "hf-clip", "--input", "{tmp}/none", "--output",
      "{tmp}/out"], ["--input", "none: no such folder"]),
    (["train", "--config", "vdim_stage0_tiny", "--out", "{tmp}/run",
      "--config.data.source={tmp}/no_images"], ["--config.data.source", "no such folder"]),
    (["train", "--config", "tiny_stage1", "--out", "{tmp}/run", "--config.data.json="],
     ["needs --config.data.json=", "training json"]),
    (["train", "--config", "tiny_stage1", "--out", "{tmp}/run",
      "--config.data.json={tmp}/train.json", "--config.data.image_folder={tmp}/gone"],
     ["--config.data.image_folder", "gone: no such folder"]),
], ids=["generate_checkpoint", "eval_questions", "import_input", "export_input", "vdim_images",
        "train_without_data_json", "train_image_folder"])
def test_a_missing_input_says_which_flag_and_that_it_is_missing(argv, words, tmp_path, capsys):
  (tmp_path / "train.json").write_text("[]")
  code, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
  assert_one_line(code, err, *words)
  assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def read_only(folder: pathlib.Path):
  """Nothing can be created in `folder` (as root, permission bits do not stop writes: chattr)."""
  if os.geteuid() == 0:
    subprocess.run(["chattr", "+i", str(folder)], check=True)
  else:
    folder.chmod(0o555)


def writable(folder: pathlib.Path):
  if os.geteuid() == 0:
    subprocess.run(["chattr", "-i", str(folder)], check=True)
  else:
    folder.chmod(0o755)


@pytest.mark.parametrize("command", ["train", "convert"])
def test_an_unwritable_output_is_refused_before_any_work(command, clip_export, tmp_path, capsys):
  parent = tmp_path / "locked"
  parent.mkdir()
  read_only(parent)
  try:
    if command == "train":
      argv = [*TRAIN, "--out", parent / "run"]
    else:
      argv = ["convert", "import", "--format", "hf-clip", "--input", clip_export, "--output",
              parent / "out"]
    code, err = run(argv, capsys)
  finally:
    writable(parent)
  assert_one_line(code, err, str(parent), "cannot write")
  assert list(parent.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
  argv = ["convert", "export", "--format", "hf-clip", "--input", str(tmp_path / "none"),
          "--output", str(tmp_path / "out")]
  with pytest.raises(cli.UsageError, match="no such folder"):
    cli.main(["--debug", *argv])
  with pytest.raises(cli.UsageError):
    cli.main([*argv[:1], "--debug", *argv[1:]])
  monkeypatch.setenv("HIWIN_DEBUG", "1")
  with pytest.raises(cli.UsageError):
    cli.main(argv)


def test_a_bug_is_reported_as_an_internal_error_in_one_line(capsys, monkeypatch):
  def broken(args, overrides):
    raise RuntimeError("an invariant broke")
  monkeypatch.setitem(cli.HANDLERS, "aot", broken)
  code, err = run(["aot"], capsys)
  assert_one_line(code, err, "internal error: RuntimeError: an invariant broke", "--debug",
                  status=1)


def test_a_key_error_is_a_bug_not_a_user_error(capsys, monkeypatch):
  def broken(args, overrides):
    return {}["x"]
  monkeypatch.setitem(cli.HANDLERS, "aot", broken)
  code, err = run(["aot"], capsys)
  assert_one_line(code, err, "internal error: KeyError: 'x'", "--debug", status=1)


def test_an_unknown_config_key_is_still_a_user_error(tmp_path, capsys):
  code, err = run([*TRAIN, "--out", tmp_path / "run", "--config.train.nope=1"], capsys)
  assert_one_line(code, err, "hiwin train: error:", "no config key 'train.nope'")


def test_parameters_that_do_not_fit_the_model_are_a_checkpoint_error():
  from flax import nnx
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  with pytest.raises(weights.CheckpointError, match="does not have.*'extra'"):
    weights.load_params(model, {"kernel": np.zeros((2, 3)), "bias": np.zeros(3),
                                "extra": np.zeros(1)})
  with pytest.raises(weights.CheckpointError, match="1 parameters of the model are not given"):
    weights.load_params(model, {"kernel": np.zeros((2, 3))})


def test_a_malformed_question_file_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
  def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the question file was read")
  monkeypatch.setattr(weights, "load_model", no_model)
  (tmp_path / "q.jsonl").write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1}\n')
  code, err = run(["eval", "--checkpoint", tmp_path, "--tokenizer", "bytes", "--questions",
                   tmp_path / "q.jsonl", "--answers", tmp_path / "a.jsonl"], capsys)
  assert_one_line(code, err, "q.jsonl", "appears twice")
