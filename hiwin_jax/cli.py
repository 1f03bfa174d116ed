"""`hiwin`: one command with subcommands, and every subcommand's handler.
`hiwin <subcommand> --help` documents each.

Config-driven subcommands take `--config NAME_OR_PATH` and any number of
`--config.a.b=value` overrides (ml_collections style). The handlers parse and report; the work
is library code (`hiwin_jax.demo`, `train/`, `infer/`, `weights`, the converters).

Errors. A mistake the user can fix (a flag, an override, a missing or malformed file, a folder
that cannot be written) exits with status 2 and one line naming the flag, file, field or value
and what is expected; anything else is reported as an internal error in one line (status 1).
`--debug` (or `HIWIN_DEBUG=1`) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.util
import json
import logging
import os
import pathlib
import sys
from typing import Sequence

from hiwin_jax import config

# The configs in configs/ by kind (tests/test_cli.py checks these lists against the folder).
MODEL_CONFIGS = ("tiny", "vicuna7b", "vicuna13b", "qwen2_7b")
STAGE_CONFIGS = ("vdim_stage0", "stage1_pretrain", "stage2_sft", "vdim_stage0_tiny",
                 "tiny_stage1", "tiny_stage2")
STAGES = ("vdim", "pretrain", "sft")


class _Parser(argparse.ArgumentParser):
  """argparse with its error on one line (the usage is one `--help` away)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(ValueError):
  """A flag, or a combination of flags, the command cannot work with."""


def _int_at_least(lo: int):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = None
    if value is None or value < lo:
      raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
    return value
  return parse


def _number_in(lo: float, hi: float, *, lo_open: bool = False, what: str):
  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      value = float("nan")
    if not ((lo < value if lo_open else lo <= value) and value <= hi):
      raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value
  return parse


def _add_config_args(p: argparse.ArgumentParser, default: str, kind: str,
                     note: str = "") -> None:
  """`kind`: "model" or "stage", the configs that make sense for the subcommand; `note`: what
  else the help must say about them."""
  names = MODEL_CONFIGS if kind == "model" else STAGE_CONFIGS
  p.add_argument("--config", default=default,
                 help=f"a config name in configs/ or a path to a config file (default: "
                      f"{default}); {kind} configs: {', '.join(names)}{note}; override any "
                      f"field with --config.a.b=value")


def _module_doc(name: str) -> str:
  """A module's docstring without importing it (the parser stays light)."""
  source = pathlib.Path(importlib.util.find_spec(name).origin).read_text()
  return ast.get_docstring(ast.parse(source))


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  rest, overrides = [], []
  for a in argv:
    (overrides if a.startswith("--config.") else rest).append(a)
  return rest, overrides


def build_parser() -> argparse.ArgumentParser:
  from hiwin_jax.data import image
  parser = _Parser(
      prog="hiwin", description="LLaVA-UHD v2 in JAX: demo, training, weight conversion.",
      epilog="Config overrides: --config.model.llm.num_layers=2 (any subcommand with --config). "
             "Errors are one line; --debug (or HIWIN_DEBUG=1) shows the traceback.")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  parser.add_argument("--debug", action="store_true",
                      help="tracebacks for errors (also HIWIN_DEBUG=1)")
  # --debug after the subcommand too; SUPPRESS keeps the subcommand from resetting it to False.
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="tracebacks for errors (also HIWIN_DEBUG=1)")
  sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND",
                              parser_class=functools.partial(_Parser, parents=[common]))

  demo = sub.add_parser(
      "demo", help="offline end-to-end run: a tiny LLaVA-UHD v2 trained on CPU (no downloads)",
      description=_module_doc("hiwin_jax.demo"),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_config_args(demo, "tiny", "model",
                   note=" (only tiny is CPU-sized); its stages run the stage configs "
                        "vdim_stage0_tiny, tiny_stage1 and tiny_stage2 with the demo's settings; "
                        "overrides reach the model and the stage-1/2 configs")
  demo.add_argument("--out", default="runs/demo",
                    help="output folder, new or empty (default: runs/demo)")
  demo.add_argument("--overwrite", action="store_true",
                    help="replace an --out folder that holds an earlier demo run")

  train = sub.add_parser(
      "train", help="run a training stage (0: VDIM, 1: projector pre-training, 2: fine-tuning)",
      description="Runs the stage named by the config's `train.stage` (vdim, pretrain, sft); "
                  "resumes from the latest checkpoint in --out. Multi-process runs (SLURM, "
                  "mpirun, TPU pods, launch/local.sh) are detected from the environment. Stage "
                  "0: --config vdim_stage0_tiny (offline) or vdim_stage0; stages 1/2: "
                  "--config stage1_pretrain / stage2_sft with --config.data.* and "
                  "--config.init.* set (see the config files).")
  _add_config_args(train, "vdim_stage0_tiny", "stage")
  train.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")

  conv = sub.add_parser(
      "convert", help="PyTorch/HF checkpoints <-> hiwin parameter checkpoints",
      description="import: a checkpoint folder (config.json + safetensors, sharded or not) -> a "
                  "hiwin checkpoint folder (orbax params + hiwin_config.json). export: the reverse "
                  "(loadable by the official code / transformers' from_pretrained). Converts "
                  "tensor by tensor. For llava-uhd, --config supplies the ViT geometry, which the "
                  "official config.json does not record.")
  conv.add_argument("direction", choices=["import", "export"])
  conv.add_argument("--format", required=True,
                    choices=["llava-uhd", "llava-projector", "hf-llm", "hf-clip"],
                    help="llava-uhd: the official LLaVA-UHD v2 checkpoint folder (config.json + "
                         "safetensors; exported in bf16 unless --dtype); llava-projector: the "
                         "projector file stage 1 writes (import: mm_projector.bin or its "
                         ".safetensors twin, with --config for the geometry; export: a folder "
                         "with both, from a llava-uhd or llava-projector checkpoint, projector "
                         "parameters alone are enough); hf-llm: LlamaForCausalLM / "
                         "Qwen2ForCausalLM; hf-clip: CLIPVisionModel")
  _add_config_args(conv, "vicuna7b", "model")
  conv.add_argument("--input", required=True, help="source folder or file")
  conv.add_argument("--output", required=True,
                    help="destination folder: new or empty (written completely or not at all)")
  conv.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty --output whole (only if it holds nothing but an "
                         "earlier output of this kind: model files, or a hiwin checkpoint)")
  conv.add_argument("--dtype", default=None, choices=config.DTYPE_NAMES,
                    help="dtype of the written tensors (default: as stored)")

  data = sub.add_parser(
      "data", help="training data tools (build: LLaVA json + images -> prepared ArrayRecord)",
      description="build: writes a LLaVA-format json and its image folder once as the prepared "
                  "dataset (ArrayRecord records + each distinct image once, validated) for "
                  "data.format=array_record; set data.array_record_dir to the folder it prints. "
                  "Uses every core of the host.")
  data.add_argument("action", choices=["build"])
  data.add_argument("--json", required=True, help="LLaVA json: [{id, image, conversations}]")
  data.add_argument("--images", required=True, help="folder the json's image paths are in")
  data.add_argument("--out", required=True, help="output folder")
  data.add_argument("--overwrite", action="store_true",
                    help="replace --out if it holds an earlier prepared dataset")
  data.add_argument("--max-pixels", type=_int_at_least(1), default=image.MAX_IMAGE_PIXELS,
                    help="pixel budget: images whose header declares more are not stored "
                         f"(default: {image.MAX_IMAGE_PIXELS:,})")
  data.add_argument("--workers", type=_int_at_least(0), default=0,
                    help="processes (default 0: one per core)")

  gen = sub.add_parser(
      "generate", help="answer a question about one or more images",
      description="Loads a LLaVA-UHD v2 checkpoint and answers --prompt about each --image with the "
                  "official evaluation prompt (vicuna_v1, '<image>\\n' + question, eval "
                  "pre-resize and max_slice_nums 9 unless --no-pre-resize / --max-slice-nums say "
                  "otherwise); streams the answer to stdout.")
  _add_model_args(gen)
  _add_config_args(gen, "vicuna7b", "model")
  gen.add_argument("--image", action="append", default=None,
                   help="image file; repeat for several images, each answered (in one batch, "
                        "with the shape buckets) for the same prompt; omit for text only")
  gen.add_argument("--prompt", required=True, help="the question")
  ev = sub.add_parser(
      "eval", help="answer a LLaVA-style question file (resumable) and score it",
      description="Question jsonl (question_id, image, text, optional answer/answers) + image "
                  "folder -> answers jsonl (resumes by skipping answered ids; per-question "
                  "errors are recorded) -> the chosen metric.")
  _add_model_args(ev)
  _add_config_args(ev, "vicuna7b", "model")
  ev.add_argument("--questions", required=True, help="question file (jsonl)")
  ev.add_argument("--image-folder", default="", help="folder the questions' image paths are in")
  ev.add_argument("--answers", required=True, help="answers file (jsonl; appended, resumed)")
  ev.add_argument("--metric", default="none",
                  choices=["none", "vqa", "anls", "relaxed", "exact", "normalized", "choice",
                           "mme"],
                  help="score the answers with this metric (default: none)")
  ev.add_argument("--batch-size", type=_int_at_least(1), default=1,
                  help="questions per generate call")
  ev.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

  aot = sub.add_parser(
      "aot", help="compile a train step (or the JBU) for an abstract TPU slice; report memory",
      description="Compiles the config's stage 1/2 train step for a TPU topology on this machine "
                  "(libtpu, no TPU: abstract weights, nothing allocated) and prints per-chip "
                  "memory from the compiler, FLOPs and whether it fits the chip's HBM (exit 1 "
                  "if a compiled combination does not). The batch: --batch rows per batch "
                  "shard, each a sample with --slices slices + an overview on the 24x24 canvas, "
                  "--seq tokens. Lists (--batch 1,2,4 --attention xla,splash) compile every "
                  "combination, one after the other, and end with a markdown table. --jbu "
                  "instead compiles the JBU 4x stack at real size on one chip per adaptive-conv "
                  "impl (xla, pallas_tpu), forward and forward+backward, and prints memory and "
                  "XLA's cost analysis (FLOPs, bytes accessed, time estimate).")
  _add_config_args(aot, "stage2_sft", "stage")
  aot.add_argument("--topology", default="v5p-8",
                   help="v5p-8, v5p-64, v6e-64, v5litepod-16 or a libtpu name (v5p:2x4x4)")
  aot.add_argument("--batch", default="1",
                   help="rows per batch shard, or a comma-separated list (default: 1)")
  aot.add_argument("--seq", type=_int_at_least(1), default=4096,
                   help="sequence length (default: 4096)")
  aot.add_argument("--slices", type=_int_at_least(0), default=7,
                   help="slices per sample (default: 7)")
  aot.add_argument("--attention", default=None,
                   help="LLM attention(s), comma-separated: xla, splash (default: the config's)")
  aot.add_argument("--jbu", action="store_true",
                   help="compile the JBU stack (pallas_tpu vs xla) instead of the train step")
  return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
  """Options shared by `hiwin generate` and `hiwin eval`."""
  from hiwin_jax.data import slicing
  from hiwin_jax.data.conversation import TEMPLATES
  from hiwin_jax.infer import requests
  p.add_argument("--checkpoint", required=True,
                 help="hiwin checkpoint folder (params/ + hiwin_config.json) or an official "
                      "LLaVA-UHD v2 folder (config.json + safetensors; --config gives the ViT)")
  p.add_argument("--tokenizer", required=True,
                 help="tokenizer folder (tokenizer.model + tokenizer_config.json), or 'bytes' "
                      "for the byte-level test tokenizer of tiny models")
  p.add_argument("--dtype", default=None, choices=config.DTYPE_NAMES,
                 help="parameter dtype when importing an official folder")
  p.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                 help="conversation template (default: the model's, vicuna_v1 for Vicuna, "
                      "qwen_1_5 for Qwen2)")
  p.add_argument("--max-new-tokens", type=_int_at_least(1), default=128)
  p.add_argument("--num-beams", type=_int_at_least(1), default=1)
  p.add_argument("--temperature", default=0.0,
                 type=_number_in(0.0, float("inf"), what="a number >= 0"),
                 help="0: greedy / beam search")
  p.add_argument("--top-p", default=1.0,
                 type=_number_in(0.0, 1.0, lo_open=True, what="a number in (0, 1]"))
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--max-slice-nums", type=_int_at_least(1), default=slicing.EVAL_MAX_SLICE_NUMS,
                 help=f"at most this many slices per image (default: "
                      f"{slicing.EVAL_MAX_SLICE_NUMS}, the official evaluation; training uses "
                      f"{slicing.TRAIN_MAX_SLICE_NUMS}; 1: the overview only)")
  p.add_argument("--no-pre-resize", dest="pre_resize", action="store_false",
                 help="slice the images as they are, without the official evaluation "
                      "pre-resize (longer side to 1024 px, 1536 for TextVQA); `hiwin demo` "
                      "evaluates this way")


# --- handlers ---------------------------------------------------------------------------------

def _require(path: str, flag: str, kind: str = "folder") -> pathlib.Path:
  """`path` of an input flag, which must exist as a `kind` ("folder", "file" or "path")."""
  p = pathlib.Path(path)
  ok = {"folder": p.is_dir, "file": p.is_file, "path": p.exists}[kind]()
  if not ok:
    what = "file or folder" if kind == "path" else kind
    raise UsageError(f"{flag} {path}: no such {what}" if not p.exists() else
                     f"{flag} {path}: not a {what}")
  return p


def _convert(args, overrides) -> int:
  from hiwin_jax.convert import formats, llava_uhd
  from hiwin_jax import outputs, weights
  projector = args.format == "llava-projector"
  official = projector or args.format == "llava-uhd"
  section = "model" if official else formats.FORMATS[args.format].section
  _require(args.input, "--input", "path" if args.direction == "import" else "folder")
  kind = (outputs.HIWIN_CHECKPOINT if args.direction == "import" else
          outputs.PROJECTOR_FOLDER if projector else outputs.MODEL_FOLDER)
  # Refused before minutes of conversion, not after.
  outputs.check_destination(args.output, kind, overwrite=args.overwrite, flag="--output")
  if args.direction == "import":
    if projector:
      cfg = config.load_config(args.config, overrides).model
      params = llava_uhd.import_projector(args.input, cfg, args.dtype)
    elif official:
      base = config.load_config(args.config, overrides).model
      cfg, params = llava_uhd.import_official(args.input, args.dtype, base)
    else:
      cfg, params = formats.import_params(args.format, args.input, args.dtype)
    out = weights.write_params(args.output, params, {"format": args.format,
                                                     section: cfg.to_dict()},
                               overwrite=args.overwrite)
  else:
    params, saved = weights.read_params(args.input)
    # The projector file is part of a whole-model checkpoint too.
    readable = ("llava-uhd", "llava-projector") if projector else (args.format,)
    if not saved or saved.get("format") not in readable:
      raise UsageError(f"--input {args.input}: not a hiwin {' or '.join(readable)} checkpoint "
                       f"(its {weights.CONFIG_NAME} says format "
                       f"{saved and saved.get('format')!r})")
    if projector:
      out = llava_uhd.export_projector_folder(params, config.model_from_dict(saved[section]),
                                              args.output, args.dtype or "bfloat16",
                                              overwrite=args.overwrite)
    elif official:
      cfg = config.model_from_dict(saved[section])
      out = llava_uhd.export_official(params, cfg, args.output, args.dtype or "bfloat16",
                                      overwrite=args.overwrite)
    else:
      cfg = formats.FORMATS[args.format].schema()
      cfg.update(saved[section])
      out = formats.export_params(args.format, params, cfg, args.output, args.dtype,
                                  overwrite=args.overwrite)
  logging.getLogger("hiwin").info("wrote %s", out)
  return 0


def _check_train_inputs(cfg, stage: str) -> None:
  """Every input the stage reads is named and exists, before anything is built."""
  def need(key: str, kind: str, what: str, optional: bool = False):
    section, field = key.split(".")
    value = str(cfg[section][field])
    if not value:
      if optional:
        return
      raise UsageError(f"stage {stage} needs --config.{key}=... ({what})")
    if not (key == "data.source" and value == "skimage"):
      _require(value, f"--config.{key}", kind)

  if stage == "vdim":
    need("data.source", "folder", "a folder of images, or 'skimage'")
    need("init.vision", "folder", "an HF CLIP folder", optional=True)
    return
  if cfg.data.format == "array_record":
    need("data.array_record_dir", "folder", "the folder `hiwin data build` printed")
  else:
    need("data.json", "file", "the LLaVA-format training json")
    need("data.image_folder", "folder", "the folder its image paths are relative to")
  need("data.tokenizer", "folder", "the tokenizer folder with tokenizer.model")
  need("init.checkpoint", "folder", "a hiwin checkpoint", optional=True)
  need("init.vdim", "path", "a stage-0 run folder or VDIM .ckpt", optional=True)


def _train(args, overrides) -> int:
  from hiwin_jax import outputs
  from hiwin_jax.parallel import distributed
  if distributed.detect(os.environ).kind == "single":
    # A folder another run holds is refused at once, before jax and the config load (nothing is
    # created here; loop.claim takes the lock).
    outputs.check_run_folder(args.out)
  cfg = config.load_config(args.config, overrides)
  stage = cfg.train.stage if "train" in cfg else None
  if stage not in STAGES:
    raise UsageError(f"--config {args.config}: names stage {stage!r} (train.stage); expected "
                     f"one of {STAGES}: a stage config ({', '.join(STAGE_CONFIGS)})")
  _check_train_inputs(cfg, stage)
  distributed.init_distributed()
  from hiwin_jax.train import loop
  # The folder is claimed (one run at a time, writable) before the data and model are built.
  with loop.claim(args.out) as out:
    if stage == "vdim":
      from hiwin_jax.train.vdim import VdimTrainer
      task = VdimTrainer(cfg)
    else:
      from hiwin_jax.train.trainer import LlavaTask
      task = LlavaTask(cfg)
    result = loop.run(task, out)
  say = logging.getLogger("hiwin").info
  if result["stopped_at"] is not None:
    say("stopped at step %d with a checkpoint (rerun the same command to resume); outputs in %s",
        result["stopped_at"], args.out)
  else:
    say("stage %s done: %d steps, final loss %.4f; outputs in %s", stage, result["steps_run"],
        result.get("loss", float("nan")), args.out)
  return 0


def _generate(args, model, cfg_model, tokenizer, gen) -> int:
  """Answers `args.prompt` about each image; one image and no beams: streams to stdout."""
  from hiwin_jax.data import image
  from hiwin_jax.infer import requests
  from hiwin_jax.infer.generate import Generator
  paths = args.image or [None]
  try:
    prepared = [requests.prepare(
        args.prompt, image.load_image(path) if path else None, tokenizer, cfg_model,
        template=args.template, image_folder=str(pathlib.Path(path).parent) if path else "",
        max_slice_nums=args.max_slice_nums, pre_resize=args.pre_resize,
        max_context=int(cfg_model.llm.max_position_embeddings), reserve=gen.max_new_tokens)
        for path in paths]
  except requests.RequestError as e:
    print(f"hiwin generate: error: {e}", file=sys.stderr)
    return 2
  shown: list[int] = []
  text_so_far = [""]

  def stream(step, tokens, active):
    if active[0]:
      shown.append(int(tokens[0]))
      text = tokenizer.decode(shown)
      sys.stdout.write(text[len(text_so_far[0]):])
      sys.stdout.flush()
      text_so_far[0] = text

  streaming = gen.num_beams == 1 and len(prepared) == 1
  out = Generator(model)(requests.collate(prepared, cfg_model), gen,
                         seed=args.seed, stream=stream if streaming else None)
  if streaming:
    sys.stdout.write("\n")
    return 0
  for i, path in enumerate(paths):
    text = tokenizer.decode(out.tokens[i][:out.lengths[i]].tolist()).strip()
    sys.stdout.write(f"{path}: {text}\n" if len(paths) > 1 else f"{text}\n")
  return 0


def _eval(args, model, cfg_model, tokenizer, gen) -> int:
  """Answers the question file (resuming), scores it with `--metric`, prints a JSON line."""
  from hiwin_jax.infer import evaluate
  log = logging.getLogger("hiwin.eval")
  settings = evaluate.EvalSettings(template=args.template, max_slice_nums=args.max_slice_nums,
                                   pre_resize=args.pre_resize,
                                   batch_size=args.batch_size,
                                   model_id=pathlib.Path(args.checkpoint).name or "hiwin")
  counts = evaluate.answer_questions(model, tokenizer, cfg_model, args.questions,
                                     args.image_folder, args.answers, gen=gen, settings=settings,
                                     progress=not args.no_progress, log=log)
  log.info("answered %d questions (%d already answered, %d errors) -> %s", counts["asked"],
           counts["skipped"], counts["errors"], args.answers)
  result = {"counts": counts}
  if args.metric != "none":
    result["score"] = evaluate.score(args.questions, args.answers, args.metric)
  print(json.dumps(result))
  return 0


def _answer(args, overrides) -> int:
  """`hiwin generate` and `hiwin eval`: the model, tokenizer and decoding settings, then the
  subcommand."""
  from hiwin_jax import weights
  from hiwin_jax.infer import evaluate, requests
  from hiwin_jax.infer.generate import GenerationConfig
  _require(args.checkpoint, "--checkpoint")
  if args.tokenizer != "bytes":
    _require(args.tokenizer, "--tokenizer")
  if args.command == "generate":
    for path in args.image or ():
      _require(path, "--image", "file")
  else:
    _require(args.questions, "--questions", "file")
    evaluate.read_questions(args.questions)  # a malformed file fails before the model loads
    if args.image_folder:
      _require(args.image_folder, "--image-folder")
  tokenizer = evaluate.load_tokenizer(args.tokenizer)
  model, cfg_model = weights.load_model(args.checkpoint, args.config, overrides, args.dtype)
  if args.template is None:
    args.template = requests.model_template(cfg_model)
  gen = GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                         temperature=args.temperature, top_p=args.top_p,
                         eos_token_id=int(cfg_model.llm.eos_token_id),
                         pad_token_id=int(cfg_model.llm.pad_token_id))
  handler = _generate if args.command == "generate" else _eval
  return handler(args, model, cfg_model, tokenizer, gen)


def _aot(args, overrides) -> int:
  """Prints each compile's report and a markdown table; exit status 0 if every compiled step fits
  the chip's HBM, 1 if one does not."""
  import jax

  from hiwin_jax.train import aot
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")  # the TPU here is abstract: never probe for one
  if args.jbu:
    results = []
    for impl in ("xla", "pallas_tpu"):
      for backward in (False, True):
        results.append(aot.compile_jbu(args.topology, impl, backward))
        print(aot.jbu_table(results[-1:]).splitlines()[-1], flush=True)
    print(aot.jbu_table(results), flush=True)
    return 0
  try:
    batches = [int(b) for b in args.batch.split(",")]
    if min(batches) < 1:
      raise ValueError
  except ValueError:
    raise UsageError(f"--batch {args.batch!r} must be a positive integer or a comma-separated "
                     f"list of them") from None
  cfg = config.load_config(args.config, overrides)
  attentions = args.attention.split(",") if args.attention else [cfg.model.llm.attention]
  from hiwin_jax.models.llama import ATTENTIONS
  if not set(attentions) <= set(ATTENTIONS):
    raise UsageError(f"--attention {args.attention!r}: each must be one of {ATTENTIONS}")
  results = []
  for attention in attentions:
    for batch in batches:
      cfg.model.llm.attention = attention
      result = aot.compile_step(cfg, args.topology, batch=batch, seq=args.seq,
                                slices=args.slices)
      print(result.summary(), flush=True)
      results.append(result)
  if len(results) > 1:
    print(aot.step_table(results), flush=True)
  return 0 if all(r.fits for r in results) else 1


def _data(args, overrides) -> int:
  if overrides:
    raise UsageError(f"hiwin data takes no --config overrides (got {overrides[0]})")
  _require(args.json, "--json", "file")
  _require(args.images, "--images")
  from hiwin_jax.data import array_record
  out = array_record.build(args.json, args.images, args.out, overwrite=args.overwrite,
                           max_pixels=args.max_pixels,
                           workers=args.workers)
  manifest = array_record.read_manifest(out)
  logging.getLogger("hiwin").info(
      "wrote the prepared dataset %s: %d records, %d images; entries with errors: %s", out,
      manifest["num_records"], manifest["num_images"], manifest["errors"] or "none")
  print(out)
  return 0


def _demo(args, overrides) -> int:
  from hiwin_jax import demo
  return demo.run(args.config, overrides, args.out, overwrite=args.overwrite)


def _has_accelerator() -> bool:
  """A TPU (Google's PCI vendor id, as JAX's own probe reads it) or GPU driver is present."""
  for vendor in pathlib.Path("/sys/bus/pci/devices").glob("*/vendor"):
    with contextlib.suppress(OSError):
      if vendor.read_text().strip() == "0x1ae0":
        return True
  return any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/kfd"))


def _quiet_start() -> None:
  """Where libtpu is installed (the tpu-aot extra) on a machine without a TPU, JAX still starts
  its TPU backend, and libtpu prints host-probing warnings on every command. Such a machine
  computes on the CPU: name that platform, so the TPU backend is never started. An explicit
  JAX_PLATFORMS, or any accelerator, leaves JAX to choose."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  if _has_accelerator():
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # imported already (in-process callers): its config read the env
    sys.modules["jax"].config.update("jax_platforms", "cpu")


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


HANDLERS = {"demo": _demo, "train": _train, "convert": _convert, "data": _data,
            "generate": _answer, "eval": _answer, "aot": _aot}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  _quiet_start()
  rest, overrides = _split_overrides(argv)
  args = build_parser().parse_args(rest)
  debug = args.debug or os.environ.get("HIWIN_DEBUG", "") not in ("", "0")
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("jax", "orbax"):  # backend probing, checkpoint bookkeeping: not news
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # Orbax logs each failure it then raises (with a traceback, from several threads); the
  # handler reports what it raises, once.
  logging.getLogger("absl").setLevel(logging.DEBUG if debug else logging.CRITICAL)
  try:
    return HANDLERS[args.command](args, overrides)
  except KeyboardInterrupt:
    if debug:
      raise
    print(f"hiwin {args.command}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # every error ends here as one line, unless --debug
    if debug:
      raise
    if isinstance(e, (ValueError, OSError)):
      # The project's errors for bad input are ValueErrors (config, checkpoint, image, data,
      # request errors) and OSErrors (files and folders); a bare KeyError is a bug.
      print(f"hiwin {args.command}: error: {_one_line(e)}", file=sys.stderr)
      return 2
    print(f"hiwin {args.command}: internal error: {type(e).__name__}: {_one_line(e)} (rerun "
          f"with --debug for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
