"""The JBU 4x stack at real size: JAX (`xla` adaptive conv) vs two PyTorch implementations.

  python benchmarks/jbu.py                  # every case, each in its own process, then a table
  python benchmarks/jbu.py --only jax-fwd --repeats 3

Workload: C = 1024, 7 slices of 24x24 ViT features -> 48x48 -> 96x96 (guidance: 7 images of
336x336), fp32, eval mode. `fwd` = forward of the whole stack; `fwdbwd` = forward + backward of a
scalar loss w.r.t. the source features and every JBU parameter (what VDIM pre-training needs).
PyTorch cases: `shift` accumulates the 49 shifted slices (memory-lean); `unfold` is FeatUp's
pure-PyTorch fallback (F.unfold materialises 49 copies of the upsampled map; it is run one slice
at a time, since all 7 at once need ~13 GB for the 4x step alone). Peak memory: see harness.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import measure, print_table, report_child, run_children  # noqa: E402

C, SLICES, GRID = 1024, 7, 24
CASES = ["jax-fwd", "jax-fwdbwd", "torch_shift-fwd", "torch_shift-fwdbwd", "torch_unfold-fwd",
         "torch_unfold-fwdbwd"]


def run_jax(backward: bool, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from hiwin_jax.models.jbu import JBUStack
  from hiwin_jax.models.layers import Precision

  graphdef, state = nnx.split(JBUStack(C, precision=Precision(), conv_impl="xla",
                                       rngs=nnx.Rngs(0)))
  source = jax.random.normal(jax.random.key(1), (SLICES, GRID, GRID, C))
  pixels = jax.random.normal(jax.random.key(2), (SLICES, 14 * GRID, 14 * GRID, 3))

  def forward(state, source):
    return nnx.merge(graphdef, state)(source, pixels)["feat4x"]

  if backward:
    step = jax.jit(jax.grad(lambda st, x: jnp.sum(forward(st, x) ** 2), argnums=(0, 1)))
  else:
    step = jax.jit(forward)
  return measure(lambda: jax.block_until_ready(step(state, source)), repeats)


def torch_jbu_stack(conv: str):
  """A PyTorch JBU 4x stack (spec §3.2-3.3, NCHW, fp32) with the adaptive conv as `conv`."""
  import torch
  from torch import nn
  F = nn.functional

  def adaptive_conv(up, kernel):  # up (B,C,H+6,W+6), kernel (B,49,H,W)
    h, w = kernel.shape[-2:]
    if conv == "unfold":
      return torch.cat([
          torch.einsum("bcphw,bphw->bchw",
                       F.unfold(up[i:i + 1], 7).reshape(1, up.shape[1], 49, h, w), kernel[i:i + 1])
          for i in range(up.shape[0])])
    out = 0
    for a in range(7):
      for b in range(7):
        out = out + up[:, :, a:a + h, b:b + w] * kernel[:, 7 * a + b:7 * a + b + 1]
    return out

  class Step(nn.Module):
    def __init__(self):
      super().__init__()
      self.range_temp = nn.Parameter(torch.tensor(0.0))
      self.sigma_spatial = nn.Parameter(torch.tensor(1.0))
      self.range_proj = nn.Sequential(nn.Conv2d(3, 32, 1), nn.GELU(), nn.Conv2d(32, 32, 1))
      self.fixup_proj = nn.Sequential(nn.Conv2d(52, 49, 1), nn.GELU(), nn.Conv2d(49, 49, 1))

    def forward(self, source, guidance):
      b, _, gh, gw = guidance.shape
      keys = self.range_proj(guidance)
      nb = F.unfold(F.pad(keys, [3] * 4, mode="reflect"), 7).reshape(b, 32, 49, gh, gw)
      tau = self.range_temp.exp().clamp(1e-4, 1e4)
      rng = F.softmax(tau * torch.einsum("bcphw,bchw->bphw", nb, keys), dim=1)
      t = torch.linspace(-1, 1, 7)
      ta, tb = torch.meshgrid(t, t, indexing="ij")
      spatial = torch.exp(-(ta ** 2 + tb ** 2) / (2 * self.sigma_spatial ** 2)).reshape(1, 49, 1, 1)
      kernel = rng * spatial
      kernel = kernel / kernel.sum(1, keepdim=True).clamp(min=1e-7)
      kernel = kernel + 0.1 * self.fixup_proj(torch.cat([kernel, guidance], 1))
      up = F.pad(F.interpolate(source, size=(gh, gw), mode="bicubic", align_corners=False),
                 [3] * 4, mode="reflect")
      return adaptive_conv(up, kernel)

  class Stack(nn.Module):
    def __init__(self):
      super().__init__()
      self.up1, self.up2 = Step(), Step()
      self.fixup_proj = nn.Conv2d(C, C, 1)

    def forward(self, source, pixels):
      h, w = source.shape[-2:]
      f2 = self.up1(source, F.adaptive_avg_pool2d(pixels, (2 * h, 2 * w)))
      f4 = self.up2(f2, F.adaptive_avg_pool2d(pixels, (4 * h, 4 * w)))
      return f4 + 0.1 * self.fixup_proj(f4)

  return Stack()


def run_torch(conv: str, backward: bool, repeats: int) -> dict:
  import torch
  torch.manual_seed(0)
  model = torch_jbu_stack(conv).eval()
  source = torch.randn(SLICES, C, GRID, GRID, requires_grad=backward)
  pixels = torch.randn(SLICES, 3, 14 * GRID, 14 * GRID)

  def step():
    if backward:
      model.zero_grad(set_to_none=True)
      (model(source, pixels) ** 2).sum().backward()
    else:
      with torch.no_grad():
        model(source, pixels)

  return measure(step, repeats)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--only", choices=CASES)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    impl, mode = args.only.split("-")
    backward = mode == "fwdbwd"
    result = (run_jax(backward, args.repeats) if impl == "jax"
              else run_torch(impl.split("_")[1], backward, args.repeats))
    return report_child(args.only, result)
  rows = run_children(__file__, [args.only] if args.only else CASES,
                      ["--repeats", str(args.repeats)])
  print_table(rows, args.repeats)
  for mode in ("fwd", "fwdbwd"):
    jax_s = rows.get(f"jax-{mode}", {}).get("seconds")
    best = min((r["seconds"] for n, r in rows.items()
                if n.startswith("torch") and n.endswith(f"-{mode}") and r.get("seconds")),
               default=None)
    if jax_s and best:
      print(f"{mode}: JAX time / best PyTorch time = {jax_s / best:.2f}")


if __name__ == "__main__":
  main()
