"""`hiwin`: one command with subcommands, and every subcommand's handler.
`hiwin <subcommand> --help` documents each.

Config-driven subcommands take `--config NAME_OR_PATH` and any number of
`--config.a.b=value` overrides (ml_collections style). The handlers parse and report; the work
is library code (`hiwin_jax.demo`, `train/`, `infer/`, `weights`, the converters).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import os
import pathlib
import sys
from typing import Sequence

# The configs in configs/ by kind (tests/test_cli.py checks these lists against the folder).
MODEL_CONFIGS = ("tiny", "vicuna7b", "vicuna13b", "qwen2_7b")
STAGE_CONFIGS = ("vdim_stage0", "stage1_pretrain", "stage2_sft", "vdim_stage0_tiny",
                 "tiny_stage1", "tiny_stage2")
STAGES = ("vdim", "pretrain", "sft")


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
  parser = argparse.ArgumentParser(
      prog="hiwin", description="LLaVA-UHD v2 in JAX: demo, training, weight conversion.",
      epilog="Config overrides: --config.model.llm.num_layers=2 (any subcommand with --config).")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

  demo = sub.add_parser(
      "demo", help="offline end-to-end run: a tiny LLaVA-UHD v2 trained on CPU (no downloads)",
      description=_module_doc("hiwin_jax.demo"),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_config_args(demo, "tiny", "model",
                   note=" (only tiny is CPU-sized); its stages run the stage configs "
                        "vdim_stage0_tiny, tiny_stage1 and tiny_stage2 with the demo's settings; "
                        "overrides reach the model and the stage-1/2 configs")
  demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")

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
  conv.add_argument("--format", required=True, choices=["llava-uhd", "hf-llm", "hf-clip"],
                    help="llava-uhd: the official LLaVA-UHD v2 checkpoint folder (config.json + "
                         "safetensors; exported in bf16 unless --dtype); hf-llm: "
                         "LlamaForCausalLM / Qwen2ForCausalLM; hf-clip: CLIPVisionModel")
  _add_config_args(conv, "vicuna7b", "model")
  conv.add_argument("--input", required=True, help="source folder or file")
  conv.add_argument("--output", required=True, help="destination folder")
  conv.add_argument("--dtype", default=None,
                    help="dtype of the written tensors (float32, bfloat16; default: as stored)")

  data = sub.add_parser(
      "data", help="training data tools (build: LLaVA json + images -> ArrayRecord)",
      description="build: writes a LLaVA-format json and its image folder as an ArrayRecord "
                  "dataset (TFDS builder, no tensorflow needed) for data.format=array_record; "
                  "set data.array_record_dir to the folder it prints.")
  data.add_argument("action", choices=["build"])
  data.add_argument("--json", required=True, help="LLaVA json: [{id, image, conversations}]")
  data.add_argument("--images", required=True, help="folder the json's image paths are in")
  data.add_argument("--out", required=True, help="output folder")

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
  ev.add_argument("--batch-size", type=int, default=1, help="questions per generate call")
  ev.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

  aot = sub.add_parser(
      "aot", help="compile a train step for an abstract TPU slice; report per-chip memory",
      description="Compiles the config's stage 1/2 train step for a TPU topology on this machine "
                  "(libtpu, no TPU: abstract weights, nothing allocated) and prints per-chip "
                  "memory from the compiler, FLOPs and whether it fits the chip's HBM (exit 1 "
                  "if not). The batch: --batch rows per batch shard, each a sample with "
                  "--slices slices + an overview on the 24x24 canvas, --seq tokens.")
  _add_config_args(aot, "stage2_sft", "stage")
  aot.add_argument("--topology", default="v5p-8",
                   help="v5p-8, v5p-64, v6e-64, v5litepod-16 or a libtpu name (v5p:2x4x4)")
  aot.add_argument("--batch", type=int, default=1, help="rows per batch shard (default: 1)")
  aot.add_argument("--seq", type=int, default=4096, help="sequence length (default: 4096)")
  aot.add_argument("--slices", type=int, default=7, help="slices per sample (default: 7)")
  return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
  """Options shared by `hiwin generate` and `hiwin eval`."""
  from hiwin_jax.data import slicing
  from hiwin_jax.infer import requests
  p.add_argument("--checkpoint", required=True,
                 help="hiwin checkpoint folder (params/ + hiwin_config.json) or an official "
                      "LLaVA-UHD v2 folder (config.json + safetensors; --config gives the ViT)")
  p.add_argument("--tokenizer", required=True,
                 help="tokenizer folder (tokenizer.model + tokenizer_config.json), or 'bytes' "
                      "for the byte-level test tokenizer of tiny models")
  p.add_argument("--dtype", default=None, help="parameter dtype when importing an official folder")
  p.add_argument("--template", default=requests.DEFAULT_TEMPLATE, help="conversation template")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--num-beams", type=int, default=1)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy / beam search")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--max-slice-nums", type=int, default=slicing.EVAL_MAX_SLICE_NUMS,
                 help=f"at most this many slices per image (default: "
                      f"{slicing.EVAL_MAX_SLICE_NUMS}, the official evaluation; training uses "
                      f"{slicing.TRAIN_MAX_SLICE_NUMS}; 1: the overview only)")
  p.add_argument("--no-pre-resize", dest="pre_resize", action="store_false",
                 help="slice the images as they are, without the official evaluation "
                      "pre-resize (longer side to 1024 px, 1536 for TextVQA); `hiwin demo` "
                      "evaluates this way")


# --- handlers ---------------------------------------------------------------------------------

def _convert(args, overrides) -> int:
  from hiwin_jax.convert import formats, llava_uhd
  from hiwin_jax import config, weights
  official = args.format == "llava-uhd"
  section = "model" if official else formats.FORMATS[args.format].section
  if args.direction == "import":
    if official:
      base = config.load_config(args.config, overrides).model
      cfg, params = llava_uhd.import_official(args.input, args.dtype, base)
    else:
      cfg, params = formats.import_params(args.format, args.input, args.dtype)
    out = weights.write_params(args.output, params, {"format": args.format,
                                                     section: cfg.to_dict()})
  else:
    params, saved = weights.read_params(args.input)
    if not saved or saved.get("format") != args.format:
      raise SystemExit(f"{args.input}: not a hiwin {args.format} checkpoint "
                       f"(its {weights.CONFIG_NAME} says format "
                       f"{saved and saved.get('format')!r})")
    if official:
      cfg = config.model_from_dict(saved[section])
      out = llava_uhd.export_official(params, cfg, args.output, args.dtype or "bfloat16")
    else:
      cfg = formats.FORMATS[args.format].schema()
      cfg.update(saved[section])
      out = formats.export_params(args.format, params, cfg, args.output, args.dtype)
  logging.getLogger("hiwin").info("wrote %s", out)
  return 0


def _train(args, overrides) -> int:
  from hiwin_jax import config
  from hiwin_jax.parallel.distributed import init_distributed
  from hiwin_jax.train import loop
  cfg = config.load_config(args.config, overrides)
  stage = cfg.train.stage if "train" in cfg else None
  if stage not in STAGES:
    raise SystemExit(f"hiwin train: config {args.config!r} names stage {stage!r} (train.stage); "
                     f"expected one of {STAGES}: a stage config ({', '.join(STAGE_CONFIGS)})")
  init_distributed()
  if stage == "vdim":
    from hiwin_jax.train.vdim import VdimTrainer
    task = VdimTrainer(cfg)
  else:
    from hiwin_jax.train.trainer import LlavaTask
    task = LlavaTask(cfg)
  result = loop.run(task, args.out)
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
  from hiwin_jax.infer import evaluate
  from hiwin_jax.infer.generate import GenerationConfig
  tokenizer = evaluate.load_tokenizer(args.tokenizer)
  model, cfg_model = weights.load_model(args.checkpoint, args.config, overrides, args.dtype)
  gen = GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                         temperature=args.temperature, top_p=args.top_p,
                         eos_token_id=int(cfg_model.llm.eos_token_id),
                         pad_token_id=int(cfg_model.llm.pad_token_id))
  handler = _generate if args.command == "generate" else _eval
  return handler(args, model, cfg_model, tokenizer, gen)


def _aot(args, overrides) -> int:
  """Prints the report; exit status 0 if the step fits the chip's HBM, 1 if not."""
  import jax

  from hiwin_jax import config
  from hiwin_jax.train import aot
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")  # the TPU here is abstract: never probe for one
  cfg = config.load_config(args.config, overrides)
  result = aot.compile_step(cfg, args.topology, batch=args.batch, seq=args.seq,
                            slices=args.slices)
  print(result.summary(), flush=True)
  return 0 if result.fits else 1


def _data(args, overrides) -> int:
  del overrides
  from hiwin_jax.data import array_record
  out = array_record.build(args.json, args.images, args.out)
  logging.getLogger("hiwin").info("wrote the ArrayRecord dataset %s", out)
  print(out)
  return 0


def _demo(args, overrides) -> int:
  from hiwin_jax import demo
  return demo.run(args.config, overrides, args.out)


HANDLERS = {"demo": _demo, "train": _train, "convert": _convert, "data": _data,
            "generate": _answer, "eval": _answer, "aot": _aot}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = _split_overrides(argv)
  args = build_parser().parse_args(rest)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("jax", "absl", "orbax"):  # backend probing, checkpoint bookkeeping: not news
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from hiwin_jax.convert.safetensors_io import CheckpointError
  from hiwin_jax.data.image import ImageError
  try:
    return HANDLERS[args.command](args, overrides)
  except (CheckpointError, ImageError, FileNotFoundError, FileExistsError, KeyError) as e:
    # Bad input the user can fix: one clear line, no traceback.
    print(f"hiwin {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
