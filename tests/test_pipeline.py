"""The training data pipeline: global plan, static shapes, bad samples, sources, resume, processes.

Small PIL-written images in tmp_path; the real Vicuna tokenizer of tests/fixtures/vicuna-tokenizer
(vicuna_v1 template).
"""

import json
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from hiwin_jax import config as C
from hiwin_jax.data import loader, metadata
from hiwin_jax.data.tokenizer import LlamaSpmTokenizer

VICUNA = pathlib.Path(__file__).resolve().parent / "fixtures" / "vicuna-tokenizer"

# (width, height): unsliced, 2, 4 and 6 slices, wide and tall
SIZES = [(200, 100), (300, 300), (337, 337), (640, 480), (700, 200), (240, 640), (1024, 768)]


@pytest.fixture(scope="module")
def tok_and_template():
  return LlamaSpmTokenizer(VICUNA), "vicuna_v1"


def _conv(text: str, image: bool = True):
  return [{"from": "human", "value": ("<image>\n" if image else "") + "Describe the image."},
          {"from": "gpt", "value": text}]


def _write_dataset(root: pathlib.Path, n_good: int = 21, bad: bool = True, text_only: bool = False):
  """A LLaVA json + image folder. Returns (json path, image folder, {reason: expected count})."""
  images = root / "images"
  images.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  records = []
  for i in range(n_good):
    w, h = SIZES[i % len(SIZES)]
    name = f"img{i}.{'png' if i % 2 else 'jpg'}"
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(images / name)
    records.append({"id": f"s{i}", "image": name, "conversations": _conv(f"a cat number {i}")})
  expected = {}
  if text_only:
    records.append({"id": "text0", "conversations": _conv("just text here", image=False)})
  if bad:
    (images / "corrupt.jpg").write_bytes(b"this is not an image at all")
    records.append({"id": "corrupt", "image": "corrupt.jpg", "conversations": _conv("x")})
    records.append({"id": "missing", "image": "nope.png", "conversations": _conv("x")})
    records.append({"id": "badrec", "image": "img0.jpg"})  # no conversations
    records.append(["not", "a", "record"])
    records.append({"id": "badconv", "image": "img1.png",
                    "conversations": [{"from": "robot", "value": "<image>\nhi"}]})
    records.append({"id": "long", "image": "img0.jpg",
                    "conversations": _conv(" ".join(["cat"] * 3000))})
    # good header, truncated pixel data: fails only when decoded, at load time
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(images / "t.png")
    data = (images / "t.png").read_bytes()
    (images / "trunc.png").write_bytes(data[:len(data) // 2])
    records.append({"id": "trunc", "image": "trunc.png", "conversations": _conv("x")})
    expected = {"unreadable_image": 1, "missing_image": 1, "bad_record": 2,
                "bad_conversation": 1, "too_long": 1}
  path = root / "data.json"
  path.write_text(json.dumps(records))
  return path, images, expected


def _cfgs(json_path, images, template, **overrides):
  d = C.data_config()
  d.update(json=str(json_path), image_folder=str(images), template=template, max_length=2048,
           seq_multiple=256, global_batch_size=4, grad_accum=2, seed=3, prefetch=2)
  d.update(overrides)
  model = ml_collections.ConfigDict({"projector": C.projector_config()})
  return d, model


def _take(it, n):
  return [next(it) for _ in range(n)]


def _signature(batch):
  return tuple((k, batch[k].shape) for k in ("input_ids", "labels")) + tuple(
      (b["pixels"].shape, b["grid"].shape) for b in batch["buckets"])


def _assert_same(a, b):
  assert a["meta"]["ids"] == b["meta"]["ids"], (a["meta"]["ids"], b["meta"]["ids"])
  assert a["meta"]["step"] == b["meta"]["step"]
  for k in ("input_ids", "image_token", "labels", "attention_mask"):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert len(a["buckets"]) == len(b["buckets"])
  for x, y in zip(a["buckets"], b["buckets"]):
    np.testing.assert_array_equal(x["grid"], y["grid"])
    np.testing.assert_array_equal(x["pixels"], y["pixels"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tok_and_template):
  tok, template = tok_and_template
  root = tmp_path_factory.mktemp("llava")
  json_path, images, expected = _write_dataset(root, text_only=True)
  return json_path, images, expected, tok, template


def test_bad_samples_are_counted_by_reason_and_the_run_goes_on(dataset, tmp_path, monkeypatch):
  json_path, images, expected, tok, template = dataset
  d, model = _cfgs(json_path, images, template, epochs=2, cache_dir=str(tmp_path / "cache"))
  it = loader.make_train_iterator(d, model, tok)
  for reason, count in expected.items():
    assert it.skipped[reason] == count, (reason, it.skipped)
  batches = list(it)
  assert len(batches) == it.num_steps == sum(it.steps_per_epoch) > 0
  ids = {i for b in batches for i in b["meta"]["ids"]}
  assert "trunc" not in ids and {"corrupt", "missing", "long", "badrec"}.isdisjoint(ids)
  load_skipped = batches[-1]["meta"]["skipped"]["unreadable_image"] - expected["unreadable_image"]
  # "trunc" (the last record) fails at load time in every slot the plan gives it
  trunc = int(np.flatnonzero(it.plan.meta.arrays["index"] == it.plan.meta.num_records - 1)[0])
  slots = sum(int((it.plan.epoch(e).members == trunc).sum()) for e in range(2))
  assert load_skipped == slots >= 2
  fillers = [(b, i) for b in batches for i, f in enumerate(b["meta"]["filler"]) if f]
  assert fillers
  for b, i in fillers:  # fillers carry no supervised token
    assert (b["labels"].reshape(-1, b["labels"].shape[-1])[i] == -100).all()
  # every good sample is seen once per epoch
  seen = [i for b in batches[:it.steps_per_epoch[0]]
          for i, f in zip(b["meta"]["ids"], b["meta"]["filler"]) if not f]
  kept = {f"s{i}" for i in range(21)} | {"text0"}
  assert sorted(seen) == sorted(kept)
  # a restart reads the metadata cache instead of rescanning
  cached = list((tmp_path / "cache").glob("meta-*/shard-*.npz"))
  assert len(cached) == 1
  monkeypatch.setattr(metadata, "_scan_shard", lambda *a: pytest.fail("metadata rescanned"))
  it2 = loader.make_train_iterator(d, model, tok)
  assert it2.keys == it.keys and it2.skipped == it.plan.meta.counts


def test_batches_have_static_shapes_matching_their_key(dataset):
  json_path, images, _, tok, template = dataset
  d, model = _cfgs(json_path, images, template)
  it = loader.make_train_iterator(d, model, tok)
  bk = it.plan.settings.buckets
  for batch in it:
    ov, sl, n, s = batch["meta"]["key"]
    assert batch["input_ids"].shape == (2, 1 * 2, s) and batch["input_ids"].dtype == np.int32
    assert batch["attention_mask"].dtype == bool
    canvases = sorted({bk.index(c) for c in (ov, sl) if c is not None})
    assert len(batch["buckets"]) == len(canvases)
    for j, b in zip(canvases, batch["buckets"]):
      hc, wc = bk[j]
      per = (n if bk[j] == sl else 0) + (1 if bk[j] == ov else 0)
      assert b["pixels"].shape == (2, 2 * per, 14 * hc, 14 * wc, 3)
      assert (b["grid"] > 0).all()  # no padded item slots
    # every image token addresses a real item of the micro-batch
    total = sum(b["grid"].shape[1] for b in batch["buckets"])
    tok_ids = batch["image_token"]
    assert tok_ids.max() < total * it.plan.settings.tokens.tokens_per_item
    assert ((tok_ids >= 0) <= batch["attention_mask"]).all()


@pytest.mark.slow
def test_distinct_batch_shapes_over_200_steps_at_most_the_keys(dataset):
  json_path, images, _, tok, template = dataset
  d, model = _cfgs(json_path, images, template, epochs=40, global_batch_size=2, grad_accum=1,
                   seq_multiple=128)
  it = loader.make_train_iterator(d, model, tok)
  assert it.num_steps >= 200
  shapes = {_signature(b) for b in _take(it, 200)}
  assert 3 <= len(shapes) <= len(it.keys), (len(shapes), it.keys)


def test_array_record_source_gives_the_json_samples(dataset, tmp_path, capsys):
  """The prepared dataset gives the JSON source's batches; an image that fails only when
  decoded ("trunc") is refused by the build instead of failing at load time, so the comparison
  runs on the entries without it."""
  from hiwin_jax import cli
  from hiwin_jax.data import array_record
  json_path, images, _, tok, template = dataset
  entries = json.loads(json_path.read_text())
  kept = tmp_path / "kept.json"
  kept.write_text(json.dumps([e for e in entries if not (isinstance(e, dict)
                                                         and e.get("id") == "trunc")]))
  outs = []
  for source, name in ((json_path, "all"), (kept, "ar")):
    rc = cli.main(["data", "build", "--json", str(source), "--images", str(images),
                   "--out", str(tmp_path / name)])
    assert rc == 0
    outs.append(capsys.readouterr().out.strip().splitlines()[-1])
  assert array_record.read_manifest(outs[0])["errors"]["unreadable_image"] == 2
  out = outs[1]
  assert pathlib.Path(out, "prepared.json").is_file()
  d, model = _cfgs(kept, images, template)
  d_ar, _ = _cfgs(kept, images, template, format="array_record", array_record_dir=out)
  it_json = loader.make_train_iterator(d, model, tok)
  it_ar = loader.make_train_iterator(d_ar, model, tok)
  assert it_ar.skipped == it_json.skipped and it_ar.keys == it_json.keys
  for a, b in zip(it_json, it_ar, strict=True):
    _assert_same(a, b)


@pytest.mark.slow
def test_resume_from_saved_state_and_from_a_start_step(dataset, tmp_path):
  json_path, images, _, tok, template = dataset
  d, model = _cfgs(json_path, images, template, epochs=2)
  it = loader.make_train_iterator(d, model, tok)
  _take(it, 5)
  state = it.get_state()
  rest = list(it)
  assert rest
  restored = loader.make_train_iterator(d, model, tok)
  restored.set_state(state)
  started = loader.make_train_iterator(d, model, tok, start_step=5)
  for a, b, c in zip(rest, restored, started, strict=True):
    _assert_same(a, b)
    _assert_same(a, c)
  # through grain's orbax checkpoint handler
  import grain
  import orbax.checkpoint as ocp
  it = loader.make_train_iterator(d, model, tok)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    fresh = loader.make_train_iterator(d, model, tok)
    mngr.restore(3, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointRestore(fresh)))
  assert fresh.step == 3
  _assert_same(next(fresh), next(it))


def test_two_processes_make_the_single_process_global_batch(dataset):
  json_path, images, _, tok, template = dataset
  d, model = _cfgs(json_path, images, template)
  one = loader.make_train_iterator(d, model, tok)
  p0 = loader.make_train_iterator(d, model, tok, process_index=0, process_count=2)
  p1 = loader.make_train_iterator(d, model, tok, process_index=1, process_count=2)
  per_item = one.plan.settings.tokens.tokens_per_item
  for g, a, b in zip(one, p0, p1, strict=True):
    assert a["meta"]["ids"] + b["meta"]["ids"] != [] and g["meta"]["key"] == a["meta"]["key"]
    for k in ("input_ids", "image_token", "labels", "attention_mask"):
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]], axis=1), g[k], err_msg=k)
    cat = [{name: np.concatenate([x[name], y[name]], axis=1) for name in ("pixels", "grid")}
           for x, y in zip(a["buckets"], b["buckets"], strict=True)]
    for x, y in zip(cat, g["buckets"], strict=True):
      np.testing.assert_array_equal(x["pixels"], y["pixels"])
    # gather: the global image_token of each process picks the same pixels per position as the
    # single-process batch does
    per = a["input_ids"].shape[1]
    for m in range(g["input_ids"].shape[0]):
      glob = [x["pixels"][m][s] for x in g["buckets"] for s in range(x["pixels"].shape[1])]
      gathered = [x["pixels"][m][s] for x in cat for s in range(x["pixels"].shape[1])]
      for p, proc in enumerate((a, b)):
        for r in range(per):
          mine, ref = proc["image_token"][m, r], g["image_token"][m, p * per + r]
          np.testing.assert_array_equal(mine >= 0, ref >= 0)
          for item in np.unique(mine[mine >= 0] // per_item):
            ref_items = np.unique(ref[mine // per_item == item] // per_item)
            assert len(ref_items) == 1
            np.testing.assert_array_equal(gathered[item], glob[ref_items[0]])
    # the local numbering of process 1 starts after process 0's slots of each bucket
    if (b["image_token"] >= 0).any():
      n0 = b["buckets"][0]["grid"].shape[1]
      assert (b["image_token"][b["image_token"] >= 0] // per_item).min() >= n0


def test_worker_processes_give_the_in_process_batches(dataset):
  json_path, images, _, tok, template = dataset
  d0, model = _cfgs(json_path, images, template)
  d2, _ = _cfgs(json_path, images, template, workers=2)
  it0 = loader.make_train_iterator(d0, model, tok)
  it2 = loader.make_train_iterator(d2, model, tok)
  for a, b in zip(it0, it2, strict=True):
    _assert_same(a, b)


def test_plan_is_a_pure_function_of_seed_and_step(dataset):
  json_path, images, _, tok, template = dataset
  d, model = _cfgs(json_path, images, template, epochs=3)
  plan, _ = loader.make_plan(d, model, tok)
  again, _ = loader.make_plan(d, model, tok)
  other, _ = loader.make_plan(_cfgs(json_path, images, template, epochs=3, seed=4)[0], model,
                                tok)
  for e in range(3):
    np.testing.assert_array_equal(plan.epoch(e).members, again.epoch(e).members)
  assert not np.array_equal(plan.epoch(0).members, plan.epoch(1).members)
  assert not np.array_equal(plan.epoch(0).members, other.epoch(0).members)
  # one key per batch, members share it
  for e in range(3):
    ep = plan.epoch(e)
    codes = np.stack([plan.meta.arrays[k] for k in ("ov", "sl", "n")], 1)
    for key, members in zip(ep.keys, ep.members):
      assert (plan.settings.seq_bucket(ep.length[members]) == key[3]).all()
      augmented = ep.draw[members] < 1
      assert (codes[members[~augmented]] == key[:3]).all()


def test_overview_only_when_slicing_is_off(dataset):
  json_path, images, _, tok, template = dataset
  d, model = _cfgs(json_path, images, template, slicing=False)
  it = loader.make_train_iterator(d, model, tok)
  assert all(k.slices is None and k.num_slices == 0 for k in it.keys)
  for batch in _take(it, 3):
    ov = batch["meta"]["key"][0]
    if ov is None:  # text-only
      assert batch["buckets"] == ()
      continue
    (bucket,) = batch["buckets"]
    assert bucket["pixels"].shape[:2] == (2, 2)
    h, w = bucket["grid"][0, 0]
    assert h * w <= 576 and (h, w) != (0, 0)


def _items_of(batch):
  """The micro-batches' items as sorted (grid, pixel bytes) pairs, empty slots left out."""
  out = []
  for b in batch["buckets"]:
    for px, (h, w) in zip(b["pixels"].reshape(-1, *b["pixels"].shape[2:]),
                          b["grid"].reshape(-1, 2)):
      out.append(((int(h), int(w)), px[:14 * h, :14 * w].tobytes()))
  return sorted(out)


@pytest.mark.parametrize("variant", ["r1", "r2"])
def test_textvqa_training_pre_resize_follows_the_projector_layout(tok_and_template, tmp_path,
                                                                    variant):
  """Spec §0.1 and §1.4: a TextVQA image is resized to a longer side of 1024 with the model's
  code state's `resize_image_keep_ratio`: R1 (7B) only upscales, R2 (13B, Qwen2) also shrinks."""
  from hiwin_jax.data import image, layout, slicing
  tok, template = tok_and_template
  folder = tmp_path / "images" / "TextVQA"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(1)
  records = []
  for i, (w, h) in enumerate([(1500, 1100), (600, 400)]):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    records.append({"id": f"t{i}", "image": f"TextVQA/{i}.png", "conversations": _conv("a sign")})
  (tmp_path / "data.json").write_text(json.dumps(records))
  d, model = _cfgs(tmp_path / "data.json", tmp_path / "images", template, global_batch_size=1,
                   grad_accum=1, shuffle=False)
  model.projector.layout = variant
  it = loader.make_train_iterator(d, model, tok)
  tokens = layout.TokenLayout.from_config(model.projector)
  want_sizes = {"t0": (1500, 1100) if variant == "r1" else (1024, 750), "t1": (1024, 682)}
  batches = list(it)
  assert sorted(i for b in batches for i in b["meta"]["ids"]) == ["t0", "t1"]
  for batch in batches:
    (rid,) = batch["meta"]["ids"]
    assert not batch["meta"]["filler"][0] and not batch["meta"]["skipped"]["size_mismatch"]
    img = image.load_image(folder / f"{rid[1:]}.png")
    resized = img.resize(want_sizes[rid], Image.Resampling.BICUBIC)
    if resized.size == img.size:
      resized = img
    res = slicing.slice_image(resized, 7)
    items = res.slices + [res.overview]
    want = sorted(((x.size[1] // 14, x.size[0] // 14), image.clip_normalize(x).tobytes())
                  for x in items)
    assert _items_of(batch) == want, rid
    assert (batch["image_token"] >= 0).sum() == tokens.tokens_per_item * len(items)
