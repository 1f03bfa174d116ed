"""Generation speed: prefill of one 1008x672 image + prompt, and greedy decode tokens/s, at batch
1 and 8; JAX (`hiwin_jax.infer.generate`) vs PyTorch (transformers' CLIPVisionModel + the
PyTorch JBU/Hiwin references of tests/reference/ + transformers' `LlamaForCausalLM`).

  python -m benchmarks.generate                       # tiny config, all cases, a table
  python -m benchmarks.generate --only jax_b1 --repeats 3
  python -m benchmarks.generate --config vicuna7b --only jax_b1 --hbm-gbps 3350   # on a GPU

Workload: a random 1008x672 RGB image through the eval slicer (max_slice_nums 9, no pre-resize:
3x2 slices of 336x336 + a 406x266 overview), `--prompt-tokens` random text ids around the
<image> placeholder, the R1 token layout; the batch repeats that request B times (no padding).
Both sides use the same weights (the JAX model's, random; the PyTorch modules are loaded from
them through the converters' key tables), fp32, greedy decoding, no EOS (every row decodes all its
tokens). N = `--new-tokens`.

Columns (median of `--repeats` timed runs after one untimed warm-up; each case in its own process,
see harness.py):
  prefill (`seconds`)  the whole prompt, vision included, up to a filled KV cache:
      jax    the jitted `generate.prefill` (ViT -> JBU -> Hiwin -> splice -> LLM forward over the
             prompt, returning the last logits and the filled cache).
      torch  `tests.reference.llava_uhd.item_features` on the batch's items (items of the same
             patch grid batched together, all rows of the batch at once: CLIPVisionModel layer -2
             -> JBU 2x, 4x -> Hiwin) + the splice of those tokens into the text embeddings at the
             image positions (`embed_tokens` + a gather) + one `LlamaForCausalLM` forward over
             the prompt with `use_cache=True` (eager attention).
  decode tok/s         B * N / (time of N single-token LLM steps from a prefilled cache); the
             prefill is run untimed before every timed run.
      jax    the jitted `generate.decode` (the greedy loop of `generate`) with max_new_tokens
             N + 1 on `prefill`'s (logits, cache, lengths): token 0 is the argmax of the prefill
             logits, then N steps (one while loop). Its cache is an input the loop does not own,
             so the time includes one on-device copy of the cache into the loop.
      torch  argmax of the prefill logits, then N calls of `hf(input_ids=<last token>,
             attention_mask=<grown by one>, cache=<DynamicCache>, use_cache=True)` + argmax
             (a Python loop, as `generate` runs it, without its logits processors).
  generate             end to end, N new tokens (prefill + N - 1 decode steps):
      jax    the jitted `generate.generate(max_new_tokens=N)` (vision included).
      torch  the torch prefill's vision + splice, then `hf.generate(inputs_embeds=...,
             do_sample=False, max_new_tokens=min_new_tokens=N)`.
  peak MB              resident high-water mark of the timed `generate` runs (the torch process
             also holds the JAX model, the source of its weights).
Checks, once, untimed. Torch cases: max |torch - jax| / max |jax| of the PyTorch image tokens
against the JAX ones (`LlavaUHD.encode_images`; overall and per item patch grid) and of the
prefill's last-position logits against JAX's `prefill`. Both round the Hiwin window boxes' edges
k * side / 12 to the feature dtype, as the official code does (official-spec §4.4): in this fp32
run not at all. Every case: the first N
tokens of the decode loop equal its `generate` tokens; the parent compares JAX's and PyTorch's
tokens of row 0 per batch.
With `--config vicuna7b` the JAX cases also print the decode bound of reading every LLM parameter
once per step from HBM: LLM bytes / bandwidth (`--hbm-gbps`) per step, and the achieved fraction.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # started as `python benchmarks/<name>.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (jit_init, measure, module_name, print_table, report_child,
                                run_children)

IMAGE_WH = (1008, 672)
CASES = ["jax_b1", "jax_b8", "torch_b1", "torch_b8"]


def build(config, batch: int, prompt_tokens: int):
  """(cfg, model, host batch) for `batch` copies of the 1008x672 request; `config` is a config
  name or a loaded config."""
  import numpy as np
  from flax import nnx
  from PIL import Image

  from hiwin_jax import config as C
  from hiwin_jax.data.tokenizer import IMAGE_TOKEN_INDEX
  from hiwin_jax.infer import requests as R
  from hiwin_jax.models.layers import Precision
  from hiwin_jax.models.llava_uhd import LlavaUHD
  cfg = C.load_config(config) if isinstance(config, str) else config
  model = nnx.merge(*jit_init(lambda: LlavaUHD(cfg.model, Precision.from_config(
      cfg.model.precision), rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (IMAGE_WH[1], IMAGE_WH[0], 3), dtype=np.uint8))
  text = rng.integers(3, cfg.model.llm.vocab_size, prompt_tokens)
  ids = [1, *text[:prompt_tokens // 2], IMAGE_TOKEN_INDEX, *text[prompt_tokens // 2:]]
  prepared = R.prepare_ids(ids, img, cfg.model, pre_resize=False)
  return cfg, model, R.collate([prepared] * batch, cfg.model)


def run_jax(args, batch: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from hiwin_jax.infer import generate as G
  _, model, host = build(args.config, batch, args.prompt_tokens)
  graphdef, state = nnx.split(model)
  data = jax.tree.map(jnp.asarray, host)
  n, s = args.new_tokens, host["input_ids"].shape[1]
  gen = G.GenerationConfig(max_new_tokens=n, eos_token_id=None)
  gen_decode = G.GenerationConfig(max_new_tokens=n + 1, eos_token_id=None)  # argmax + N steps
  # The cache holds the N decode steps' keys: slots [0, s + N).
  prefill = jax.jit(lambda st, b: G.prefill(nnx.merge(graphdef, st), b, s + n))
  decode = jax.jit(lambda st, logits, cache, lengths: G.decode(
      nnx.merge(graphdef, st), logits, cache, lengths, gen_decode).tokens)
  generate = jax.jit(lambda st, b: G.generate(nnx.merge(graphdef, st), b, gen).tokens)
  t = time.perf_counter()
  tokens = np.asarray(jax.block_until_ready(generate(state, data)))
  compile_s = time.perf_counter() - t
  pre = measure(lambda: jax.block_until_ready(prefill(state, data)), args.repeats)
  prefilled = jax.block_until_ready(prefill(state, data))  # untimed; decode does not consume it
  dec = measure(lambda: jax.block_until_ready(decode(state, *prefilled)), args.repeats)
  full = measure(lambda: jax.block_until_ready(generate(state, data)), args.repeats)
  decoded = np.asarray(decode(state, *prefilled))
  out = {"seconds": pre["seconds"], "peak_mb": full["peak_mb"], "generate_s": full["seconds"],
         "decode_s": dec["seconds"], "decode_tok_s": batch * n / dec["seconds"],
         "first_call_s": compile_s, "seq_len": int(s), "device": jax.devices()[0].device_kind,
         "decode_matches_generate": bool(np.array_equal(decoded[:, :n], tokens)),
         "tokens_row0": decoded[0].tolist()}
  params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  llm_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.llm)))
  step_bound = llm_bytes / (args.hbm_gbps * 1e9)
  out.update(params_gb=params_bytes / 1e9, llm_gb=llm_bytes / 1e9,
             hbm_bound_tok_s=batch / step_bound,
             hbm_fraction=out["decode_tok_s"] / (batch / step_bound))
  return out


def torch_vision(cfg, params: dict):
  """(clip, jbu, hiwin): transformers' CLIPVisionModel and the references
  `tests.reference.jbu.JBU4xStack(conv="shift")` and `tests.reference.hiwin.Hiwin`, carrying our
  weights `params` (`weights.model_params`) through the converters' key tables, in eval mode, no
  grad."""
  import numpy as np
  import torch
  import transformers

  from hiwin_jax.convert import core, hf_clip, vdim
  from hiwin_jax.convert.llava_uhd import projector_table
  from tests.reference.hiwin import GRID, Hiwin
  from tests.reference.jbu import JBU4xStack
  m = cfg.model
  proj = m.projector
  if (proj.grid_size, proj.feature_scale_mask, proj.jbu_scale, m.vision.select_layer) != (
      GRID, 7, 4, -2):
    raise ValueError("the PyTorch path is the 12x12-query, 1x/2x/4x, JBU 4x, layer -2 model; "
                     f"config has {proj.grid_size}, mask {proj.feature_scale_mask}, "
                     f"{proj.jbu_scale}x, layer {m.vision.select_layer}")

  def tensors(table):
    return {k: torch.from_numpy(np.array(v)) for k, v in core.to_torch(table, params)}

  hf_cfg = {k: v for k, v in hf_clip.vision_to_hf_config(m.vision).items()
            if k not in ("architectures", "model_type", "dtype")}
  clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**hf_cfg))
  # transformers 5 names CLIPVisionModel's tensors without the `vision_model.` prefix.
  clip.load_state_dict(tensors(hf_clip.clip_table(m.vision, prefix="", ours_prefix="vision.")))
  jbu = JBU4xStack(proj.kv_dim, conv="shift")
  jbu.load_state_dict(tensors(vdim.jbu_table(proj.jbu_scale, prefix="", ours_prefix="jbu.")))
  hiwin = Hiwin(proj.kv_dim, proj.embed_dim, proj.num_heads)
  official = tensors(projector_table(prefix="", ours="projector."))
  hiwin.load_state_dict({k: v for k, v in official.items() if k in hiwin.state_dict()})
  for module in (clip, jbu, hiwin):
    module.eval().requires_grad_(False)
  return clip, jbu, hiwin


def torch_items(host: dict, patch: int, tokens_per_item: int):
  """The batch's items as `tests.reference.llava_uhd.item_features` takes them, and where their
  tokens go.

  -> (groups: one NCHW tensor per patch grid of all items with that grid, in bucket-slot order;
      index [B, S] int64: each position's row in the flattened torch image tokens, -1 for text;
      slots: the JAX flat slot of each torch item, in torch order).
  The index is the JAX `image_token` renumbered from bucket slots to torch item order (host
  bookkeeping done once, like the JAX side's bucket packing)."""
  import numpy as np
  import torch
  by_grid, total = {}, 0
  for b in host["buckets"]:
    for j, (h, w) in enumerate(np.asarray(b["grid"]).tolist()):
      if h and w:  # an empty slot has grid (0, 0)
        by_grid.setdefault((h, w), []).append((total + j, b["pixels"][j, :patch * h, :patch * w]))
    total += len(b["grid"])
  slots = np.array([slot for members in by_grid.values() for slot, _ in members])
  rank = np.full(total, -1, np.int64)
  rank[slots] = np.arange(len(slots))
  tok = np.asarray(host["image_token"]).astype(np.int64)
  item = rank[np.maximum(tok, 0) // tokens_per_item]
  if np.any((tok >= 0) & (item < 0)):
    raise ValueError("an image position points at an empty bucket slot")
  index = np.where(tok >= 0, item * tokens_per_item + np.maximum(tok, 0) % tokens_per_item, -1)
  groups = [torch.from_numpy(np.stack([px for _, px in members])).permute(0, 3, 1, 2).contiguous()
            for members in by_grid.values()]
  return groups, torch.from_numpy(index), slots


def run_torch(args, batch: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from flax import nnx

  from hiwin_jax.convert import core, hf_llama
  from hiwin_jax import weights
  from hiwin_jax.infer import generate as G
  from tests.numerics import max_rel_err
  from tests.reference import clip as clip_ref
  from tests.reference.llava_uhd import item_features
  rel_err = lambda a, b: max_rel_err(a, b)[0]
  torch.set_num_threads(os.cpu_count())
  cfg, model, host = build(args.config, batch, args.prompt_tokens)
  if not np.all(host["attention_mask"]):
    raise ValueError("expected unpadded rows (the last position is every row's prompt end)")
  params = weights.model_params(model)
  clip, jbu, hiwin = torch_vision(cfg, params)
  llm_cfg = cfg.model.llm
  hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_llama.llm_to_hf_config(llm_cfg).items()
                                       if k not in ("architectures", "torch_dtype", "dtype")})
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  llm = {k[len("llm."):]: v for k, v in params.items() if k.startswith("llm.")}
  state = {k: torch.from_numpy(np.array(v))
           for k, v in core.to_torch(hf_llama.llama_table(llm_cfg), llm)}
  hf.load_state_dict(state, strict=False)
  hf.config._attn_implementation = "eager"
  hf.requires_grad_(False)

  grid = int(cfg.model.projector.grid_size)
  patch = int(cfg.model.vision.patch_size)
  groups, index, slots = torch_items(host, patch, grid * grid)
  is_image = (index >= 0)[..., None]
  gather = index.clamp(min=0)
  ids = torch.from_numpy(np.asarray(host["input_ids"]).astype(np.int64))
  mask = torch.from_numpy(np.asarray(host["attention_mask"]).astype(np.int64))
  step_mask = torch.ones((batch, 1), dtype=mask.dtype)
  n, s = args.new_tokens, ids.shape[1]

  def splice(image):
    """Image tokens [items, 144, E] -> the LLM input embeddings [B, S, E]."""
    text = hf.model.embed_tokens(ids)
    return torch.where(is_image, image.reshape(-1, image.shape[-1])[gather], text)

  vit = lambda px: clip_ref.hf_features(clip, px)

  def embeds():
    return splice(item_features(vit, jbu, hiwin, groups))

  def prefill():
    return hf(inputs_embeds=embeds(), attention_mask=mask, use_cache=True)

  def llm_generate(x):
    return hf.generate(inputs_embeds=x, attention_mask=mask, do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, num_beams=1, pad_token_id=0, eos_token_id=None)

  def generate():
    return llm_generate(embeds())

  with torch.inference_mode():
    image = item_features(vit, jbu, hiwin, groups)
    x = splice(image)  # fixed input of the untimed prefills that start each decode run

  def prefilled():
    out = hf(inputs_embeds=x, attention_mask=mask, use_cache=True)
    return out.logits[:, -1], out.cache

  def decode(start):
    logits, cache = start
    tok = logits.argmax(-1, keepdim=True)
    tokens, m = [tok], mask
    for _ in range(n):
      m = torch.cat([m, step_mask], 1)
      out = hf(input_ids=tok, attention_mask=m, cache=cache, use_cache=True)
      cache = out.cache
      tok = out.logits[:, -1].argmax(-1, keepdim=True)
      tokens.append(tok)
    return torch.cat(tokens, 1)

  # Checks, once, untimed: the torch image tokens and prefill logits against JAX's.
  graphdef, jstate = nnx.split(model)
  data = jax.tree.map(jnp.asarray, host)

  def reference(st, b):
    m = nnx.merge(graphdef, st)
    return m.encode_images(b["buckets"]), G.prefill(m, b, s + 1)[0]

  jax_image, jax_logits = map(np.asarray, jax.jit(reference)(jstate, data))
  with torch.inference_mode():
    image = image.numpy()
    start = prefilled()
    logits = start[0].numpy()
    decoded = decode(start).numpy()
    generated = llm_generate(x).numpy()
  per_item = lambda a: a.reshape(-1, grid * grid, a.shape[-1])[slots]
  jax_image = per_item(jax_image)
  by_grid, first = {}, 0
  for g in groups:
    k = f"{g.shape[-2] // patch}x{g.shape[-1] // patch}"
    by_grid[k] = rel_err(image[first:first + len(g)], jax_image[first:first + len(g)])
    first += len(g)

  with torch.inference_mode():
    pre = measure(prefill, args.repeats)
    dec = measure(decode, args.repeats, setup=prefilled)
    full = measure(generate, args.repeats)
  return {"seconds": pre["seconds"], "peak_mb": full["peak_mb"], "generate_s": full["seconds"],
          "decode_s": dec["seconds"], "decode_tok_s": batch * n / dec["seconds"],
          "seq_len": int(s), "image_rel_err": rel_err(image, jax_image),
          "image_rel_err_by_grid": by_grid,
          "logits_rel_err": rel_err(logits, jax_logits),
          "decode_matches_generate": bool(np.array_equal(decoded[:, :n], generated)),
          "tokens_row0": decoded[0].tolist()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="tiny", help="tiny (CPU) or vicuna7b (GPU, random weights)")
  p.add_argument("--only", choices=CASES, default=None)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--prompt-tokens", type=int, default=60)
  p.add_argument("--hbm-gbps", type=float, default=3350.0,
                 help="HBM bandwidth for the decode bound (H100 SXM: 3350)")
  args = p.parse_args()
  if args.child:
    batch = int(args.only.split("_b")[1])
    fn = run_jax if args.only.startswith("jax") else run_torch
    report_child(args.only, fn(args, batch))
    return
  names = [args.only] if args.only else CASES
  extra = ["--config", args.config, "--repeats", str(args.repeats), "--new-tokens",
           str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens), "--hbm-gbps",
           str(args.hbm_gbps)]
  rows = run_children(module_name(__file__), names, extra)
  n = args.new_tokens
  print(f"config {args.config}; 1008x672 image + {args.prompt_tokens} prompt tokens; N = {n}; "
        f"'seconds' = prefill incl. vision; decode = N single-token steps from a prefilled "
        f"cache;\ngenerate = end to end, N new tokens (see the module docstring)")
  print_table(rows, args.repeats)
  for name, r in rows.items():
    if r.get("error"):
      continue
    line = (f"{name:<10} seq {r['seq_len']:>5}  prefill {r['seconds'] * 1e3:8.1f} ms  "
            f"decode {r['decode_tok_s']:8.1f} tok/s ({r['decode_s'] / n * 1e3:6.2f} ms/step)  "
            f"generate {r['generate_s']:7.3f} s  decode==generate "
            f"{'yes' if r['decode_matches_generate'] else 'NO'}")
    if "hbm_bound_tok_s" in r and args.config != "tiny":
      line += (f"  (LLM {r['llm_gb']:.2f} GB; HBM bound {r['hbm_bound_tok_s']:.0f} tok/s at "
               f"{args.hbm_gbps:.0f} GB/s: {100 * r['hbm_fraction']:.1f}%)")
    print(line)
    if "image_rel_err" in r:
      grids = ", ".join(f"{k} {v:.1e}" for k, v in r["image_rel_err_by_grid"].items())
      print(f"{'':<10} vs JAX (max |torch - jax| / max |jax|): image tokens "
            f"{r['image_rel_err']:.1e} (by item grid: {grids}), prefill last logits "
            f"{r['logits_rel_err']:.1e}")
  for b in (1, 8):
    jx, pt = rows.get(f"jax_b{b}", {}), rows.get(f"torch_b{b}", {})
    if jx.get("tokens_row0") and pt.get("tokens_row0"):
      same = jx["tokens_row0"] == pt["tokens_row0"]
      print(f"batch {b}: JAX and PyTorch greedy tokens of row 0 (N + 1 = {n + 1}) "
            f"{'agree' if same else 'DIFFER'}")


if __name__ == "__main__":
  main()
