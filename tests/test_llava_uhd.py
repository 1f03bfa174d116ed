"""The whole tiny LLaVA-UHD v2 (configs/tiny.py, fp32) against a PyTorch composition of the
official flow, end to end: real photos -> host pipeline -> logits.

One official-layout state dict (random tensors under the official key names, level embeddings and
biases nonzero) is loaded into our model through the converter and, key by key, into the PyTorch
pieces of tests/reference/: transformers' `CLIPVisionModel` (run by `clip.vit_features`: each item
at its own grid, bicubic-resized positions), the JBU re-derivation `jbu.JBU4xStack` (NCHW, each
item at its exact size), the Hiwin re-derivation `hiwin.Hiwin` (`nn.MultiheadAttention`,
torchvision-style RoIAlign), composed by `llava_uhd.item_features` with every item its own group,
and `transformers.LlamaForCausalLM` (eager attention). The token organisation of spec §5 (R1: the
slices' global 12x12 grid with "\\n" after every row, then `ind_tokens[0]`, then the overview; R2:
slice, separator, ..., overview) and the splice of §6.3 are `llava_uhd.image_embeddings` and
`llava_uhd.splice`, item by item, with no canvases.

Our side gets the same photos through the host pipeline (`slice_image`, `clip_normalize`,
`image_layout`, `splice`, `make_batch` with the default buckets), so one batch holds items of
several shape buckets, padded slots and right-padded rows.
"""

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hiwin_jax import config as C
from hiwin_jax import weights
from hiwin_jax.convert import core
from hiwin_jax.convert import llava_uhd
from hiwin_jax.data import buckets as B
from hiwin_jax.data import layout as LY
from hiwin_jax.data import slicing
from hiwin_jax.data.image import clip_normalize
from hiwin_jax.infer.generate import GenerationConfig, generate
from hiwin_jax.models.layers import Precision
from hiwin_jax.models.llava_uhd import LlavaUHD
from tests.numerics import max_rel_err

torch = pytest.importorskip("torch")
skdata = pytest.importorskip("skimage.data")

from tests.reference import clip as clip_ref  # noqa: E402  (after the torch skip)
from tests.reference import hiwin as hiwin_ref  # noqa: E402
from tests.reference import jbu as jbu_ref  # noqa: E402
from tests.reference import llava_uhd as llava_ref  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

TOL = 1e-4
SEQ_LEN = 672           # static batch length (every sample is shorter: right padding)
MAX_SLICE_NUMS = slicing.TRAIN_MAX_SLICE_NUMS  # 7
NEW_TOKENS = 4


# --- weights -----------------------------------------------------------------------------------

def random_params(targets, seed=0):
  """Random numpy arrays for every parameter of our model (our layout), at sizes that keep every
  stage's activations O(1): kernels ~ N(0, 1/fan_in), norm scales ~ 1 +- 0.2, biases, tables,
  queries and the level embeddings nonzero, JBU temperature and sigma away from their inits."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, (shape, dtype) in targets.items():
    name = key.rsplit(".", 1)[-1]
    if name == "range_temp":
      value = rng.uniform(0.3, 1.0, shape)
    elif name == "sigma_spatial":
      value = rng.uniform(0.6, 0.9, shape)
    elif name == "scale":
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif key == "vision.patch_embedding":
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == "kernel" or key == "projector.proj":
      value = rng.standard_normal(shape) / np.sqrt(shape[-2])
      if "range_proj_0" in key:
        value = 2 * value  # a range kernel far from uniform
    elif name == "bias":
      value = 0.1 * rng.standard_normal(shape)
    else:  # embeddings, position tables, queries, class and level embeddings
      value = 0.5 * rng.standard_normal(shape)
    out[key] = np.asarray(value, dtype)
  return out


def load_torch(module, tensors):
  """load_state_dict from numpy, strict except for non-persistent-like buffers."""
  missing, unexpected = module.load_state_dict(
      {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, strict=False)
  assert not unexpected, unexpected
  assert all("position_ids" in k or "rotary" in k for k in missing), missing
  return module.eval()


def build(cfg):
  """(cfg.model, official state dict, our model, torch pieces) for the model config `cfg`; the
  LLM is transformers' `LlamaForCausalLM` or `Qwen2ForCausalLM` as `cfg.llm.arch` says."""
  import transformers
  proj = cfg.projector
  model = nnx.eval_shape(lambda: LlavaUHD(cfg, Precision.parity(), rngs=nnx.Rngs(0)))
  targets = weights.param_targets(model)
  state = dict(llava_uhd.official_tensors(random_params(targets), cfg))
  assert all(k.startswith(("model.", "lm_head.")) for k in state)

  # Ours: the official state dict through the converter into the abstract model.
  weights.load_params(model, core.to_ours(llava_uhd.llava_table(cfg), core.DictSource(state),
                                          targets))

  # PyTorch: each piece from its own official keys.
  v, m = cfg.vision, cfg.llm
  clip = transformers.CLIPVisionModel._from_config(
      transformers.CLIPVisionConfig(
          hidden_size=v.hidden_size, intermediate_size=v.mlp_dim, num_hidden_layers=v.num_layers,
          num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
          hidden_act="quick_gelu", layer_norm_eps=v.layer_norm_eps),
      attn_implementation="eager", dtype=torch.float32)
  # transformers 5's CLIPVisionModel.state_dict() has no `vision_model.` prefix.
  load_torch(clip, {k[len(llava_uhd.VISION):]: t for k, t in state.items()
                    if k.startswith(llava_uhd.VISION)})
  lm, lm_config = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if m.arch == "llama"
                   else (transformers.Qwen2ForCausalLM, transformers.Qwen2Config))
  llama = lm._from_config(
      lm_config(
          vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.mlp_dim,
          num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
          num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, rms_norm_eps=m.rms_norm_eps,
          rope_theta=m.rope_theta, max_position_embeddings=m.max_position_embeddings,
          tie_word_embeddings=False),
      attn_implementation="eager", dtype=torch.float32)
  load_torch(llama, {k: t for k, t in state.items()
                     if not k.startswith(("model.vision_tower.", llava_uhd.PROJ))})
  jbu = load_torch(jbu_ref.JBU4xStack(v.hidden_size), {
      k[len(llava_uhd.JBU):]: t for k, t in state.items() if k.startswith(llava_uhd.JBU)})
  scales = tuple(s for s in (1, 2, 4) if proj.feature_scale_mask & s)
  hiwin = hiwin_ref.Hiwin(proj.kv_dim, proj.embed_dim, proj.num_heads, scales)
  own = hiwin.state_dict()
  load_torch(hiwin, {k[len(llava_uhd.PROJ):]: t for k, t in state.items()
                     if k.startswith(llava_uhd.PROJ) and k[len(llava_uhd.PROJ):] in own})
  n_layers = v.select_layer if v.select_layer >= 0 else v.num_layers + 1 + v.select_layer
  pieces = dict(vit=lambda px: clip_ref.vit_features(clip, px, n_layers), llama=llama, jbu=jbu,
                hiwin=hiwin)
  return cfg, state, model, pieces


@pytest.fixture(scope="module")
def setup():
  cfg = C.load_config("tiny").model
  assert cfg.projector.layout == "r1" and cfg.llm.arch == "llama"
  return build(cfg)


# --- inputs ------------------------------------------------------------------------------------

def photos():
  """name -> PIL image: coffee 600x400 (2x1 slices), astronaut at 300x420 (1x2 slices: one
  slice column, so ind_tokens[0] is "\\n"), chelsea at 240x160 (not sliced, overview upscaled)."""
  astronaut = Image.fromarray(skdata.astronaut()).resize((300, 420), Image.Resampling.BICUBIC)
  chelsea = Image.fromarray(skdata.chelsea()).resize((240, 160), Image.Resampling.BICUBIC)
  return {"coffee": Image.fromarray(skdata.coffee()), "astronaut": astronaut, "chelsea": chelsea}


def text(rng, n):
  return list(rng.integers(20, 500, n))


LOGIT_SAMPLES = (("coffee",), ("astronaut", "chelsea"), ())  # one image; two; text only
GENERATE_SAMPLES = (("chelsea",), ())


def raw_samples(groups=LOGIT_SAMPLES):
  """(input ids with IMAGE_TOKEN_INDEX placeholders, labels, image names) per sample: a prompt
  (labels -100) holding the sample's images, then a supervised answer ending in EOS (2)."""
  out = []
  for k, names in enumerate(groups):
    rng = np.random.default_rng(5 + k)
    ids, labels = [1] + text(rng, 3), [LY.IGNORE_INDEX] * 4
    for name in names:
      ids += [LY.IMAGE_TOKEN_INDEX] + text(rng, 4)
      labels += [LY.IGNORE_INDEX] * 5
    answer = text(rng, 6) + [2]
    out.append((np.array(ids + answer), np.array(labels + answer), names))
  return out


@pytest.fixture(scope="module")
def sliced():
  """name -> SliceResult (max_slice_nums = 7, the training setting)."""
  return {name: slicing.slice_image(im, MAX_SLICE_NUMS) for name, im in photos().items()}


def host_batch(cfg, sliced, layout, groups=LOGIT_SAMPLES, seq_len=SEQ_LEN, raw=None):
  """Our host pipeline: layout spans, splice, per-sample items (slices, then the overview),
  make_batch over the default buckets. raw: samples as `raw_samples` gives them (its default)."""
  proj = cfg.projector
  tokens = LY.TokenLayout(layout, proj.grid_size, proj.newline_token, proj.comma_token)
  samples = []
  for ids, labels, names in raw or raw_samples(groups):
    spans = [LY.image_layout(sliced[n].grid, tokens) for n in names]
    seq = LY.splice(ids, labels, spans, max_length=cfg.max_length)
    items = [clip_normalize(p) for n in names for p in sliced[n].slices + [sliced[n].overview]]
    samples.append((seq, items))
  return B.make_batch(samples, B.default_buckets(), seq_len,
                       tokens_per_item=tokens.tokens_per_item)


# --- the PyTorch composition (official flow, item by item) -------------------------------------

def torch_image_tokens(pieces, result):
  """One image's Hiwin outputs (n_slices + 1, 144, E): slices row-major, then the overview; each
  item through the ViT, the JBU and the Hiwin reference at its own size."""
  groups = [torch.from_numpy(clip_normalize(im).transpose(2, 0, 1)[None].copy())
            for im in result.slices + [result.overview]]                # [1, 3, 14h, 14w] each
  with torch.no_grad():
    return llava_ref.item_features(pieces["vit"], pieces["jbu"], pieces["hiwin"], groups)


def organise(tokens, result, layout, emb, newline, comma):
  """Spec §5: the embeddings that replace `<image>`. `tokens` (n + 1, 144, E)."""
  # The slicer's `ind_tokens` (spec §1.3), with the tiny vocab's ids for "\n" and ",".
  ind = [] if result.grid is None else [newline if x == result.grid[0] - 1 else comma
                                        for _ in range(result.grid[1])
                                        for x in range(result.grid[0])]
  return llava_ref.image_embeddings(tokens, result.grid, ind, layout, newline, emb)


def torch_sequence(cfg, pieces, image_tokens, sliced, sample, layout):
  """§6.3 for one sample: the text pieces (split at every <image>) embedded with embed_tokens,
  interleaved with the §5 image spans, truncated to max_length -> (embeddings [n, E], labels [n],
  length of each image span)."""
  ids, labels, names = sample
  embed = pieces["llama"].model.embed_tokens
  emb = lambda token: embed(torch.tensor([token]))[0]
  proj = cfg.projector
  with torch.no_grad():
    spans = [organise(image_tokens[n], sliced[n], layout, emb, proj.newline_token,
                      proj.comma_token) for n in names]
    seq, lab = llava_ref.splice(embed, ids, labels, spans, cfg.max_length)
  return seq, lab, [len(span) for span in spans]


def torch_reference(cfg, pieces, image_tokens, sliced, layout, groups=LOGIT_SAMPLES, raw=None):
  """All samples right-padded with zero vectors to the longest, attention_mask, position_ids =
  arange, LlamaForCausalLM(inputs_embeds=...) -> (logits per sample [n_i, V], labels per sample,
  image span lengths per sample)."""
  seqs, labels, spans = zip(*[torch_sequence(cfg, pieces, image_tokens, sliced, sample, layout)
                              for sample in raw or raw_samples(groups)])
  longest = max(len(s) for s in seqs)
  embeds = torch.zeros(len(seqs), longest, seqs[0].shape[-1])
  mask = torch.zeros(len(seqs), longest, dtype=torch.long)
  for i, s in enumerate(seqs):
    embeds[i, :len(s)], mask[i, :len(s)] = s, 1
  with torch.no_grad():
    logits = pieces["llama"](inputs_embeds=embeds, attention_mask=mask,
                             position_ids=torch.arange(longest)[None].expand(len(seqs), -1)).logits
  return [logits[i, :len(s)].numpy() for i, s in enumerate(seqs)], labels, spans


@pytest.fixture(scope="module")
def image_tokens(setup, sliced):
  _, _, _, pieces = setup
  return {name: torch_image_tokens(pieces, r) for name, r in sliced.items()}


@nnx.jit
def forward(model, batch):
  return model(batch)[0]


def real(batch):
  """Real (unpadded) length of each row."""
  return [int(m.sum()) for m in batch["attention_mask"]]


# --- tests -------------------------------------------------------------------------------------

def test_slicing_of_the_photos(sliced):
  assert sliced["coffee"].grid == (2, 1) and sliced["astronaut"].grid == (1, 2)
  assert sliced["chelsea"].grid is None
  # Items land in several buckets (and padded slots).
  grids = {n: [(p.height // 14, p.width // 14) for p in r.slices + [r.overview]]
           for n, r in sliced.items()}
  which = {B.assign_bucket(h, w, B.default_buckets()) for g in grids.values() for h, w in g}
  assert len(which) >= 2, grids


@pytest.mark.parametrize("layout", ["r1", "r2"])
def test_logits_match_torch_composition(setup, sliced, image_tokens, layout):
  cfg, _, model, pieces = setup
  batch = host_batch(cfg, sliced, layout)
  assert len(batch["buckets"]) >= 2, "items of several shape buckets"
  assert any((b["grid"] == 0).all(1).any() for b in batch["buckets"]), "an empty slot"
  want, want_labels, spans = torch_reference(cfg, pieces, image_tokens, sliced, layout)
  lengths = real(batch)
  assert lengths == [len(w) for w in want] and max(lengths) < SEQ_LEN

  # Image spans: the spec's counts, the slicer's count, labels -100 (separators included).
  for (ids, _, names), lens in zip(raw_samples(), spans):
    for name, n in zip(names, lens):
      plan = sliced[name].plan
      if plan.grid is None:
        want_n = 144
      else:
        cols, rows = plan.grid
        want_n = (12 * rows * (12 * cols + 1) + 1 + 144 if layout == "r1"
                  else 145 * cols * rows + 144)
      tokens = LY.TokenLayout(layout, cfg.projector.grid_size, cfg.projector.newline_token,
                              cfg.projector.comma_token)
      ours = len(LY.image_layout(plan.grid, tokens))
      assert n == want_n == ours == LY.image_token_count(plan.grid, tokens), (name, layout)
  for i, lab in enumerate(want_labels):
    np.testing.assert_array_equal(batch["labels"][i, :lengths[i]], lab, err_msg=f"sample {i}")
    assert (batch["labels"][i, lengths[i]:] == LY.IGNORE_INDEX).all()
    image_positions = batch["image_token"][i, :lengths[i]] >= 0
    assert (batch["labels"][i, :lengths[i]][image_positions] == LY.IGNORE_INDEX).all()
    assert image_positions.sum() == 144 * sum(len(sliced[n].slices) + 1
                                              for n in raw_samples()[i][2])

  got = np.asarray(forward(model, batch))
  worst = 0.0
  for i, w in enumerate(want):
    err, where = max_rel_err(got[i, :lengths[i]], w)
    print(f"{layout} sample {i} ({lengths[i]} positions): max rel logit error {err:.2e} at {where}")
    worst = max(worst, err)
    assert err <= TOL, f"{layout} sample {i}: max relative logit error {err:.3e} at {where}"
  print(f"{layout}: max relative logit error over the batch {worst:.2e}")


def test_generate_matches_full_recompute(setup, sliced, image_tokens):
  """Greedy decoding with the KV cache (`infer.generate`: jit, rows of different lengths
  right-padded, an image in the prompt) == greedy decoding by a full forward of the PyTorch
  composition per new token.

  A one-bucket batch keeps the extra compilation small; the recompute runs the torch reference
  (no cache), whose logits agree with ours to ~1e-6 relative, far below the top-2 margins."""
  cfg, _, model, pieces = setup
  batch = host_batch(cfg, sliced, "r1", GENERATE_SAMPLES, seq_len=192)
  lengths = real(batch)

  # No EOS: every row decodes all NEW_TOKENS tokens.
  gen = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_id=None)
  tokens = np.asarray(nnx.jit(lambda m, b: generate(m, b, gen).tokens)(model, batch))
  assert tokens.shape == (len(lengths), NEW_TOKENS)

  llama = pieces["llama"]
  expected, margin = [], np.inf
  for i, sample in enumerate(raw_samples(GENERATE_SAMPLES)):
    seq, _, _ = torch_sequence(cfg, pieces, image_tokens, sliced, sample, "r1")
    assert len(seq) == lengths[i]
    row = []
    with torch.no_grad():
      for _ in range(NEW_TOKENS):
        logits = llama(inputs_embeds=seq[None]).logits[0, -1]
        top2 = torch.topk(logits, 2).values
        margin = min(margin, float((top2[0] - top2[1]) / logits.abs().max()))
        row.append(int(logits.argmax()))
        seq = torch.cat([seq, llama.model.embed_tokens(torch.tensor(row[-1:]))])
    expected.append(row)
  print(f"generated {tokens.tolist()}; smallest relative top-2 logit margin {margin:.2e}")
  assert margin > 1e-3, "a near-tie makes the comparison meaningless: change the seed"
  np.testing.assert_array_equal(tokens, np.array(expected))


# --- R2 with a Qwen2 LLM and the Qwen2 tokenizer ------------------------------------------------

QWEN2_TOL = 1e-5  # issue 15: the Qwen2 release's parity bound (fp32)


@pytest.fixture(scope="module")
def qwen2_setup():
  """The tiny model with a Qwen2-architecture LLM (q/k/v biases, GQA 4/2, RoPE theta 1e6, eps
  1e-6, untied head) over the Qwen2 tokenizer's full vocabulary, R2 layout with levels {1x, 4x}
  (the Qwen2 release's), LLaMA's separator ids 29892 / 13 embedded by Qwen2's table."""
  cfg = C.load_config("qwen2_7b", [
      "--config.model.vision.hidden_size=64", "--config.model.vision.num_layers=3",
      "--config.model.vision.num_heads=4", "--config.model.vision.mlp_dim=128",
      "--config.model.llm.hidden_size=64", "--config.model.llm.num_layers=2",
      "--config.model.llm.num_heads=4", "--config.model.llm.num_kv_heads=2",
      "--config.model.llm.head_dim=16", "--config.model.llm.mlp_dim=128",
      "--config.model.llm.vocab_size=151936", "--config.model.llm.max_position_embeddings=2048",
      "--config.model.projector.embed_dim=64", "--config.model.projector.kv_dim=64",
      "--config.model.projector.num_heads=4", "--config.model.precision.dtype=float32",
      "--config.model.max_length=2048"]).model
  assert (cfg.llm.arch, cfg.llm.qkv_bias, cfg.llm.rope_theta) == ("qwen2", True, 1e6)
  assert (cfg.projector.layout, cfg.projector.feature_scale_mask) == ("r2", 5)
  return build(cfg)


def test_r2_logits_with_a_qwen2_llm_and_tokenizer_match_torch(qwen2_setup, sliced, tmp_path):
  """Spec §5-§6 end to end for the Qwen2 release: a chatml sample tokenized by the real Qwen2
  tokenizer (`preprocess` with qwen_1_5), the 2x1-sliced photo in the R2 organisation, our
  batch against the PyTorch composition with `Qwen2ForCausalLM`."""
  from hiwin_jax.data.conversation import preprocess
  from hiwin_jax.data.tokenizer import load_tokenizer
  from tests.reference import qwen_text
  cfg, _, model, pieces = qwen2_setup
  tok = load_tokenizer(qwen_text.unpacked_fixture(tmp_path / "tok"))
  ex = preprocess([{"from": "human", "value": "What is in this cup?\n<image>"},
                   {"from": "gpt", "value": "Coffee with latte art."}], tok, "qwen_1_5", True,
                  variant="r2")
  raw = [(ex.input_ids.astype(np.int64), ex.labels.astype(np.int64), ("coffee",))]
  assert max(ex.input_ids) > 150_000  # chatml markers: the high end of the vocabulary
  tokens = {"coffee": torch_image_tokens(pieces, sliced["coffee"])}
  want, want_labels, _ = torch_reference(cfg, pieces, tokens, sliced, "r2", raw=raw)
  batch = host_batch(cfg, sliced, "r2", seq_len=480, raw=raw)
  (n,) = real(batch)
  assert n == len(want[0]) == len(ex.input_ids) - 1 + 145 * 2 + 144
  seps = batch["input_ids"][0, :n][batch["image_token"][0, :n] < 0]
  assert 29892 in seps and 13 in seps  # the R2 separators, LLaMA ids in Qwen2's table
  np.testing.assert_array_equal(batch["labels"][0, :n], want_labels[0])
  got = np.asarray(forward(model, batch))[0, :n]
  err, where = max_rel_err(got, want[0])
  print(f"qwen2 r2 ({n} positions): max rel logit error {err:.2e} at {where}")
  assert err <= QWEN2_TOL, f"qwen2 r2: max relative logit error {err:.3e} at {where}"
