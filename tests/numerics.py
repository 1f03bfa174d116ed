"""Comparison helpers shared by the numerical tests."""

import ml_dtypes
import numpy as np


def max_rel_err(actual, expected) -> tuple[float, tuple]:
  """max|a - e| / max|e| and the index where |a - e| is largest."""
  a = np.asarray(actual, np.float64)
  e = np.asarray(expected, np.float64)
  assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
  diff = np.abs(a - e)
  where = np.unravel_index(np.argmax(diff), diff.shape) if diff.size else ()
  scale = np.max(np.abs(e)) if e.size else 1.0
  return float(diff.max() / max(scale, 1e-30)) if diff.size else 0.0, tuple(int(i) for i in where)


def assert_close(actual, expected, tol: float, what: str = "") -> None:
  err, where = max_rel_err(actual, expected)
  assert err <= tol, (f"{what}: max relative error {err:.3e} > {tol:.1e} at index {where} "
                      f"(got {np.asarray(actual)[where]!r}, expected {np.asarray(expected)[where]!r})")


def bf16_values(x) -> np.ndarray:
  """float32 `x` rounded to the nearest bfloat16 values, as float32: inputs and weights both
  sides of a bf16 comparison start from exactly."""
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
