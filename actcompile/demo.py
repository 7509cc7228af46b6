"""``actcompile-demo``: plan and train a real model on real data at a quarter of its activation memory.

Trains torchvision's ResNet-18 on scikit-learn's bundled handwritten digits (1,797 8×8 images,
upsampled to 32×32; nothing is downloaded) twice from the same initial weights and batches:
once as is, once through ``actcompile(model, budget=...)``, and then through
``torch.compile(model, backend=actcompile.backend(budget=...))`` (the Inductor back end; skip it
with ``--eager-only``). Prints the plans, the activation bytes the heap really keeps per step,
and the loss, held-out accuracy and time of each.

Run: ``actcompile-demo --budget 0.25 --epochs 3``
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn


def digits(seed: int = 0):
    """Train/test tensors of scikit-learn's digits, as 3×32×32 images in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:   # optional dependency: say what to install
        raise SystemExit("actcompile-demo needs scikit-learn: pip install 'actcompile[demo]'") from err
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    images = nn.functional.interpolate(images, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(order))
    return (images[order[:cut]], labels[order[:cut]]), (images[order[cut:]], labels[order[cut:]])


def train(model, batches, epochs: int, lr: float = 0.05):
    """SGD with momentum under a one-cycle schedule. The schedule's decay to a small rate at the end
    is what makes two short runs comparable: at a constant rate, the held-out accuracy after a few
    dozen steps moved by 15 points between runs that differed only in rounding (BatchNorm's
    running statistics lag the last, large updates)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(batches))
    losses = []
    for _ in range(epochs):
        for step, (x, y) in enumerate(batches):
            torch.manual_seed(step)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="actcompile-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="0.25", help="fraction of baseline (e.g. 0.25) or a size ('2MB')")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and train/test split")
    parser.add_argument("--eager-only", action="store_true", help="skip the torch.compile (Inductor) back end")
    ns = parser.parse_args(argv)
    if os.environ.get("MALLOC_ARENA_MAX") != "1":   # glibc's heap counters need one arena (measure.py)
        os.environ["MALLOC_ARENA_MAX"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "actcompile.demo", *(argv or sys.argv[1:])])

    import torchvision

    from actcompile import actcompile
    from actcompile.measure import kept_by_forward
    from actcompile.plan import format_bytes

    try:
        budget = float(ns.budget)
    except ValueError:
        budget = ns.budget
    torch.manual_seed(ns.seed)
    (train_x, train_y), (test_x, test_y) = digits(ns.seed)
    batches = list(zip(train_x.split(ns.batch), train_y.split(ns.batch)))[:-1]   # equal-sized batches
    model = torchvision.models.resnet18(num_classes=10)
    reference = copy.deepcopy(model)
    for_inductor = copy.deepcopy(model)

    start = time.perf_counter()
    compiled = actcompile(model, budget=budget, example_inputs=batches[0][0])
    plan_seconds = time.perf_counter() - start
    print(compiled.plan)
    print(f"\nplanned in {plan_seconds:.1f} s")
    for net in (reference, compiled):   # one step first: it compiles the codec kernels (kept, not activations)
        net(batches[0][0]).sum().backward()
        net.zero_grad(set_to_none=True)
    kept_ref = kept_by_forward(reference, batches[0][0])
    kept_cmp = kept_by_forward(compiled, batches[0][0])
    print(f"activation memory per step (heap, measured): uncompressed {format_bytes(kept_ref)}, "
          f"actcompile {format_bytes(kept_cmp)} ({kept_cmp / kept_ref:.1%}); budget {format_bytes(compiled.plan.budget_bytes)}")

    timings = {}
    for name, net in (("uncompressed", reference), ("actcompile", compiled)):
        start = time.perf_counter()
        losses = train(net, batches, ns.epochs)
        timings[name] = time.perf_counter() - start
        print(f"{name:>12}: final loss {sum(losses[-5:]) / 5:.4f}, held-out accuracy "
              f"{accuracy(net, test_x, test_y):.1%}, {timings[name]:.1f} s")
    ok = kept_cmp <= compiled.plan.budget_bytes
    print("budget met" if ok else "BUDGET EXCEEDED")
    if not ns.eager_only:
        inductor(for_inductor, budget, batches, ns.epochs, (test_x, test_y))
    return 0 if ok else 1


def inductor(model, budget, batches, epochs: int, test) -> None:
    """The same training through ``torch.compile`` with actcompile's Inductor back end."""
    import actcompile
    from actcompile.plan import format_bytes

    be = actcompile.backend(budget=budget)
    compiled = torch.compile(model, backend=be)
    start = time.perf_counter()
    try:   # the first step compiles (minutes on a CPU); Inductor needs a C++ compiler here
        compiled(batches[0][0]).sum().backward()
    except Exception as err:
        print(f"\ntorch.compile back end unavailable here ({type(err).__name__}: {str(err).splitlines()[0]})")
        return
    model.zero_grad(set_to_none=True)
    print(f"\ntorch.compile(backend=actcompile): compiled in {time.perf_counter() - start:.0f} s; plan of its graph:")
    plan = be.plans[0]
    print(plan)
    # the plan's own baseline is what its partition saves; where Inductor was asked to recompute
    # more (be.memory_budgets), plain torch.compile's saved bytes are the budget ledger's
    plain = sum(g.baseline for g in be.forward_budget.graphs.values())
    recomputing = (f", Inductor recomputing more (activation_memory_budget {be.memory_budgets[0]})"
                   if be.memory_budgets[0] < 1.0 else "")
    print(f"saved for backward: {format_bytes(plan.planned_bytes)} of the {format_bytes(plain)} "
          f"plain torch.compile saves{recomputing}; budget {format_bytes(plan.budget_bytes)}")
    start = time.perf_counter()
    losses = train(compiled, batches, epochs)
    print(f"{'compiled':>12}: final loss {sum(losses[-5:]) / 5:.4f}, held-out accuracy "
          f"{accuracy(compiled, *test):.1%}, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
