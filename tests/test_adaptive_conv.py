"""adaptive_conv (FeatUp AdaptiveConv, NHWC): xla reference vs the independent torch unfold
reference of tests/reference/jbu.py, its explicit VJP vs autodiff and finite differences, the
Pallas kernels (TPU and GPU, interpret mode) vs xla at small and at production block shapes,
impl="auto" per lowering platform, the kernels inside the JBU stack (alone and shard_mapped under
a mesh), the official-grad-bug flag, and shape validation."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from hiwin_jax.config import default_logical_rules
from hiwin_jax.kernels import adaptive_conv, adaptive_conv_sharded
from hiwin_jax.kernels import adaptive_conv_pallas_gpu as kgpu
from hiwin_jax.kernels import adaptive_conv_pallas_tpu as ktpu
from hiwin_jax.kernels.adaptive_conv import BUGGY_GRAD_TAPS
from hiwin_jax.models.jbu import JBUStack
from hiwin_jax.models.layers import Precision
from hiwin_jax.parallel import sharding
from tests.numerics import assert_close

ac = importlib.import_module("hiwin_jax.kernels.adaptive_conv")  # the package re-exports the name
TOL = 1e-6


def _inputs(b, h, w, c, seed=0, dtype=jnp.float32):
  """Standard-normal xpad [B, H+6, W+6, C] (in `dtype`), filters and cotangent (f32)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  xpad = jnp.asarray(normal(b, h + 6, w + 6, c)).astype(dtype)
  return xpad, jnp.asarray(normal(b, h, w, 49)), jnp.asarray(normal(b, h, w, c))


@functools.cache
def _xla_case(b, h, w, c, seed=0):
  """(xpad, filters, g) and the xla impl's (out, grad_x, grad_filters), computed once."""
  xpad, filters, g = _inputs(b, h, w, c, seed)
  return (xpad, filters, g), _vjp(functools.partial(adaptive_conv, impl="xla"), xpad, filters, g)


def _torch_unfold_reference(torch, xpad, filters):
  """FeatUp's unfold formulation (tests/reference/jbu.py `adaptive_conv`) in float64, NHWC."""
  from tests.reference.jbu import adaptive_conv as reference
  x = torch.from_numpy(np.asarray(xpad, np.float64)).permute(0, 3, 1, 2)    # NCHW
  f = torch.from_numpy(np.asarray(filters, np.float64)).permute(0, 3, 1, 2)  # [B, 49, H, W]
  return reference(x, f, "unfold").permute(0, 2, 3, 1).numpy()


def _naive_jnp(xpad, filters):
  """All 49 shifted copies stacked, then one einsum: obviously correct, memory-hungry."""
  h, w = filters.shape[1:3]
  cols = jnp.stack([xpad[:, a:a + h, b:b + w, :] for a in range(7) for b in range(7)], axis=3)
  return jnp.einsum("nhwtc,nhwt->nhwc", cols, filters, precision=jax.lax.Precision.HIGHEST)


def _vjp(fn, xpad, filters, g):
  out, pullback = jax.vjp(fn, xpad, filters)
  return (out, *pullback(g))


# ----------------------------------------------------------------------------- xla


@pytest.mark.torch
@pytest.mark.parametrize("shape", [(2, 10, 7, 5), (1, 4, 80, 3)])
def test_xla_forward_matches_torch_unfold_reference(torch, shape):
  (xpad, filters, _), (out, _, _) = _xla_case(*shape)
  assert out.dtype == jnp.float32 and out.shape == shape
  assert_close(out, _torch_unfold_reference(torch, xpad, filters), TOL, f"xla forward {shape}")


@pytest.mark.parametrize("shape", [(2, 10, 7, 5), (1, 4, 80, 3)])
def test_xla_gradients_match_autodiff_of_naive_formulation(shape):
  (xpad, filters, g), got = _xla_case(*shape)
  want = _vjp(_naive_jnp, xpad, filters, g)
  for name, a, e in zip(("out", "grad_x", "grad_filters"), got, want):
    assert a.shape == e.shape and a.dtype == e.dtype, (name, a.shape, a.dtype, e.shape, e.dtype)
    assert_close(a, e, TOL, f"xla {name} {shape}")


def test_xla_gradients_match_finite_differences_in_float64():
  with jax.enable_x64(True):
    xpad, filters, _ = _inputs(1, 3, 2, 2, seed=1, dtype=jnp.float64)
    filters = filters.astype(jnp.float64)
    fn = functools.partial(adaptive_conv, impl="xla")
    assert fn(xpad, filters).dtype == jnp.float64
    check_grads(fn, (xpad, filters), order=1, modes=("rev",), atol=1e-7, rtol=1e-7)


def test_cotangent_dtypes_match_primal_dtypes():
  xpad, filters, g = _inputs(2, 5, 6, 4, dtype=jnp.bfloat16)
  out, gx, gf = _vjp(functools.partial(adaptive_conv, impl="xla"), xpad, filters, g)
  assert (out.dtype, gx.dtype, gf.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
  # bf16 input, f32 accumulation: same as the f32 path fed the same (upcast) values.
  assert_close(out, adaptive_conv(xpad.astype(jnp.float32), filters, impl="xla"), TOL, "bf16 fwd")


def test_auto_is_xla_on_cpu_and_works_under_jit_grad():
  (xpad, filters, g), (want_out, want_gx, want_gf) = _xla_case(2, 5, 6, 4)
  assert_close(adaptive_conv(xpad, filters), want_out, 0.0, "auto")
  loss = lambda x, f: jnp.vdot(g, adaptive_conv(x, f))
  gx, gf = jax.jit(jax.grad(loss, argnums=(0, 1)))(xpad, filters)
  assert_close(gx, want_gx, TOL, "jit grad_x")
  assert_close(gf, want_gf, TOL, "jit grad_filters")


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_sharded_helper_matches_unsharded_on_batch_sharded_inputs(impl):
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:2])
  (xpad, filters, g), want = _xla_case(2, 5, 6, 4)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  xpad, filters, g = jax.device_put((xpad, filters, g), batch)
  fn = functools.partial(adaptive_conv_sharded, mesh=mesh, batch_axis="data", impl=impl,
                         interpret=impl != "xla")
  got = jax.jit(functools.partial(_vjp, fn))(xpad, filters, g)
  for name, a, e in zip(("out", "grad_x", "grad_filters"), got, want):
    assert a.sharding.is_equivalent_to(batch, a.ndim), (name, a.sharding)
    assert_close(a, e, TOL, f"sharded {impl} {name}")


# ----------------------------------------------------------------------------- bug compat


def test_official_grad_bug_zeroes_exactly_42_taps_and_keeps_grad_x():
  (xpad, filters, g), (_, gx, gf) = _xla_case(2, 5, 6, 4)
  _, gx_bug, gf_bug = _vjp(functools.partial(adaptive_conv, impl="xla", official_grad_bug=True),
                           xpad, filters, g)
  assert BUGGY_GRAD_TAPS == (0, 1, 4, 9, 16, 25, 36)
  kept = np.zeros(49, bool)
  kept[list(BUGGY_GRAD_TAPS)] = True
  gf, gf_bug = np.asarray(gf), np.asarray(gf_bug)
  assert np.all(gf_bug[..., ~kept] == 0.0), "the 42 taps the CUDA kernel never writes must be 0"
  assert np.count_nonzero(gf[..., ~kept]) == gf[..., ~kept].size   # they are nonzero normally
  np.testing.assert_array_equal(gf_bug[..., kept], gf[..., kept])
  np.testing.assert_array_equal(np.asarray(gx_bug), np.asarray(gx))


# ----------------------------------------------------------------------------- pallas


@pytest.fixture(scope="module")
def small_case():
  """H=6, W=9, C=8: one block in every grid dim but the batch."""
  return _xla_case(1, 6, 9, 8, seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_pallas_custom_vjp_matches_xla_in_interpret_mode(impl, small_case):
  (xpad, filters, g), want = small_case
  got = _vjp(functools.partial(adaptive_conv, impl=impl, interpret=True), xpad, filters, g)
  for name, a, e in zip(("out", "grad_x", "grad_filters"), got, want):
    assert a.dtype == e.dtype, (name, a.dtype, e.dtype)
    assert_close(a, e, TOL, f"{impl} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("kernels,blocks", [(ktpu, dict(th=4, tc=128)), (kgpu, dict(tw=8, tc=128))],
                         ids=["pallas_tpu", "pallas_gpu"])
def test_pallas_kernels_cross_block_boundaries_in_interpret_mode(kernels, blocks):
  """C=130 crosses a lane tile (2 channel blocks, the second mostly padding); H=5 is not a
  multiple of th=4 (TPU) and W=9 not a multiple of tw=8 (GPU)."""
  (xpad, filters, g), (want_out, want_gx, want_gf) = _xla_case(1, 5, 9, 130, seed=3)
  got = {
      "out": kernels.forward(xpad, filters, interpret=True, **blocks),
      "grad_x": kernels.grad_x(g, filters, interpret=True, **blocks),
      "grad_filters": kernels.grad_f(g, xpad, interpret=True, **blocks),
  }
  want = {"out": want_out, "grad_x": want_gx, "grad_filters": want_gf}
  for name in got:
    assert_close(got[name], want[name], TOL, f"{kernels.__name__} {name} {blocks}")


# ----------------------------------------------------------------------------- production blocks

# The real JBU: 7 items (6 slices + overview), C = 1024, 24x24 -> 48x48 (level 1) -> 96x96.
PROD_B, PROD_C = 7, 1024
# bf16 features are what the bf16 model feeds the kernels (xpad in the compute dtype); the
# cotangent of the float32 conv output, and the filters, stay float32.
FEATURE_DTYPES = [jnp.float32, jnp.bfloat16]


def _production_case(b, h, w, c, dtype, seed):
  """(xpad in `dtype`, filters, g) and the xla passes' float32 (out, grad_x, grad_filters) on
  those same values (the kernels' oracle, before the custom_vjp casts grad_x to xpad's dtype)."""
  xpad, filters, g = _inputs(b, h, w, c, seed, dtype)
  return (xpad, filters, g), (ac.forward_xla(xpad, filters), ac.grad_x_xla(g, filters),
                              ac.grad_f_xla(g, xpad))


@pytest.mark.parametrize("w", [48, 96], ids=["level2x", "level4x"])
def test_pallas_tpu_production_tiles_are_the_documented_ones(w):
  want_tc = {48: 512, 96: 256}[w]
  for dtype in FEATURE_DTYPES:
    for op in ("forward", "grad_x", "grad_f"):
      _, th, cp, tc = ktpu.tiles(op, w, w, PROD_C, jnp.float32 if op == "grad_x" else dtype,
                                 dtype)
      assert (th, cp, tc) == (8, PROD_C, want_tc), (op, dtype, th, cp, tc)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("w", [48, 96], ids=["level2x", "level4x"])
def test_pallas_tpu_kernels_at_production_block_shapes_in_interpret_mode(w, dtype):
  """Each kernel with the (th, W, tc) blocks it picks at the real size (B=7, W x W, C=1024; see
  the test above), on the smallest problem with two blocks along every grid axis: B=2, H=2*th
  (grad_x: H+6 = 22 rows padded to 24, as 54 -> 56 and 102 -> 104 in production), W = the
  production W (W is one full-dim block), C = 2*tc. TPU semantics (`pltpu.InterpretParams`)."""
  blocks = {op: ktpu.tiles(op, w, w, PROD_C, jnp.float32 if op == "grad_x" else dtype, dtype)
            for op in ("forward", "grad_x", "grad_f")}
  th, tc = blocks["forward"][1], blocks["forward"][3]
  (xpad, filters, g), (out, gx, gf) = _production_case(2, 2 * th, w, 2 * tc, dtype, seed=5)
  force = lambda op: dict(th=blocks[op][1], tc=blocks[op][3])
  got = {"out": ktpu.forward(xpad, filters, interpret=True, **force("forward")),
         "grad_x": ktpu.grad_x(g, filters, interpret=True, **force("grad_x")),
         "grad_filters": ktpu.grad_f(g, xpad, interpret=True, **force("grad_f"))}
  for name, want in (("out", out), ("grad_x", gx), ("grad_filters", gf)):
    assert got[name].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(got[name]))), name
    assert_close(got[name], want, 1e-5, f"pallas_tpu {name} W={w} {jnp.dtype(dtype).name}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=["f32", "bf16"])
def test_pallas_gpu_kernels_at_production_block_shapes_in_interpret_mode(dtype):
  """The Triton kernels with their production tiles (tw=32, tc=128 at W = 48 or 96, C = 1024)
  on a grid with two W tiles (W=48 padded to 64; grad_x: 54 -> 64, as production's 102 -> 128
  pads) and two channel tiles (C=256), B=2, H=3: the production program per grid step."""
  for w in (48, 54, 96, 102):
    assert kgpu.tiles(w, PROD_C) == (32, 128), w
  (xpad, filters, g), (out, gx, gf) = _production_case(2, 3, 48, 256, dtype, seed=6)
  got = {"out": kgpu.forward(xpad, filters, interpret=True),
         "grad_x": kgpu.grad_x(g, filters, interpret=True),
         "grad_filters": kgpu.grad_f(g, xpad, interpret=True)}
  for name, want in (("out", out), ("grad_x", gx), ("grad_filters", gf)):
    assert got[name].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(got[name]))), name
    assert_close(got[name], want, 1e-5, f"pallas_gpu {name} {jnp.dtype(dtype).name}")


@pytest.mark.parametrize("platform, marker, absent", [
    ("tpu", "tpu_custom_call", "triton"), ("cuda", "triton", "tpu_custom_call"),
    ("cpu", None, ("tpu_custom_call", "triton"))], ids=["tpu", "cuda", "cpu"])
def test_auto_picks_the_kernel_of_the_platform_lowered_for(platform, marker, absent):
  """impl="auto" follows the lowering platform (lax.platform_dependent), not the host backend:
  the same traced program lowers to Mosaic for TPU, Triton for CUDA, and plain XLA on CPU."""
  xpad, filters, g = _inputs(1, 5, 6, 8)
  fn = lambda x, f: jax.vjp(adaptive_conv, x, f)[1](g)
  text = jax.jit(fn).trace(xpad, filters).lower(lowering_platforms=(platform,)).as_text()
  if marker:
    assert marker in text, platform
  for a in (absent,) if isinstance(absent, str) else absent:
    assert a not in text, (platform, a)


# ----------------------------------------------------------------------------- in the model


@pytest.fixture(scope="module")
def jbu_case():
  """A JBU 4x stack's inputs (B=2, non-square 5x4 grid, C=8), an output cotangent, and the xla
  stack's (feat4x, parameter gradients, source gradient)."""
  rng = np.random.default_rng(7)
  source = jnp.asarray(rng.standard_normal((2, 5, 4, 8), np.float32))
  pixels = jnp.asarray(rng.standard_normal((2, 70, 56, 3), np.float32))
  cot = jnp.asarray(rng.standard_normal((2, 20, 16, 8), np.float32))
  step, state = _jbu_step("xla", pixels, cot)
  return (source, pixels, cot), jax.jit(step)(state, source)


def _jbu_step(impl, pixels, cot):
  """(step(state, source) -> (feat4x, grad_state, grad_source), state) of a JBUStack(8) with
  `conv_impl=impl` (same parameters for every impl)."""
  graphdef, state = nnx.split(JBUStack(8, precision=Precision.parity(), conv_impl=impl,
                                       rngs=nnx.Rngs(0)))
  fn = lambda st, x: nnx.merge(graphdef, st)(x, pixels)["feat4x"]
  return lambda st, x: (fn(st, x), *jax.vjp(fn, st, x)[1](cot)), state


def _assert_jbu_close(got, want, what):
  """feat4x and the source gradient: <= 1e-5 each. Parameter gradients: <= 1e-5 relative to the
  largest parameter gradient; a scalar's gradient (range_temp, sigma_spatial) is a sum over every
  pixel and tap with heavy cancellation, so the 1e-7 rounding differences of the filter
  gradient, or a mesh's per-shard partial sums, move it by up to ~1e-4 of its own size."""
  out, gparams, gsource = got
  assert_close(out, want[0], 1e-5, f"{what}: feat4x")
  assert_close(gsource, want[2], 1e-5, f"{what}: grad_source")
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want[1]))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(gparams), jax.tree.leaves(want[1])):
    err = float(jnp.max(jnp.abs(x - y))) / scale
    assert err <= 1e-5, f"{what}: grad {jax.tree_util.keystr(path)} error {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_jbu_stack_runs_the_pallas_kernels_like_xla(impl, jbu_case):
  """The model path (not only the op): JBUStack(conv_impl=<pallas>) on CPU lowers the kernels in
  interpret mode; forward, parameter and source gradients equal the xla stack's."""
  (source, pixels, cot), want = jbu_case
  step, state = _jbu_step(impl, pixels, cot)
  _assert_jbu_close(jax.jit(step)(state, source), want, impl)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_jbu_stack_shard_maps_pallas_impls_over_the_batch_axes_under_a_mesh(impl, jbu_case):
  """Under a mesh with logical rules (as the trainer runs it) a Pallas impl ("auto" included:
  TPU and CUDA lower Pallas) runs in a shard_map over the mesh axes of the `batch` rule, since
  XLA cannot partition a kernel's custom call; the xla impl is left to XLA's partitioner. (A
  kernel inside the map: test_sharded_helper_matches_unsharded_on_batch_sharded_inputs.)"""
  (source, pixels, cot), want = jbu_case
  step, state = _jbu_step(impl, pixels, cot)
  mesh = jax.make_mesh((2, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), sharding.use_rules(default_logical_rules()):
    assert sharding.mesh_axes("batch", 2) == ("data",)
    assert sharding.mesh_axes("batch", 3) == ()  # 3 rows do not divide over 2 devices
    jaxpr = str(jax.make_jaxpr(step)(state, source))
    got = jax.jit(step)(state, source)
  assert ("shard_map" in jaxpr) == (impl != "xla"), impl
  _assert_jbu_close(got, want, f"{impl} under a mesh")


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("xshape,fshape", [
    ((2, 16, 13, 5), (2, 10, 8, 49)),     # W mismatch
    ((2, 16, 13, 5), (1, 10, 7, 49)),     # batch mismatch
    ((2, 16, 13, 5), (2, 10, 7, 9)),      # not 49 taps
    ((2, 6, 13, 5), (2, 0, 7, 49)),       # H = 0
    ((2, 16, 5, 5), (2, 10, 0, 49)),      # W < 1 (xpad narrower than the 7-tap window)
    ((16, 13, 5), (10, 7, 49)),           # no batch dim
])
def test_bad_shapes_raise_value_error_naming_both_shapes(xshape, fshape):
  fshape = tuple(max(d, 0) for d in fshape)
  with pytest.raises(ValueError) as err:
    adaptive_conv(jnp.zeros(xshape, jnp.float32), jnp.zeros(fshape, jnp.float32))
  assert str(xshape) in str(err.value) and str(fshape) in str(err.value), err.value


def test_unknown_impl_raises():
  xpad, filters = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 2, 2, 49))
  with pytest.raises(ValueError, match="impl"):
    adaptive_conv(xpad, filters, impl="cuda")


# ----------------------------------------------------------------------------- lowering


def _kernel_args(b, h, w, c, dtype, sharding=None):
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  x, f = sds((b, h + 6, w + 6, c), dtype), sds((b, h, w, 49), jnp.float32)
  g = sds((b, h, w, c), dtype)
  return {"forward": (x, f), "grad_x": (g, f), "grad_f": (g, x)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 9, 130), (PROD_B, 96, 96, PROD_C)],
                         ids=["small", "production"])
def test_pallas_gpu_kernels_lower_to_triton_off_device(dtype, shape):
  """Pallas -> Triton IR runs in jax itself (power-of-2 rule included); PTX is not built."""
  for name, args in _kernel_args(*shape, dtype).items():
    lowered = jax.jit(getattr(kgpu, name)).trace(*args).lower(lowering_platforms=("cuda",))
    assert "xla.gpu.triton" in lowered.as_text(), name


@pytest.mark.tpu_aot
def test_pallas_tpu_kernels_compile_for_an_abstract_v5p(monkeypatch):
  """Mosaic compiles (tiling and layout rules) with libtpu on CPU; interpret mode cannot
  show that. Needs the libtpu wheel matching jax (libtpu==0.0.42.* for jax 0.10.2)."""
  pytest.importorskip("libtpu")
  from jax.experimental import topologies
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
  devices = topologies.get_topology_desc("v5p:2x2x1", "tpu").devices
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  for shape in [(2, 10, 7, 5), (1, 5, 9, 130), (PROD_B, 48, 48, PROD_C),
                (PROD_B, 96, 96, PROD_C)]:
    for dtype in (jnp.float32, jnp.bfloat16):
      for name, args in _kernel_args(*shape, dtype, sharding).items():
        jax.jit(getattr(ktpu, name)).lower(*args).compile()
