"""The JBU 4x stack at real size: JAX (`xla` adaptive conv) vs two PyTorch implementations.

  python -m benchmarks.jbu                  # every case, each in its own process, then a table
  python -m benchmarks.jbu --only jax-fwd --repeats 3

Workload: C = 1024, 7 slices of 24x24 ViT features -> 48x48 -> 96x96 (guidance: 7 images of
336x336), fp32, eval mode. `fwd` = forward of the whole stack; `fwdbwd` = forward + backward of a
scalar loss w.r.t. the source features and every JBU parameter (what VDIM pre-training needs).
PyTorch cases: the JBU reference of tests/reference/jbu.py (`JBU4xStack`) with its two
adaptive convolutions: `shift` accumulates the 49 shifted slices (memory-lean); `unfold` is FeatUp's
pure-PyTorch fallback (F.unfold materialises 49 copies of the upsampled map; it is run one slice
at a time, since all 7 at once need ~13 GB for the 4x step alone). Peak memory: see harness.py.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # started as `python benchmarks/<name>.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import measure, module_name, print_table, report_child, run_children

C, SLICES, GRID = 1024, 7, 24
CASES = ["jax-fwd", "jax-fwdbwd", "torch_shift-fwd", "torch_shift-fwdbwd", "torch_unfold-fwd",
         "torch_unfold-fwdbwd"]


def run_jax(backward: bool, repeats: int) -> dict:
  import jax
  from hiwin_jax.train.aot import stack4x_programs
  from hiwin_jax.models.layers import Precision

  forward, grad, state = stack4x_programs(C, precision=Precision(), conv_impl="xla")
  source = jax.random.normal(jax.random.key(1), (SLICES, GRID, GRID, C))
  pixels = jax.random.normal(jax.random.key(2), (SLICES, 14 * GRID, 14 * GRID, 3))
  step = jax.jit(grad if backward else forward)
  return measure(lambda: jax.block_until_ready(step(state, source, pixels)), repeats)


def run_torch(conv: str, backward: bool, repeats: int) -> dict:
  import torch

  from tests.reference.jbu import JBU4xStack
  torch.manual_seed(0)
  model = JBU4xStack(C, conv).eval()
  source = torch.randn(SLICES, C, GRID, GRID, requires_grad=backward)
  pixels = torch.randn(SLICES, 3, 14 * GRID, 14 * GRID)

  def step():
    if backward:
      model.zero_grad(set_to_none=True)
      (model(source, pixels)[1] ** 2).sum().backward()
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
  rows = run_children(module_name(__file__), [args.only] if args.only else CASES,
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
