"""Forward time and peak memory of the two towers, JAX vs transformers (PyTorch), on this machine.

  python -m benchmarks.towers            # all four runs, each in its own process, then a table
  python -m benchmarks.towers --only clip-jax --repeats 3

Workloads (fp32, random weights, inference, no gradients):
  clip: CLIP-ViT-L/14-336 (24 layers, width 1024) on 7 slices of 336x336, output of layer 23
        (what LLaVA-UHD uses; transformers runs all 24 layers and returns hidden_states[-2]);
  llm:  a ~1.1B LLaMA (TinyLlama geometry: 22 layers, width 2048, GQA 32/4, MLP 5632,
        vocab 32000) on 1 x 512 tokens, full logits.
Time is the median of `--repeats` runs after one warm-up (JAX: compiled). Peak memory is the
process's resident high-water mark during the timed runs (weights, inputs, activations and the
framework itself; set-up transients before the warm-up are excluded).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # started as `python benchmarks/<name>.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (jit_init, measure, module_name, print_table, report_child,
                                run_children)

LLM = dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
           head_dim=64, mlp_dim=5632)
SLICES, TOKENS = 7, 512


def run_jax(which, repeats):
  import jax
  from flax import nnx
  from hiwin_jax import config as C
  from hiwin_jax.models.layers import Precision

  if which == "clip":
    from hiwin_jax.models.clip_vit import ClipVisionTower
    make = lambda: ClipVisionTower(C.vision_config(), Precision(), rngs=nnx.Rngs(0))
    inputs = (jax.random.normal(jax.random.key(1), (SLICES, 336, 336, 3)),)
    call = lambda m, px: m(px)[0]
  else:
    from hiwin_jax.models.llama import LlamaModel
    cfg = C.llm_config()
    cfg.update(LLM)
    make = lambda: LlamaModel(cfg, Precision(), rngs=nnx.Rngs(0))
    inputs = (jax.random.randint(jax.random.key(1), (1, TOKENS), 0, LLM["vocab_size"]),)
    call = lambda m, ids: m(ids)[0]
  graphdef, state = jit_init(make)
  fwd = jax.jit(lambda st, *x: call(nnx.merge(graphdef, st), *x))
  return measure(lambda: jax.block_until_ready(fwd(state, *inputs)), repeats)


def run_torch(which, repeats):
  import torch
  import transformers
  torch.manual_seed(0)
  with torch.device("cpu"):
    if which == "clip":
      model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
          hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
          image_size=336, patch_size=14, hidden_act="quick_gelu")).eval()
      x = torch.randn(SLICES, 3, 336, 336)
      call = lambda: model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    else:
      model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
          vocab_size=LLM["vocab_size"], hidden_size=LLM["hidden_size"],
          num_hidden_layers=LLM["num_layers"], num_attention_heads=LLM["num_heads"],
          num_key_value_heads=LLM["num_kv_heads"], intermediate_size=LLM["mlp_dim"])).eval()
      ids = torch.randint(0, LLM["vocab_size"], (1, TOKENS))
      call = lambda: model(input_ids=ids).logits
  with torch.inference_mode():
    return measure(call, repeats)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--only", help="one of clip-jax, clip-torch, llm-jax, llm-torch")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    which, impl = args.only.split("-")
    return report_child(args.only, (run_jax if impl == "jax" else run_torch)(which, args.repeats))
  names = [args.only] if args.only else ["clip-jax", "clip-torch", "llm-jax", "llm-torch"]
  rows = run_children(module_name(__file__), names, ["--repeats", str(args.repeats)])
  print_table(rows, args.repeats)
  for which in ("clip", "llm"):
    jax_s = rows.get(f"{which}-jax", {}).get("seconds")
    torch_s = rows.get(f"{which}-torch", {}).get("seconds")
    if jax_s and torch_s:
      print(f"{which}: JAX time / PyTorch time = {jax_s / torch_s:.2f}")


if __name__ == "__main__":
  main()
