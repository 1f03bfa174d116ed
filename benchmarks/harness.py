"""Shared benchmark plumbing: each measured case runs in a fresh process (so peak RSS is its own),
then the parent prints one table with the machine named."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable


def _rss_mb(field: str) -> float:
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith(field)) / 1024


def measure(fn: Callable[..., object], repeats: int,
            setup: Callable[[], object] | None = None) -> dict:
  """Median wall time of `fn()` over `repeats` runs after one warm-up (compilation) run, and the
  peak resident memory during the timed runs (the high-water mark is reset after the warm-up, so
  set-up transients such as random initialisation do not count; inputs and weights do).

  With `setup`, every run (the warm-up too) calls `fn(setup())` and times only `fn`: fresh inputs
  for code that consumes them, e.g. a KV cache that a decode loop extends in place."""
  def once() -> float:
    args = () if setup is None else (setup(),)
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t

  once()
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM (Linux)
  times = [once() for _ in range(repeats)]
  return {"seconds": statistics.median(times), "peak_mb": _rss_mb("VmHWM:")}


def jit_init(make: Callable[[], object]):
  """(graphdef, state) of the NNX module `make()` builds, initialised as one jitted program: built
  eagerly, every initialiser is its own dispatch (a compilation each on a GPU; minutes at 7B)."""
  import jax
  from flax import nnx
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  return graphdef, jax.jit(lambda: nnx.state(make()))()


def report_child(name: str, result: dict) -> None:
  """Prints this process's result line for the parent to collect."""
  print(json.dumps({"name": name, **result}))


# The repository root, put on the children's PYTHONPATH: `python -m benchmarks.<module>` then
# works from any working directory (which stays the parent's, for relative paths).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_name(file: str) -> str:
  """`benchmarks.<name>` of a benchmark script's `__file__`, however it was started (as a module
  or as `python benchmarks/<name>.py`, where `__spec__` is None)."""
  return "benchmarks." + os.path.splitext(os.path.basename(file))[0]


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
  out = {**os.environ, **(env or {})}
  out["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, out.get("PYTHONPATH")) if p)
  return out


def run_child(module: str, name: str, extra_args: list[str], env: dict[str, str] | None = None,
              timeout: float | None = None) -> dict:
  """Runs one case as `python -m <module> --child --only <name> ...` in a fresh process (its own
  peak memory; nothing cached between cases), from any working directory (`_child_env`),
  with `env` over this process's environment. A failure or a timeout becomes the row's `error`
  (stderr's last line) and `stderr_tail` (its last 4000 characters, for the traceback), so one
  case never stops the others."""
  cmd = [sys.executable, "-m", module, "--child", "--only", name, *extra_args]
  failed = {"name": name, "seconds": None, "peak_mb": None}
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(env),
                         timeout=timeout)
  except subprocess.TimeoutExpired as e:
    stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
    return {**failed, "error": f"timed out after {timeout:.0f} s", "stderr_tail": stderr[-4000:]}
  lines = out.stdout.strip().splitlines()
  if out.returncode or not lines:
    error = (out.stderr.strip().splitlines() or ["failed"])[-1][:200] if out.returncode else (
        "no result line")
    return {**failed, "error": error, "stderr_tail": out.stderr[-4000:]}
  return json.loads(lines[-1])


def run_children(module: str, names: list[str], extra_args: list[str]) -> dict[str, dict]:
  """`run_child` for each case, on the CPU."""
  return {name: run_child(module, name, extra_args, {"JAX_PLATFORMS": "cpu"}) for name in names}


def machine() -> str:
  model = ""
  try:
    with open("/proc/cpuinfo") as f:
      model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  except OSError:
    pass
  return f"{model or platform.machine()}, {os.cpu_count()} cores"


def print_table(rows: dict[str, dict], repeats: int) -> None:
  print(f"machine: {machine()}; median of {repeats} runs after a warm-up")
  print(f"{'case':<28}{'seconds':>10}{'peak MB':>10}")
  for name, r in rows.items():
    if r.get("error"):
      print(f"{name:<28}{'failed':>10}{'':>10}  {r['error']}")
    else:
      print(f"{name:<28}{r['seconds']:>10.3f}{r['peak_mb']:>10.0f}")
