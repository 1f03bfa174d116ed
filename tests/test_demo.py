"""`hiwin demo` end to end at CI size (a few steps per stage): every stage runs through the run
loop, both stage-2 models are evaluated, the summary has its shape, every figure is written, and
the `hiwin eval` command the demo prints reproduces its answers."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import re
import shlex

import pytest

from hiwin_jax import cli, demo

TINY = demo.DemoSize(n_train=12, n_eval=12, stage0_steps=1, warmup_steps=2, stage1_steps=2,
                     stage2_steps=2)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert demo.run("tiny", [], out, seed=1, size=TINY) == 0
  return out, printed.getvalue()


def test_demo_summary_has_every_model_per_question_kind(run):
  out, _ = run
  summary = json.loads((out / "demo_summary.json").read_text())
  for key in ("accuracy_untrained", "accuracy_baseline", "accuracy_trained"):
    acc = summary[key]
    assert 0.0 <= acc["accuracy"] <= 1.0 and acc["n"] == 2 * TINY.n_eval, key
    assert set(acc["per_category"]) == {"colour", "pattern"}, key
    assert acc["per_category"]["colour"]["chance"] == 0.25
    assert acc["per_category"]["pattern"]["chance"] == pytest.approx(1 / 3)
  for stage in ("stage0", "warmup", "stage1", "stage2", "stage2_baseline"):
    assert len(summary[f"{stage}_loss"]) == 2, stage
  assert set(summary["detail_gain_over_baseline"]) == {"pattern"}
  assert summary["seed"] == 1 and summary["cpu_seconds"] > 0


def test_demo_writes_every_figure_and_run_folder(run):
  out, _ = run
  for name in ("loss_curves.png", "accuracy.png", "examples.png"):
    path = out / "figures" / name
    assert path.is_file() and path.stat().st_size > 10_000, name
  for stage in ("stage0", "warmup", "stage1", "stage2", "stage2_baseline"):
    assert (out / stage / "loss.png").stat().st_size > 10_000, stage
    assert (out / stage / "final").is_dir(), stage
  assert (out / "stage2" / "official").is_dir()
  assert not (out / "stage2_baseline" / "official").exists()
  for model in ("untrained", "baseline", "full"):
    answers = (out / f"answers_{model}.jsonl").read_text().splitlines()
    assert len(answers) == 2 * TINY.n_eval, model


def test_the_closing_line_names_folders_that_exist(run):
  out, printed = run
  line = next(l for l in printed.splitlines() if l.startswith("done in "))
  folders = re.findall(r"(\w+)/", line.split(f"Outputs in {out}:")[1])
  assert {"stage0", "warmup", "stage1", "stage2", "stage2_baseline", "figures"} <= set(folders)
  for folder in folders:
    assert (out / folder).is_dir(), folder


def test_the_printed_eval_command_reproduces_the_demos_answers(run):
  out, printed = run
  command = next(l.strip() for l in printed.splitlines()
                 if l.strip().startswith("hiwin eval") and "/stage2/final" in l)
  argv = shlex.split(command)[1:]
  assert "--no-pre-resize" in argv
  assert cli.main(argv) == 0
  again = pathlib.Path(argv[argv.index("--answers") + 1])

  def texts(path):
    return {r["question_id"]: r["text"] for r in map(json.loads, path.read_text().splitlines())}

  assert texts(again) == texts(out / "answers_full.jsonl")


def test_an_earlier_run_is_refused_in_one_line_and_replaced_only_with_overwrite(tmp_path, capsys):
  """Every stage resumes from its folder's checkpoints: a second demo into the same --out would
  continue the first (its seed, its settings) instead of running."""
  earlier = tmp_path / "demo"
  (earlier / "stage1").mkdir(parents=True)
  (earlier / "demo_summary.json").write_text("{}")
  assert cli.main(["demo", "--out", str(earlier)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--overwrite" in err and str(earlier) in err
  assert (earlier / "demo_summary.json").read_text() == "{}"  # nothing touched
  (earlier / "notes.txt").write_text("mine")  # not the demo's: --overwrite must not delete it
  assert cli.main(["demo", "--out", str(earlier), "--overwrite"]) == 2
  assert "notes.txt" in capsys.readouterr().err
  assert (earlier / "notes.txt").read_text() == "mine" and (earlier / "stage1").is_dir()


def _summary(untrained, baseline, full):
  """A demo_summary.json with per-kind accuracies (colour, pattern) for the three models."""
  def acc(colour, pattern):
    return {"accuracy": (colour + pattern) / 2, "chance": 0.29,
            "per_category": {"colour": {"accuracy": colour}, "pattern": {"accuracy": pattern}}}
  return {"accuracy_untrained": acc(*untrained), "accuracy_baseline": acc(*baseline),
          "accuracy_trained": acc(*full)}


def test_the_seed_bars_are_the_issues_and_each_can_fail():
  from benchmarks import demo_seeds
  good = demo_seeds.bars(_summary((0, 0), (1.0, 0.33), (1.0, 1.0)))
  assert good == dict.fromkeys(good, True) and len(good) == 4
  failing = {
      "full_overall": _summary((0, 0), (1.0, 0.33), (0.88, 0.88)),
      "full_every_kind": _summary((0, 0), (1.0, 0.33), (1.0, 0.84)),
      "baseline_gap_on_detail": _summary((0, 0), (1.0, 0.71), (1.0, 1.0)),
      "untrained_near_0_or_chance": _summary((0.7, 0.7), (1.0, 0.33), (1.0, 1.0)),
  }
  for bar, summary in failing.items():
    result = demo_seeds.bars(summary)
    assert not result[bar] and all(v for k, v in result.items() if k != bar), (bar, result)
