"""Reach: how far below the uncompressed activation memory each kind of plan gets, at what gradient
fidelity and step time — codecs alone, recomputation alone, and the joint plan.

For each model and budget (1/4, 1/8, 1/16 of the heap growth a training forward of the
uncompressed model measures, outputs included), three plans of the eager back end:

- **lossy**: codecs only (``recompute=False``);
- **recompute**: recomputed segments only (``codecs=["none"]``: no lossy codec; lossless
  integer narrowing stays on, as it loses nothing);
- **joint**: the default plan, codecs and recomputed segments priced by ``time_weight``.

Each model is measured in one fresh process (``MALLOC_ARENA_MAX=1``, ``MALLOC_MMAP_THRESHOLD_=65536``
so freed tensors leave the process at once), every plan on a fresh copy of the model:
**activation MB** (heap growth across a training forward), **peak MB** (``VmHWM`` over one
forward+backward above what the process held before it), **step ×** (median of 5
forward+backward steps interleaved with the uncompressed model's; the mmap threshold slows every
allocation of both alike). Every plan is measured in the steady state a training run spends its
time in: after 32 steps, past the early drift and heap checks (forwards 1, 2, 4, …, 32; see
``speed.warmup_steps``). A heap check that finds the forward over its budget twice re-plans with
the per-node reserve it measured; the forced mmap threshold rounds every large allocation up to
whole pages, ~1.8 KB per autograd node on GPT-2-small against the 1,024 B prior, so the first
forwards of a plan near its budget can be over by a few tenths of a percent (run 4's notes). **grad cosine**: all parameter gradients
against the uncompressed step with the model's real loss (cross-entropy; the LM loss), dropout
off. **plan s**: ``plan.planning_seconds``. **analyzer / heap**: the plan's predicted
uncompressed heap growth (``plan.predicted_heap_bytes``: the storages FakeTensors show, and
autograd's records at the per-node reserve) over the measured uncompressed MB. Codec kernels run eagerly
(``ACTCOMPILE_COMPILE_CODECS=0``): compiling them takes minutes per shape on this machine and
changes the time, not the memory or the gradients. ``--compiled-codecs`` runs them as the
library's default does (Inductor kernels; the first steps of each new shape compile, before
the timed steady state).

    python benchmarks/reach.py > benchmarks/results/reach.md
    python benchmarks/reach.py --models resnet18 --budgets 0.125 --modes lossy joint
    python benchmarks/reach.py --codecs all     # the lossy and joint plans offered every codec
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
from speed import build, measure_memory, step, warmup_steps  # noqa: E402  (the same models, losses and measures)

MODELS = ("resnet18", "mobilenet_v2", "mnist_net", "vit_small", "gpt2_small")   # the small ViT and GPT-2-small shape
BUDGETS = (0.25, 0.125, 0.0625)
MODES = ("lossy", "recompute", "joint")
OPTIONS = {"lossy": dict(recompute=False), "recompute": dict(codecs=["none"]), "joint": {}}


def measure_model(name: str, fractions, modes, codecs=None) -> list[dict]:
    """Every (budget, mode) row of one model, in this process; ``codecs`` (None: the default set)
    are offered to the lossy and joint plans."""
    import copy

    from actcompile import actcompile
    from actcompile.errors import BudgetError
    torch.manual_seed(0)
    model, inputs, loss = build(name)
    params = [p for p in model.parameters() if p.requires_grad]
    step(model, params, inputs, loss)
    reference = torch.cat([p.grad.flatten() for p in params]).double()
    uncompressed = measure_memory(model, params, inputs, loss)["activation_bytes"]
    rows = []
    for fraction in fractions:
        for mode in modes:
            row = dict(model=name, fraction=fraction, mode=mode, budget_bytes=int(fraction * uncompressed),
                       uncompressed_bytes=uncompressed)
            rows.append(row)
            copied = copy.deepcopy(model)
            own = [p for p in copied.parameters() if p.requires_grad]
            try:
                options = dict(OPTIONS[mode])
                if codecs is not None and mode != "recompute":
                    options["codecs"] = codecs
                trained = actcompile(copied, budget=row["budget_bytes"], example_inputs=inputs, **options)
                # the prediction before any step: a heap check later re-measures the per-node reserve
                row["analyzer_bytes"] = trained.plan.predicted_heap_bytes
            except BudgetError as err:
                row["error"] = f"no plan (smallest {err.smallest_bytes / 1e6:.2f} MB)"
                continue
            for _ in range(warmup_steps("actcompile", trained, "time")):   # to the steady state (see above)
                step(trained, own, inputs, loss)
            got = torch.cat([p.grad.flatten() for p in own]).double()
            plan = trained.plan
            row.update(plan_s=plan.planning_seconds, grad_cosine=F.cosine_similarity(got, reference, dim=0).item(),
                       recomputed=sum(1 for a in plan.assignments if a.codec == "recompute"),
                       codecs=sorted({a.codec for a in plan.assignments} - {"recompute"}))
            row.update(measure_memory(trained, own, inputs, loss))
            times = {"eager": [], mode: []}
            for _ in range(5):   # interleaved, so drift hits both alike
                for label, m, ps in (("eager", model, params), (mode, trained, own)):
                    start = time.perf_counter()
                    step(m, ps, inputs, loss)
                    times[label].append(time.perf_counter() - start)
            row["step_ratio"] = statistics.median(times[mode]) / statistics.median(times["eager"])
            del trained, copied
    return rows


def run_child(name, fractions, modes, codecs=None, compiled_codecs=False) -> list[dict]:
    env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="65536",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               ACTCOMPILE_COMPILE_CODECS="1" if compiled_codecs else "0")
    cmd = [sys.executable, __file__, "--one", name, json.dumps(list(fractions)), json.dumps(list(modes)),
           json.dumps(codecs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return [dict(model=name, fraction=f, mode=m, error=lines[-1][:160] if lines else f"exit {proc.returncode}")
                for f in fractions for m in modes]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--codecs", default=None,
                        help='codecs offered to the lossy and joint plans ("all", or names joined by commas)')
    parser.add_argument("--compiled-codecs", action="store_true",
                        help="codec kernels compiled with Inductor (the library's default), not eager")
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "FRACTIONS", "MODES", "CODECS"), help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if ns.one:
        name, fractions, modes, codecs = ns.one
        print(json.dumps(measure_model(name, json.loads(fractions), json.loads(modes), json.loads(codecs))))
        return
    print(f"Date: {datetime.date.today()}  \nCommand: `python benchmarks/reach.py {' '.join(argv or sys.argv[1:])}`  \n"
          f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU\n")
    print("| model | budget | plan | uncompressed MB | analyzer / heap | budget MB | activation MB | peak MB "
          "| grad cosine | step × | plan s | recomputed segments | codecs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ns.models:
        codecs = ns.codecs if ns.codecs in (None, "all") else ns.codecs.split(",")
        for r in run_child(name, ns.budgets, ns.modes, codecs, ns.compiled_codecs):
            head = f"| {name} | 1/{round(1 / r['fraction'])} | {r['mode']} "
            if "activation_bytes" not in r:
                budget = f"{r['budget_bytes'] / 1e6:.2f}" if "budget_bytes" in r else ""
                print(head + f"| | | {budget} | {r['error']} | | | | | | |", flush=True)
                continue
            over = " (over)" if r["activation_bytes"] > r["budget_bytes"] else ""
            print(head + f"| {r['uncompressed_bytes'] / 1e6:.2f} | {r['analyzer_bytes'] / r['uncompressed_bytes']:.3f} "
                  f"| {r['budget_bytes'] / 1e6:.2f} "
                  f"| {r['activation_bytes'] / 1e6:.2f}{over} | {r['peak_bytes'] / 1e6:.1f} | {r['grad_cosine']:.5f} "
                  f"| {r['step_ratio']:.2f} | {r['plan_s']:.1f} | {r['recomputed']} | {', '.join(r['codecs'])} |",
                  flush=True)


if __name__ == "__main__":
    main()
