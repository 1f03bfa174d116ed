"""The training data pipeline at the scale of the real recipe (issue 16).

  python -m benchmarks.data --records 1000000 --root /tmp/hiwin-data-bench
  python -m benchmarks.data --records 100000 --only steady --formats prepared   # one part

A synthetic LLaVA-style dataset (`make_dataset`): `--records` JSON entries whose conversations
follow the mix of the LLaVA-UHD v2 SFT data (table `MIX`), over `--images` small images in real
formats (JPEG, PNG incl. palette, grayscale and RGBA; some with an EXIF rotation; photo, chart
and document sizes), reused by path, plus 0.3% bad entries. Measured, for the JSON input and for
the prepared dataset (`hiwin data build`), each case in a fresh process:
  build     `hiwin data build` wall time
  meta      the metadata pass (no cache) at 1 and at 2 processes
  start     a training iterator from warm caches: seconds to its first batch
  steady    samples/s of one process with 0, 1 and 2 grain workers, and peak RSS (VmHWM) of the
            training process and of each worker
The vicuna tokenizer of tests/fixtures and the stage-2 data settings (vicuna_v1, slicing, 4096).
The dataset and the warm caches stay in `--root/n<records>` for later runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import random
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

# Conversation mix (weight, image kind or None, rounds (lo, hi), question words, answer words):
# an approximation of the LLaVA-UHD v2 SFT mix (LLaVA-665K: LLaVA-Instruct, ShareGPT, VQAv2, GQA,
# OKVQA, A-OKVQA, OCR-VQA, TextCaps, RefCOCO, VG; plus DocVQA, ChartQA, DVQA, AI2D, TextVQA): most
# samples are short-answer VQA with several rounds, a fifth are long-form instructions, a few
# percent text-only chat; spliced lengths run from ~700 to ~4000 tokens.
MIX = (
    (0.40, "photo", (1, 12), (4, 12), (1, 3)),       # VQAv2 / GQA / OKVQA / VG style
    (0.18, "photo", (1, 5), (8, 25), (40, 200)),     # LLaVA-Instruct conversations / reasoning
    (0.22, "doc", (1, 6), (6, 20), (1, 8)),          # OCR-VQA, DocVQA, ChartQA, DVQA, AI2D
    (0.14, "photo", (1, 4), (5, 15), (5, 20)),       # TextCaps, RefCOCO
    (0.06, None, (1, 8), (10, 80), (80, 400)),       # ShareGPT (text only)
)
WORDS = ("the a of and to in is that it for on with as was at by this be from or are an which "
         "image picture photo shows man woman person people dog cat car street building table "
         "sign text number chart value year total left right top bottom red blue green yellow "
         "white black small large two three many what where when how why color name read "
         "written page document figure axis label increase decrease percent price date title "
         "answer question describe detail scene background front behind next standing sitting "
         "holding wearing looking playing water tree sky grass road window door room food").split()
# (kind, (width, height), weight)
SIZES = {
    "photo": (((640, 480), 5), ((500, 375), 2), ((480, 640), 2), ((800, 600), 1),
              ((1024, 768), 1), ((224, 224), 1)),
    "doc": (((850, 1100), 3), ((800, 600), 3), ((1240, 1754), 1), ((1000, 700), 2)),
}
BAD_FRACTION = 0.003


def _pick(rng: random.Random, table):
  total = sum(w for *_, w in table)
  x = rng.random() * total
  for *item, w in table:
    x -= w
    if x <= 0:
      return item[0] if len(item) == 1 else tuple(item)
  return table[-1][0]


def _image(rng: np.random.Generator, kind: str, size: tuple[int, int], k: int) -> tuple[str, bytes]:
  """A small real-format image: smooth content (few bytes) at a real document/photo size."""
  w, h = size
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  base = rng.integers(0, 256, 3)
  arr = np.stack([(base[c] + 60 * np.sin(xx / (23 + 7 * c)) + 60 * np.cos(yy / (31 + 5 * c)))
                  for c in range(3)], -1)
  arr = np.clip(arr, 0, 255).astype(np.uint8)
  for _ in range(4):
    x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
    arr[y0:y0 + int(rng.integers(4, h // 3)), x0:x0 + int(rng.integers(4, w // 3))] = \
        rng.integers(0, 256, 3)
  img = Image.fromarray(arr)
  buf = io.BytesIO()
  fmt = k % 20
  if fmt < 13:
    exif = None
    if fmt == 0:  # a phone photo stored sideways
      exif = Image.Exif()
      exif[0x0112] = 6
    img.save(buf, "JPEG", quality=85, **({"exif": exif} if exif else {}))
    return "jpg", buf.getvalue()
  if fmt < 16:
    img.save(buf, "PNG")
  elif fmt < 18:
    img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buf, "PNG")
  elif fmt < 19:
    img.convert("L").save(buf, "PNG")
  else:
    img.convert("RGBA").save(buf, "PNG")
  return "png", buf.getvalue()


def make_images(folder: pathlib.Path, n_images: int, seed: int = 0) -> dict[str, list[str]]:
  """`n_images` images under `folder` (in subfolders like the real mix); paths by kind."""
  rng = np.random.default_rng(seed)
  pick = random.Random(seed)
  paths: dict[str, list[str]] = {"photo": [], "doc": []}
  for k in range(n_images):
    kind = "doc" if k % 3 == 2 else "photo"
    size = _pick(pick, SIZES[kind])
    sub = ("coco/train2017", "gqa/images", "vg/VG_100K", "textvqa/train_images")[k % 4] \
        if kind == "photo" else ("docvqa/train", "chartqa/train", "ocr_vqa/images")[k % 3]
    ext, data = _image(rng, kind, size, k)
    rel = f"{sub}/{k:08d}.{ext}"
    (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / rel).write_bytes(data)
    paths[kind].append(rel)
  return paths


def _words(rng: random.Random, lo: int, hi: int) -> str:
  return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def make_record(rng: random.Random, i: int, paths: dict[str, list[str]]) -> dict:
  weights = [m[0] for m in MIX]
  _, kind, rounds, qw, aw = MIX[rng.choices(range(len(MIX)), weights)[0]]
  conv = []
  for r in range(rng.randint(*rounds)):
    q = _words(rng, *qw).capitalize() + "?"
    if r == 0 and kind is not None:
      q = "<image>\n" + q
    conv += [{"from": "human", "value": q}, {"from": "gpt", "value": _words(rng, *aw) + "."}]
  record = {"id": f"{i:08d}", "conversations": conv}
  if kind is not None:
    record["image"] = rng.choice(paths[kind])
  if rng.random() < BAD_FRACTION:  # a missing image, a broken conversation, a bad record
    record = [dict(record, image="missing/nope.jpg"),
              dict(record, conversations=[{"from": "robot", "value": "hi"}]),
              {"id": record["id"]}][i % 3]
  return record


def make_dataset(root: pathlib.Path, n_records: int, n_images: int = 3000,
                 seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes `root/images/...` and `root/data.json` (streamed, never all records in memory);
  returns (json path, image folder). Deterministic in (n_records, n_images, seed)."""
  images = root / "images"
  images.mkdir(parents=True, exist_ok=True)
  paths = make_images(images, n_images, seed)
  rng = random.Random(seed + 1)
  json_path = root / "data.json"
  with open(json_path, "w", encoding="utf-8") as f:
    f.write("[\n")
    for i in range(n_records):
      f.write(("" if i == 0 else ",\n") + json.dumps(make_record(rng, i, paths)))
    f.write("\n]\n")
  return json_path, images


# --- measuring ----------------------------------------------------------------------------------

VICUNA = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vicuna-tokenizer"


def _status_mb(pid: int | str, field: str) -> float:
  try:
    with open(f"/proc/{pid}/status") as f:
      return next(int(l.split()[1]) for l in f if l.startswith(field)) / 1024
  except (OSError, StopIteration):
    return 0.0


def _children(pid: int) -> list[int]:
  out = []
  for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
    try:
      kids = [int(k) for k in (task / "children").read_text().split()]
    except OSError:
      continue
    for k in kids:
      out += [k] + _children(k)
  return out


def _rss() -> dict:
  """Peak RSS (MB) of this process, of its largest live descendant and of all live ones, plus
  the largest peak among descendants already ended."""
  kids = [_status_mb(k, "VmHWM:") for k in _children(os.getpid())]
  ended = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  return {"rss_mb": round(_status_mb("self", "VmHWM:")), "worker_mb": round(max(kids + [ended])),
          "host_mb": round(_status_mb("self", "VmHWM:") + sum(kids))}


def _cfgs(ds: pathlib.Path, fmt: str, *, workers: int = 0, batch: int = 8):
  import ml_collections

  from hiwin_jax import config as C
  d = C.data_config()
  d.update(json=str(ds / "data.json"), image_folder=str(ds / "images"), template="vicuna_v1",
           slicing=True, max_slice_nums=7, max_length=4096, global_batch_size=batch,
           grad_accum=1, workers=workers, prefetch=2, cache_dir=str(ds / f"cache-{fmt}"))
  if fmt == "prepared":
    d.update(format="array_record", array_record_dir=str(ds / "prepared"))
  return d, ml_collections.ConfigDict({"projector": C.projector_config()})


def _tokenizer():
  from hiwin_jax.data.tokenizer import LlamaSpmTokenizer
  return LlamaSpmTokenizer(VICUNA)


def run_case(ds: pathlib.Path, case: dict) -> dict:
  """One measurement, in this (fresh) process."""
  from hiwin_jax.data import array_record, loader, metadata, plan, sources
  kind, fmt = case["kind"], case.get("format", "json")
  if kind == "build":
    t = time.perf_counter()
    array_record.build(ds / "data.json", ds / "images", ds / "prepared", workers=case["procs"],
                       overwrite=True)
    return {"seconds": time.perf_counter() - t, **_rss()}
  if kind == "index":
    t = time.perf_counter()
    n = len(sources.scan_json_list(ds / "data.json"))
    return {"seconds": time.perf_counter() - t, "records": n, **_rss()}
  tok = _tokenizer()
  d, model = _cfgs(ds, fmt, workers=case.get("workers", 0))
  if kind == "meta":
    source = loader.make_source(d, str(ds / "index"))
    len(source)  # the json index (timed by "index"), kept in ds/index
    settings = plan.Settings.from_configs(d, model)
    with tempfile.TemporaryDirectory(dir=ds) as tmp:
      t = time.perf_counter()
      metadata.scan(source, tok, settings, tmp, workers=case["procs"])
      return {"seconds": time.perf_counter() - t, **_rss()}
  t = time.perf_counter()
  it = loader.make_train_iterator(d, model, tok)
  next(it)
  first = time.perf_counter() - t
  if kind == "start":
    return {"seconds": first, **_rss()}
  steps = case["steps"]
  t = time.perf_counter()
  for _ in range(steps):
    next(it)
  seconds = time.perf_counter() - t
  rss = _rss()
  it.close()
  return {"seconds": seconds, "samples_per_s": steps * d.global_batch_size / seconds, **rss}


def _child(ds: pathlib.Path, case: dict) -> dict:
  out = subprocess.run([sys.executable, "-m", "benchmarks.data", "--root", str(ds.parent),
                        "--records", ds.name[1:], "--case", json.dumps(case)],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if out.returncode:
    return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:160]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--records", type=int, default=100_000)
  p.add_argument("--images", type=int, default=3000)
  p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "hiwin-data-bench"))
  p.add_argument("--only", nargs="*", default=["build", "meta", "start", "steady"],
                 choices=["build", "meta", "start", "steady"])
  p.add_argument("--formats", nargs="*", default=["json", "prepared"],
                 choices=["json", "prepared"])
  p.add_argument("--procs", type=int, nargs="*", default=[1, 2],
                 help="metadata pass processes to measure")
  p.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2],
                 help="grain workers to measure")
  p.add_argument("--steps", type=int, default=8, help="steps of 8 samples timed per case")
  p.add_argument("--case", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  ds = pathlib.Path(args.root, f"n{args.records}")
  if args.case:
    print(json.dumps(run_case(ds, json.loads(args.case))))
    return
  stamp = ds / "made.json"
  if not stamp.is_file() or json.loads(stamp.read_text()) != [args.records, args.images]:
    ds.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    make_dataset(ds, args.records, args.images)
    stamp.write_text(json.dumps([args.records, args.images]))
    print(f"dataset: {args.records:,} records, {args.images:,} images, "
          f"{(ds / 'data.json').stat().st_size / 2**20:.0f} MiB of json, written in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
  cases = []
  if "build" in args.only or not (ds / "prepared" / "prepared.json").is_file():
    cases.append({"kind": "build", "procs": 0})
  if "meta" in args.only:
    cases += [{"kind": "index"}]
    cases += [{"kind": "meta", "format": f, "procs": n} for f in args.formats for n in args.procs]
  if "start" in args.only:  # the first run fills the caches, the second starts from them
    cases += [{"kind": "start", "format": f, "cold": c} for f in args.formats for c in (1, 0)]
  if "steady" in args.only:
    cases += [{"kind": "steady", "format": f, "workers": w, "steps": args.steps}
              for f in args.formats for w in args.workers]
  cores = len(os.sched_getaffinity(0))
  print(f"{args.records:,} records; {cores} cores; load average {os.getloadavg()[0]:.1f}",
        flush=True)
  for case in cases:
    r = _child(ds, case)
    print(json.dumps({**case, **{k: round(v, 2) if isinstance(v, float) else v
                                 for k, v in r.items()}}), flush=True)


if __name__ == "__main__":
  main()
