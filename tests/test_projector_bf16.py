"""The whole projector (JBU 4x stack, then Hiwin at feature_scale_mask 5, the R2 releases' levels)
in bf16 against the PyTorch references run in bf16 on CPU: how many output elements differ.

Inputs and weights are bf16-representable, so both sides start from the same values; the
comparison counts exact bit differences (issue 15's measure). Each module's own bound is in
test_jbu.py / test_hiwin.py; here their differences compound through the chain.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hiwin_jax.models.hiwin import HiwinProjector
from hiwin_jax.models.layers import Precision
from tests.numerics import bf16_values

torch = pytest.importorskip("torch")

from tests import test_hiwin as th  # noqa: E402  (after the torch skip)
from tests import test_jbu as tj  # noqa: E402
from tests.reference import jbu as jbu_ref  # noqa: E402

pytestmark = pytest.mark.torch

BF16 = Precision(jnp.bfloat16, jnp.bfloat16)
GRIDS = [(13, 10), (5, 14), (11, 11), (3, 6)]


def test_bf16_projector_rounds_where_torch_rounds():
  """At most 8% of the projector's bf16 outputs differ from torch's bf16 run (6.8% measured, 56%
  before every bf16 result went through `layers.round_to`; issue 15's target is 5%).

  Every rounding point agrees: the JBU alone differs on 0.00% of a 10x7 grid's outputs
  (test_jbu.py, <= 0.1%) and Hiwin alone on 2.95% (test_hiwin.py). What is left are float32 summation
  orders torch's CPU kernels choose (LayerNorm statistics, RoIAlign sums, the JBU's 49-tap
  normalisation): they move ~1e-4 of the intermediate bf16 values by an ulp (up to 1% of a 3x6
  item's feat4x), and the chain of LayerNorms and E-wide projections spreads those."""
  c = th.KV
  sd = {k: bf16_values(v) for k, v in tj.random_official(c, seed=21).items()}
  jbu = tj.stack(c, sd, BF16)
  hiwin = HiwinProjector(th.config(5, "official"), BF16, rngs=nnx.Rngs(2))
  params = {k: bf16_values(v) for k, v in th.randomised(hiwin, seed=22).items()}
  state = nnx.state(hiwin, nnx.Param)
  for path, leaf in nnx.to_flat_state(state):
    leaf.set_value(jnp.asarray(params[".".join(map(str, path))], jnp.bfloat16))
  nnx.update(hiwin, state)

  source, pixels, items = tj.canvas_inputs(GRIDS, th.CANVAS, c, seed=23)
  source, pixels = bf16_values(source), bf16_values(pixels)
  grid = jnp.asarray(GRIDS, jnp.int32)
  up = tj.run_canvas(jbu, jnp.asarray(source, jnp.bfloat16), jnp.asarray(pixels, jnp.bfloat16),
                     grid)
  got = th.run(hiwin, {1: jnp.asarray(source, jnp.bfloat16), 4: up["feat4x"]}, grid)

  torch_items = []
  with torch.no_grad():
    for s_item, p_item in items:
      s_item, p_item = bf16_values(s_item), bf16_values(p_item)
      _, feat4x = jbu_ref.jbu4x(tj.nchw(s_item), tj.nchw(p_item),
                                {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
                                torch.bfloat16, conv="fma")
      torch_items.append({1: tj.nchw(s_item), 4: feat4x.float()})
  want = th.torch_hiwin(params, torch_items, (1, 4), torch.bfloat16)
  frac = float(np.mean(got.astype(np.float32) != want))
  print(f"bf16 projector (JBU + Hiwin, mask 5): {frac:.3%} of elements differ from torch's bf16")
  assert frac <= 0.08, f"{frac:.2%} of bf16 projector outputs differ from torch's bf16 flow"
