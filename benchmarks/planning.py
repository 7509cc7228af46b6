"""How long planning takes, and where: ResNet-50 (batch 32, 224×224, random weights) at 1/8.

``explain`` runs the whole pipeline (Dynamo's trace, one real forward that both captures the
graphs and calibrates every candidate codec on every saved tensor, the FakeTensor profiles,
the knapsack); its time is the plan's ``planning_seconds`` (each ``explain`` traces afresh,
as a new model would). Calibration time is split by codec (summed over tensors and ε).

``--deep N`` plans a residual stack of ``N`` blocks instead (LayerNorm, scale, tanh, add: seven
graph nodes each with the parameters read, 17,503 at ``N = 2500``) and splits the time into the policy pass
(``choose_plans``: the recomputable segments, their merged options, the knapsack) and the rest
(Dynamo's trace, the FakeTensor profiles, the capture forward and its calibration).

    python benchmarks/planning.py > benchmarks/results/planning.md
    python benchmarks/planning.py --model resnet18 --batch 8 --size 64
    python benchmarks/planning.py --deep 2500
    python benchmarks/planning.py --compare resnet18 mobilenet_v2 mnist_net vit_small gpt2_small

``--compare`` plans each model of ``benchmarks/speed.py`` (its inputs) at 1/4 and 1/8 of the
analyzer's baseline with ``codecs="quantizers"`` and with the default set (every codec): the
fastest of two plans, and the codecs each plan chose (the joint plan: recompute offered).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import math
import platform
import sys
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
    parser.add_argument("--deep", type=int, default=0, metavar="N", help="plan a residual stack of N blocks instead")
    parser.add_argument("--compare", nargs="+", metavar="MODEL", help="the quantizers against every codec on these models")
    ns = parser.parse_args(argv)
    if ns.compare:
        return compare_codec_sets(ns.compare, ns.repeat, argv if argv is not None else sys.argv[1:])
    if ns.deep:
        return plan_deep(ns.deep, ns.budget, argv if argv is not None else sys.argv[1:])
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
    for codecs in ("quantizers", None):   # the default set is every codec (since run 5)
        runs = []
        for _ in range(ns.repeat):   # the fastest: this shared machine's speed moves from minute to minute
            seconds.clear()
            calls.clear()
            plan = explain(model, x, budget=ns.budget, codecs=codecs)
            runs.append((plan.planning_seconds, sum(seconds.values()), seconds.most_common()))
        planning, calibration, by_codec = min(runs, key=lambda r: r[0])
        split = ", ".join(f"{name} {s:.1f}" for name, s in by_codec)
        print(f"| {codecs or 'default'} | {planning:.1f} | {calibration:.1f} | {split} |", flush=True)


def compare_codec_sets(models, repeat: int, argv) -> None:
    """Planning seconds and chosen codecs, the quantizers against every codec (see the module doc)."""
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from speed import build
    from actcompile.errors import BudgetError

    print(f"Command: `python benchmarks/planning.py {' '.join(argv)}`  ")
    print(f"Date: {datetime.date.today().isoformat()}  ")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU\n")
    print("| model | budget | codecs | planning s | the plan |")
    print("|---|---|---|---|---|")
    for name in models:
        torch.manual_seed(0)
        model, inputs, _ = build(name)
        for budget in (0.25, 0.125):
            for codecs in ("quantizers", None):
                fastest, chosen = math.inf, "no plan"
                for _ in range(repeat):
                    start = time.perf_counter()
                    try:
                        plan = explain(model, inputs, budget=budget, codecs=codecs)
                        chosen = ", ".join(f"{c} {n}" for c, n in
                                           sorted(collections.Counter(a.codec for a in plan.assignments).items()))
                    except BudgetError:
                        pass
                    fastest = min(fastest, time.perf_counter() - start)
                print(f"| {name} | {budget:g} | {codecs or 'default'} | {fastest:.2f} | {chosen} |", flush=True)


class _Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.scale = torch.nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x + torch.tanh(self.norm(x) * self.scale)


class _Deep(torch.nn.Module):
    def __init__(self, blocks: int, width: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(width) for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.sum()


def plan_deep(blocks: int, budget: float, argv) -> None:
    """Time the policy pass on one large graph (see the module doc)."""
    import actcompile.api as api

    policy_seconds, graph_nodes, saves = [], [], []
    choose_plans = api.choose_plans

    def timed(profiles, *args, **kwargs):
        start = time.perf_counter()
        try:
            return choose_plans(profiles, *args, **kwargs)
        finally:
            policy_seconds.append(time.perf_counter() - start)
            graph_nodes.append(sum(len(p.nodes) for p in profiles))
            saves.append(sum(len(p.tensors) for p in profiles))

    api.choose_plans = timed
    torch.manual_seed(0)
    model, x = _Deep(blocks, 1024), torch.randn(16, 1024)
    plan = explain(model, x, budget=budget)
    recomputed = sum(1 for a in plan.assignments if a.codec == "recompute")
    print(f"Command: `python benchmarks/planning.py {' '.join(argv)}`  ")
    print(f"Date: {datetime.date.today().isoformat()}  ")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU  ")
    print(f"Model: {blocks} residual blocks (LayerNorm, scale, tanh, add) of width 1024, batch 16, budget {budget:g}\n")
    print("| graph nodes | saved tensors | planning s | policy pass s | the rest s | recomputed segments | codecs |")
    print("|---|---|---|---|---|---|---|")
    codecs = sorted({a.codec for a in plan.assignments} - {"recompute"})
    print(f"| {max(graph_nodes)} | {max(saves)} | {plan.planning_seconds:.1f} "
          f"| {sum(policy_seconds):.2f} | {plan.planning_seconds - sum(policy_seconds):.1f} | {recomputed} "
          f"| {', '.join(codecs)} |")


if __name__ == "__main__":
    main()
