"""The stage-2 train step (LLM + ViT + projector train, the JBU frozen), JAX vs PyTorch: tokens/s,
step time, MFU and peak memory, on this machine's CPU (or, later, one GPU).

  python -m benchmarks.train_step                       # CPU: peak, tiny and 1b, JAX and PyTorch
  python -m benchmarks.train_step --only 1b-jax --repeats 3
  python -m benchmarks.train_step --sizes tiny --repeats 5
  python -m benchmarks.train_step --device gpu          # one GPU, bf16 (see "GPU" below)
  python -m benchmarks.train_step --device gpu --dry-run  # print what it would measure

Batch (both sides, both sizes): 1 micro-batch of 2 samples, sequence 512 (right-padded): a random
672x336 image (2 slices of 336x336 + a 462x224 overview, R1 layout: 445 image tokens) and a
336x672 one (2 slices + a 224x462 overview, 457 image tokens), each with a random prompt and a
supervised answer that fill the row to 512 / 496 tokens. 6 ViT items per step, 1008 real tokens.

Sizes:
  tiny  `configs/tiny_stage2.py` as is (ViT 64 wide x 3, LLM 64 wide x 2, vocab 512; fp32).
  1b    `tiny_stage2` with overrides: the LLM is the TinyLlama-1.1B geometry of
        benchmarks/towers.py (width 2048, GQA 32/4 heads of 64, MLP 5632, vocab 32000) at
        `--llm-layers` layers (default 4 on CPU, 22 = the full 1.1B on a GPU). On this 24 GiB
        machine the full depth cannot train in fp32 (weights + gradients + AdamW moments alone
        are 16 bytes a parameter = 17.6 GB), and at 4 layers (0.44 B trainable parameters) the
        step peaks at 14.4 GB in PyTorch, while JAX's step asks XLA for 4.9 GB of arguments +
        15.1 GB of temporaries (10.1 GB with `--remat full`) and was OOM-killed at 17.5-19.6 GB
        RSS on 2026-11-26 (see BUILD_NOTES.md); the per-layer matmul
        shapes, which set the MFU, are those of the full model. The ViT is a "ViT-B/14-336"
        (width 768, 12 layers, 12 heads, MLP 3072, output of layer 11), the JBU at C = 768, the
        Hiwin at E = 2048 with 16 heads. `--remat` (default none) names the JAX remat policy of
        the ViT and LLM layers; PyTorch then uses HF gradient checkpointing on both towers.

The step: AdamW (torch defaults, weight decay 0) after global-norm clipping to 1.0; cross-entropy
summed over supervised tokens / their count; trainable = LLM + ViT + Hiwin (minus pos_embed) + the
JBU's final 1x1 fix-up conv (the official stage-2 set, `trainer.SFT_TRAINABLE`); gradients flow
through the frozen JBU into the ViT.
  jax    `hiwin_jax.train.trainer.Trainer(cfg, total_steps=...)`: `init_state()`,
         `device_batch(host)` once, then the jitted `step(state, batch)` (state donated).
  torch  transformers `CLIPVisionModel` (all layers, `hidden_states[-2][:, 1:]`, bicubic position
         interpolation for the overviews; default sdpa attention), the JBU 4x stack and the
         Hiwin of tests/reference/ (`jbu.JBU4xStack(conv="shift")`, `hiwin.Hiwin`:
         nn.MultiheadAttention per query set, as the official code), composed by
         `llava_uhd.item_features`, items with the same shape batched together (the 4 slices,
         then each overview); the image tokens
         scattered into `LlamaForCausalLM.model.embed_tokens(input_ids)` at the same positions
         as ours (`inputs_embeds`, default sdpa attention, attention_mask); `torch.optim.AdamW`
         (foreach) after `clip_grad_norm_`. Same shapes as ours, independent random weights.
         The official ViT runs its last layer too (discarded output; +1/12 of the ViT).

Measured: median step time of `--repeats` steps after one warm-up step (JAX: compile) in a fresh
process per case (benchmarks/harness.py); peak memory = the process's resident high-water mark
over the timed steps (weights, optimizer state, activations, framework). tokens/s = real LLM
tokens (attention_mask) per second.

MFU = F / (step time * peak), F = `Trainer.flops(host)`: the trainer module's documented formula
(2 x matmul weights used per token x tokens + attention scores/values, of the ViT layers used and
the LLM incl. the LM head, x3 for towers that train; JBU and Hiwin not counted), the same F for both
frameworks (same shapes). On CPU the peak is *measured* here: the best of the median fp32 rate
of an N x N @ N x N matmul (`--peak-n`, default 4096) in jax (`jnp.dot`, default precision) and in
torch (`torch.matmul`), each in its own process with the same threads; MFU is relative to that one
number for both frameworks (so it is "fraction of what a big GEMM gets on this box", not of the
vendor's nominal peak).

GPU (`--device gpu`): the 1b size with all 22 LLM layers (`--llm-layers`), bf16 compute
(`precision.dtype = bfloat16`, fp32 master weights and AdamW state), one card; JAX on the
`cuda` backend, PyTorch on `cuda` under `torch.autocast(bfloat16)`. MFU is relative to the card's
dense bf16 peak (`trainer.PEAK_TFLOPS` by device kind, e.g. H100 989 TFLOP/s); the measured bf16
matmul rate is printed next to it. Peak memory is the device's (`memory_stats()` /
`torch.cuda.max_memory_allocated`). Target: JAX MFU >= 45%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # started as `python benchmarks/<name>.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import machine, measure, module_name, report_child, run_children

SEQ_LEN = 512
IMAGES_WH = ((672, 336), (336, 672))
ROW_LENGTHS = (512, 496)      # real tokens per sample (text fills what the image leaves)
PROMPT_TOKENS = 24            # before the image; the rest after it is the supervised answer
LLM_1B = dict(vocab_size=32000, hidden_size=2048, num_heads=32, num_kv_heads=4, head_dim=64,
              mlp_dim=5632, max_position_embeddings=2048)
VIT_B = dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072)
CPU_LLM_LAYERS, GPU_LLM_LAYERS = 4, 22
LR = 1e-5


# --- config and batch (shared by both frameworks) ---------------------------------------------

def make_config(size: str, device: str, llm_layers: int | None, remat: str = "none"):
  from hiwin_jax import config as C
  cfg = C.from_file("tiny_stage2")
  if size == "1b":
    cfg.model.vision.update(VIT_B)
    cfg.model.llm.update(LLM_1B, num_layers=llm_layers or (GPU_LLM_LAYERS if device == "gpu"
                                                              else CPU_LLM_LAYERS))
    cfg.model.projector.update(num_heads=16, comma_token=29892)
  cfg.model.precision.dtype = "bfloat16" if device == "gpu" else "float32"
  cfg.model.vision.remat = cfg.model.llm.remat = remat
  cfg.train.optimizer.update(lr=LR, schedule="constant", weight_decay=0.0, grad_clip=1.0)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  C.resolve_model(cfg.model)  # after the geometry changes: the projector follows the towers
  assert tuple(cfg.train.trainable) == tuple(C.load_config("stage2_sft").train.trainable)
  return cfg


def make_samples(cfg):
  """[(layout.Sequence, [item pixels [14h, 14w, 3], ...]), ...] for the two samples."""
  import numpy as np
  from PIL import Image
  from hiwin_jax.data import layout as LY
  from hiwin_jax.data import slicing
  from hiwin_jax.data.image import clip_normalize
  rng = np.random.default_rng(0)
  tokens, vocab = LY.TokenLayout.from_config(cfg.model.projector), cfg.model.llm.vocab_size
  out = []
  for (w, h), length in zip(IMAGES_WH, ROW_LENGTHS):
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
    res = slicing.slice_image(image, slicing.TRAIN_MAX_SLICE_NUMS)
    span = LY.image_layout(res.grid, tokens)
    answer = length - len(span) - PROMPT_TOKENS
    ids = np.concatenate([[1], rng.integers(20, vocab, PROMPT_TOKENS - 1), [LY.IMAGE_TOKEN_INDEX],
                          rng.integers(20, vocab, answer - 1), [2]])
    labels = np.where(np.arange(len(ids)) > PROMPT_TOKENS, ids, LY.IGNORE_INDEX)
    seq = LY.splice(ids, labels, [span], max_length=SEQ_LEN)
    assert len(seq.input_ids) == length
    out.append((seq, [clip_normalize(p) for p in res.slices + [res.overview]]))
  return out


def host_batch(cfg, samples):
  """The trainer's host batch (tests/test_trainer.py's `host_batch`): one micro-batch."""
  from hiwin_jax.data import buckets as B
  from hiwin_jax.data import layout as LY
  from hiwin_jax.train import trainer as T
  tokens = LY.TokenLayout.from_config(cfg.model.projector)
  mb = B.make_batch(samples, B.default_buckets(), SEQ_LEN, tokens_per_item=tokens.tokens_per_item)
  out = {k: mb[k][None] for k in T.TEXT_KEYS}
  out["buckets"] = tuple({k: b[k][None] for k in ("pixels", "grid")} for b in mb["buckets"])
  return out


def step_flops(cfg, host) -> float:
  """`Trainer.flops(host)` without building the model (the same function the trainer calls)."""
  from flax import nnx
  from hiwin_jax.models.layers import Precision
  from hiwin_jax import weights
  from hiwin_jax.models.llava_uhd import LlavaUHD
  from hiwin_jax.train import trainer as T
  abstract = nnx.eval_shape(lambda: LlavaUHD(cfg.model, Precision.from_config(
      cfg.model.precision), rngs=nnx.Rngs(0)))
  paths = list(weights.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)), "/"))
  return T.model_flops(cfg.model, host, T.ParamRules.from_config(cfg.train), paths)


def workload(cfg, host) -> dict:
  import numpy as np
  return {"tokens": int(np.sum(host["attention_mask"])),
          "supervised": int(np.sum(host["labels"][..., 1:] != -100)),
          "items": int(sum(np.sum(b["grid"][..., 0] > 0) for b in host["buckets"])),
          "flops": step_flops(cfg, host)}


def device_peak_mb(device: str, framework: str) -> float | None:
  if device != "gpu":
    return None
  if framework == "jax":
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2 ** 20
  import torch
  return torch.cuda.max_memory_allocated() / 2 ** 20


# --- JAX --------------------------------------------------------------------------------------

def run_jax(size, device, llm_layers, repeats, remat):
  import jax
  from hiwin_jax.train import trainer as T
  cfg = make_config(size, device, llm_layers, remat)
  host = host_batch(cfg, make_samples(cfg))
  tr = T.Trainer(cfg, total_steps=1000)
  state = tr.init_state()
  flops = tr.flops(host)
  batch = tr.device_batch(host)
  losses = []

  def one_step():
    nonlocal state
    state, metrics = tr.step(state, batch)
    losses.append(float(jax.block_until_ready(metrics)["loss"]))

  t0 = time.perf_counter()
  result = measure(one_step, repeats)
  first = time.perf_counter() - t0 - result["seconds"] * repeats  # approx. compile + first step
  return {**result, **workload(cfg, host), "flops": flops, "first_step_s": first,
          "losses": losses, "trainable": tr.num_trainable, "frozen": tr.num_frozen,
          "device_peak_mb": device_peak_mb(device, "jax"), "device_kind": jax.devices()[0].device_kind,
          "peak_tflops_nominal": (tr.peak_flops or 0) / 1e12 or None}


# --- PyTorch ----------------------------------------------------------------------------------

def torch_model(cfg):
  """(clip, jbu, hiwin, llama) with the stage-2 trainable set; random weights."""
  import transformers

  from tests.reference.hiwin import Hiwin
  from tests.reference.jbu import JBU4xStack
  v, m = cfg.model.vision, cfg.model.llm
  proj = cfg.model.projector
  assert proj.feature_scale_mask == 7 and v.select_layer == -2
  clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=v.hidden_size, intermediate_size=v.mlp_dim, num_hidden_layers=v.num_layers,
      num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
      hidden_act="quick_gelu", layer_norm_eps=v.layer_norm_eps))
  jbu = JBU4xStack(v.hidden_size, conv="shift")
  hiwin = Hiwin(proj.kv_dim, proj.embed_dim, proj.num_heads)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.mlp_dim,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, rms_norm_eps=m.rms_norm_eps,
      rope_theta=m.rope_theta, max_position_embeddings=m.max_position_embeddings,
      tie_word_embeddings=False))
  jbu.requires_grad_(False)
  jbu.fixup_proj.requires_grad_(True)        # jbu/fixup_proj/.* trains (SFT_TRAINABLE)
  hiwin.pos_embed.requires_grad_(False)      # projector/pos_embed is frozen (SFT_FROZEN)
  for module in (clip, jbu, hiwin, llama):
    module.train()
  return clip, jbu, hiwin, llama


def run_torch(size, device, llm_layers, repeats, remat):
  import numpy as np
  import torch
  from torch.nn import functional as F

  from tests.reference import clip as clip_ref
  from tests.reference.llava_uhd import item_features
  torch.manual_seed(0)
  dev = "cuda" if device == "gpu" else "cpu"
  cfg = make_config(size, device, llm_layers)
  samples = make_samples(cfg)
  host = host_batch(cfg, samples)
  clip, jbu, hiwin, llama = (m.to(dev) for m in torch_model(cfg))
  if remat != "none":  # per-layer activation checkpointing of both towers (HF's)
    clip.gradient_checkpointing_enable()
    llama.gradient_checkpointing_enable()
  modules = (clip, jbu, hiwin, llama)
  params = [p for m in modules for p in m.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

  # Items in sample order (slices, then the overview); groups of same-shaped items.
  items = [px for _, its in samples for px in its]
  groups = {}
  for k, px in enumerate(items):
    groups.setdefault(px.shape, []).append(k)
  group_px = [(torch.from_numpy(np.stack([items[k] for k in ks])).permute(0, 3, 1, 2).to(dev), ks)
              for ks in groups.values()]
  order = torch.tensor(np.argsort(np.concatenate([ks for ks in groups.values()])), device=dev)
  # Image-token index of every position: sample-local item index -> index into `items`.
  offsets = np.cumsum([0] + [len(its) for _, its in samples])[:-1] * 144
  tok = np.full((len(samples), SEQ_LEN), -1, np.int64)
  for i, (seq, _) in enumerate(samples):
    tok[i, :len(seq.image_token)] = np.where(seq.image_token >= 0, seq.image_token + offsets[i], -1)
  tok = torch.from_numpy(tok).to(dev)
  ids = torch.from_numpy(host["input_ids"][0].astype(np.int64)).to(dev)
  mask = torch.from_numpy(host["attention_mask"][0].astype(np.int64)).to(dev)
  labels = torch.from_numpy(host["labels"][0].astype(np.int64)).to(dev)
  autocast = (torch.autocast("cuda", torch.bfloat16) if dev == "cuda"
              else torch.autocast("cpu", enabled=False))

  def forward_loss():
    feats = item_features(lambda px: clip_ref.hf_features(clip, px), jbu, hiwin,
                          [px for px, _ in group_px])[order]
    flat = feats.reshape(-1, feats.shape[-1])
    text = llama.model.embed_tokens(ids)
    embeds = torch.where((tok >= 0)[..., None], flat[tok.clamp(min=0)].to(text.dtype), text)
    logits = llama(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                         ignore_index=-100, reduction="sum")
    return ce / (target != -100).sum()

  losses = []

  def one_step():
    with autocast:
      loss = forward_loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))
    if dev == "cuda":
      torch.cuda.synchronize()

  t0 = time.perf_counter()
  result = measure(one_step, repeats)
  first = time.perf_counter() - t0 - result["seconds"] * repeats
  return {**result, **workload(cfg, host), "first_step_s": first, "losses": losses,
          "trainable": sum(p.numel() for p in params),
          "frozen": sum(p.numel() for m in modules for p in m.parameters() if not p.requires_grad),
          "threads": torch.get_num_threads(), "device_peak_mb": device_peak_mb(device, "torch")}


# --- peak matmul rate -------------------------------------------------------------------------

def run_peak(framework, device, n, repeats):
  """FLOP/s of one n x n @ n x n matmul (fp32 on CPU, bf16 on GPU): 2 n^3 / median time."""
  if framework == "jax":
    import jax
    import jax.numpy as jnp
    dtype = jnp.bfloat16 if device == "gpu" else jnp.float32
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.dot)
    fn = lambda: jax.block_until_ready(mm(a, b))
  else:
    import torch
    dev, dtype = ("cuda", torch.bfloat16) if device == "gpu" else ("cpu", torch.float32)
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    fn = lambda: (torch.matmul(a, b), sync())
  result = measure(fn, repeats)
  return {**result, "flops": 2.0 * n ** 3, "flops_per_s": 2.0 * n ** 3 / result["seconds"]}


# --- driver -----------------------------------------------------------------------------------

def child(args):
  what, framework = args.only.rsplit("-", 1)
  if args.device == "gpu":
    import jax  # harness.run_children sets JAX_PLATFORMS=cpu for CPU runs; override it here
    jax.config.update("jax_platforms", "cuda")
  if what == "peak":
    res = run_peak(framework, args.device, args.peak_n, max(args.repeats, 5))
  else:
    fn = run_jax if framework == "jax" else run_torch
    res = fn(what, args.device, args.llm_layers, args.repeats, args.remat)
  report_child(args.only, res)


def describe(args, names):
  layers = args.llm_layers or (GPU_LLM_LAYERS if args.device == "gpu" else CPU_LLM_LAYERS)
  dtype = "bf16 compute, fp32 master weights" if args.device == "gpu" else "fp32"
  print(f"stage-2 train step, {args.device}, {dtype}; batch: 1 micro-batch x 2 samples, "
        f"sequence {SEQ_LEN}, images {IMAGES_WH} (6 ViT items, {sum(ROW_LENGTHS)} real tokens)")
  print(f"sizes: tiny = configs/tiny_stage2.py; 1b = LLM TinyLlama geometry x {layers} layers + "
        f"ViT-B/14-336 + JBU C=768 + Hiwin E=2048/16 heads")
  peak = (f"measured {'bf16' if args.device == 'gpu' else 'fp32'} {args.peak_n}^3 matmul rate "
          f"(best of jnp.dot, torch.matmul)")
  if args.device == "gpu":
    peak = "the card's nominal dense bf16 peak (trainer.PEAK_TFLOPS); also printed: the " + peak
  print(f"MFU = Trainer.flops(host) / (median step time x peak), peak = {peak}")
  print(f"cases (each in its own process, in this order): {', '.join(names)}")


def fmt(x, spec):
  return "-" if x is None else format(x, spec)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--only", help="one case: peak-jax, peak-torch, {tiny,1b}-{jax,torch}")
  p.add_argument("--sizes", default="tiny,1b", help="comma-separated: tiny, 1b")
  p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--llm-layers", type=int, default=None,
                 help=f"1b LLM depth (default {CPU_LLM_LAYERS} on cpu, {GPU_LLM_LAYERS} on gpu)")
  p.add_argument("--remat", default="none", help="JAX remat policy of the ViT and LLM layers "
                 "(layers.REMAT_POLICIES); PyTorch: any value but none = HF gradient checkpointing")
  p.add_argument("--peak-n", type=int, default=None, help="matmul side for the peak rate "
                 "(default 4096 on cpu, 8192 on gpu)")
  p.add_argument("--dry-run", action="store_true", help="print what would be measured, run nothing")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  args.peak_n = args.peak_n or (8192 if args.device == "gpu" else 4096)
  if args.child:
    return child(args)

  sizes = [s for s in args.sizes.split(",") if s]
  if args.device == "gpu" and args.sizes == "tiny,1b":
    sizes = ["1b"]  # the tiny model measures nothing but launch overhead on a card
  names = [args.only] if args.only else (["peak-jax", "peak-torch"] + [
      f"{s}-{f}" for s in sizes for f in ("jax", "torch")])
  describe(args, names)
  if args.dry_run:
    return
  if args.device == "gpu":
    import shutil
    import subprocess
    smi = shutil.which("nvidia-smi")
    if not smi or subprocess.run([smi, "-L"], capture_output=True).returncode:
      sys.exit("--device gpu: no NVIDIA GPU visible (nvidia-smi -L failed); nothing measured")

  extra = ["--repeats", str(args.repeats), "--device", args.device, "--peak-n", str(args.peak_n),
           "--remat", args.remat]
  if args.llm_layers:
    extra += ["--llm-layers", str(args.llm_layers)]
  rows, loads = {}, {}
  for name in names:  # one at a time, so the load average next to each row is its own
    before = os.getloadavg()[0]
    rows.update(run_children(module_name(__file__), [name], extra))
    loads[name] = (before, os.getloadavg()[0])

  peaks = [r["flops_per_s"] for n, r in rows.items() if n.startswith("peak") and r.get("seconds")]
  measured_peak = max(peaks) if peaks else None
  print(f"\nmachine: {machine()}; {time.strftime('%Y-%m-%d')}; median of {args.repeats} steps "
        "after a warm-up step; load = 1-min load average before/after the case")
  for n, r in rows.items():
    if n.startswith("peak") and r.get("seconds"):
      print(f"  {n}: {args.peak_n}^3 matmul {r['seconds'] * 1e3:.1f} ms = "
            f"{r['flops_per_s'] / 1e9:.1f} GFLOP/s (peak RSS {r['peak_mb']:.0f} MB, "
            f"load {loads[n][0]:.1f}/{loads[n][1]:.1f})")
  print(f"{'case':<12}{'step s':>9}{'tokens/s':>10}{'TFLOP/step':>12}{'TFLOP/s':>9}{'MFU':>8}"
        f"{'peak MB':>9}{'dev MB':>9}{'load':>11}  loss first->last")
  for n, r in rows.items():
    if n.startswith("peak"):
      continue
    if r.get("error") or not r.get("seconds"):
      print(f"{n:<12}  failed: {r.get('error')}")
      continue
    rate = r["flops"] / r["seconds"]
    peak = r.get("peak_tflops_nominal") * 1e12 if args.device == "gpu" and r.get(
        "peak_tflops_nominal") else measured_peak
    mfu = rate / peak if peak else None
    r.update(tokens_per_s=r["tokens"] / r["seconds"], mfu=mfu, peak_used=peak)
    print(f"{n:<12}{r['seconds']:>9.3f}{r['tokens_per_s']:>10.1f}{r['flops'] / 1e12:>12.3f}"
          f"{rate / 1e12:>9.3f}{fmt(mfu and 100 * mfu, '>7.1f')}%{r['peak_mb']:>9.0f}"
          f"{fmt(r.get('device_peak_mb'), '>9.0f')}"
          f"{loads[n][0]:>6.1f}/{loads[n][1]:<4.1f}  "
          f"{r['losses'][0]:.3f}->{r['losses'][-1]:.3f}")
  for s in sizes:
    jx, pt = rows.get(f"{s}-jax", {}), rows.get(f"{s}-torch", {})
    if jx.get("seconds") and pt.get("seconds"):
      print(f"{s}: JAX step time / PyTorch step time = {jx['seconds'] / pt['seconds']:.2f}; "
            f"trainable params JAX {jx['trainable'] / 1e6:.1f} M, PyTorch "
            f"{pt['trainable'] / 1e6:.1f} M; frozen {jx['frozen'] / 1e6:.2f} M / "
            f"{pt['frozen'] / 1e6:.2f} M; JAX first step (compile) {jx['first_step_s']:.1f} s")
  if args.device == "gpu":
    jx = rows.get("1b-jax", {})
    if jx.get("mfu") is not None:
      print(f"GPU target: JAX MFU >= 45%: {'met' if jx['mfu'] >= 0.45 else 'NOT met'} "
            f"({100 * jx['mfu']:.1f}% of {jx['peak_used'] / 1e12:.0f} TFLOP/s, "
            f"{jx.get('device_kind')})")
  print(json.dumps({"rows": rows, "measured_peak_flops": measured_peak}, default=str))


if __name__ == "__main__":
  main()
