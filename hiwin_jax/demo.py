"""`hiwin demo`: the offline main job. A tiny LLaVA-UHD v2 reads a detail that only its
high-resolution slices show, beside a low-resolution (overview only) baseline that cannot.

The task (`data/synthetic.py`): 224x224 images, each with one coloured area (a third to a half of
the image) filled with a 1-pixel pattern: horizontal lines, vertical lines or checks. Two
questions per image: the area's colour (4 answers) and its pattern (3 answers). The tiny model's
ViT takes 112 px, so the slicer cuts every image into 4 slices at full resolution plus a 112 px
overview at half scale. The slices show the pattern pixel for pixel; in the overview its period
is one pixel, below the sampling limit, and the resize averages every pattern to the same flat
tint. The colour survives in the tint: it is the control question the baseline can answer.

The run, every part of it the library's real code path (`train/loop.py` driving the stage
tasks, the training data loader, checkpoints, the evaluation code of `hiwin eval`):
  0. stage 0: the JBU (VDIM) pre-trained on scikit-image's photos, on the features of the
     model's own (initial) ViT, exported to and re-imported from the HF CLIP layout;
  W. a text warm-up of the LLM (only) on the questions with a caption in place of the image: it
     stands in for the pretrained Vicuna that LLaVA starts from (a from-scratch 2-layer LLM
     must first learn the answer format and to take answers from its context);
  1. stage 1: projector pre-training on captions (`plain`, overview only as in the official
     stage 1, projector trainable), shared by both models below;
  2. stage 2 twice from stage 1, with the same data, steps, seed and settings:
       full model  slicing on: 4 slices + the overview, 80 image tokens per question;
       baseline    slicing off: the overview only, 16 image tokens (LLaVA-1.5-style input);
  then held-out accuracy per question kind of the untrained model, the baseline and the full
  model (greedy decoding with the KV cache), the official PyTorch export of the full model
  reloaded and compared tensor by tensor, and figures: loss curves with the learning rate, an
  accuracy bar chart, a grid of held-out examples.

Where the tiny recipe differs from the 7B one, and why (measured: BUILD_NOTES.md, demo):
  - projector.grid_size 4 (16 tokens per slice or overview instead of 144): a 2-layer LLM
    trained from scratch must find the answer among the image tokens within a few hundred
    steps; fewer, larger-window tokens also make every step cheaper;
  - stage 2 trains the from-scratch LLM at 2e-3 but the projector (with the JBU) and the ViT at
    the official 2e-5 (`optimizer.projector_lr`, `vision_lr`: LLaVA's mm_projector_lr): with
    one rate of 2e-3, the projector turns every image token into the same vector within 25
    steps and the model never reads the image;
  - evaluation slices as training does (max_slice_nums 7, no pre-resize): the official
    evaluation pre-resize to 1024 px, meant for CLIP-L's 336 px slices, would cut the 224 px
    images into slices the model never saw. `hiwin eval --no-pre-resize --max-slice-nums 7`
    (baseline: 1) reproduces the demo's numbers; the demo prints the commands.

Outputs (all in --out): task/, tokenizer/, init/ and init_clip_hf/ (the untrained model),
stage0/, warmup/, stage1/, stage2/ (full model) and stage2_baseline/ (each with checkpoints/,
final/, tensorboard/, metrics.jsonl and loss.png; stage2/official/ is the PyTorch export),
answers_{untrained,baseline,full}.jsonl, figures/ and demo_summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shlex
import shutil
import time

import jax
import numpy as np
from flax import nnx

from hiwin_jax import config, outputs, weights
from hiwin_jax.data import slicing, synthetic

VIEW = 112       # the tiny model's ViT input side: 8x8 patches of 14 px
GRID_SIZE = 4    # Hiwin tokens per item = GRID_SIZE ** 2
MODEL_OVERRIDES = (f"--config.model.vision.image_size={VIEW}",
                   f"--config.model.projector.grid_size={GRID_SIZE}")
BATCH, WARMUP_BATCH = 8, 32
WARMUP_LR, STAGE1_LR = 3e-3, 1e-4
# Stage 2: the LLM (from scratch) at 100x the official rate, the projector and ViT at it.
STAGE2_LR, STAGE2_VISION_LR = 2e-3, 2e-5
FULL_SLICES, BASELINE_SLICES = slicing.TRAIN_MAX_SLICE_NUMS, 1  # max_slice_nums at evaluation
MODELS = ("untrained", "baseline", "full")
# What a demo run writes into its --out folder (the only entries --overwrite may replace).
DEMO_RUN = outputs.OutputKind("an earlier hiwin demo run",
                              ("task", "tokenizer", "init", "init_clip_hf", "stage*", "warmup",
                               "answers_*.jsonl", "figures", "demo_summary.json"))


@dataclasses.dataclass(frozen=True)
class DemoSize:
  """How much the demo trains and evaluates. `DEMO` is `hiwin demo`; tests use a tiny one."""
  n_train: int = 480
  n_eval: int = 48
  stage0_steps: int = 8
  warmup_steps: int = 200
  stage1_steps: int = 40
  stage2_steps: int = 300


DEMO = DemoSize()


def _stage_cfg(name: str, data_json: pathlib.Path, task, out: pathlib.Path, overrides, *,
               steps: int, seed: int, n_train: int, batch: int = BATCH,
               **extra) -> config.ConfigDict:
  cfg = config.load_config(name, [f"--config.data.json={data_json}",
                                  f"--config.data.image_folder={task.image_folder}",
                                  f"--config.data.tokenizer={out / 'tokenizer'}",
                                  f"--config.data.global_batch_size={batch}",
                                  f"--config.data.epochs={1 + steps * batch // n_train}",
                                  f"--config.data.seed={seed}", f"--config.seed={seed}",
                                  f"--config.train.num_steps={steps}",
                                  "--config.mesh.data=-1", *MODEL_OVERRIDES, *overrides])
  for key, value in extra.items():
    config.apply_overrides(cfg, [f"--config.{key}={value}"])
  return cfg


def _initial_model(cfg, out: pathlib.Path, seed: int) -> tuple[pathlib.Path, pathlib.Path]:
  """Random tiny model -> `init/` (hiwin checkpoint) and its ViT in the HF CLIP layout."""
  from hiwin_jax.convert import formats
  from hiwin_jax.models.layers import Precision
  from hiwin_jax.models.llava_uhd import LlavaUHD
  model = LlavaUHD(cfg.model, Precision.from_config(cfg.model.precision), rngs=nnx.Rngs(seed))
  init = weights.write_params(out / "init", weights.model_params(model),
                              {"format": "llava-uhd", "model": cfg.model.to_dict()},
                              overwrite=True)
  clip = out / "init_clip_hf"
  formats.export_model("hf-clip", model.vision, cfg.model.vision, clip, overwrite=True)
  return init, clip


def _stage0(cfg_model, clip: pathlib.Path, out: pathlib.Path, steps: int, seed: int) -> dict:
  """Stage 0 on the model's own ViT (read back from the HF CLIP layout) at 112 px."""
  from hiwin_jax.train import loop
  from hiwin_jax.train.vdim import VdimTrainer
  cfg = config.load_config("vdim_stage0_tiny", [
      f"--config.init.vision={clip}", f"--config.train.num_steps={steps}",
      f"--config.seed={seed}", f"--config.data.image_size={VIEW}",
      "--config.data.global_batch_size=2", "--config.train.vdim_loss.max_pad=10",
      f"--config.checkpoint.every={steps}", "--config.checkpoint.keep=1"])
  cfg.model = config.ConfigDict(cfg_model.to_dict())
  return loop.run(VdimTrainer(cfg), out / "stage0")


def accuracy(score: dict) -> dict:
  """`evaluate.score` output -> {"accuracy", "chance", "n", "per_category": {kind:
  {"accuracy", "chance", "n"}}} (the shape of demo_summary.json and `plots.accuracy_bars`)."""
  def one(s):
    return {"accuracy": s["score"], "chance": s["chance"], "n": s["scored"]}
  return {**one(score), "per_category": {k: one(v) for k, v in score["per_category"].items()}}


def eval_command(checkpoint: pathlib.Path, task, out: pathlib.Path, name: str,
                 max_slice_nums: int) -> str:
  """The `hiwin eval` command line that asks and scores the questions as the demo does."""
  return shlex.join([
      "hiwin", "eval", "--checkpoint", str(checkpoint), "--tokenizer", str(out / "tokenizer"),
      "--questions", str(task.eval_jsonl), "--image-folder", str(task.image_folder),
      "--answers", str(out / f"answers_{name}_again.jsonl"), "--metric", "normalized",
      "--max-new-tokens", "4", "--batch-size", "16", "--no-pre-resize",
      "--max-slice-nums", str(max_slice_nums)])


def _evaluate(checkpoint: pathlib.Path, task, out: pathlib.Path, name: str,
              max_slice_nums: int) -> dict:
  """Greedy answers to the held-out questions (the `hiwin eval` code path) and their accuracy."""
  from hiwin_jax.data.tokenizer import LlamaSpmTokenizer
  from hiwin_jax.infer import evaluate
  from hiwin_jax.infer.generate import GenerationConfig
  model, cfg_model = weights.load_model(checkpoint)
  tok = LlamaSpmTokenizer(out / "tokenizer")
  answers = out / f"answers_{name}.jsonl"
  answers.unlink(missing_ok=True)
  evaluate.answer_questions(model, tok, cfg_model, task.eval_jsonl, task.image_folder, answers,
                            gen=GenerationConfig(max_new_tokens=4,
                                                 eos_token_id=int(cfg_model.llm.eos_token_id)),
                            settings=evaluate.EvalSettings(batch_size=16, model_id=name,
                                                           pre_resize=False,
                                                           max_slice_nums=max_slice_nums),
                            progress=False)
  score = evaluate.score(task.eval_jsonl, answers, "normalized", chance=task.chance)
  return {"accuracy": accuracy(score),
          "answers": {a["question_id"]: a["text"] for a in evaluate.read_jsonl(answers)}}


def _check_official_export(final: pathlib.Path, official: pathlib.Path, cfg_model) -> int:
  """The exported official PyTorch checkpoint, converted back, equals the trained params."""
  from hiwin_jax.convert import llava_uhd
  ours, _ = weights.read_params(final)
  _, back = llava_uhd.import_official(official, None, cfg_model)
  missing = sorted(set(ours) - set(back))
  if missing:
    raise AssertionError(f"official export lost {len(missing)} tensors, e.g. {missing[:3]}")
  bad = [k for k in ours if not np.array_equal(np.asarray(ours[k]), np.asarray(back[k]))]
  if bad:
    raise AssertionError(f"official export round trip changed {len(bad)} tensors, e.g. {bad[:3]}")
  return len(ours)


def _table(results: dict[str, dict], kinds: list[str]) -> str:
  """Accuracy per question kind (rows) of each model and chance (columns)."""
  head = f"{'question':<10}" + "".join(f"{m:>11}" for m in MODELS) + f"{'chance':>9}"
  lines = [head]
  for kind in kinds + ["overall"]:
    row = f"{kind:<10}"
    for model in MODELS:
      acc = results[model]
      value = acc["accuracy"] if kind == "overall" else acc["per_category"][kind]["accuracy"]
      row += f"{value:>11.1%}"
    ref = results["full"]
    chance = ref["chance"] if kind == "overall" else ref["per_category"][kind]["chance"]
    lines.append(row + f"{chance:>9.1%}")
  return "\n".join(lines)


def _metrics_rows(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
          if line.strip()]


def _figures(out: pathlib.Path, task, results: dict, answers: dict,
             stages: list[tuple[str, pathlib.Path]]) -> list[pathlib.Path]:
  """figures/loss_curves.png, accuracy.png and examples.png."""
  from PIL import Image

  from hiwin_jax import plots
  from hiwin_jax.infer import scorers
  folder = out / "figures"
  curves = []
  for label, run_dir in stages:
    rows = _metrics_rows(run_dir)
    curves.append({"name": label, "steps": [r["step"] for r in rows],
                   "losses": [r["loss"] for r in rows], "lr": [r["lr"] for r in rows]})
  paths = [plots.stage_loss_curves(folder / "loss_curves.png", curves,
                                   "training loss per stage (dashed: learning rate)")]
  n = results["full"]["n"]
  paths.append(plots.accuracy_bars(
      folder / "accuracy.png", {m: results[m] for m in MODELS},
      f"held-out accuracy ({n} questions about {task.n_eval} unseen images)"))

  areas = task.areas()
  by_kind: dict[str, list[dict]] = {}
  for record in task.eval_records():
    by_kind.setdefault(record["category"], []).append(record)
  # the first question of each pattern (the detail), then colour questions about other images
  chosen, seen = [], set()
  for record in by_kind["pattern"]:
    if record["answer"] not in seen:
      seen.add(record["answer"])
      chosen.append(record)
  shown = {r["image"] for r in chosen}
  chosen += [r for r in by_kind["colour"] if r["image"] not in shown][:2]
  examples = []
  for record in chosen:
    path = task.image_folder / record["image"]
    area = areas[record["image"]]
    with Image.open(path) as img:
      image = img.convert("RGB")
    views = _detail_views(image, area["box"])
    model_answers = {m: answers[m][record["question_id"]] for m in ("baseline", "full")}
    right = {m: scorers.normalized_match(a, [record["answer"]]) == 1.0
             for m, a in model_answers.items()}
    examples.append({"image": path, "box": area["box"], "views": views,
                     "question": record["text"], "truth": record["answer"],
                     "answers": model_answers, "right": right})
  paths.append(plots.examples_grid(
      folder / "examples.png", examples, columns=len(examples),
      title="held-out examples: what the slices and the overview show of the area's centre"))
  return paths


def _detail_views(image, box) -> dict[str, np.ndarray]:
  """A 16x16 px window at the centre of the area as the full model's slice shows it (image
  pixels) and as the overview shows it (the same window in overview pixels), cut from the
  slicer's own output."""
  result = slicing.slice_image(image, FULL_SLICES, VIEW)
  left, top, right, bottom = box
  cx, cy, half = (left + right) // 2, (top + bottom) // 2, 8
  (sw, sh), (cols, _) = result.plan.slice_size, result.grid
  col, row = cx // sw, cy // sh
  tile = np.asarray(result.slices[row * cols + col])
  x0, y0 = cx - col * sw - half, cy - row * sh - half
  x0, y0 = min(max(x0, 0), sw - 2 * half), min(max(y0, 0), sh - 2 * half)
  scale = result.overview.width / image.width
  ov = np.asarray(result.overview)
  ox, oy, oh = round((x0 + col * sw) * scale), round((y0 + row * sh) * scale), round(half * scale)
  return {"in its slice": tile[y0:y0 + 2 * half, x0:x0 + 2 * half],
          "in the overview": ov[oy:oy + 2 * oh, ox:ox + 2 * oh]}


def run(config_name: str, overrides, out: str | pathlib.Path, *, seed: int = 0,
        size: DemoSize = DEMO, overwrite: bool = False) -> int:
  """`config_name`: the model config the stage configs start from (only `tiny` is CPU-sized).
  `seed` draws the task's images, the initial weights and the data order. A non-empty `out` is
  refused unless `overwrite` and it holds only an earlier demo's outputs (then it is replaced)."""
  t0, cpu0 = time.perf_counter(), time.process_time()
  # Every stage resumes from the checkpoints in its folder, so an earlier run's folder would
  # be continued (with its own seed and settings), not redone: refuse it, or replace it whole.
  out = outputs.check_destination(out, DEMO_RUN, overwrite=overwrite, flag="--out")
  if out.is_dir():
    shutil.rmtree(out)
  out.mkdir(parents=True)
  if config_name != "tiny":
    raise SystemExit(f"hiwin demo trains the tiny model (configs/tiny_stage1.py, "
                     f"tiny_stage2.py) on 2 CPU cores; --config {config_name!r} is not CPU-sized")
  print(f"hiwin demo: {jax.device_count()} {jax.devices()[0].platform} device(s); outputs in {out}",
        flush=True)

  task = synthetic.write_task(out / "task", size.n_train, size.n_eval, seed=seed,
                              scale_resolution=VIEW)
  synthetic.make_tokenizer(out / "tokenizer", task.texts())
  geometry = synthetic.pattern_geometry(task.image_size, VIEW)
  print(f"task: {task.n_train} training / {task.n_eval} held-out images of "
        f"{task.image_size[0]}x{task.image_size[1]} px, slice grid {task.grid} at "
        f"{geometry.slice_scale:g}x + an overview at {geometry.overview_scale:g}x; questions: "
        f"the colour of the patterned area (4 answers), its 1-pixel pattern (3 answers: its "
        f"period is {geometry.slice_period:g} px in a slice, {geometry.overview_period:g} px "
        f"in the overview)", flush=True)

  def stage_cfg(name, data_json, steps, batch=BATCH, **extra):
    return _stage_cfg(name, data_json, task, out, overrides, steps=steps, seed=seed,
                      n_train=size.n_train, batch=batch, **extra)

  cfg1 = stage_cfg("tiny_stage1", task.pretrain_json, size.stage1_steps)
  init, clip = _initial_model(cfg1, out, seed)
  timings = {}

  t = time.perf_counter()
  print("\n== stage 0: VDIM (JBU) pre-training on the initial ViT's features ==", flush=True)
  s0 = _stage0(cfg1.model, clip, out, size.stage0_steps, seed)
  timings["stage0"] = time.perf_counter() - t

  t = time.perf_counter()
  print("\n== untrained model: held-out accuracy ==", flush=True)
  results, answers = {}, {}
  untrained = _evaluate(init, task, out, "untrained", FULL_SLICES)
  results["untrained"], answers["untrained"] = untrained["accuracy"], untrained["answers"]
  timings["eval_untrained"] = time.perf_counter() - t

  from hiwin_jax.train import loop
  from hiwin_jax.train.trainer import LlavaTask
  t = time.perf_counter()
  print("\n== text warm-up of the LLM (questions with a caption in place of the image) ==",
        flush=True)
  cfg_w = stage_cfg("tiny_stage2", task.warmup_json, size.warmup_steps, batch=WARMUP_BATCH,
                    **{"init.checkpoint": init, "train.optimizer.lr": WARMUP_LR})
  cfg_w.name = "tiny_text_warmup"
  cfg_w.train.update(trainable=["llm/.*"], frozen=[])
  sw = loop.run(LlavaTask(cfg_w), out / "warmup")
  timings["warmup"] = time.perf_counter() - t

  t = time.perf_counter()
  print("\n== stage 1: projector pre-training (captions, overview only) ==", flush=True)
  cfg1 = stage_cfg("tiny_stage1", task.pretrain_json, size.stage1_steps,
                   **{"init.checkpoint": sw["final"], "init.vdim": out / "stage0",
                      "train.optimizer.lr": STAGE1_LR})
  s1 = loop.run(LlavaTask(cfg1), out / "stage1")
  timings["stage1"] = time.perf_counter() - t

  stage2 = {}
  for model, slicing_on, folder in (("full", True, "stage2"), ("baseline", False,
                                                                "stage2_baseline")):
    t = time.perf_counter()
    what = ("slicing on: 4 slices + overview" if slicing_on
            else "slicing off: overview only, the low-resolution baseline")
    print(f"\n== stage 2, {model}: fine-tuning on the questions ({what}) ==", flush=True)
    cfg2 = stage_cfg("tiny_stage2", task.sft_json, size.stage2_steps,
                     **{"data.slicing": slicing_on, "train.optimizer.lr": STAGE2_LR,
                        "train.optimizer.projector_lr": STAGE2_VISION_LR,
                        "train.optimizer.vision_lr": STAGE2_VISION_LR,
                        "init.checkpoint": s1["final"], "init.vdim": out / "stage0",
                        "export.official": slicing_on, "export.dtype": "float32"})
    cfg2.name = f"tiny_stage2_{model}"
    stage2[model] = (loop.run(LlavaTask(cfg2), out / folder), cfg2, out / folder)
    timings[f"stage2_{model}"] = time.perf_counter() - t

  eval_lines = []
  for model, slices in (("baseline", BASELINE_SLICES), ("full", FULL_SLICES)):
    t = time.perf_counter()
    final = pathlib.Path(stage2[model][0]["final"])
    result = _evaluate(final, task, out, model, slices)
    results[model], answers[model] = result["accuracy"], result["answers"]
    eval_lines.append(eval_command(final, task, out, model, slices))
    timings[f"eval_{model}"] = time.perf_counter() - t
  kinds = list(task.answers)
  print("\n== held-out accuracy (greedy answers, exact match) ==", flush=True)
  print(_table(results, kinds))

  full_run, full_cfg, full_dir = stage2["full"]
  n = _check_official_export(pathlib.Path(full_run["final"]), full_dir / "official",
                             full_cfg.model)
  print(f"\nofficial PyTorch export: {full_dir / 'official'}; {n} tensors reloaded and equal "
        f"to the trained parameters", flush=True)

  t = time.perf_counter()
  figures = _figures(out, task, results, answers,
                     [("stage 0 (VDIM)", out / "stage0"), ("text warm-up", out / "warmup"),
                      ("stage 1", out / "stage1"), ("stage 2, full", full_dir),
                      ("stage 2, baseline", stage2["baseline"][2])])
  timings["figures"] = time.perf_counter() - t

  losses = {"stage0": s0, "warmup": sw, "stage1": s1, "stage2": full_run,
            "stage2_baseline": stage2["baseline"][0]}
  summary = {
      "accuracy_untrained": results["untrained"], "accuracy_baseline": results["baseline"],
      "accuracy_trained": results["full"],
      **{f"{name}_loss": [r["losses"][0], r["losses"][-1]] for name, r in losses.items()},
      "skipped_samples": {name: r["skipped"] for name, r in losses.items() if "skipped" in r},
      "seed": seed, "seconds": {**timings, "total": time.perf_counter() - t0},
      # all threads of the process: on a shared machine the wall time above is inflated
      "cpu_seconds": time.process_time() - cpu0,
  }
  detail = {k: results["full"]["per_category"][k]["accuracy"]
            - results["baseline"]["per_category"][k]["accuracy"]
            for k in synthetic.DETAIL_CATEGORIES}
  summary["detail_gain_over_baseline"] = detail
  summary["trained_beats_chance"] = (results["full"]["accuracy"]
                                     > results["full"]["chance"] + 0.1)
  outputs.write_text(out / "demo_summary.json", json.dumps(summary, indent=2, default=str))
  print("\nlosses (first -> last step): " + ", ".join(
      f"{name} {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}" for name, r in losses.items()))
  gains = ", ".join(f"{k} {v:+.0%}" for k, v in detail.items())
  print(f"the slices' gain over the low-resolution baseline on the detail question: {gains}")
  print("re-score with `hiwin eval` (the same settings):\n  " + "\n  ".join(eval_lines))
  print(f"figures: {', '.join(str(p) for p in figures)}")
  folders = sorted(p.name + "/" for p in out.iterdir() if p.is_dir())
  print(f"done in {summary['seconds']['total']:.0f} s ({summary['cpu_seconds']:.0f} CPU-s). "
        f"Outputs in {out}: {', '.join(folders)} answers_*.jsonl, demo_summary.json", flush=True)
  return 0
