"""Reach: how far below the uncompressed activation memory each kind of plan gets, at what gradient
fidelity and step time — codecs alone, recomputation alone, and the joint plan.

For each model and budget (1/4, 1/8, 1/16 of the heap growth a training forward of the
uncompressed model measures, outputs included), three plans of the eager back end:

- **lossy**: codecs only (``recompute=False``);
- **recompute**: recomputed segments only (``codecs=["none"]``: no lossy codec; lossless
  integer narrowing stays on, as it loses nothing);
- **joint**: the default plan, codecs and recomputed segments priced by ``time_weight``.

Each row is two fresh processes (as ``speed.py``): one measures memory (``MALLOC_ARENA_MAX=1``,
``MALLOC_MMAP_THRESHOLD_=65536``): **activation MB** (heap growth across a training forward),
**peak MB** (``VmHWM`` over one forward+backward above what the process held before it); one
measures the **step ×** (median of 5 forward+backward steps interleaved with the uncompressed
model's, after 2 warm-up steps). **grad cosine**: all parameter gradients against the
uncompressed step with the model's real loss (cross-entropy; the LM loss), dropout off.
**plan s**: ``plan.planning_seconds``. Codec kernels run eagerly
(``ACTCOMPILE_COMPILE_CODECS=0``): compiling them takes minutes per shape on this machine and
changes the time, not the memory or the gradients.

    python benchmarks/reach.py > benchmarks/results/reach.md
    python benchmarks/reach.py --models resnet18 --budgets 0.125 --modes lossy joint
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from speed import build, call, rss_status, step  # noqa: E402  (the same models and losses)

MODELS = ("resnet18", "mobilenet_v2", "mnist_net", "vit_b_16", "gpt2")
BUDGETS = (0.25, 0.125, 0.0625)
MODES = ("lossy", "recompute", "joint")
OPTIONS = {"lossy": dict(recompute=False), "recompute": dict(codecs=["none"]), "joint": {}}


def measure_one(name: str, fraction: float, mode: str, what: str) -> dict:
    from actcompile import actcompile
    from actcompile.errors import BudgetError
    from actcompile.measure import heap_in_use

    torch.manual_seed(0)
    model, inputs, loss = build(name)
    params = [p for p in model.parameters() if p.requires_grad]
    step(model, params, inputs, loss)
    reference = torch.cat([p.grad.flatten() for p in params]).double()
    for p in params:
        p.grad = None
    before = heap_in_use()
    out = call(model, inputs)
    uncompressed = heap_in_use() - before
    del out
    budget = int(fraction * uncompressed)
    try:
        trained = actcompile(model, budget=budget, example_inputs=inputs, **OPTIONS[mode])
    except BudgetError as err:
        return dict(error=f"no plan (smallest {err.smallest_bytes / 1e6:.2f} MB)", budget_bytes=budget,
                    uncompressed_bytes=uncompressed)
    for _ in range(2):
        step(trained, params, inputs, loss)
    got = torch.cat([p.grad.flatten() for p in params]).double()
    plan = trained.plan
    result = dict(budget_bytes=budget, uncompressed_bytes=uncompressed, plan_s=plan.planning_seconds,
                  grad_cosine=F.cosine_similarity(got, reference, dim=0).item(),
                  recomputed=sum(1 for a in plan.assignments if a.codec == "recompute"),
                  codecs=sorted({a.codec for a in plan.assignments} - {"recompute"}))
    if what == "memory":
        for p in params:
            p.grad = None
        torch.manual_seed(0)
        before = heap_in_use()
        out = call(trained, inputs)
        result["activation_bytes"] = heap_in_use() - before
        del out
        for p in params:
            p.grad = None
        before = rss_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        step(trained, params, inputs, loss)
        result["peak_bytes"] = rss_status()["VmHWM"] - before
    else:
        times = {"eager": [], mode: []}
        for _ in range(5):   # interleaved, so drift hits both alike
            for label, m in (("eager", model), (mode, trained)):
                start = time.perf_counter()
                step(m, params, inputs, loss)
                times[label].append(time.perf_counter() - start)
        result["step_ratio"] = statistics.median(times[mode]) / statistics.median(times["eager"])
    return result


def run_child(name, fraction, mode, what) -> dict:
    env = dict(os.environ, MALLOC_ARENA_MAX="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               ACTCOMPILE_COMPILE_CODECS="0")
    if what == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--one", name, str(fraction), mode, what]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1][:160] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "FRACTION", "MODE", "WHAT"), help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if ns.one:
        name, fraction, mode, what = ns.one
        print(json.dumps(measure_one(name, float(fraction), mode, what)))
        return
    print(f"Date: {datetime.date.today()}  \nCommand: `python benchmarks/reach.py {' '.join(argv or sys.argv[1:])}`  \n"
          f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU\n")
    print("| model | budget | plan | uncompressed MB | budget MB | activation MB | peak MB | grad cosine | step × "
          "| plan s | recomputed segments | codecs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ns.models:
        for fraction in ns.budgets:
            for mode in ns.modes:
                memory = run_child(name, fraction, mode, "memory")
                if "activation_bytes" not in memory:
                    budget = f"{memory['budget_bytes'] / 1e6:.2f}" if "budget_bytes" in memory else ""
                    print(f"| {name} | 1/{round(1 / fraction)} | {mode} | | {budget} | {memory['error']} "
                          "| | | | | | |", flush=True)
                    continue
                timing = run_child(name, fraction, mode, "time")
                ratio = f"{timing['step_ratio']:.2f}" if "step_ratio" in timing else timing.get("error", "")
                over = " (over)" if memory["activation_bytes"] > memory["budget_bytes"] else ""
                print(f"| {name} | 1/{round(1 / fraction)} | {mode} | {memory['uncompressed_bytes'] / 1e6:.2f} "
                      f"| {memory['budget_bytes'] / 1e6:.2f} | {memory['activation_bytes'] / 1e6:.2f}{over} "
                      f"| {memory['peak_bytes'] / 1e6:.1f} | {memory['grad_cosine']:.5f} | {ratio} "
                      f"| {memory['plan_s']:.1f} | {memory['recomputed']} | {', '.join(memory['codecs'])} |", flush=True)


if __name__ == "__main__":
    main()
