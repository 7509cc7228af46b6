"""Gradient fidelity at tight budgets: error weighting by tensor against by gradient share, and
the plan's predicted gradient error against the measured one.

For each model, budget and ``error_weighting`` the eager back end plans on the model's example
inputs, then one step with the model's real loss (cross-entropy against fixed labels; the LM
loss for GPT-2; dropout off) is compared with the uncompressed step: the cosine and relative L2
error of all parameter gradients together (zero-initialised heads given small weights first:
torchvision's ViT head starts at zero, which hides every trunk gradient). ``predicted`` is ``plan.predicted_gradient_error``
(``√Σ share·ε²``, :mod:`actcompile.passes.sensitivity`; probed with a random tangent, so it
predicts the error a random loss direction sees, which the measured real loss need not).

    python benchmarks/fidelity.py > benchmarks/results/fidelity.md
    python benchmarks/fidelity.py --models resnet18 --budgets 0.125   # a subset
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from speed import build, call  # noqa: E402  (the same models and losses as the speed table)

MODELS = ("resnet18", "mnist_net", "vit_b_16", "gpt2", "mobilenet_v2")   # classifiers and an LM: the losses speed.py knows
BUDGETS = (0.25, 0.125, 0.0625)
WEIGHTINGS = ("tensor", "gradient", "gradient:0")


def gradients(model, inputs, loss) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss(call(model, inputs)).backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])


def measure(name: str, budget: float, weighting: str) -> dict:
    from actcompile import actcompile
    from actcompile.errors import BudgetError

    torch.manual_seed(0)
    model, inputs, loss = build(name)   # zero-initialised heads get small weights there
    reference = gradients(model, inputs, loss)
    start = time.perf_counter()
    options = dict(error_weighting=weighting)
    if weighting.startswith("gradient:"):          # "gradient:0": the gradient weighting with that floor
        options = dict(error_weighting="gradient", gradient_floor=float(weighting.split(":")[1]))
    try:
        wrapped = actcompile(model, budget=budget, example_inputs=inputs, **options)
    except BudgetError as err:
        return dict(error=f"BudgetError: smallest {err.smallest_bytes} B")
    plan_s = time.perf_counter() - start
    got = gradients(wrapped, inputs, loss)
    plan = wrapped.plan
    return dict(cosine=F.cosine_similarity(got, reference, dim=0).item(),
                measured=(torch.linalg.vector_norm(got - reference) / torch.linalg.vector_norm(reference)).item(),
                predicted=plan.predicted_gradient_error, plan_s=plan_s,
                codecs=", ".join(sorted({a.codec for a in plan.assignments})))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    parser.add_argument("--weightings", nargs="+", default=WEIGHTINGS)
    ns = parser.parse_args(argv)
    torch.set_num_threads(2)
    print(f"Date: {datetime.date.today()}  \nMachine: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, CPU\n")
    print("| model | budget | weighting | grad cosine | measured rel. error | predicted | plan s | codecs |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ns.models:
        for budget in ns.budgets:
            for weighting in ns.weightings:
                r = measure(name, budget, weighting)
                if "error" in r:
                    print(f"| {name} | {budget:g} | {weighting} | {r['error']} | | | | |", flush=True)
                    continue
                predicted = "-" if r["predicted"] is None else f"{r['predicted']:.4f}"
                print(f"| {name} | {budget:g} | {weighting} | {r['cosine']:.5f} | {r['measured']:.4f} | "
                      f"{predicted} | {r['plan_s']:.1f} | {r['codecs']} |", flush=True)


if __name__ == "__main__":
    main()
