"""`layers.Linear` in bf16 against torch's bf16 `F.linear` on CPU: where a biased projection rounds.

torch's `F.linear` on a 2-D (or contiguous N-D) input is one addmm: the bias enters the float32
accumulator and the result is rounded to bf16 once. On a non-contiguous input it is matmul, then
`add_`: the product is rounded, then the sum. The two rules disagree on ~29% of the outputs of a
1024-wide bf16 projection, so each must be matched where the official code takes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hiwin_jax.models.layers import Linear, Precision, scaled

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.torch

BF16 = Precision(jnp.bfloat16, jnp.float32, jax.lax.Precision.DEFAULT)
# The float32 accumulation order of XLA's and oneDNN's dot differ, so a sum that lands within an
# fp32 ulp of a bf16 rounding boundary may round the other way (1 of 16384 elements measured).
MAX_DIFFERING = 1e-3


def bf16_values(shape, seed, scale=1.0):
  """float32 numbers that bf16 represents exactly, so both sides start from the same inputs."""
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
  return torch.from_numpy(x).bfloat16().float().numpy()


@pytest.fixture(scope="module")
def projection():
  w = bf16_values((256, 1024), 1, 1 / 32)                                    # torch layout [out, in]
  b = bf16_values((256,), 2)
  layer = Linear(1024, 256, axes=(None, None), use_bias=True, precision=BF16, rngs=nnx.Rngs(0))
  layer.kernel[...] = jnp.asarray(w.T)
  layer.bias[...] = jnp.asarray(b)
  return layer, torch.from_numpy(w).bfloat16(), torch.from_numpy(b).bfloat16()


def differing(ours, theirs) -> float:
  return float(np.mean(np.asarray(ours.astype(jnp.float32)) != theirs.float().numpy()))


def test_bf16_linear_rounds_once_as_torch_addmm(projection):
  layer, w, b = projection
  x = bf16_values((64, 1024), 3)
  want = F.linear(torch.from_numpy(x).bfloat16(), w, b)
  got = jax.jit(lambda m, x: m(x))(layer, jnp.asarray(x))
  assert got.dtype == jnp.bfloat16
  frac = differing(got, want)
  assert frac <= MAX_DIFFERING, f"{frac:.2%} of bf16 outputs differ from torch's F.linear"


def test_bf16_linear_on_a_non_contiguous_input_rounds_twice_as_torch(projection):
  layer, w, b = projection
  layer = nnx.clone(layer)
  layer.fused_bias = False
  x = bf16_values((2, 1024, 24), 4)                                         # NCHW-like, permuted
  want = F.linear(torch.from_numpy(x).bfloat16().permute(0, 2, 1), w, b)
  got = layer(jnp.asarray(x).transpose(0, 2, 1))
  frac = differing(got, want)
  assert frac <= MAX_DIFFERING, f"{frac:.2%} of bf16 outputs differ from torch's matmul + add_"


def test_scaled_multiplies_in_float32_as_torch_does_a_python_scalar():
  x = bf16_values((4096,), 5)
  want = torch.from_numpy(x).bfloat16() * 0.1
  got = scaled(jnp.asarray(x, jnp.bfloat16), 0.1)
  assert got.dtype == jnp.bfloat16
  assert differing(got, want) == 0.0


def test_bf16_results_keep_their_rounding_under_jit():
  """A bf16 LayerNorm feeding a projection, then a softmax feeding a product: jitted, XLA:CPU
  keeps each op in float32 and (excess precision) drops the bf16 round trips between them unless
  `round_to` marks them; the jitted chain must equal the op-by-op one, as torch computes it."""
  from hiwin_jax.models.layers import LayerNorm, biased_matmul, round_to
  p = Precision(jnp.bfloat16, jnp.bfloat16, jax.lax.Precision.DEFAULT)
  ln = LayerNorm(256, eps=1e-6, axis_name=None, precision=p)
  x, w, v = (jnp.asarray(bf16_values(s, seed), jnp.bfloat16)
             for s, seed in (((64, 256), 7), ((256, 64), 8), ((64, 32), 9)))

  def chain(ln, x, w, v):
    h = biased_matmul(ln(x), w, None, p)
    probs = round_to(jax.nn.softmax(h.astype(jnp.float32), -1), jnp.bfloat16)
    return jnp.matmul(probs, v, preferred_element_type=jnp.float32)

  with jax.disable_jit():
    eager = chain(ln, x, w, v)
  np.testing.assert_array_equal(np.asarray(nnx.jit(chain)(ln, x, w, v)), np.asarray(eager))


def test_rounded_is_a_bf16_rounding_xla_keeps_inside_a_fusion():
  """torch rounds `tau * logits` to bf16 before its softmax; `rounded` keeps that rounding under
  jit, where XLA's excess precision would skip an `.astype(bf16).astype(f32)` pair."""
  from hiwin_jax.models.layers import rounded
  logits = bf16_values((512, 49), 6, 4.0)
  tau = np.float32(2.640625)
  want = torch.softmax(torch.tensor(tau).bfloat16() * torch.from_numpy(logits).bfloat16(), -1)
  got = jax.jit(lambda t, x: jax.nn.softmax(rounded(t * x, jnp.bfloat16), -1).astype(
      jnp.bfloat16))(jnp.float32(tau), jnp.asarray(logits))
  assert differing(got, want) <= MAX_DIFFERING
  np.testing.assert_array_equal(np.asarray(rounded(jnp.asarray(logits * tau), jnp.float32)),
                                logits * tau)
