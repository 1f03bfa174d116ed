"""The LLaVA-UHD v2 vision path at real size on one 1008x672 image: JAX (`LlavaUHD.encode_images`)
vs a PyTorch implementation that runs it item by item as the official code does.

  python -m benchmarks.vision_path                 # both cases, each in its own process, a table
  python -m benchmarks.vision_path --only jax --repeats 3
  python -m benchmarks.vision_path --small         # reduced widths and depth, for debugging

Workload (fp32, random weights, inference): a random 1008x672 RGB image through our slicer
(`hiwin_jax.data.slicing.slice_image`, eval max_slice_nums=9, no pre-resize): 6 slices of 336x336
(3x2 grid, 24x24 patches each) and a 406x266 overview (19x29 patches), CLIP-normalised. Then
CLIP ViT-L/14-336 (24 layers, width 1024, output of layer 23) -> VDIM JBU 4x stack (C = 1024;
levels 1x, 2x, 4x) -> Hiwin (E = 4096, 32 heads, 12x12 query grid, 4 query sets,
feature_scale_mask 7) -> 7 x 144 tokens of width 4096.

Cases:
  jax    `LlavaUHD(vicuna7b config, fp32).encode_images(buckets)` on the buckets of
         `hiwin_jax.data.buckets.pack_items` with the default bucket set: the 6 slices go into the
         24x24 bucket padded to 8 slots (slot counts are powers of two), the overview into the
         20x40 canvas (1 slot). The LLM is a 1-layer, 32-word stand-in (encode_images never
         touches it; projector width and heads are set explicitly to the 7B values). One jitted
         program, compiled ahead of the timed runs (compile time reported separately).
  torch  The official computation in PyTorch, from tests/reference/ (`llava_uhd.item_features`):
         items with the same patch grid batched together (the 6 slices as one group, the
         overview alone), per group: transformers' `CLIPVisionModel` (all 24 layers,
         `hidden_states[-2][:, 1:]`, bicubic-resized position embeddings via
         `interpolate_pos_encoding` for the 19x29 grid; default attention implementation;
         `clip.hf_features`), the JBU 4x stack `jbu.JBU4xStack(conv="shift")` (the memory-lean
         49-shifted-slice adaptive conv; feat2x and feat4x with the fix-up), and the Hiwin keys
         and values of `hiwin.Hiwin`: per level Linear(1024->E) + LayerNorm + bicubic position
         table + level embedding, RoIAlign on the 12x12 windows (torchvision's sampling rule on
         the official bf16-rounded boxes, applied as two einsums with per-axis weights); then all
         items' keys/values zero-padded to L_max with a key padding mask and one
         `nn.MultiheadAttention(E, 32)` (batch_first=False, need_weights left at True) called
         once per query set (4 calls, each re-projecting the keys and values, as the official
         `query_with_parallel_attn` does), ln_proj, cat_proj, ln_post, @ proj.

Time: median of `--repeats` runs after one warm-up. Peak memory: resident high-water mark of the
timed runs (weights, inputs, activations, framework; see harness.py).

FLOPs (a multiply-add counts 2):
  vision, JAX   XLA's cost analysis of the compiled program (`jax.jit(f).lower(...).compile()
                .cost_analysis()["flops"]`): all ops (matmuls and elementwise), as compiled, i.e.
                including the bucket padding (8 slots for 6 slices, a 20x40 canvas for 19x29, 12
                RoIAlign slots per window and level). XLA counts a while loop's body once, so the
                scanned ViT encoder (one loop per bucket) is corrected by adding (layers run - 1)
                x the cost analysis of one `ClipEncoderLayer` compiled at that bucket's shapes.
  vision, torch `torch.utils.flop_counter.FlopCounterMode` over the warm-up run: matmuls,
                convolutions and attention only (no elementwise ops), no padding.
  LLM prefill   Vicuna-7B (L = 32 layers, d = 4096, d_ff = 11008, V = 32000) on
                S = image tokens + prompt tokens, with the image tokens of the R1 layout for a
                3x2 grid, 12*2*(12*3+1) + 1 + 144 = 1033, and a typical `--prompt-tokens` = 60:
                  F_prefill = 2 * P * S + 4 * L * S^2 * d
                P = L * (4 d^2 + 3 d d_ff) + d V = 6.61e9 parameters used as matmul weights
                (attention q/k/v/o and SwiGLU MLP of every layer, plus the LM head on every
                position, as transformers computes all logits; the embedding table is a lookup);
                4 L S^2 d = q.k^T and probs.v over the full S x S score matrix, as eager
                attention computes it (a causal kernel would do half).
  full inference = vision (JAX count) + LLM prefill, compared with the paper's 17.5 TFLOPs per
                1008x672 image (the main comparison table of the LLaVA-UHD v2 paper,
                arXiv:2412.13871). The few decoded answer tokens (2 * P per token) are left out.
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
MAX_SLICE_NUMS = 9          # evaluation (spec §1.1); 7 at training gives the same 3x2 grid here
PAPER_TFLOPS = 17.5
CASES = ["jax", "torch"]

# Real dimensions and the reduced ones of --small (same image geometry, narrower and shallower).
FULL = dict(vision_width=1024, vision_layers=24, vision_heads=16, vision_mlp=4096, embed=4096,
            heads=32)
SMALL = dict(vision_width=64, vision_layers=3, vision_heads=4, vision_mlp=256, embed=256, heads=2)


def image_items():
  """The slicer's output for a random 1008x672 image: (plan, [6 slices..., overview]) as
  CLIP-normalised float32 [H, W, 3] arrays, slices row-major first (the official order)."""
  import numpy as np
  from PIL import Image
  from hiwin_jax.data import image, slicing
  pixels = np.random.default_rng(0).integers(0, 256, (IMAGE_WH[1], IMAGE_WH[0], 3), np.uint8)
  res = slicing.slice_image(Image.fromarray(pixels), MAX_SLICE_NUMS)
  items = [image.clip_normalize(s) for s in res.slices] + [image.clip_normalize(res.overview)]
  return res.plan, items


# --- JAX -------------------------------------------------------------------------------------

def model_config(dims: dict):
  """The 7B config (`configs/vicuna7b.py`) in fp32, widths from `dims`, a tiny stand-in LLM."""
  from hiwin_jax import config as C
  cfg = C.from_file("vicuna7b")
  m = cfg.model
  m.precision.dtype = "float32"
  m.vision.remat = m.llm.remat = "none"  # inference: no backward pass, remat would be a no-op
  m.vision.update(hidden_size=dims["vision_width"], num_layers=dims["vision_layers"],
                  num_heads=dims["vision_heads"], mlp_dim=dims["vision_mlp"])
  # encode_images never touches the LLM: keep the projector at the LLM's width and heads, and
  # make the LLM a 1-layer, 32-word stand-in so that its weights cost nothing.
  m.projector.embed_dim, m.projector.num_heads = dims["embed"], dims["heads"]
  m.llm.update(vocab_size=32, hidden_size=64, num_layers=1, num_heads=1, num_kv_heads=1,
               head_dim=64, mlp_dim=64)
  C.resolve_model(m)  # kv_dim follows the ViT width set above
  return cfg


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def vit_scan_correction(cfg, precision, buckets) -> float:
  """FLOPs XLA leaves out of the scanned ViT: its cost analysis counts a while loop's body once,
  so add (layers run - 1) x one encoder layer at each bucket's shapes (compiled abstractly)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from hiwin_jax.models.clip_vit import ClipEncoderLayer, select_index
  v = cfg.model.vision
  run = select_index(v.select_layer, v.num_layers)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: ClipEncoderLayer(v, precision, rngs=nnx.Rngs(0))))
  layer = jax.jit(lambda st, x, bias: nnx.merge(graphdef, st)(x, bias))
  max_patches = (v.image_size // v.patch_size) ** 2
  extra = 0.0
  for b in buckets:
    n, hp, wp, _ = b["pixels"].shape
    t = 1 + min((hp // v.patch_size) * (wp // v.patch_size), max_patches)
    x = jax.ShapeDtypeStruct((n, t, v.hidden_size), precision.dtype)
    bias = jax.ShapeDtypeStruct((n, 1, 1, t), jnp.float32)
    extra += (run - 1) * _xla_flops(layer.lower(state, x, bias).compile())
  return extra


def run_jax(dims: dict, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from hiwin_jax.data import buckets as B
  from hiwin_jax.models.layers import Precision
  from hiwin_jax.models.llava_uhd import LlavaUHD

  cfg = model_config(dims)
  precision = Precision.from_config(cfg.model.precision)
  make = lambda: LlavaUHD(cfg.model, precision, rngs=nnx.Rngs(0))
  graphdef, state = jit_init(make)
  _, items = image_items()
  packed = B.pack_items(items, B.default_buckets())
  buckets = tuple({k: jnp.asarray(v) for k, v in b.items()} for b in packed.buckets)

  def encode(state, buckets):
    return nnx.merge(graphdef, state).encode_images(buckets)

  t0 = time.perf_counter()
  compiled = jax.jit(encode).lower(state, buckets).compile()
  compile_s = time.perf_counter() - t0
  loops = compiled.as_text().count(" while(")
  raw = _xla_flops(compiled)
  flops = raw + vit_scan_correction(cfg, precision, buckets)
  result = measure(lambda: jax.block_until_ready(compiled(state, buckets)), repeats)
  # For reference, the same program's count without bucket padding: one canvas per group of
  # same-sized items, exactly their size (compiled from shapes only, never run).
  exact = []
  for px in items:
    if exact and exact[-1][0] == px.shape:
      exact[-1][1] += 1
    else:
      exact.append([px.shape, 1])
  exact = tuple({"pixels": jax.ShapeDtypeStruct((n, *shape), jnp.float32),
                 "grid": jax.ShapeDtypeStruct((n, 2), jnp.int32)} for shape, n in exact)
  flops_exact = (_xla_flops(jax.jit(encode).lower(state, exact).compile())
                 + vit_scan_correction(cfg, precision, exact))
  shapes = [f"{tuple(b['pixels'].shape)}" for b in buckets]
  return {**result, "flops": flops, "flops_uncorrected": raw, "flops_exact": flops_exact,
          "while_loops": loops, "compile_s": compile_s, "buckets": shapes}


# --- PyTorch ---------------------------------------------------------------------------------

def run_torch(dims: dict, repeats: int) -> dict:
  import torch
  import transformers
  from torch.utils import flop_counter

  from tests.reference import clip as clip_ref
  from tests.reference.hiwin import Hiwin
  from tests.reference.jbu import JBU4xStack
  from tests.reference.llava_uhd import item_features

  torch.manual_seed(0)
  c = dims["vision_width"]
  clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=c, intermediate_size=dims["vision_mlp"], num_hidden_layers=dims["vision_layers"],
      num_attention_heads=dims["vision_heads"], image_size=336, patch_size=14,
      hidden_act="quick_gelu")).eval()
  jbu = JBU4xStack(c, conv="shift").eval()
  hiwin = Hiwin(c, dims["embed"], dims["heads"]).eval()
  for model in (clip, jbu, hiwin):
    model.requires_grad_(False)  # inference (and FlopCounterMode hooks tensors needing grad)

  _, items = image_items()
  groups = []  # consecutive items with the same patch grid, batched (official grouping)
  for px in items:
    t = torch.from_numpy(px).permute(2, 0, 1)[None]
    if groups and groups[-1].shape[-2:] == t.shape[-2:]:
      groups[-1] = torch.cat([groups[-1], t])
    else:
      groups.append(t)

  def forward():
    return item_features(lambda px: clip_ref.hf_features(clip, px), jbu, hiwin, groups)

  # The CPU flash-attention op that sdpa dispatches to has no formula in the counter.
  cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
  if cpu_sdpa is not None and cpu_sdpa not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(cpu_sdpa)
    def _(query, key, value, *args, out_shape=None, **kwargs):
      return flop_counter.sdpa_flop_count(query, key, value)
  counter = flop_counter.FlopCounterMode(display=False)
  first = [True]

  def step():
    if first[0]:  # the warm-up run (not timed) counts the FLOPs
      first[0] = False
      with counter:
        return forward()
    return forward()

  with torch.inference_mode():
    result = measure(step, repeats)
  return {**result, "flops": float(counter.get_total_flops()),
          "groups": [str(tuple(g.shape)) for g in groups]}


# --- FLOPs of the LLM and the report ---------------------------------------------------------

def llm_prefill_flops(seq_len: int) -> tuple[float, float]:
  """(F_prefill, P) of Vicuna-7B on seq_len tokens (formula in the module docstring)."""
  from hiwin_jax import config as C
  llm = C.load_config("vicuna7b").model.llm
  d, layers, d_ff, vocab = llm.hidden_size, llm.num_layers, llm.mlp_dim, llm.vocab_size
  params = layers * (4 * d * d + 3 * d * d_ff) + d * vocab
  return 2 * params * seq_len + 4 * layers * seq_len ** 2 * d, params


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--only", choices=CASES)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--small", action="store_true", help="reduced widths and depth, for debugging")
  p.add_argument("--prompt-tokens", type=int, default=60, help="text tokens besides the image")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  dims = SMALL if args.small else FULL
  if args.child:
    return report_child(args.only, (run_jax if args.only == "jax" else run_torch)(dims,
                                                                                  args.repeats))

  from hiwin_jax.data import layout, slicing
  plan = slicing.plan_slices(*IMAGE_WH, MAX_SLICE_NUMS)
  tokens = layout.TokenLayout.from_config(model_config(dims).model.projector)
  image_tokens = layout.image_token_count(plan.grid, tokens)
  print(f"image {IMAGE_WH[0]}x{IMAGE_WH[1]}: {plan.num_slices} slices of "
        f"{plan.slice_size[0]}x{plan.slice_size[1]} (grid {plan.grid[0]}x{plan.grid[1]}, "
        f"{plan.slice_patches[0]}x{plan.slice_patches[1]} patches) + a "
        f"{plan.overview_size[0]}x{plan.overview_size[1]} overview "
        f"({plan.overview_patches[0]}x{plan.overview_patches[1]} patches); "
        f"{'REDUCED widths (--small): ' if args.small else ''}ViT width {dims['vision_width']}, "
        f"{dims['vision_layers']} layers; Hiwin E={dims['embed']}, {dims['heads']} heads; fp32")
  rows = run_children(module_name(__file__), [args.only] if args.only else CASES,
                      ["--repeats", str(args.repeats)] + (["--small"] if args.small else []))
  print_table(rows, args.repeats)
  jx, pt = rows.get("jax", {}), rows.get("torch", {})
  if jx.get("seconds"):
    print(f"jax: compile {jx['compile_s']:.1f} s (not in the time); buckets (pixels) "
          f"{', '.join(jx['buckets'])}")
  if pt.get("seconds"):
    print(f"torch: groups (pixels) {', '.join(pt['groups'])}")
  if jx.get("seconds") and pt.get("seconds"):
    ratio = jx["seconds"] / pt["seconds"]
    print(f"JAX time / PyTorch time = {ratio:.2f} (target <= 0.70: "
          f"{'met' if ratio <= 0.7 else 'NOT met'})")

  seq = image_tokens + args.prompt_tokens
  llm, params = llm_prefill_flops(seq)
  line = lambda label, flops, note="": print(f"  {label:<52}{flops / 1e12:8.3f} T  {note}")
  print(f"\nFLOPs of one inference (multiply-add = 2)"
        f"{'; vision at REDUCED widths' if args.small else ''}")
  vision = []
  if jx.get("flops"):
    line("vision, JAX: XLA cost analysis, as compiled", jx["flops"],
         f"(uncorrected for the ViT scan: {jx['flops_uncorrected'] / 1e12:.3f} T; "
         f"{jx['while_loops']} while loops)")
    vision.append(("JAX vision as compiled", jx["flops"]))
  if jx.get("flops_exact"):
    line("vision, JAX: same program, unpadded canvases", jx["flops_exact"])
    vision.append(("JAX vision, no padding", jx["flops_exact"]))
  if pt.get("flops"):
    line("vision, PyTorch: FlopCounterMode (matmul/conv/attn)", pt["flops"])
    vision.append(("PyTorch vision", pt["flops"]))
  line(f"LLM prefill, Vicuna-7B, S = {image_tokens} + {args.prompt_tokens} = {seq}", llm,
       f"(2 * {params / 1e9:.3f}e9 * S + 4 * 32 * S^2 * 4096)")
  for label, flops in vision:
    total = flops + llm
    line(f"full inference = {label} + prefill", total,
         f"= {total / 1e12 / PAPER_TFLOPS:.2f} x the paper's {PAPER_TFLOPS} T")

if __name__ == "__main__":
  main()
