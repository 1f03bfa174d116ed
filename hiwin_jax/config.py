"""Every config schema (ml_collections), and loading a config file with command-line overrides.

A file in `configs/` defines `get_config() -> ConfigDict` from the schemas here: a model config
(`tiny`, `vicuna7b`, ...) is `base_config()` with the model's geometry; a stage config
(`vdim_stage0`, `stage1_pretrain`, `stage2_sft`, ...) is a complete recipe of one training run.
Every config has the same top-level shape:

  name, seed
  model        vision, llm, projector, precision, max_length          `model_config`
  mesh         data, fsdp, tensor, rules                              `mesh_config`
and a stage config (`hiwin train`) adds
  data         stage 0: `vdim_data_config`; stages 1/2: `data_config`
  train        stage, num_steps, log_every, optimizer and the stage's own fields:
               stage 0: `vdim_train_config`; stages 1/2: `train_config`
  checkpoint   `checkpoint_config`
  init         stage 0: `vdim_init_config`; stages 1/2: `init_config`
  export       `export_config`

`load_config("tiny", ["--config.model.llm.num_layers=2"])` (a name in configs/ or a path) runs
`get_config()`, applies the overrides, then `resolve_model` fills the projector's derived fields
once; nothing downstream derives them again.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Mapping, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict
CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
# The dtypes a config, a conversion or an export may name.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


# --- the model --------------------------------------------------------------------------------

def vision_config() -> ConfigDict:
  """CLIP ViT-L/14-336 as the official model uses it (official-spec §2)."""
  return ConfigDict(dict(
      image_size=336, patch_size=14, num_channels=3, hidden_size=1024, num_layers=24,
      num_heads=16, mlp_dim=4096, layer_norm_eps=1e-5, select_layer=-2,
      remat="none",
  ))


def llm_config() -> ConfigDict:
  """Vicuna-7B v1.5 (LLaMA-2 7B geometry), official-spec §6.1."""
  return ConfigDict(dict(
      arch="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
      num_kv_heads=32, head_dim=128, mlp_dim=11008, rms_norm_eps=1e-5, rope_theta=10000.0,
      max_position_embeddings=4096, qkv_bias=False, tie_embeddings=False,
      bos_token_id=1, eos_token_id=2, pad_token_id=0,
      # "xla" everywhere; "cudnn" = jax.nn.dot_product_attention on NVIDIA GPUs; "splash" = the
      # Pallas TPU splash kernel (training and uncached prefill; interpret mode off TPU)
      attention="xla",
      remat="none",
  ))


def projector_config() -> ConfigDict:
  """VDIM (JBU) + Hiwin projector, official-spec §3-§5. None = derived from the towers by
  `resolve_model`: embed_dim = LLM width, kv_dim = ViT width, num_heads = embed_dim // 128."""
  return ConfigDict(dict(
      embed_dim=None, kv_dim=None, num_heads=None, grid_size=12,
      feature_scale_mask=7,   # bits 1/2/4 = levels 1x/2x/4x (the 7B config.json says which)
      layout="r1",            # r1: the released 7B token layout; r2: 13B / Qwen2 (branch HEAD)
      jbu_scale=4,
      # adaptive conv of the JBU (kernels/adaptive_conv.py): "auto" = the Pallas kernel of the
      # platform compiled for (TPU: pallas_tpu, CUDA: pallas_gpu), xla elsewhere; or "xla",
      # "pallas_tpu", "pallas_gpu"
      conv_impl="auto",
      # True: reproduce the official CUDA grad_filters bug (official-spec §3.4: only taps 0, 1, 4,
      # 9, 16, 25, 36 of the adaptive-conv filters get gradient), for bit-faithful replays of
      # the official runs.
      jbu_official_grad_bug=False,
      # "folded": k/v in-projections moved onto the queries (same math, ~12x fewer FLOPs at
      # E=4096); "official": projected per sample, as nn.MultiheadAttention does
      attention="folded",
      # separator embeddings between slices: "\n" and "," of the LLM's vocabulary (LLaMA ids)
      newline_token=13, comma_token=29892,
  ))


def precision_config() -> ConfigDict:
  """Parameters in `param_dtype`, compute in `dtype`; `matmul_precision` for fp32 matmuls."""
  return ConfigDict(dict(dtype="float32", param_dtype="float32", matmul_precision="default"))


def model_config() -> ConfigDict:
  """The whole model (`LlavaUHD`): the released CLIP-L/14-336 + Vicuna-7B geometry."""
  return ConfigDict(dict(vision=vision_config(), llm=llm_config(),
                         projector=projector_config(), precision=precision_config(),
                         # tokenizer_model_max_length: the spliced sequence is cut here
                         max_length=4096))


def resolve_model(model: ConfigDict) -> ConfigDict:
  """Fills the projector's derived fields of `model` in place (those still None) and checks
  them; returns `model`. `load_config` calls it once; a model config read from a file (a
  checkpoint's sidecar, an official config.json) goes through it when it is read."""
  p = model.projector
  if p.embed_dim is None:
    p.embed_dim = model.llm.hidden_size
  if p.kv_dim is None:
    p.kv_dim = model.vision.hidden_size
  if p.num_heads is None:
    p.num_heads = p.embed_dim // 128
  if p.num_heads < 1 or p.embed_dim % p.num_heads:
    raise ConfigError(f"model.projector: embed_dim {p.embed_dim} does not split into "
                     f"num_heads {p.num_heads} heads (set model.projector.num_heads)")
  return model


def model_from_dict(saved: Mapping) -> ConfigDict:
  """A model config saved as a dict (a checkpoint's `hiwin_config.json`) over today's schema,
  so fields added since it was written take their defaults; resolved."""
  model = model_config()
  model.update(saved)
  return resolve_model(model)


# --- the mesh ---------------------------------------------------------------------------------

def default_logical_rules() -> list[tuple[str, tuple[str, ...] | str | None]]:
  """Logical axis -> mesh axes. FSDP over `fsdp`, Megatron-style tensor parallelism over `tensor`."""
  return [
      ("batch", ("data", "fsdp")),
      ("layers", None),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("norm", None),
      ("vision_embed", "fsdp"),
      ("vision_mlp", "tensor"),
      ("vision_heads", "tensor"),
      ("vision_patch", None),
      ("vision_pos", None),
  ]


def mesh_config() -> ConfigDict:
  """Mesh axis sizes; one of them may be -1 (all remaining devices)."""
  return ConfigDict(dict(data=1, fsdp=-1, tensor=1, rules=default_logical_rules()))


def base_config() -> ConfigDict:
  """What every config starts from: a name, a seed, the model and the mesh."""
  cfg = ConfigDict()
  cfg.name = "base"
  cfg.seed = 0
  cfg.model = model_config()
  cfg.mesh = mesh_config()
  return cfg


# --- data -------------------------------------------------------------------------------------

def data_config() -> ConfigDict:
  """Fields of `cfg.data` for the LLaVA training stages (stage 1: template plain, slicing False,
  max_length 3072; stage 2: vicuna_v1, slicing True, 4096); read by
  `hiwin_jax.data.loader.make_train_iterator`."""
  return ConfigDict({
      "format": "json",            # "json" (LLaVA json + image folder) | "array_record"
      "json": "",                  # LLaVA-format json: [{id, image, conversations}]
      "image_folder": "",          # the json's "image" paths are relative to this folder
      "array_record_dir": "",      # written by `hiwin data build`
      "tokenizer": "",             # folder with tokenizer.model (+ tokenizer_config.json)
      "template": "vicuna_v1",     # plain | vicuna_v1 | qwen_1_5
      "slicing": True,             # False: overview only (official stage 1 `--single True`)
      "max_slice_nums": 7,         # the official training value (spec §1.1; evaluation uses 9)
      "max_length": 4096,          # longer spliced samples are excluded (reason too_long)
      "seq_multiple": 128,         # sequence length bucket granularity
      "global_batch_size": 128,    # samples per optimizer step over all processes
      "grad_accum": 1,             # micro-batches per step (leading axis of every array)
      "seed": 0,
      "shuffle": True,
      "remainder": "pad",          # "pad" (filler samples, labels -100) | "drop"
      "workers": 0,                # grain worker processes; 0 = in the training process
      "prefetch": 2,               # steps prefetched (per worker)
      "cache_dir": "",             # metadata cache (share it between hosts to split the pass);
                                   # "" = the prepared dataset's cache/ (array_record) or none
      "metadata_workers": 0,       # processes of the metadata pass on each host; 0 = all cores
      "max_image_pixels": 150_000_000,  # data.image.MAX_IMAGE_PIXELS (a test keeps them equal):
                                        # images declaring more pixels are refused, not decoded
      "epochs": 1,
  })


def vdim_data_config() -> ConfigDict:
  """`cfg.data` of stage 0: the images the VDIM pre-trains on (official-spec §3.7)."""
  return ConfigDict(dict(
      source="",               # folder of images (recursive) or "skimage" (bundled photos)
      image_size=336,          # multiple of the patch size; the downsamplers map back to /14
      global_batch_size=16,    # sharded over the mesh's data axes
      workers=8,               # decoding threads
  ))


# --- training ---------------------------------------------------------------------------------

def adamw_config() -> ConfigDict:
  """AdamW after global-norm clipping with linear warm-up and cosine decay: HF Trainer's
  `adamw_torch` defaults as LLaVA's scripts use them (official-spec §7).

  `projector_lr` / `vision_lr`: peak learning rates of the projector (`projector/*` and the
  JBU, `jbu/*`) and of the ViT (`vision/*`), LLaVA's `mm_projector_lr` and
  `mm_vision_tower_lr`; 0 = `lr` (the official LLaVA-UHD v2 recipe: one rate). They follow
  `lr`'s schedule."""
  return ConfigDict(dict(
      name="adamw", lr=2e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, b1=0.9,
      b2=0.999, eps=1e-8, grad_clip=1.0, projector_lr=0.0, vision_lr=0.0))


def nadam_config() -> ConfigDict:
  """`torch.optim.NAdam` (its defaults) after Lightning's gradient-norm clip to `clip_norm` in
  the first `clip_steps` steps, constant learning rate: the VDIM pre-training's optimizer."""
  return ConfigDict(dict(
      name="nadam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, momentum_decay=4e-3,
      clip_norm=1e-4, clip_steps=10))


def train_config() -> ConfigDict:
  """`cfg.train` of stages 1 and 2. `trainable` / `frozen`: regular expressions fully matched
  against "/"-joined parameter paths (`projector/pos_embed`); frozen wins."""
  return ConfigDict(dict(
      stage="sft",         # "pretrain" (stage 1) or "sft" (stage 2)
      trainable=[],
      frozen=[],
      optimizer=adamw_config(),
      num_steps=-1,        # -1: data.epochs over the dataset
      jbu_dropout=True,    # the official JBU's Dropout2d is active in both stages (frozen or not)
      peak_tflops=0.0,     # per device, for MFU; 0 = from the device kind (unknown on CPU)
      log_every=10,
  ))


def vdim_loss_config() -> ConfigDict:
  """The multi-view reconstruction loss of the official VDIM pre-training (official-spec §3.7):
  jitters per step, their reflect padding (px) and zoom, the random projection's width, the
  sampled CRF term's weight and sample count."""
  return ConfigDict(dict(n_jitters=2, max_pad=30, max_zoom=2.0, projection_dim=30,
                         crf_weight=0.001, crf_samples=1000))


def vdim_train_config() -> ConfigDict:
  """`cfg.train` of stage 0."""
  return ConfigDict(dict(
      stage="vdim",
      optimizer=nadam_config(),
      num_steps=-1,        # -1: one epoch, ceil(#images / global_batch_size) steps
      log_every=10,
      vdim_loss=vdim_loss_config(),
  ))


def checkpoint_config() -> ConfigDict:
  """Run checkpoints every `every` steps (and at the end and on SIGTERM), the last `keep` kept;
  `resume`: continue from the latest one (False: refuse a folder that has checkpoints)."""
  return ConfigDict(dict(every=500, keep=3, async_save=True, resume=True))


def init_config() -> ConfigDict:
  """Where the weights of stages 1/2 come from before training (applied in this order, later
  wins): `checkpoint`: a hiwin parameter checkpoint (e.g. stage 1's `final/`, or a converted
  official model); `vdim`: stage 0's output folder or an official VDIM `.ckpt` (the JBU; the
  official recipe reloads it in both stages)."""
  return ConfigDict(dict(checkpoint="", vdim=""))


def vdim_init_config() -> ConfigDict:
  """Stage 0's frozen featurizer: `vision`, an HF CLIP folder (openai/clip-vit-large-patch14-336
  for the real run); "" = random initialisation (warned)."""
  return ConfigDict(dict(vision=""))


def export_config() -> ConfigDict:
  """What a finished run writes besides `final/` (the hiwin checkpoint): with `official`, the
  official PyTorch layout (stages 1/2: the LLaVA-UHD folder; stage 0: the VDIM `.ckpt`) in
  `dtype`."""
  return ConfigDict(dict(official=False, dtype="bfloat16"))


# --- loading ----------------------------------------------------------------------------------

def resolve_config_path(name: str) -> pathlib.Path:
  """`tiny`, `configs/tiny.py` or any path to a config file."""
  path = pathlib.Path(name)
  if path.suffix != ".py":
    path = CONFIG_DIR / f"{name}.py"
  if not path.is_file():
    raise FileNotFoundError(f"config {name!r} not found (looked for {path}); known configs: "
                            f"{known_configs()}")
  return path


def known_configs() -> list[str]:
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def from_file(name: str) -> ConfigDict:
  """What the config file's `get_config()` returns: no overrides, nothing resolved. A recipe
  builds on another config with it (the model of `vicuna7b`, the stage of `stage1_pretrain`)."""
  path = resolve_config_path(name)
  spec = importlib.util.spec_from_file_location(f"hiwin_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


class ConfigError(ValueError):
  """A config value that cannot work: the message names the field (or the `--config.` flag that
  set it) and what is expected."""


class UnknownKeyError(ConfigError, KeyError):
  """An override names a field the config does not have."""

  def __str__(self) -> str:
    return str(self.args[0])


_KIND = {bool: "True or False", int: "an integer", float: "a number", tuple: "a list like [a, b]",
         list: "a list like [a, b]"}


def _parse_value(text: str, current, flag: str):
  """Parses `text` as a Python literal of the type of the value it replaces (`flag`, the override
  as given, names it in errors)."""
  if isinstance(current, ConfigDict):
    raise ConfigError(f"{flag}: {flag.partition('=')[0]} is a section, not a value; set one of "
                      f"its fields ({', '.join(sorted(current.keys())[:6])})")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    value = {"true": True, "false": False}.get(text) if isinstance(current, bool) else None
    if value is None:
      raise ConfigError(f"{flag}: cannot parse {text!r} as "
                        f"{_KIND.get(type(current), type(current).__name__)}") from None
  kind = type(current)
  ok = (current is None
        or (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind in (tuple, list) and isinstance(value, (tuple, list))))
  if not ok:
    raise ConfigError(f"{flag}: expected {_KIND.get(kind, kind.__name__)}, got {text!r}")
  if kind is float:
    value = float(value)
  if kind in (tuple, list):
    value = kind(value)
  return value


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """Applies `--config.a.b=value` (or `a.b=value`) overrides; unknown keys are an error.
  Derived fields are not updated: override before `load_config` resolves them."""
  for item in overrides:
    key, sep, text = item.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} is not of the form --config.key=value")
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
      if part not in node or not isinstance(node[part], ConfigDict):
        raise UnknownKeyError(f"override {item!r}: no config section "
                          f"{'.'.join(parents[:i + 1])!r}")
      node = node[part]
    if leaf not in node:
      raise UnknownKeyError(f"override {item!r}: no config key {key!r}; keys here: "
                        f"{sorted(node.keys())}")
    node[leaf] = _parse_value(text, node[leaf], item)
  return cfg


# --- validation -------------------------------------------------------------------------------

def _positive(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _one_of(*names):
  return lambda v: v in names


def _in_range(lo, hi, lo_open=False, hi_open=False):
  def check(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return False
    return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
  return check


_POSITIVE = (_positive, "a positive integer")
_NON_NEGATIVE = (_non_negative, "an integer >= 0")
_POSITIVE_NUMBER = (_in_range(0, float("inf"), lo_open=True), "a number > 0")
_NON_NEGATIVE_NUMBER = (_in_range(0, float("inf")), "a number >= 0")
_DTYPE = (_one_of(*DTYPE_NAMES), f"one of {', '.join(DTYPE_NAMES)}")
_BETA = (_in_range(0, 1, hi_open=True), "a number in [0, 1)")
_MESH_AXIS = (lambda v: _positive(v) or v == -1, "a positive integer or -1 (the rest)")


def _field_rules() -> list[tuple[str, tuple]]:
  """(dotted field, (predicate, what is expected)) for every field a value can be meaningless
  for; a field a config does not have is skipped. Names the models and data check themselves
  (templates, remat policies, kernels) come from where they are defined."""
  from hiwin_jax.data.conversation import TEMPLATES
  from hiwin_jax.kernels.adaptive_conv import IMPLS
  from hiwin_jax.models.layers import PRECISIONS, REMAT_POLICIES
  from hiwin_jax.models.llama import ATTENTIONS
  rules = [(f"model.vision.{f}", _POSITIVE) for f in (
      "image_size", "patch_size", "num_channels", "hidden_size", "num_layers", "num_heads",
      "mlp_dim")]
  rules += [(f"model.llm.{f}", _POSITIVE) for f in (
      "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
      "mlp_dim", "max_position_embeddings")]
  rules += [(f"model.llm.{f}", _NON_NEGATIVE) for f in ("bos_token_id", "eos_token_id",
                                                        "pad_token_id")]
  rules += [
      ("model.vision.layer_norm_eps", _POSITIVE_NUMBER),
      ("model.vision.remat", (_one_of(*REMAT_POLICIES), f"one of {', '.join(REMAT_POLICIES)}")),
      ("model.llm.remat", (_one_of(*REMAT_POLICIES), f"one of {', '.join(REMAT_POLICIES)}")),
      ("model.llm.arch", (_one_of("llama", "qwen2"), "llama or qwen2")),
      ("model.llm.attention", (_one_of(*ATTENTIONS), f"one of {', '.join(ATTENTIONS)}")),
      ("model.llm.rms_norm_eps", _POSITIVE_NUMBER),
      ("model.llm.rope_theta", _POSITIVE_NUMBER),
      ("model.projector.grid_size", _POSITIVE),
      ("model.projector.feature_scale_mask", (_one_of(*range(1, 8)), "an integer 1..7 (bits 1/2/4 "
                                              "= levels 1x/2x/4x)")),
      ("model.projector.layout", (_one_of("r1", "r2"), "r1 or r2")),
      ("model.projector.jbu_scale", (_one_of(2, 4, 8), "2, 4 or 8")),
      ("model.projector.conv_impl", (_one_of(*IMPLS), f"one of {', '.join(IMPLS)}")),
      ("model.projector.attention", (_one_of("folded", "official"), "folded or official")),
      ("model.precision.dtype", _DTYPE),
      ("model.precision.param_dtype", _DTYPE),
      ("model.precision.matmul_precision", (_one_of(*PRECISIONS),
                                            f"one of {', '.join(PRECISIONS)}")),
      ("model.max_length", _POSITIVE),
      ("mesh.data", _MESH_AXIS), ("mesh.fsdp", _MESH_AXIS), ("mesh.tensor", _MESH_AXIS),
      ("data.format", (_one_of("json", "array_record"), "json or array_record")),
      ("data.template", (_one_of(*TEMPLATES), f"one of {', '.join(sorted(TEMPLATES))}")),
      ("data.remainder", (_one_of("pad", "drop"), "pad or drop")),
      ("data.workers", _NON_NEGATIVE), ("data.prefetch", _NON_NEGATIVE),
      ("train.num_steps", (lambda v: _positive(v) or v == -1, "a positive integer, or -1 (the "
                           "whole data)")),
      ("train.log_every", _POSITIVE),
      ("train.optimizer.lr", _POSITIVE_NUMBER),
      ("train.optimizer.b1", _BETA), ("train.optimizer.b2", _BETA),
      ("train.optimizer.eps", _POSITIVE_NUMBER),
      ("train.optimizer.weight_decay", _NON_NEGATIVE_NUMBER),
      ("train.optimizer.projector_lr", _NON_NEGATIVE_NUMBER),
      ("train.optimizer.vision_lr", _NON_NEGATIVE_NUMBER),
      ("train.optimizer.grad_clip", _NON_NEGATIVE_NUMBER),
      ("train.optimizer.warmup_ratio", (_in_range(0, 1), "a number in [0, 1]")),
      ("train.optimizer.clip_norm", _POSITIVE_NUMBER),
      ("train.optimizer.clip_steps", _NON_NEGATIVE),
      ("train.optimizer.momentum_decay", _NON_NEGATIVE_NUMBER),
      ("train.vdim_loss.max_pad", _NON_NEGATIVE),
      ("train.vdim_loss.max_zoom", (_in_range(1, float("inf")), "a number >= 1")),
      ("train.vdim_loss.crf_weight", _NON_NEGATIVE_NUMBER),
      ("checkpoint.every", _POSITIVE), ("checkpoint.keep", _POSITIVE),
      ("export.dtype", _DTYPE),
  ]
  rules += [(f"data.{f}", _POSITIVE) for f in (
      "max_slice_nums", "max_length", "seq_multiple", "global_batch_size", "grad_accum", "epochs",
      "image_size")]
  rules += [(f"train.vdim_loss.{f}", _POSITIVE) for f in (
      "n_jitters", "projection_dim", "crf_samples")]
  return rules


def _get(cfg: ConfigDict, path: str):
  node = cfg
  for part in path.split("."):
    if not isinstance(node, ConfigDict) or part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def validate(cfg: ConfigDict, name: str = "config", overrides: Sequence[str] = ()) -> ConfigDict:
  """Refuses values that cannot work (0 or negative sizes, unknown names, ratios out of range,
  shapes that do not divide), before anything is built; returns `cfg`. The error names the
  `--config.` flag that set the value, or the field of config `name`."""
  flags = {item.removeprefix("--").removeprefix("config.").partition("=")[0]: item
           for item in overrides}

  def fail(path: str, expected: str, value=_MISSING):
    value = _get(cfg, path) if value is _MISSING else value
    where = flags.get(path, f"config {name}: {path} = {value!r}")
    raise ConfigError(f"{where}: expected {expected}")

  for path, (check, expected) in _field_rules():
    value = _get(cfg, path)
    if value is not _MISSING and not check(value):
      fail(path, expected)
  for section in ("model.projector.embed_dim", "model.projector.kv_dim",
                  "model.projector.num_heads"):
    value = _get(cfg, section)
    if value is not _MISSING and value is not None and not _positive(value):
      fail(section, "a positive integer, or None (derived from the towers)")
  if "model" in cfg:
    v, llm = cfg.model.vision, cfg.model.llm
    if v.image_size % v.patch_size:
      fail("model.vision.image_size", f"a multiple of model.vision.patch_size ({v.patch_size})")
    if v.hidden_size % v.num_heads:
      fail("model.vision.num_heads", f"a divisor of model.vision.hidden_size ({v.hidden_size})")
    if llm.num_heads % llm.num_kv_heads:
      fail("model.llm.num_kv_heads", f"a divisor of model.llm.num_heads ({llm.num_heads})")
  if "mesh" in cfg and [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
    fail("mesh.fsdp", "at most one of mesh.data, mesh.fsdp, mesh.tensor set to -1")
  return cfg


def load_config(name: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """The finished config: `get_config()` of the file, the overrides, validated, the derived
  fields."""
  cfg = validate(apply_overrides(from_file(name), overrides), name, overrides)
  if "model" in cfg:
    resolve_model(cfg.model)
  return cfg
