"""benchmarks/device_check.py: `--smoke` runs every case of the script at tiny shapes on the CPU
(Pallas interpreted), so the one-command GPU check cannot rot between device loans; and the
roofline and card tables it divides by."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import device_check as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cases_per_backend_cover_every_impl_of_the_issue():
  assert D.cases("gpu") == ["conv-xla", "conv-pallas_gpu", "jbu-xla", "jbu-pallas_gpu",
                            "attention-cudnn", "vision", "llm7b-b1", "llm7b-b8", "train1b"]
  assert "conv-pallas_tpu" in D.cases("tpu") and "attention-splash" in D.cases("tpu")
  assert {"conv-pallas_gpu", "conv-pallas_tpu", "jbu-pallas_gpu", "jbu-pallas_tpu",
          "attention-splash"} <= set(D.cases("cpu"))


def test_cards_are_matched_by_device_kind():
  assert D.card("NVIDIA H100 80GB HBM3") == D.CARDS["H100"]
  assert D.card("NVIDIA H100 PCIe") == D.CARDS["H100 PCIe"]
  assert D.card("NVIDIA H200") == D.CARDS["H200"]
  assert D.card("cpu") is None


def test_conv_roofline_is_the_jbu_kernel_notes_bound_at_the_4x_step():
  """jbu-kernel.md §3: 6.47 GFLOP forward; a conv reading the padded f32 input and the filters
  and writing the f32 output once moves 575 MB (our op always writes float32)."""
  shape = (7, 96, 96, 1024)
  bytes_only = (1.0, float("inf"), 0.0)  # 1 B/s, unlimited FLOP/s: the bound is the bytes
  flops_only = (float("inf"), 1.0, 0.0)
  assert D.conv_roofline(shape, 4, False, bytes_only) == pytest.approx(575e6, rel=2e-3)
  assert D.conv_roofline(shape, 4, False, flops_only) == pytest.approx(6.47e9, rel=2e-3)
  assert D.conv_roofline(shape, 4, True, flops_only) == pytest.approx(3 * 6.47e9, rel=2e-3)
  # Backward reads g (f32) and one of (xpad, filters), writes the other's gradient: 2 more passes.
  assert D.conv_roofline(shape, 2, True, bytes_only) > 2.5 * D.conv_roofline(shape, 2, False,
                                                                               bytes_only)
  assert D.conv_roofline(shape, 4, False, None) is None


@pytest.mark.slow
def test_smoke_runs_every_case_on_cpu(tmp_path):
  out = tmp_path / "check.json"
  proc = subprocess.run(
      # started as the issue writes it, as a file, from outside the repository
      [sys.executable, os.path.join(ROOT, "benchmarks", "device_check.py"), "--smoke", "--out",
       str(out), "--cache-dir", str(tmp_path / "cache"), "--budget", "100000"],
      cwd=tmp_path, capture_output=True, text=True, timeout=1800,
      # The script as a user runs it: one CPU device, not the 8 fake ones conftest sets up.
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  rows = report["cases"]
  assert list(rows) == ["info"] + D.cases("cpu")
  assert not [n for n, r in rows.items() if r.get("error")]
  info = report["info"]
  assert info["platform"] == "cpu" and info["jax"] and info["jaxlib"] and report["smoke"]
  for impl in ("pallas_gpu", "pallas_tpu"):  # interpreted kernels == xla (fp32)
    conv = rows[f"conv-{impl}"]
    for what in ("out", "grad_x", "grad_f"):
      assert conv[f"err_f32_{what}"] <= 1e-5, (impl, what, conv)
    assert conv["fwdbwd_bf16_s"] > 0 and conv["fwdbwd_bf16_roofline"] is None  # no CPU peaks
    assert rows[f"jbu-{impl}"]["err_feat4x"] <= 1e-2  # bf16 compute
  att = rows["attention-splash"]
  for path in ("padded", "causal"):  # the kernel is no worse than xla's own bf16 rounding
    assert att[f"err_splash_{path}"] <= 2 * att[f"err_xla_{path}"] + 1e-3, att
  assert rows["llm7b-b8"]["decode_tok_s"] > 0 and rows["train1b"]["seconds"] > 0
  table = (tmp_path / "check.md").read_text()
  for name in rows:
    assert f"| {name} |" in table


def test_run_child_keeps_the_failing_cases_stderr_tail(tmp_path, monkeypatch):
  """A failed case keeps its traceback's end (device runs are rare: the report must say why), and
  a case that exits 0 without a result line is a failed row, not an IndexError in the parent."""
  from benchmarks.harness import run_child
  (tmp_path / "crash.py").write_text(
      "import sys\nsys.stderr.write('x' * 5000 + '\\nTraceback end: boom\\n')\nsys.exit(3)\n")
  (tmp_path / "silent.py").write_text("print('', end='')\n")
  (tmp_path / "slow.py").write_text(
      "import sys, time\nsys.stderr.write('started\\n'); sys.stderr.flush()\ntime.sleep(60)\n")
  monkeypatch.chdir(tmp_path)
  crash = run_child("crash", "c", [])
  assert crash["error"] == "Traceback end: boom" and crash["seconds"] is None
  assert len(crash["stderr_tail"]) == 4000 and crash["stderr_tail"].endswith("boom\n")
  assert run_child("silent", "s", [])["error"] == "no result line"
  slow = run_child("slow", "t", [], timeout=2)
  assert slow["error"] == "timed out after 2 s" and "started" in slow["stderr_tail"]
