"""TPU pods without TPUs: compile a stage 1/2 train step (or the JBU stack alone) for an abstract
TPU topology on a CPU machine and read per-chip memory and XLA's cost analysis from the compiler.

libtpu (the `tpu-aot` extra, the wheel matching jax) describes a TPU slice's devices without the
hardware (`jax.experimental.topologies.get_topology_desc`). The config's mesh is built over those
devices, the `Trainer` is built `abstract=True` (an `nnx.eval_shape`d model: no weight is ever
allocated), and `compiled_step()` is lowered on ShapeDtypeStructs that carry the train state's,
the frozen parameters' and a representative batch's shardings, then compiled by the real TPU
compiler. `compiled.memory_analysis()` is per chip (one SPMD partition): arguments (state, frozen
weights, batch shard), outputs (the new state, aliased to the donated arguments), temporaries
(activations, gradients, optimizer update) and the program.

The batch is the shape class stage 2 trains on most: every sample has `slices` slices and one
overview, all on the 24x24 canvas (576 patches, 144 tokens each), in a sequence of `seq` tokens;
`batch` rows per batch shard of the mesh (the mesh axes the `batch` rule names) per micro-batch,
`cfg.data.grad_accum` micro-batches.

  hiwin aot --config stage2_sft --topology v5p-8 --batch 2 --seq 4096 \
      --config.model.llm.remat=full
  hiwin aot --topology v5p-8 --batch 1,2,4 --attention xla,splash   # a table of combinations
  hiwin aot --topology v6e-8 --jbu                                  # JBU stack: pallas_tpu vs xla

The JBU report (`compile_jbu`): the JBU 4x stack of the real model (C=1024, 7 items 24x24 ->
48x48 -> 96x96, bf16 compute) on one chip, forward and forward + backward (gradients of every JBU
parameter and of the source), per adaptive-conv impl. Besides the memory it prints XLA's cost
analysis: FLOPs, bytes accessed and XLA's own time estimate (`optimal_seconds`). XLA counts a
while loop's body once (the xla impl runs its 49 taps, and both impls the range-kernel rows, in
loops), so the xla rows' FLOPs, bytes and time are lower bounds; a Pallas kernel's numbers are
the `pl.CostEstimate` its wrapper declares.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from hiwin_jax.data import layout
from hiwin_jax.data.slicing import PATCH_SIZE
from hiwin_jax.parallel import mesh as mesh_lib
from hiwin_jax.parallel import sharding

if TYPE_CHECKING:
  from hiwin_jax.models.layers import Precision

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: the libtpu topology prefix, TensorCores per chip in the accelerator
  type's count (v5p-8 and v4-8 count cores: 4 chips), HBM per chip, peak dense bf16 FLOP/s."""
  prefix: str
  cores_per_chip: int
  hbm_gib: float
  peak_tflops: float
  dims: int  # 3: a 3-D torus (AxBxC), 2: a 2-D one (AxB)


CHIPS = {
    "v5p": Chip("v5p", 2, 95.0, 459.0, 3),
    "v4": Chip("v4", 2, 32.0, 275.0, 3),
    "v6e": Chip("v6e", 1, 32.0, 918.0, 2),
    "v5e": Chip("v5e", 1, 16.0, 197.0, 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str          # accelerator type, e.g. "v5p-64"
  libtpu_name: str   # libtpu's topology name, e.g. "v5p:2x4x4"
  chip: Chip

  @property
  def num_chips(self) -> int:
    return math.prod(int(d) for d in self.libtpu_name.split(":")[1].split("x"))


def _torus(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU's slice shape for `chips` chips: from the smallest slice (2x2x1 hosts for 3-D
  tori, 1x1 for 2-D) double the smallest side, the last of equals first (v5p: 2x2x1, 2x2x2,
  2x2x4, 2x4x4, 4x4x4; v6e: 2x2, 2x4, 4x4, 4x8, 8x8)."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"{chips} chips: only power-of-two slices are known here")
  sides = [2, 2, 1] if dims == 3 else [1] * dims
  if chips < math.prod(sides):
    raise ValueError(f"{chips} chips: the smallest {dims}-D slice has {math.prod(sides)}")
  while math.prod(sides) < chips:
    i = min(range(dims), key=lambda j: (sides[j], -j))
    sides[i] *= 2
  return tuple(sides)


def parse_topology(name: str) -> Topology:
  """"v5p-8" / "v6e-64" / "v5litepod-16" (Cloud TPU accelerator types) or a libtpu topology
  name such as "v5p:2x4x4" / "v6e:8x8"."""
  m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
  gen = m and _ALIASES.get(m.group(1), m.group(1))
  if not m or gen not in CHIPS:
    raise ValueError(f"unknown TPU topology {name!r}: expected e.g. v5p-8, v5p-64, v6e-64, "
                     f"v5litepod-16, v4-8 or a libtpu name like v5p:2x4x4 "
                     f"(generations: {sorted(CHIPS)})")
  chip = CHIPS[gen]
  if m.group(3):
    shape = tuple(int(d) for d in m.group(3).split("x"))
    if len(shape) != chip.dims:
      raise ValueError(f"topology {name!r}: {gen} slices are {chip.dims}-D")
    chips = math.prod(shape)
    return Topology(f"{gen}-{chips * chip.cores_per_chip}", f"{gen}:{m.group(3)}", chip)
  count = int(m.group(2))
  if count % chip.cores_per_chip:
    raise ValueError(f"topology {name!r}: {gen}-N counts TensorCores, {chip.cores_per_chip} "
                     f"per chip")
  shape = _torus(count // chip.cores_per_chip, chip.dims)
  return Topology(f"{gen}-{count}", f"{gen}:" + "x".join(map(str, shape)), chip)


def abstract_devices(topo: Topology) -> list:
  """The slice's devices as libtpu describes them (no TPU needed)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Other processes on this machine may hold libtpu's lock; an abstract topology needs no chip.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ["TPU_ACCELERATOR_TYPE"] = topo.name if topo.chip.prefix != "v5e" else (
      f"v5litepod-{topo.num_chips}")
  try:
    import libtpu  # noqa: F401  (the error below is clearer than jax's)
  except ImportError:
    raise RuntimeError("compiling for a TPU topology needs libtpu matching jax "
                       "(pip install 'hiwin-jax[tpu-aot]')") from None
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(topo.libtpu_name, "tpu").devices
  if len(devices) != topo.num_chips:
    raise RuntimeError(f"libtpu describes {topo.libtpu_name} with {len(devices)} devices, "
                       f"expected one per chip ({topo.num_chips})")
  return list(devices)


# --- the batch --------------------------------------------------------------------------------

def batch_shards(mesh: Mesh, rules) -> int:
  return math.prod(mesh.shape[a] for a in sharding.rules_dict(rules)["batch"] if a in mesh.shape)


def representative_batch(trainer, rows_per_shard: int, seq: int, slices: int,
                         canvas: tuple[int, int] = (24, 24)) -> tuple[dict, dict]:
  """(ShapeDtypeStructs with the trainer's batch sharding, a host batch of masks and grids for
  the FLOPs estimate): every sample `slices` + 1 items on `canvas`, every token valid."""
  k = int(trainer.cfg.data.grad_accum) if "data" in trainer.cfg else 1
  rows = rows_per_shard * batch_shards(trainer.mesh, trainer.rules_table)
  items = rows * (slices + 1)
  per_item = layout.TokenLayout.from_config(trainer.cfg.model.projector).tokens_per_item
  if (slices + 1) * per_item > seq:
    raise ValueError(f"{slices} slices + overview need {(slices + 1) * per_item} image "
                     f"tokens per sample, more than --seq {seq}")
  sh = trainer.batch_sharding
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  hc, wc = canvas
  abstract = {"input_ids": sds((k, rows, seq), jnp.int32),
              "image_token": sds((k, rows, seq), jnp.int32),
              "labels": sds((k, rows, seq), jnp.int32),
              "attention_mask": sds((k, rows, seq), jnp.bool_),
              "buckets": ({"pixels": sds((k, items, hc * PATCH_SIZE, wc * PATCH_SIZE, 3),
                                         jnp.float32),
                           "grid": sds((k, items, 2), jnp.int32)},)}
  host = {"attention_mask": np.ones((k, rows, seq), bool),
          "buckets": ({"grid": np.broadcast_to(np.array([hc, wc], np.int32), (k, items, 2))},)}
  return abstract, host


# --- the report -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-chip bytes from `compiled.memory_analysis()`. Outputs aliased to donated arguments (the
  train state) occupy the arguments' buffers, so they count once."""
  argument: int
  output: int
  alias: int
  temp: int
  code: int

  @classmethod
  def from_compiled(cls, compiled) -> MemoryReport:
    m = compiled.memory_analysis()
    if m is None:
      raise RuntimeError("the compiler reported no memory analysis for this program")
    return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
               int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
               int(m.generated_code_size_in_bytes))

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp + self.code

  def fits(self, hbm_gib: float) -> bool:
    return self.total <= hbm_gib * GIB

  def line(self, hbm_gib: float) -> str:
    g = lambda b: f"{b / GIB:.2f}"
    return (f"per chip: args {g(self.argument)} GiB, temp {g(self.temp)} GiB, output "
            f"{g(self.output)} GiB (aliased {g(self.alias)}), code {g(self.code)} GiB, total "
            f"{g(self.total)} GiB of {hbm_gib:g} GiB HBM -> "
            f"{'fits' if self.fits(hbm_gib) else 'DOES NOT FIT'}")


@dataclasses.dataclass(frozen=True)
class CostReport:
  """XLA's cost analysis of a compiled program (per chip): FLOPs, bytes accessed, XLA's time
  estimate in seconds (None where the backend gives none), and the number of while loops (whose
  bodies the analysis counts once)."""
  flops: float | None
  bytes_accessed: float | None
  seconds: float | None
  while_loops: int

  @classmethod
  def from_compiled(cls, compiled) -> CostReport:
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    get = lambda k: float(cost[k]) if cost.get(k) else None
    # libtpu 0.0.42 gives v6e programs a negative optimal_seconds: no estimate, not a time.
    seconds = get("optimal_seconds")
    return cls(get("flops"), get("bytes accessed"), seconds if seconds and seconds > 0 else None,
               compiled.as_text().count(" while("))


@dataclasses.dataclass(frozen=True)
class AotResult:
  topology: Topology
  mesh_shape: dict[str, int]
  attention: str
  remat: dict[str, str]
  rows_per_shard: int
  global_rows: int
  seq: int
  slices: int
  memory: MemoryReport | None  # None: the compiler refused the program (`refusal`)
  model_flops: float        # per step, all chips (trainer.model_flops: ViT + LLM matmuls)
  xla_flops: float | None   # per chip, the compiler's cost analysis
  num_trainable: int
  num_frozen: int
  lower_s: float
  compile_s: float
  refusal: str = ""  # the compiler's out-of-memory message, when it refused to compile

  @property
  def fits(self) -> bool:
    return self.memory is not None and self.memory.fits(self.topology.chip.hbm_gib)

  def summary(self) -> str:
    t, c = self.topology, self.topology.chip
    step_s = self.model_flops / (t.num_chips * c.peak_tflops * 1e12)
    xla = f"{self.xla_flops / 1e12:.4g} TFLOP per chip (XLA)" if self.xla_flops else "n/a"
    lines = [
        f"topology {t.name} ({t.libtpu_name}, {t.num_chips} chips), mesh {self.mesh_shape}",
        (f"attention {self.attention}; remat llm={self.remat['llm']} "
         f"vision={self.remat['vision']}; batch "
         f"{self.rows_per_shard} rows per batch shard ({self.global_rows} global per "
         f"micro-batch), seq {self.seq}, {self.slices} slices + overview per sample"),
        (f"parameters: {self.num_trainable / 1e6:.1f} M trainable, "
         f"{self.num_frozen / 1e6:.1f} M frozen"),
        (self.memory.line(c.hbm_gib) if self.memory else
         f"per chip: DOES NOT FIT, the compiler refused it: {self.refusal[:300]}"),
        (f"FLOPs per step: {self.model_flops / 1e12:.4g} TFLOP (model), {xla}; at 100% of "
         f"{c.peak_tflops:g} TFLOP/s/chip >= {step_s:.3g} s/step"),
        f"lower {self.lower_s:.1f} s, compile {self.compile_s:.1f} s",
    ]
    return "\n".join(lines)


def compile_step(cfg, topology: str, *, batch: int = 1, seq: int = 4096, slices: int = 7,
                 canvas: tuple[int, int] = (24, 24), log=print) -> AotResult:
  """Compiles `cfg`'s train step for `topology` (see the module docstring) and reports."""
  from hiwin_jax.train.trainer import Trainer
  topo = parse_topology(topology)
  devices = abstract_devices(topo)
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  trainer = Trainer(cfg, mesh, abstract=True)
  abstract_batch, host = representative_batch(trainer, batch, seq, slices, canvas)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), sharding.use_rules(trainer.rules_table):
    lowered = trainer.compiled_step().lower(trainer.abstract_state(), trainer.frozen,
                                            abstract_batch)
  t1 = time.perf_counter()
  log(f"lowered in {t1 - t0:.1f} s; compiling for {topo.libtpu_name} ...")
  compiled, refusal = None, ""
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # A program that cannot fit the chip's HBM is an answer ("does not fit"), not a failure.
    if "RESOURCE_EXHAUSTED" not in str(e) or "HBM" not in str(e):
      raise
    refusal = " ".join(str(e).split())
  t2 = time.perf_counter()  # the analyses below (the cost one prints the whole HLO) not timed
  memory = MemoryReport.from_compiled(compiled) if compiled else None
  xla_flops = CostReport.from_compiled(compiled).flops if compiled else None
  return AotResult(
      topo, dict(mesh.shape), cfg.model.llm.attention,
      {"llm": cfg.model.llm.remat, "vision": cfg.model.vision.remat},
      batch, int(abstract_batch["input_ids"].shape[1]), seq, slices, memory,
      trainer.flops(host), xla_flops, trainer.num_trainable, trainer.num_frozen, t1 - t0,
      t2 - t1, refusal)


def _refused_temp(message: str) -> str:
  # XLA:TPU says "... memory required for HLO temporaries (35.56G) exceeds available HBM ...".
  found = re.search(r"temporaries \((\S+?)G\)", message)
  return f"{found[1]} GiB needed" if found else "out of memory"


def step_table(results: list[AotResult]) -> str:
  """A markdown table of train-step compiles (one row per topology x attention x batch)."""
  g = lambda b: f"{b / GIB:.1f} GiB"
  rows = ["| topology | attention | batch/chip (global) | arguments | temporaries | total | HBM "
          "| fits | lower + compile |", "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    m, hbm = r.memory, r.topology.chip.hbm_gib
    sizes = (f"{g(m.argument)} | {g(m.temp)} | {g(m.total)}" if m else
             f"- | refused: {_refused_temp(r.refusal)} | -")
    rows.append(f"| {r.topology.name} | {r.attention} | {r.rows_per_shard} ({r.global_rows}) | "
                f"{sizes} | {hbm:g} GiB | {'yes' if r.fits else 'no'} | "
                f"{r.lower_s + r.compile_s:.0f} s |")
  return "\n".join(rows)


# --- the JBU stack on one chip ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class JbuResult:
  chip: str
  impl: str
  backward: bool
  memory: MemoryReport
  cost: CostReport
  compile_s: float


def stack4x_programs(channels: int, *, precision: Precision, conv_impl: str,
                     abstract: bool = False):
  """(forward, grad, state): the JBU 4x stack workload that benchmarks/jbu.py,
  benchmarks/device_check.py and `hiwin aot --jbu` time or compile, defined once.

  forward(state, source, pixels) -> feat4x [B, 4h, 4w, C]; grad(state, source, pixels) -> the
  gradients of sum(feat4x^2) (in float32) w.r.t. (state, source), i.e. every JBU parameter and the
  source; source [B, h, w, C], pixels [B, 14h, 14w, 3]. Neither is jitted (callers jit, lower or
  time them). `state`: a `JBUStack(channels)` initialised from nnx.Rngs(0), or its
  ShapeDtypeStructs with `abstract` (nothing allocated)."""
  from hiwin_jax.models.jbu import JBUStack
  make = lambda: JBUStack(channels, precision=precision, conv_impl=conv_impl, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(nnx.eval_shape(make) if abstract else make())

  def forward(state, source, pixels):
    return nnx.merge(graphdef, state)(source, pixels)["feat4x"]

  grad = jax.grad(lambda st, x, px: jnp.sum(forward(st, x, px).astype(jnp.float32) ** 2),
                  argnums=(0, 1))
  return forward, grad, state


def compile_jbu(topology: str, impl: str, backward: bool, *, items: int = 7, grid: int = 24,
                channels: int = 1024, dtype: str = "bfloat16") -> JbuResult:
  """Compiles the JBU 4x stack for one chip of `topology` (see the module docstring): source
  [items, grid, grid, channels] in `dtype`, pixels [items, 14 grid, 14 grid, 3] float32,
  parameters float32; forward = feat4x; backward = the gradients of sum(feat4x^2) w.r.t. every
  JBU parameter and the source."""
  from hiwin_jax.models.layers import DTYPES, Precision
  topo = parse_topology(topology)
  device = jax.sharding.SingleDeviceSharding(abstract_devices(topo)[0])
  precision = Precision(dtype=DTYPES[dtype], param_dtype=jnp.float32)
  forward, grad, state = stack4x_programs(channels, precision=precision, conv_impl=impl,
                                          abstract=True)
  on_chip = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
  state = jax.tree.map(on_chip, state)
  source = on_chip(jax.ShapeDtypeStruct((items, grid, grid, channels), precision.dtype))
  pixels = on_chip(jax.ShapeDtypeStruct((items, PATCH_SIZE * grid, PATCH_SIZE * grid, 3),
                                        jnp.float32))
  fn = grad if backward else forward
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(state, source, pixels).compile()
  return JbuResult(topo.chip.prefix, impl, backward, MemoryReport.from_compiled(compiled),
                   CostReport.from_compiled(compiled), time.perf_counter() - t0)


def jbu_table(results: list[JbuResult]) -> str:
  """A markdown table of JBU stack compiles (one row per chip x impl x pass)."""
  mib = lambda b: f"{b / 2 ** 20:.0f}"
  opt = lambda x, f: "n/a" if x is None else f(x)
  rows = ["| chip | impl | pass | arguments MiB | temporaries MiB | output MiB | XLA GFLOP | "
          "XLA GB accessed | XLA time estimate | while loops |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    m, c = r.memory, r.cost
    rows.append(f"| {r.chip} | {r.impl} | {'fwd+bwd' if r.backward else 'fwd'} | "
                f"{mib(m.argument)} | {mib(m.temp)} | {mib(m.output)} | "
                f"{opt(c.flops, lambda x: f'{x / 1e9:.1f}')} | "
                f"{opt(c.bytes_accessed, lambda x: f'{x / 1e9:.2f}')} | "
                f"{opt(c.seconds, lambda x: f'{x * 1e6:.0f} us')} | {c.while_loops} |")
  return "\n".join(rows)
