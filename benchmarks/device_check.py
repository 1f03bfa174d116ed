"""One command that checks and times every accelerator claim of the project on the card it runs on
(issue 14), each case in its own process so that a failing case never stops the others.

  python -m benchmarks.device_check                       # on a GPU (or TPU) machine: ~5-8 min
  python -m benchmarks.device_check --only conv-pallas_gpu --repeats 5
  python -m benchmarks.device_check --smoke               # every case at tiny shapes on the CPU
                                                          # (Pallas in interpret mode): CI
  python benchmarks/device_check.py --smoke               # the same, started as a file

On a device the cases run one at a time; `--smoke` runs two side by side (`--jobs`).

Writes `--out` (default device_check.json: the machine, the card's name, driver, jax/jaxlib
versions and one record per case) and the same table as markdown next to it (.md), and prints the
table. Compilations go to a persistent cache (`--cache-dir`), so a rerun on the same machine
spends its time running, not compiling. `--budget` seconds (default 480) bounds the whole run: a
case starts only with 30 s of it left and is cut at its end (skipped cases are listed), every case
also has its own time limit, and the report is rewritten after every case, so a run killed from
outside keeps what it finished.

Cases (real shapes; `--smoke` shrinks every dimension but runs the same code):
  info                 backend, device kind, driver, versions (decides which impls run).
  conv-<impl>          the adaptive convolution (kernels/adaptive_conv.py) at the JBU's 4x step:
                       B=7 slices, 96x96, C=1024, 49 taps. Every impl of the backend (GPU: xla,
                       pallas_gpu; TPU: xla, pallas_tpu; smoke: all three, Pallas interpreted).
                       Output and both gradients (one vjp) vs xla: max |a - e| / max |e| for
                       fp32 inputs, and for bf16 features (vs xla on the same bf16 values in fp32:
                       the bf16 grad_x rounding shows). Time of the forward and of forward +
                       backward, fp32 and bf16 features, and the fraction of the roofline of
                       jbu-kernel.md §3 reached: bound = max(FLOPs / fp32 FMA peak, minimum
                       bytes / HBM bandwidth), minimum bytes = each pass reading its inputs and
                       writing its outputs once.
  jbu-<impl>           the JBU 4x stack (models/jbu.py) at C=1024, 7 slices 24x24 -> 48x48 ->
                       96x96, bf16 compute, fp32 parameters: forward and forward + backward
                       (gradients of every JBU parameter and of the source) time; feat4x vs the
                       xla stack.
  attention-<impl>     LLaMA attention of the 7B geometry (32 heads of 128; 2 decoder layers,
                       vocab 4096; B=4, S=2048, one row right-padded by 512) with `cudnn` (GPU) or
                       `splash` (TPU; interpreted in --smoke) vs `xla`, bf16: logits at real
                       positions vs xla in fp32 (padded batch and the plain causal path), next to
                       xla bf16's own error; forward time of both.
  vision               LlavaUHD.encode_images on one 1008x672 image (6 slices + overview; the
                       real ViT-L/14-336, JBU 4x, Hiwin at the 7B width), bf16: time and the
                       device's peak memory.
  llm7b-b1, llm7b-b8   vicuna7b with random bf16 weights: prefill of the 1008x672 image + 64
                       prompt tokens (vision included; the paper: 0.54 s on an A100), and greedy
                       decode tokens/s from the filled cache (32 steps) against the bound of
                       reading every LLM weight from HBM once per step.
  train1b              benchmarks/train_step.py's stage-2 step of the ~1B class (22-layer
                       TinyLlama-geometry LLM, ViT-B), bf16 compute: step time and MFU against
                       the card's dense bf16 peak (target >= 45%).

Peaks: the vendor's numbers for the card (`CARDS`, looked up by device kind); the table says
"n/a" where the card is not listed (the CPU). environment.md measured ~790 TFLOP/s bf16 matmul and
~3.0 TB/s (H100) / ~4.3 TB/s (H200) copy bandwidth, so 100% of these peaks is out of reach.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time

if __package__ in (None, ""):  # started as `python benchmarks/<name>.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import jit_init, machine, measure, module_name, report_child, run_child
from hiwin_jax import outputs

# device kind substring (first match wins) -> HBM bytes/s, fp32 (non-tensor-core) FLOP/s, dense
# bf16 FLOP/s: vendor data sheets (SXM parts unless named).
CARDS = {
    "H100 PCIe": (2.0e12, 51e12, 756e12),
    "H100": (3.35e12, 67e12, 989e12),
    "H200": (4.8e12, 67e12, 989e12),
    "A100": (2.04e12, 19.5e12, 312e12),
}
PAPER_PREFILL_S = 0.54  # LLaVA-UHD v2 paper, 1008x672 image, A100
IMPLS = {"gpu": ["xla", "pallas_gpu"], "tpu": ["xla", "pallas_tpu"],
         "cpu": ["xla", "pallas_gpu", "pallas_tpu"]}
ATTENTION = {"gpu": "cudnn", "tpu": "splash", "cpu": "splash"}
TIME_LIMIT_S = 240  # per case, on a card
SMOKE_TIME_LIMIT_S = 1500  # a hang guard only: CI machines are slow and shared


def card(kind: str) -> tuple[float, float, float] | None:
  return next((v for k, v in CARDS.items() if k.lower() in kind.lower()), None)


def _device():
  import jax
  return jax.devices()[0]


def _device_peak_mb() -> float | None:
  stats = _device().memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2 ** 20 if "peak_bytes_in_use" in stats else None


def _rel_err(a, e, where=None) -> float:
  """max |a - e| / max |e| (over `where` if given), computed on the device."""
  import jax.numpy as jnp
  a, e = jnp.asarray(a, jnp.float32), jnp.asarray(e, jnp.float32)
  if where is not None:
    a, e = jnp.where(where, a, 0), jnp.where(where, e, 0)
  return float(jnp.max(jnp.abs(a - e)) / jnp.maximum(jnp.max(jnp.abs(e)), 1e-30))


def _timed(fn, repeats: int) -> float:
  import jax
  return measure(lambda: jax.block_until_ready(fn()), repeats)["seconds"]


# --- cases ------------------------------------------------------------------------------------

def case_info(smoke: bool, repeats: int) -> dict:
  import jax
  import jaxlib
  dev = _device()
  driver = None
  if dev.platform == "gpu":
    try:
      driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.split()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
      driver = "unknown (nvidia-smi failed)"
  return {"seconds": None, "platform": dev.platform, "device_kind": dev.device_kind,
          "devices": jax.device_count(), "driver": driver, "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "python": platform.python_version()}


def conv_roofline(shape: tuple[int, int, int, int], x_bytes: int, backward: bool,
                  peaks: tuple[float, float, float] | None) -> float | None:
  """Lower bound (s) of the adaptive conv at out shape [B, H, W, C] (module docstring)."""
  if peaks is None:
    return None
  b, h, w, c = shape
  p, pp = b * h * w, b * (h + 6) * (w + 6)
  forward = pp * c * x_bytes + p * 49 * 4 + p * c * 4        # xpad, filters -> out (f32)
  grad_x = p * c * 4 + p * 49 * 4 + pp * c * x_bytes          # g, filters -> grad xpad
  grad_f = p * c * 4 + pp * c * x_bytes + p * 49 * 4          # g, xpad -> grad filters
  flops = 2 * 49 * c * p * (3 if backward else 1)
  traffic = forward + (grad_x + grad_f if backward else 0)
  return max(flops / peaks[1], traffic / peaks[0])


def case_conv(impl: str, smoke: bool, repeats: int) -> dict:
  import functools

  import jax
  import jax.numpy as jnp

  from hiwin_jax.kernels.adaptive_conv import adaptive_conv
  b, h, w, c = (2, 6, 9, 8) if smoke else (7, 96, 96, 1024)
  k = jax.random.split(jax.random.key(0), 3)
  xpad = jax.random.normal(k[0], (b, h + 6, w + 6, c), jnp.float32)
  filters = jax.nn.softmax(jax.random.normal(k[1], (b, h, w, 49)), axis=-1)
  g = jax.random.normal(k[2], (b, h, w, c), jnp.float32)

  def vjp(impl, x, f, g):
    out, pull = jax.vjp(functools.partial(adaptive_conv, impl=impl), x, f)
    return (out, *pull(g))

  fwd = jax.jit(lambda x, f: adaptive_conv(x, f, impl=impl))
  bwd = jax.jit(functools.partial(vjp, impl))
  out = {"seconds": None}
  if impl != "xla":
    ref = jax.jit(functools.partial(vjp, "xla"))
    for name, x in (("f32", xpad), ("bf16", xpad.astype(jnp.bfloat16))):
      want = ref(x.astype(jnp.float32), filters, g)
      got = bwd(x, filters, g)
      for what, a, e in zip(("out", "grad_x", "grad_f"), got, want):
        out[f"err_{name}_{what}"] = _rel_err(a, e)
  peaks = card(_device().device_kind)
  for name, x in (("f32", xpad), ("bf16", xpad.astype(jnp.bfloat16))):
    for mode, fn in (("fwd", lambda: fwd(x, filters)), ("fwdbwd", lambda: bwd(x, filters, g))):
      s = _timed(fn, repeats)
      bound = conv_roofline((b, h, w, c), x.dtype.itemsize, mode == "fwdbwd", peaks)
      out[f"{mode}_{name}_s"] = s
      out[f"{mode}_{name}_roofline"] = None if bound is None else bound / s
  out["seconds"] = out["fwdbwd_bf16_s"]
  return out


def case_jbu(impl: str, smoke: bool, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp

  from hiwin_jax.train.aot import stack4x_programs
  from hiwin_jax.models.layers import Precision
  c, items, grid = (8, 2, 5) if smoke else (1024, 7, 24)
  precision = Precision(dtype=jnp.bfloat16, param_dtype=jnp.float32)
  source = jax.random.normal(jax.random.key(1), (items, grid, grid, c), jnp.bfloat16)
  pixels = jax.random.normal(jax.random.key(2), (items, 14 * grid, 14 * grid, 3))

  def step(conv_impl):
    forward, grad, state = stack4x_programs(c, precision=precision, conv_impl=conv_impl)
    return jax.jit(forward), jax.jit(grad), state

  fwd, grad, state = step(impl)
  out = {"fwd_s": _timed(lambda: fwd(state, source, pixels), repeats),
         "fwdbwd_s": _timed(lambda: grad(state, source, pixels), repeats),
         "device_peak_mb": _device_peak_mb()}
  if impl != "xla":
    xla_fwd, xla_grad, _ = step("xla")
    out["err_feat4x"] = _rel_err(fwd(state, source, pixels), xla_fwd(state, source, pixels))
    out["err_grad_source"] = _rel_err(grad(state, source, pixels)[1],
                                      xla_grad(state, source, pixels)[1])
  return {"seconds": out["fwdbwd_s"], **out}


def case_attention(impl: str, smoke: bool, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from hiwin_jax import config as C
  from hiwin_jax.models.layers import Precision
  from hiwin_jax.models.llama import LlamaModel
  if smoke:
    cfg = C.load_config("tiny").model.llm
    cfg.update(num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2)
    b, s, pad = 2, 16, 5
  else:
    cfg = C.load_config("vicuna7b").model.llm
    cfg.update(num_layers=2, vocab_size=4096)
    b, s, pad = 4, 2048, 512
  ids = jax.random.randint(jax.random.key(3), (b, s), 3, cfg.vocab_size)
  mask = np.ones((b, s), np.int32)
  mask[1, s - pad:] = 0
  mask = jnp.asarray(mask)

  def logits_fn(attention, dtype):
    cfg.attention = attention
    graphdef, state = nnx.split(LlamaModel(cfg, Precision(dtype=dtype, param_dtype=jnp.float32),
                                           rngs=nnx.Rngs(0)))
    padded = jax.jit(lambda st: nnx.merge(graphdef, st)(ids, attention_mask=mask)[0])
    causal = jax.jit(lambda st: nnx.merge(graphdef, st)(ids)[0])
    return padded, causal, state

  real = mask.astype(bool)[..., None]
  ref_padded, ref_causal, state = logits_fn("xla", jnp.float32)
  want_padded, want_causal = ref_padded(state), ref_causal(state)
  out = {"seconds": None}
  for name, attention in (("xla", "xla"), (impl, impl)):
    padded, causal, state = logits_fn(attention, jnp.bfloat16)
    out[f"err_{name}_padded"] = _rel_err(padded(state), want_padded, real)
    out[f"err_{name}_causal"] = _rel_err(causal(state), want_causal)
    out[f"{name}_padded_s"] = _timed(lambda: padded(state), repeats)
    out[f"{name}_causal_s"] = _timed(lambda: causal(state), repeats)
  out["seconds"] = out[f"{impl}_padded_s"]
  return out


def case_vision(smoke: bool, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from benchmarks import vision_path as V
  from hiwin_jax.data import buckets as B
  from hiwin_jax.models.layers import Precision
  from hiwin_jax.models.llava_uhd import LlavaUHD
  cfg = V.model_config(V.SMALL if smoke else V.FULL)
  cfg.model.precision.dtype = "bfloat16"
  precision = Precision.from_config(cfg.model.precision)
  graphdef, state = jit_init(lambda: LlavaUHD(cfg.model, precision, rngs=nnx.Rngs(0)))
  _, items = V.image_items()
  packed = B.pack_items(items, B.default_buckets())
  buckets = tuple({k: jnp.asarray(v) for k, v in b.items()} for b in packed.buckets)
  t0 = time.perf_counter()
  encode = jax.jit(lambda st, bk: nnx.merge(graphdef, st).encode_images(bk)).lower(
      state, buckets).compile()
  compile_s = time.perf_counter() - t0
  result = measure(lambda: jax.block_until_ready(encode(state, buckets)), repeats)
  return {**result, "compile_s": compile_s, "device_peak_mb": _device_peak_mb()}


def case_llm7b(batch: int, smoke: bool, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from benchmarks import generate as G
  from hiwin_jax import config as C
  from hiwin_jax.infer import generate
  new_tokens = 4 if smoke else 32
  cfg = C.load_config("tiny" if smoke else "vicuna7b")
  cfg.model.precision.update(dtype="bfloat16", param_dtype="bfloat16")
  _, model, host = G.build(cfg, batch, 64)
  graphdef, state = nnx.split(model)
  data = jax.tree.map(jnp.asarray, host)
  s = host["input_ids"].shape[1]
  gen = generate.GenerationConfig(max_new_tokens=new_tokens + 1, eos_token_id=None)
  prefill = jax.jit(lambda st, b: generate.prefill(nnx.merge(graphdef, st), b, s + new_tokens))
  decode = jax.jit(lambda st, logits, cache, lengths: generate.decode(
      nnx.merge(graphdef, st), logits, cache, lengths, gen).tokens)
  prefill_s = _timed(lambda: prefill(state, data), repeats)
  filled = jax.block_until_ready(prefill(state, data))
  decode_s = _timed(lambda: decode(state, *filled), repeats)
  llm_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.llm)))
  peaks = card(_device().device_kind)
  tok_s = batch * new_tokens / decode_s
  bound = None if peaks is None else batch * peaks[0] / llm_bytes
  return {"seconds": prefill_s, "prefill_s": prefill_s, "seq_len": int(s), "batch": batch,
          "decode_tok_s": tok_s, "hbm_bound_tok_s": bound,
          "hbm_fraction": None if bound is None else tok_s / bound, "llm_gb": llm_bytes / 1e9,
          "device_peak_mb": _device_peak_mb()}


def case_train1b(smoke: bool, repeats: int) -> dict:
  from benchmarks import train_step as T
  r = T.run_jax("tiny" if smoke else "1b", "cpu" if smoke else "gpu", None, repeats, "none")
  peaks = card(r["device_kind"])
  mfu = None if peaks is None else r["flops"] / (r["seconds"] * peaks[2])
  return {"seconds": r["seconds"], "tokens": r["tokens"], "flops": r["flops"], "mfu": mfu,
          "losses": r["losses"], "device_peak_mb": r["device_peak_mb"]}


def run_case(name: str, smoke: bool, repeats: int) -> dict:
  kind, _, arg = name.partition("-")
  if kind == "info":
    return case_info(smoke, repeats)
  if kind in ("conv", "jbu", "attention"):
    return {"conv": case_conv, "jbu": case_jbu, "attention": case_attention}[kind](
        arg, smoke, repeats)
  if kind == "llm7b":  # --smoke decodes 2 rows for "b8": the same code, a quarter of the work
    return case_llm7b(min(int(arg.lstrip("b")), 2) if smoke else int(arg.lstrip("b")), smoke,
                      repeats)
  return {"vision": case_vision, "train1b": case_train1b}[kind](smoke, repeats)


def cases(platform_name: str) -> list[str]:
  impls = IMPLS.get(platform_name, ["xla"])
  return ([f"conv-{i}" for i in impls] + [f"jbu-{i}" for i in impls]
          + [f"attention-{ATTENTION[platform_name]}"] * (platform_name in ATTENTION)
          + ["vision", "llm7b-b1", "llm7b-b8", "train1b"])


# --- the report -------------------------------------------------------------------------------

def _fmt(x, unit: str = "") -> str:
  if x is None:
    return "n/a"
  if unit == "%":
    return f"{100 * x:.1f}%"
  if unit == "ms":
    return f"{1e3 * x:.2f} ms"
  return f"{x:.2e}" if isinstance(x, float) else str(x)


def summary(name: str, r: dict) -> str:
  """One line of what a case measured."""
  if r.get("error"):
    return f"FAILED: {r['error']}"
  kind = name.split("-")[0]
  if kind == "info":
    return (f"{r['device_kind']} x{r['devices']} ({r['platform']}), driver {r['driver']}, "
            f"jax {r['jax']}, jaxlib {r['jaxlib']}, python {r['python']}")
  if kind == "conv":
    errs = ", ".join(f"{k[4:]} {_fmt(v)}" for k, v in r.items() if k.startswith("err_"))
    times = ", ".join(f"{m} {d} {_fmt(r[f'{m}_{d}_s'], 'ms')} "
                      f"({_fmt(r[f'{m}_{d}_roofline'], '%')} of roofline)"
                      for d in ("f32", "bf16") for m in ("fwd", "fwdbwd"))
    return (f"vs xla: {errs}; " if errs else "the reference; ") + times
  if kind == "jbu":
    errs = (f"; vs xla: feat4x {_fmt(r['err_feat4x'])}, grad source "
            f"{_fmt(r['err_grad_source'])}") if "err_feat4x" in r else ""
    return (f"fwd {_fmt(r['fwd_s'], 'ms')}, fwd+bwd {_fmt(r['fwdbwd_s'], 'ms')}, device peak "
            f"{_fmt(r['device_peak_mb'])} MB{errs}")
  if kind == "attention":
    impl = name.split("-")[1]
    return "; ".join(f"{a}: err vs xla f32 padded {_fmt(r[f'err_{a}_padded'])} causal "
                     f"{_fmt(r[f'err_{a}_causal'])}, time padded {_fmt(r[f'{a}_padded_s'], 'ms')}"
                     f" causal {_fmt(r[f'{a}_causal_s'], 'ms')}" for a in ("xla", impl))
  if kind == "vision":
    return (f"{_fmt(r['seconds'], 'ms')}, compile {r['compile_s']:.1f} s, device peak "
            f"{_fmt(r['device_peak_mb'])} MB, host peak {r['peak_mb']:.0f} MB")
  if kind == "llm7b":
    return (f"S={r['seq_len']}: prefill {_fmt(r['prefill_s'], 'ms')} (paper: "
            f"{PAPER_PREFILL_S} s on an A100); decode {r['decode_tok_s']:.1f} tok/s, HBM bound "
            f"{_fmt(r['hbm_bound_tok_s'])} tok/s ({_fmt(r['hbm_fraction'], '%')}); LLM "
            f"{r['llm_gb']:.3g} GB, batch {r['batch']}")
  if kind == "train1b":
    return (f"step {_fmt(r['seconds'], 'ms')}, {r['tokens']} tokens, "
            f"{r['flops'] / 1e12:.3g} TFLOP, MFU {_fmt(r['mfu'], '%')} (target 45%), "
            f"device peak {_fmt(r['device_peak_mb'])} MB")
  raise ValueError(f"unknown case {name!r}")


def markdown(report: dict) -> str:
  info = report["info"]
  shapes = "smoke: tiny shapes" if report["smoke"] else "real shapes"
  lines = [f"device_check {report['date']} ({shapes}): {info.get('device_kind')} "
           f"x{info.get('devices')} ({info.get('platform')}),"
           f" driver {info.get('driver')}, jax {info.get('jax')}, jaxlib {info.get('jaxlib')}, "
           f"host {report['machine']}; median of {report['repeats']} runs after a warm-up; "
           f"total {report['total_s']:.0f} s", "",
           "| case | wall s | result |", "|---|---|---|"]
  for name, r in report["cases"].items():
    lines.append(f"| {name} | {r.get('wall_s', 0):.0f} | {summary(name, r)} |")
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
  p.add_argument("--jobs", type=int, default=None,
                 help="cases run side by side (default 1; 2 with --smoke, where nothing is timed "
                      "for the record)")
  p.add_argument("--only", help="comma-separated cases (default: every case of the backend)")
  p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement "
                 "(default 3; 1 with --smoke)")
  p.add_argument("--out", default="device_check.json", help="JSON report (a .md beside it)")
  p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/hiwin_jax/jax_cache"),
                 help="persistent compilation cache")
  p.add_argument("--budget", type=float, default=480.0,
                 help="seconds; cases that would start later are skipped")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  repeats = args.repeats or (1 if args.smoke else 3)
  args.jobs = args.jobs or (2 if args.smoke else 1)
  if args.jobs > 1 and not args.smoke:
    p.error(f"--jobs {args.jobs}: a device run times each case on the card alone (one at a time)")
  if args.child:
    return report_child(args.only, run_case(args.only, args.smoke, repeats))

  only = args.only.split(",") if args.only else None
  known = {n for plat in IMPLS for n in cases(plat)}
  if only and set(only) - known:
    p.error(f"--only {args.only!r}: unknown case(s) {sorted(set(only) - known)}; "
            f"known: {', '.join(sorted(known))}")
  env = {"JAX_COMPILATION_CACHE_DIR": args.cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  if args.smoke:
    env["JAX_PLATFORMS"] = "cpu"
  extra = ["--repeats", str(repeats)] + ["--smoke"] * args.smoke
  limit = SMOKE_TIME_LIMIT_S if args.smoke else TIME_LIMIT_S
  start = time.perf_counter()

  def run(name, timeout):
    t = time.perf_counter()
    row = run_child(module_name(__file__), name, extra, env, timeout=timeout)
    row["wall_s"] = time.perf_counter() - t
    print(f"{name:<20}{row['wall_s']:6.0f} s  {summary(name, row)}", flush=True)
    return row

  def write(rows):
    """The report so far: written after every case (each file replaced whole), so a run killed
    from outside (a device loan's per-command limit) still leaves the cases it finished."""
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "smoke": args.smoke, "repeats": repeats, "machine": machine(), "info": rows["info"],
              "total_s": time.perf_counter() - start, "cases": rows}
    outputs.write_text(args.out, json.dumps(report, indent=1))
    table = markdown(report)
    outputs.write_text(os.path.splitext(args.out)[0] + ".md", table + "\n")
    return table

  info = run("info", limit)
  if info.get("error"):
    print(f"device_check: the backend did not start: {info['error']}", file=sys.stderr)
    return 1
  if not args.smoke and info["platform"] == "cpu":
    print("device_check: jax sees no GPU/TPU (install jax[cuda12] or use --smoke)",
          file=sys.stderr)
    return 1
  names = only or cases(info["platform"])
  rows = {}
  ordered = lambda: {"info": info, **{n: rows[n] for n in names if n in rows}}
  write(ordered())
  lock = threading.Lock()

  def one(name):
    # A case starts only with time left to finish it inside the budget (30 s: process start and
    # jax import), and is cut at the budget's end.
    elapsed = time.perf_counter() - start
    if elapsed + 30 >= args.budget:
      row = {"name": name, "error": f"skipped: over the {args.budget:.0f} s budget",
             "wall_s": 0.0}
    else:
      row = run(name, min(limit, args.budget - elapsed))
    with lock:
      rows[name] = row
      write(ordered())

  # On a device the cases run one at a time (each times the card alone); the CPU smoke runs
  # `--jobs` of them side by side, as they only prove the code paths.
  with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    list(pool.map(one, names))
  print("\n" + write(ordered()))
  return 1 if any(r.get("error") for r in rows.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
