"""Generation speed: prefill of one 1008x672 image + prompt, and greedy decode tokens/s, at batch
1 and 8; JAX (`hiwin_jax.infer.generate`) vs transformers' `LlamaForCausalLM.generate`.

  python benchmarks/generate.py                       # tiny config, all cases, a table
  python benchmarks/generate.py --only jax_b1 --repeats 3
  python benchmarks/generate.py --config vicuna7b --only jax_b1 --hbm-gbps 3350   # on a GPU

Workload: a random 1008x672 RGB image through the eval slicer (max_slice_nums 9, no pre-resize:
3x2 slices of 336x336 + a 406x266 overview), `--prompt-tokens` random text ids around the
<image> placeholder, the R1 token layout; the batch repeats that request B times. Greedy
decoding of `--new-tokens` tokens, no EOS (every row decodes all of them).

Cases (each in its own process, see harness.py):
  jax_b{1,8}   prefill = the jitted `prefill` (ViT -> JBU -> Hiwin -> splice -> LLM over the
               prompt, filling the KV cache); generate = the jitted `generate` (prefill + the
               decode loop). decode tokens/s = B * new_tokens / (generate - prefill).
  torch_b{1,8} the LLM side only: the same LLM weights in transformers' `LlamaForCausalLM`
               (eager attention, fp32), fed our spliced input embeddings; prefill = one forward
               over `inputs_embeds`, generate = `generate(inputs_embeds=..., do_sample=False,
               max_new_tokens=min_new_tokens=N)`. The vision path is not in the torch numbers
               (benchmarks/vision_path.py compares it at real size).
With `--config vicuna7b` the script also prints the decode bound of reading every parameter once
per step from HBM: params bytes / bandwidth (`--hbm-gbps`) per step, and the achieved fraction.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import measure, print_table, report_child, run_children

IMAGE_WH = (1008, 672)
CASES = ["jax_b1", "jax_b8", "torch_b1", "torch_b8"]


def build(config: str, batch: int, prompt_tokens: int):
  """(cfg, model, host batch) for `batch` copies of the 1008x672 request."""
  import numpy as np
  from flax import nnx
  from PIL import Image

  from hiwin_jax import config as C
  from hiwin_jax.data.tokenizer import IMAGE_TOKEN_INDEX
  from hiwin_jax.infer import requests as R
  from hiwin_jax.models.layers import Precision
  from hiwin_jax.models.llava_uhd import LlavaUHD
  cfg = C.load_config(config)
  model = LlavaUHD(cfg.model, Precision.from_config(cfg.model.precision), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (IMAGE_WH[1], IMAGE_WH[0], 3), dtype=np.uint8))
  text = rng.integers(3, cfg.model.llm.vocab_size, prompt_tokens)
  ids = [1, *text[:prompt_tokens // 2], IMAGE_TOKEN_INDEX, *text[prompt_tokens // 2:]]
  prepared = R.prepare_ids(ids, img, cfg.model, pre_resize=False)
  return cfg, model, R.collate([prepared] * batch)


def run_jax(args, batch: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from hiwin_jax.infer import generate as G
  _, model, host = build(args.config, batch, args.prompt_tokens)
  graphdef, state = nnx.split(model)
  data = jax.tree.map(jnp.asarray, host)
  n = args.new_tokens
  gen = G.GenerationConfig(max_new_tokens=n, eos_token_id=None)
  cache_len = host["input_ids"].shape[1] + n
  prefill = jax.jit(lambda st, b: G.prefill(nnx.merge(graphdef, st), b, cache_len)[0])
  generate = jax.jit(lambda st, b: G.generate(nnx.merge(graphdef, st), b, gen).tokens)
  t = time.perf_counter()
  jax.block_until_ready(generate(state, data))
  compile_s = time.perf_counter() - t
  pre = measure(lambda: jax.block_until_ready(prefill(state, data)), args.repeats)
  full = measure(lambda: jax.block_until_ready(generate(state, data)), args.repeats)
  decode_s = max(full["seconds"] - pre["seconds"], 1e-9)
  out = {"seconds": pre["seconds"], "peak_mb": full["peak_mb"], "generate_s": full["seconds"],
         "decode_tok_s": batch * n / decode_s, "first_call_s": compile_s,
         "seq_len": int(host["input_ids"].shape[1]), "device": jax.devices()[0].device_kind}
  params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  llm_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.llm)))
  step_bound = llm_bytes / (args.hbm_gbps * 1e9)
  out.update(params_gb=params_bytes / 1e9, llm_gb=llm_bytes / 1e9,
             hbm_bound_tok_s=batch / step_bound,
             hbm_fraction=(batch * n / decode_s) / (batch / step_bound))
  return out


def run_torch(args, batch: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from ckpt_convert import core, hf_llama
  torch.set_num_threads(os.cpu_count())
  cfg, model, host = build(args.config, batch, args.prompt_tokens)
  embeds = np.asarray(jax.jit(lambda b: model.embed(b))(jax.tree.map(jnp.asarray, host)))
  llm_cfg = cfg.model.llm
  hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_llama.llm_to_hf_config(llm_cfg).items()
                                       if k not in ("architectures", "torch_dtype", "dtype")})
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  params = {k[len("llm."):]: v for k, v in core.model_params(model).items() if k.startswith("llm.")}
  state = {k: torch.from_numpy(np.ascontiguousarray(v))
           for k, v in core.to_torch(hf_llama.llama_table(llm_cfg), params)}
  hf.load_state_dict(state, strict=False)
  hf.config._attn_implementation = "eager"
  x = torch.from_numpy(embeds)
  mask = torch.from_numpy(host["attention_mask"].astype(np.int64))
  n = args.new_tokens

  def prefill():
    with torch.no_grad():
      hf(inputs_embeds=x, attention_mask=mask, use_cache=True)

  def generate():
    with torch.no_grad():
      hf.generate(inputs_embeds=x, attention_mask=mask, do_sample=False, max_new_tokens=n,
                  min_new_tokens=n, num_beams=1, pad_token_id=0, eos_token_id=None)

  pre = measure(prefill, args.repeats)
  full = measure(generate, args.repeats)
  decode_s = max(full["seconds"] - pre["seconds"], 1e-9)
  return {"seconds": pre["seconds"], "peak_mb": full["peak_mb"], "generate_s": full["seconds"],
          "decode_tok_s": batch * n / decode_s, "seq_len": int(host["input_ids"].shape[1])}


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
  rows = run_children(os.path.abspath(__file__), names, extra)
  print(f"config {args.config}; 1008x672 image + {args.prompt_tokens} prompt tokens; "
        f"{args.new_tokens} new tokens; 'seconds' = prefill")
  print_table(rows, args.repeats)
  for name, r in rows.items():
    if r.get("error"):
      continue
    line = (f"{name:<10} seq {r['seq_len']:>5}  prefill {r['seconds'] * 1e3:8.1f} ms  "
            f"generate {r['generate_s']:7.3f} s  decode {r['decode_tok_s']:8.1f} tok/s")
    if "hbm_bound_tok_s" in r:
      line += (f"  (LLM {r['llm_gb']:.2f} GB; HBM bound {r['hbm_bound_tok_s']:.0f} tok/s at "
               f"{args.hbm_gbps:.0f} GB/s: {100 * r['hbm_fraction']:.1f}%)")
    print(line)


if __name__ == "__main__":
  main()
