"""`hiwin`: one command with subcommands. `hiwin <subcommand> --help` documents each.

Config-driven subcommands take `--config NAME_OR_PATH` and any number of
`--config.a.b=value` overrides (ml_collections style).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence


def _add_config_args(p: argparse.ArgumentParser, default: str = "tiny") -> None:
  p.add_argument("--config", default=default,
                 help="config name in configs/ (tiny, vicuna7b, vicuna13b, qwen2_7b) or a path to "
                      "a config file; override any field with --config.a.b=value")


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
      "demo", help="offline end-to-end run on a tiny model (no downloads)",
      description="Builds the tiny towers, runs the CLIP tower on real photos sliced to non-square "
                  "grids and the LLM with KV-cache decoding, sharded over every local device, "
                  "exports both towers to the HuggingFace layout and reloads them.")
  _add_config_args(demo)
  demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")

  train = sub.add_parser(
      "train", help="run a training stage (0: VDIM, 1: projector pre-training, 2: fine-tuning)",
      description="Runs the stage named by the config's `stage` field (vdim, pretrain, sft); "
                  "resumes from the latest checkpoint in --out. Multi-process runs (SLURM, "
                  "mpirun, TPU pods, launch/local.sh) are detected from the environment. Stage "
                  "0: --config vdim_stage0_tiny (offline) or vdim_stage0; stages 1/2: "
                  "--config stage1_pretrain / stage2_sft with --config.data.* and "
                  "--config.init.* set (see the config files).")
  _add_config_args(train, default="vdim_stage0_tiny")
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
  _add_config_args(conv, default="vicuna7b")
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

  from hiwin_jax.infer import evaluate as infer_cli  # light: no jax at import
  gen = sub.add_parser(
      "generate", help="answer a question about one or more images",
      description="Loads a LLaVA-UHD v2 checkpoint and answers --prompt about each --image with the "
                  "official evaluation prompt (vicuna_v1, '<image>\\n' + question, eval "
                  "pre-resize, max_slice_nums 9); streams the answer to stdout.")
  infer_cli.add_model_args(gen)
  _add_config_args(gen, default="vicuna7b")
  gen.add_argument("--image", action="append", default=None,
                   help="image file; repeat for several images, each answered (in one batch, "
                        "with the shape buckets) for the same prompt; omit for text only")
  gen.add_argument("--prompt", required=True, help="the question")
  ev = sub.add_parser(
      "eval", help="answer a LLaVA-style question file (resumable) and score it",
      description="Question jsonl (question_id, image, text, optional answer/answers) + image "
                  "folder -> answers jsonl (resumes by skipping answered ids; per-question "
                  "errors are recorded) -> the chosen metric.")
  infer_cli.add_model_args(ev)
  _add_config_args(ev, default="vicuna7b")
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
  _add_config_args(aot, default="stage2_sft")
  aot.add_argument("--topology", default="v5p-8",
                   help="v5p-8, v5p-64, v6e-64, v5litepod-16 or a libtpu name (v5p:2x4x4)")
  aot.add_argument("--batch", type=int, default=1, help="rows per batch shard (default: 1)")
  aot.add_argument("--seq", type=int, default=4096, help="sequence length (default: 4096)")
  aot.add_argument("--slices", type=int, default=7, help="slices per sample (default: 7)")
  return parser


def _convert(args, overrides) -> int:
  from ckpt_convert import formats, llava_uhd
  from hiwin_jax import config as C
  from hiwin_jax.train import checkpoint
  official = args.format == "llava-uhd"
  section = "model" if official else formats.FORMATS[args.format].section
  if args.direction == "import":
    if official:
      base = C.load_config(args.config, overrides).model
      cfg, params = llava_uhd.import_official(args.input, args.dtype, base)
    else:
      cfg, params = formats.import_params(args.format, args.input, args.dtype)
    out = checkpoint.write_params(args.output, params, {"format": args.format,
                                                       section: cfg.to_dict()})
  else:
    params, saved = checkpoint.read_params(args.input)
    if not saved or saved.get("format") != args.format:
      raise SystemExit(f"{args.input}: not a hiwin {args.format} checkpoint "
                       f"(its {checkpoint.CONFIG_NAME} says format "
                       f"{saved and saved.get('format')!r})")
    if official:
      cfg = C.ConfigDict(saved[section])
      out = llava_uhd.export_official(params, cfg, args.output, args.dtype or "bfloat16")
    else:
      cfg = formats.FORMATS[args.format].schema()
      cfg.update(saved[section])
      out = formats.export_params(args.format, params, cfg, args.output, args.dtype)
  logging.getLogger("hiwin").info("wrote %s", out)
  return 0


def _train(args, overrides) -> int:
  from hiwin_jax import config as C
  from hiwin_jax.parallel.distributed import init_distributed
  cfg = C.load_config(args.config, overrides)
  stage = cfg.get("stage")
  say = logging.getLogger("hiwin").info
  if stage == "vdim":
    from hiwin_jax.train import vdim
    result = vdim.run_vdim(cfg, args.out)
    say("stage 0 done: %d steps, final loss %.4f; outputs in %s", result["steps_run"],
        result["loss"], args.out)
    return 0
  if stage in ("pretrain", "sft"):
    init_distributed()
    from hiwin_jax.train import loop
    result = loop.run_training(cfg, args.out)
    if result["stopped_at"] is not None:
      say("stopped at step %d with a checkpoint (rerun the same command to resume); outputs "
          "in %s", result["stopped_at"], args.out)
    else:
      say("stage %s done: %d steps, final loss %.4f, %s skipped samples; outputs in %s", stage,
          result["steps_run"], result.get("loss", float("nan")), sum(result["skipped"].values()),
          args.out)
    return 0
  raise SystemExit(f"hiwin train: config {args.config!r} names stage {stage!r}; expected "
                   f"'vdim', 'pretrain' or 'sft'")


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = _split_overrides(argv)
  args = build_parser().parse_args(rest)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("jax", "absl", "orbax"):  # backend probing, checkpoint bookkeeping: not news
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from ckpt_convert.safetensors_io import CheckpointError
  from hiwin_jax.data.image import ImageError
  try:
    if args.command == "demo":
      from hiwin_jax import demo
      return demo.run(args.config, overrides, args.out)
    if args.command == "convert":
      return _convert(args, overrides)
    if args.command == "train":
      return _train(args, overrides)
    if args.command == "data":
      from hiwin_jax.data import array_record
      out = array_record.build(args.json, args.images, args.out)
      logging.getLogger("hiwin").info("wrote the ArrayRecord dataset %s", out)
      print(out)
      return 0
    if args.command == "aot":
      from hiwin_jax.train import aot
      return aot.main(args, overrides)
    if args.command in ("generate", "eval"):
      from hiwin_jax.infer import evaluate as infer_cli
      return infer_cli.main(args, overrides)
  except (CheckpointError, ImageError, FileNotFoundError, FileExistsError, KeyError) as e:
    # Bad input the user can fix: one clear line, no traceback.
    print(f"hiwin {args.command}: error: {e}", file=sys.stderr)
    return 2
  raise AssertionError(args.command)


if __name__ == "__main__":
  sys.exit(main())
