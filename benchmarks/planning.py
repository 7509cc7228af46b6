"""How long planning takes, and where: ResNet-50 (batch 32, 224×224, random weights) at 1/8.

``explain`` runs the whole pipeline (Dynamo's trace, one real forward that both captures the
graphs and calibrates every candidate codec on every saved tensor, the FakeTensor profiles,
the knapsack); its time is the plan's ``planning_seconds`` (each ``explain`` traces afresh,
as a new model would). Calibration time is split by codec (summed over tensors and ε).

    python benchmarks/planning.py > benchmarks/results/planning.md
    python benchmarks/planning.py --model resnet18 --batch 8 --size 64
"""

from __future__ import annotations

import argparse
import collections
import datetime
import platform
import time

import torch
import torchvision

import actcompile.passes.calibrate as calibrate
from actcompile import explain


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--budget", type=float, default=0.125)
    parser.add_argument("--repeat", type=int, default=2, help="plans per codec set; the fastest is shown")
    ns = parser.parse_args(argv)
    seconds, calls = collections.Counter(), collections.Counter()
    measure = calibrate.measure

    def timed(codec, x, sample=None):
        start = time.perf_counter()
        try:
            return measure(codec, x, sample)
        finally:
            seconds[codec.name] += time.perf_counter() - start
            calls[codec.name] += 1

    ladder = calibrate._measure_ladder

    def timed_ladder(run, x, sample):   # one codec's ε ladder measured at once
        start = time.perf_counter()
        try:
            return ladder(run, x, sample)
        finally:
            seconds[run[0].name] += time.perf_counter() - start
            calls[run[0].name] += 1

    calibrate.measure = timed
    calibrate._measure_ladder = timed_ladder
    torch.manual_seed(0)
    model = getattr(torchvision.models, ns.model)()
    x = torch.randn(ns.batch, 3, ns.size, ns.size)
    print("# Planning time\n")
    print(f"Command: `python benchmarks/planning.py{' ' + ' '.join(argv) if argv else ''}`  ")
    print(f"Date: {datetime.date.today().isoformat()}  ")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU  ")
    print(f"Model: torchvision {ns.model}, batch {ns.batch}, {ns.size}×{ns.size}, budget {ns.budget:g}\n")
    with torch.no_grad():
        start = time.perf_counter()
        model(x)
        forward = time.perf_counter() - start
    print(f"One plain forward (no grad): {forward:.2f} s\n")
    print("| codecs | planning s | calibration s | of which, by codec |")
    print("|---|---|---|---|")
    for codecs in (None, "all"):
        runs = []
        for _ in range(ns.repeat):   # the fastest: this shared machine's speed moves from minute to minute
            seconds.clear()
            calls.clear()
            plan = explain(model, x, budget=ns.budget, codecs=codecs)
            runs.append((plan.planning_seconds, sum(seconds.values()), seconds.most_common()))
        planning, calibration, by_codec = min(runs, key=lambda r: r[0])
        split = ", ".join(f"{name} {s:.1f}" for name, s in by_codec)
        print(f"| {codecs or 'default'} | {planning:.1f} | {calibration:.1f} | {split} |", flush=True)


if __name__ == "__main__":
    main()
