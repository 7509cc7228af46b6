"""The ``actcompile`` command: a plan from the shell with its measured bytes, and one-line errors."""

import json
import os
import re
import subprocess
import sys

import pytest

from actcompile import ModelPlan
from actcompile.cli import main, parse_shape


def test_plan_prints_the_table_and_measured_bytes_under_the_budget(tmp_path):
    """The real command (a console script, re-executed with one malloc arena): exit 0, the plan
    table, and the heap's kept bytes after a training forward, which must be within the budget."""
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    run = subprocess.run([sys.executable, "-m", "actcompile.cli", "plan", "actcompile.zoo:InplaceCNN",
                          "--input", "4x3x32x32", "--budget", "0.25", "--json", str(out),
                          "--plot", str(tmp_path / "plan.svg")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    plan = ModelPlan.from_json(out.read_text())
    assert plan.planned_bytes <= plan.budget_bytes < plan.baseline_bytes
    assert "before → after" in run.stdout and all(a.codec in run.stdout for a in plan.assignments)   # the table
    assert "budget" in (tmp_path / "plan.svg").read_text()
    assert "calibrating" in run.stderr, run.stderr   # the progress lines
    assert "actcompile: planned in" in run.stderr, run.stderr
    found = re.search(r"the heap keeps .*\((\d+) B\) after .* budget .*\((\d+) B\)", run.stdout)
    assert found, run.stdout
    kept, budget = int(found[1]), int(found[2])
    assert budget == plan.budget_bytes and 0 < kept <= budget, run.stdout


def test_demo_the_readme_main_job_trains_both_and_meets_its_budget():
    """``actcompile demo`` (README's main job), one short epoch, eager back end: exit 0 only if the
    heap kept ≤ the budget; it prints the plan, both runs' loss and accuracy, and the kept bytes
    at about a quarter of the uncompressed ones."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}   # it re-executes itself
    run = subprocess.run([sys.executable, "-m", "actcompile.cli", "demo", "--epochs", "1", "--batch", "128",
                          "--eager-only"], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "budget met" in run.stdout and "before → after" in run.stdout
    found = re.search(r"uncompressed (\S+ \S+), actcompile (\S+ \S+) \(([\d.]+)%\)", run.stdout)
    assert found, run.stdout
    assert 10.0 < float(found[3]) <= 26.0, found[0]   # 1/4 of the baseline, which is within 2% of the heap
    assert len(re.findall(r"held-out accuracy [\d.]+%", run.stdout)) == 2, run.stdout
    losses = [float(v) for v in re.findall(r"final loss ([\d.]+)", run.stdout)]
    assert len(losses) == 2 and max(losses) < 1.2, losses   # both learn (chance: ln 10 = 2.30)


@pytest.mark.parametrize("argv, says", [
    (["plan", "torchvision.models", "--input", "2x3x32x32", "--budget", "0.5"], "package.module:factory"),
    (["plan", "no_such_module_here:make", "--input", "2x3", "--budget", "0.5"], "cannot import module"),
    (["plan", "torchvision.models:no_such_net", "--input", "2x3", "--budget", "0.5"], "has no 'no_such_net'"),
    (["plan", "torchvision.models:resnet18", "--input", "2x3xA", "--budget", "0.5"], "not a shape"),
    (["plan", "torchvision.models:resnet18", "--input", "2x0x4", "--budget", "0.5"], "not a shape"),
    (["plan", "torchvision.models:resnet18", "--input", "2x3x32x32", "--budget", "1.5"], "fraction of the baseline"),
    (["plan", "torchvision.models:resnet18", "--input", "2x3x32x32", "--budget", "lots"], "not a size"),
    (["plan", "torchvision.models:resnet18", "--input", "2x3x32x32", "--budget", "0.5", "--codecs", "int8,zip"],
     "unknown ['zip']"),
    (["plan", "torchvision.models:resnet18", "--input", "2x3x32x32", "--budget", "0.5", "--plot", "plan.xyz"],
     "end it with one of"),
    (["plan", "torch.nn:Linear", "--arg", "in_features=4", "--arg", "out_features=4", "--input", "2x4",
      "--budget", "1.0", "--json", "/no/such/dir/plan.json"], "no such directory"),
    (["plan", "torchvision.models:resnet18", "--input", "2x3x32x32", "--budget", "0.5", "--dtype", "int8"],
     "floating dtype"),
    (["plan", "torchvision.models:resnet18", "--arg", "depth", "--input", "2x3x32x32", "--budget", "0.5"],
     "key=value"),
    (["plan", "torchvision.models:resnet18", "--arg", "colour=3", "--input", "2x3x32x32", "--budget", "0.5"],
     "raised TypeError"),
    (["plan", "torch:ones", "--arg", "size=(2,)", "--input", "2x3", "--budget", "0.5"], "returned a Tensor"),
    (["plan", "torchvision.models:resnet18", "--input", "2x7", "--budget", "0.5"], "cannot run on the example inputs"),
])
def test_bad_model_specs_shapes_and_budgets_are_one_line_and_exit_2(capsys, argv, says):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()   # progress lines may come first, if planning began
    assert lines[-1].startswith("actcompile: error: ") and says in lines[-1], err
    assert sum(line.startswith("actcompile: error") for line in lines) == 1 and "Traceback" not in err


def test_argparse_errors_also_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "torchvision.models:resnet18", "--budget", "0.5"])   # no --input
    assert exit_.value.code == 2
    assert "--input" in capsys.readouterr().err


def test_shapes_parse():
    assert parse_shape("32x3x224x224") == (32, 3, 224, 224)
    assert parse_shape("2×128") == (2, 128)


def test_plan_json_of_the_compiled_back_end_lists_one_plan_per_graph(tmp_path, capsys):
    out = tmp_path / "plans.json"
    assert main(["plan", "torch.nn:Linear", "--arg", "in_features=64", "--arg", "out_features=64", "--input",
                 "8x64", "--budget", "1.0", "--compile", "--json", str(out), "--plot", str(tmp_path / "plan.png")]) == 0
    plans = json.loads(out.read_text())
    assert len(plans) == 1 and plans[0]["regions"] == []   # a Linear saves only its input: nothing to pack
    assert [s["detail"] for s in plans[0]["skipped"]] == ["input"]
    assert "graph 0:" in capsys.readouterr().out
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_progress_draws_a_bar_on_a_terminal_and_phases_elsewhere():
    import io

    from actcompile.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen, log = Terminal(), io.StringIO()
    for stream in (screen, log):
        p = Progress(stream)
        p.phase("graph 0/0: calibrating 2 saved tensors")
        p.step(1, 2)
        p.done("planned in 0.1 s")
    assert "[" + "#" * 12 + "." * 12 + "] 1/2" in screen.getvalue() and screen.getvalue().endswith("planned in 0.1 s\n")
    assert log.getvalue().splitlines() == ["actcompile: graph 0/0: calibrating 2 saved tensors",
                                           "actcompile: planned in 0.1 s"]
