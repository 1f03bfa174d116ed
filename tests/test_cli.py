"""The `hiwin` command: help texts, conversion round trips through files, clean errors."""

import json

import ml_dtypes
import numpy as np
import pytest

from hiwin_jax import cli, config
from hiwin_jax.convert.safetensors_io import write_sharded
from hiwin_jax.config import load_config
from tests.reference.checkpoint import assert_export_holds, config_json, model_shapes


@pytest.mark.parametrize("sub,default", [("demo", "tiny"), ("convert", "vicuna7b"),
                                         ("train", "vdim_stage0_tiny"), ("generate", "vicuna7b"),
                                         ("eval", "vicuna7b"), ("aot", "stage2_sft")])
def test_every_subcommand_has_help_naming_its_default_config_and_the_configs(sub, default,
                                                                             capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([sub, "--help"])
  assert e.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  assert f"(default: {default})" in text, text
  kind = cli.STAGE_CONFIGS if sub in ("train", "aot") else cli.MODEL_CONFIGS
  assert ", ".join(kind) in text, text


def test_demo_help_is_the_demo_modules_own_description(capsys):
  from hiwin_jax import demo
  with pytest.raises(SystemExit):
    cli.main(["demo", "--help"])
  text = capsys.readouterr().out
  assert demo.__doc__.splitlines()[0] in text
  assert "stage 0" in text and "held-out accuracy" in text
  flat = " ".join(text.split())
  assert "vdim_stage0_tiny, tiny_stage1 and tiny_stage2" in flat, flat


@pytest.mark.parametrize("sub", ["eval", "generate"])
def test_eval_flags_reproduce_the_demos_evaluation_settings(sub):
  """The demo scores without the pre-resize and at its own slice counts (demo.eval_command)."""
  common = ["--checkpoint", "c", "--tokenizer", "t"]
  rest = (["--questions", "q", "--answers", "a"] if sub == "eval" else ["--prompt", "p"])
  args = cli.build_parser().parse_args([sub, *common, *rest])
  assert args.pre_resize and args.max_slice_nums == 9  # the official evaluation
  args = cli.build_parser().parse_args([sub, *common, *rest, "--no-pre-resize",
                                        "--max-slice-nums", "7"])
  assert not args.pre_resize and args.max_slice_nums == 7


def test_the_cli_config_lists_match_the_configs_folder():
  kinds = {name: "train" in config.from_file(name) for name in config.known_configs()}
  assert sorted(cli.MODEL_CONFIGS) == sorted(n for n, stage in kinds.items() if not stage)
  assert sorted(cli.STAGE_CONFIGS) == sorted(n for n, stage in kinds.items() if stage)


def test_train_with_a_model_config_names_the_stage_configs(capsys):
  assert cli.main(["train", "--config", "tiny", "--out", "unused"]) == 2
  assert "stage1_pretrain" in capsys.readouterr().err


def test_official_checkpoint_round_trip_through_the_cli(tmp_path):
  cfg = load_config("tiny").model
  cfg.llm.num_kv_heads = cfg.llm.num_heads
  rng = np.random.default_rng(3)
  tensors = {k: rng.standard_normal(s).astype(ml_dtypes.bfloat16)
             for k, s in sorted(model_shapes(cfg).items())}
  src = tmp_path / "official"
  write_sharded(src, tensors.items())
  (src / "config.json").write_text(json.dumps(config_json(cfg)))
  # The LLM geometry comes from config.json, the ViT geometry from --config.
  assert cli.main(["convert", "import", "--format", "llava-uhd", "--config", "tiny",
                   "--input", str(src), "--output", str(tmp_path / "ours")]) == 0
  assert cli.main(["convert", "export", "--format", "llava-uhd", "--input",
                   str(tmp_path / "ours"), "--output", str(tmp_path / "back")]) == 0
  assert_export_holds(tmp_path / "back", tensors)
  config = json.loads((tmp_path / "back" / "config.json").read_text())
  assert config["feature_scale_mask"] == 7 and config["mm_projector_type"] == \
      "adapt_spatial_resampler"


def test_projector_file_round_trip_through_the_cli(tmp_path):
  """export --format llava-projector from a whole-model checkpoint, import the file alone, export
  again from the projector-only checkpoint: every key of the released file, the parameters bit
  for bit (the never-called featurizer copy is filled from the ViT, or zeros without one)."""
  import safetensors.numpy
  import torch
  cfg = load_config("tiny").model
  cfg.llm.num_kv_heads = cfg.llm.num_heads
  rng = np.random.default_rng(4)
  tensors = {k: rng.standard_normal(s).astype(ml_dtypes.bfloat16)
             for k, s in sorted(model_shapes(cfg).items())}
  write_sharded(tmp_path / "official", tensors.items())
  (tmp_path / "official" / "config.json").write_text(json.dumps(config_json(cfg)))
  convert = lambda *a: cli.main(["convert", *map(str, a)])
  assert convert("import", "--format", "llava-uhd", "--config", "tiny", "--input",
                 tmp_path / "official", "--output", tmp_path / "whole") == 0
  assert convert("export", "--format", "llava-projector", "--input", tmp_path / "whole",
                 "--output", tmp_path / "proj") == 0
  assert sorted(p.name for p in (tmp_path / "proj").iterdir()) == [
      "mm_projector.bin", "mm_projector.safetensors"]
  from hiwin_jax.convert.llava_uhd import CHANNEL_NORM, DEAD_CLIP
  first = safetensors.numpy.load_file(tmp_path / "proj" / "mm_projector.safetensors")
  keys = {k for k in tensors if k.startswith("model.mm_projector.")}
  want = {k: tensors[k] for k in keys if not k.startswith((DEAD_CLIP, CHANNEL_NORM))}
  assert set(first) == keys and 0 < len(want) < len(keys)
  for k, v in want.items():
    np.testing.assert_array_equal(first[k].view(np.uint16), v.view(np.uint16), err_msg=k)
  assert convert("import", "--format", "llava-projector", "--config", "tiny", "--input",
                 tmp_path / "proj" / "mm_projector.bin", "--output", tmp_path / "alone") == 0
  assert convert("export", "--format", "llava-projector", "--input", tmp_path / "alone",
                 "--output", tmp_path / "again") == 0
  back = torch.load(tmp_path / "again" / "mm_projector.bin", weights_only=True)
  assert set(back) == keys
  for k, v in want.items():
    np.testing.assert_array_equal(back[k].view(torch.int16).numpy(), v.view(np.int16), err_msg=k)
  # a projector-only checkpoint is not a whole model
  assert convert("export", "--format", "llava-uhd", "--input", tmp_path / "alone", "--output",
                 tmp_path / "nope") == 2


def test_bad_input_gives_one_line_error_and_exit_code_2(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  code = cli.main(["convert", "export", "--format", "hf-llm", "--input", str(tmp_path / "empty"),
                   "--output", str(tmp_path / "x")])
  assert code == 2
  err = capsys.readouterr().err
  assert "not a hiwin parameter checkpoint" in err and "Traceback" not in err
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "config.json").write_text("{}")
  code = cli.main(["convert", "import", "--format", "hf-llm", "--input", str(tmp_path / "broken"),
                   "--output", str(tmp_path / "y")])
  assert code == 2 and "broken" in capsys.readouterr().err
