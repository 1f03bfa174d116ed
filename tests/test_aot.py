"""`hiwin aot` (hiwin_jax/train/aot.py): a train step, and the JBU stack, compiled for an
abstract TPU slice.

The compile test needs libtpu (the `tpu-aot` extra) and skips without it; the topology names and
the memory arithmetic are checked everywhere.
"""

import types

import pytest

from hiwin_jax import config as C
from hiwin_jax.train import aot

GIB = 2 ** 30


@pytest.mark.parametrize("name, libtpu_name, chips, hbm", [
    ("v5p-8", "v5p:2x2x1", 4, 95.0), ("v5p-16", "v5p:2x2x2", 8, 95.0),
    ("v5p-64", "v5p:2x4x4", 32, 95.0), ("v5p-128", "v5p:4x4x4", 64, 95.0),
    ("v6e-8", "v6e:2x4", 8, 32.0), ("v6e-64", "v6e:8x8", 64, 32.0),
    ("v5litepod-16", "v5e:4x4", 16, 16.0), ("v4-8", "v4:2x2x1", 4, 32.0),
    ("v5p:2x4x4", "v5p:2x4x4", 32, 95.0)])
def test_accelerator_types_map_to_cloud_tpu_slice_shapes(name, libtpu_name, chips, hbm):
  t = aot.parse_topology(name)
  assert (t.libtpu_name, t.num_chips, t.chip.hbm_gib) == (libtpu_name, chips, hbm)


@pytest.mark.parametrize("bad", ["v5p-6", "v5p-7", "h100-8", "v6e:2x2x2", "v5p"])
def test_unknown_or_impossible_topologies_are_refused(bad):
  with pytest.raises(ValueError, match="topology|chips|slice"):
    aot.parse_topology(bad)


def test_donated_outputs_count_once_and_fit_compares_with_hbm():
  m = aot.MemoryReport(argument=40 * GIB, output=30 * GIB, alias=30 * GIB, temp=50 * GIB,
                       code=GIB)
  assert m.total == 91 * GIB
  assert m.fits(95.0) and not m.fits(90.0)
  assert "fits" in m.line(95.0) and "DOES NOT FIT" in m.line(90.0)
  compiled = types.SimpleNamespace(memory_analysis=lambda: types.SimpleNamespace(
      argument_size_in_bytes=3, output_size_in_bytes=2, alias_size_in_bytes=2,
      temp_size_in_bytes=5, generated_code_size_in_bytes=1))
  assert aot.MemoryReport.from_compiled(compiled).total == 9


@pytest.mark.tpu_aot
@pytest.mark.slow
def test_tiny_stage2_step_compiles_for_a_v5p_slice_with_a_memory_report():
  pytest.importorskip("libtpu")
  cfg = C.load_config("tiny_stage2")
  # cut for compile time: one used layer per tower (select_layer -2), the JBU levels kept
  cfg.model.vision.num_layers = 2
  cfg.model.llm.num_layers = 1
  cfg.model.llm.remat = "full"
  r = aot.compile_step(cfg, "v5p-8", batch=1, seq=384, slices=1, canvas=(8, 8),
                       log=lambda _: None)
  assert r.topology.num_chips == 4 and r.mesh_shape["data"] == 4
  assert r.global_rows == 4
  m = r.memory
  assert m.argument > 0 and m.temp > 0 and m.output > 0 and m.total > 0
  # the new state is written into the donated old one
  assert m.alias > 0
  assert r.fits and r.model_flops > 0
  assert "fits" in r.summary()


def test_step_table_has_one_row_per_compile():
  m = aot.MemoryReport(argument=20 * GIB, output=20 * GIB, alias=20 * GIB, temp=70 * GIB, code=0)
  rows = [aot.AotResult(aot.parse_topology("v5p-8"), {"fsdp": 4}, attention, {"llm": "full",
                                                                            "vision": "full"},
                        batch, 4 * batch, 4096, 7, m, 1e15, None, 1, 1, 10.0, 50.0)
          for attention, batch in (("xla", 1), ("splash", 2))]
  table = aot.step_table(rows).splitlines()
  assert table[2] == ("| v5p-8 | xla | 1 (4) | 20.0 GiB | 70.0 GiB | 90.0 GiB | 95 GiB | yes "
                      "| 60 s |"), table[2]
  assert table[3].startswith("| v5p-8 | splash | 2 (8) |") and len(table) == 4


def test_a_program_the_compiler_refuses_is_a_row_that_does_not_fit():
  """XLA:TPU refuses a program whose temporaries exceed HBM (RESOURCE_EXHAUSTED): that is the
  answer "does not fit", reported with what it needed, not an internal error."""
  refusal = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (35.56G) exceeds available HBM (31.25G).")
  r = aot.AotResult(aot.parse_topology("v6e-64"), {"fsdp": 64}, "xla",
                    {"llm": "full", "vision": "full"}, 2, 128, 4096, 7, None, 1e15, None, 1, 1,
                    4.0, 300.0, refusal)
  assert not r.fits
  assert "DOES NOT FIT" in r.summary() and "35.56G" in r.summary()
  row = aot.step_table([r]).splitlines()[2]
  assert row == ("| v6e-64 | xla | 2 (128) | - | refused: 35.56 GiB needed | - | 32 GiB | no "
                 "| 304 s |"), row


@pytest.mark.parametrize("estimate, want", [(2.5e-3, 2.5e-3), (-18.98, None), (0.0, None)])
def test_cost_report_keeps_only_positive_time_estimates(estimate, want):
  """libtpu 0.0.42 returns negative `optimal_seconds` for v6e programs: not a time."""
  compiled = types.SimpleNamespace(
      cost_analysis=lambda: {"flops": 1e9, "bytes accessed": 2e6, "optimal_seconds": estimate},
      as_text=lambda: "a = while(b)\nc = while(d)")
  report = aot.CostReport.from_compiled(compiled)
  assert (report.flops, report.bytes_accessed, report.seconds, report.while_loops) == (
      1e9, 2e6, want, 2)


@pytest.mark.tpu_aot
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_jbu_stack_compiles_per_impl_with_memory_and_cost(impl):
  pytest.importorskip("libtpu")
  fwd = aot.compile_jbu("v6e-8", impl, False, items=2, grid=4, channels=128)
  both = aot.compile_jbu("v6e-8", impl, True, items=2, grid=4, channels=128)
  assert fwd.chip == "v6e" and fwd.memory.output == 2 * 16 * 16 * 128 * 2  # bf16 feat4x
  assert both.memory.output > fwd.memory.output  # parameter and source gradients
  for r in (fwd, both):
    assert r.cost.flops and r.cost.bytes_accessed and r.memory.total > 0
  rows = aot.jbu_table([fwd, both]).splitlines()
  assert rows[2].startswith(f"| v6e | {impl} | fwd |") and rows[3].startswith(
      f"| v6e | {impl} | fwd+bwd |"), rows
