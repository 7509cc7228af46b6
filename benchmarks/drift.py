"""Plans that stay true: a zero-initialised gate trained for a few hundred steps, with and without drift checks.

The model is an adaLN-Zero-style residual MLP (two blocks ``x + gate(c) ⊙ mlp(LN(x))``, each gate
a zero-initialised linear map of the mean token ``c``) on scikit-learn's digits (real
handwritten digits, 8×8, here 16 tokens of 4 pixels per image; nothing downloaded). At
initialisation every gate output is all zeros, which every codec keeps "exactly", so the plan
gives it the 1-bit mask. Training moves the gates within a few steps.

Three runs from the same initialisation and batches: uncompressed; actcompile at 1/4 with drift
checks off (``check_every=0``); and with checks (forwards 1, 2, 4, 8, 16, then every 25th). Every 25 steps the compressed
run's parameter gradient is compared with the uncompressed gradient at the same parameters on
the same batch (cosine and relative L2 error of all parameters together, cross-entropy loss).

    python benchmarks/drift.py > benchmarks/results/drift.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from actcompile import PlanDriftWarning, actcompile
from actcompile.measure import compare_gradients

TOKENS, PIXELS = 16, 4


class GatedBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.gate = nn.Linear(width, width)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x):
        condition = x.mean(1, keepdim=True)
        return x + self.gate(condition) * self.mlp(self.norm(x))


class GatedNet(nn.Module):
    def __init__(self, width: int = 128):
        super().__init__()
        self.embed = nn.Linear(PIXELS, width)
        self.blocks = nn.Sequential(GatedBlock(width), GatedBlock(width))
        self.head = nn.Linear(width, 10)

    def forward(self, images):
        return self.head(self.blocks(self.embed(images)).mean(1))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16   # (1797, 8, 8)
    tokens = images.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, TOKENS, PIXELS)   # 2×2 patches
    return tokens, torch.tensor(data.target)


def batches(tokens, labels, size, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(labels), (size,), generator=g)
        yield tokens[index], labels[index]


def gradient_of(model, x, y) -> dict:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(check_every: int | None, steps: int, batch: int, every: int, lr: float):
    """One training run; ``check_every=None`` is the uncompressed one. Returns its rows and summary."""
    tokens, labels = digits()
    torch.manual_seed(0)
    model = GatedNet()
    example = tokens[:batch]
    wrapped = model if check_every is None else actcompile(
        model, budget=0.25, example_inputs=example, check_every=check_every)
    first_plan = None if check_every is None else str(wrapped.plan)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rows, seconds = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanDriftWarning)
        for step, (x, y) in enumerate(batches(tokens, labels, batch, steps), start=1):
            if check_every is not None and (step == 1 or step % every == 0):
                exact = gradient_of(model, x, y)
                got = gradient_of(wrapped, x, y)
                cosine, rel = compare_gradients(exact, got)
                gate_codecs = sorted({a.codec for a in wrapped.plan.assignments if a.node.startswith("mul")})
                rows.append((step, cosine, rel, ",".join(gate_codecs), len(wrapped.drifts)))
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(wrapped(x), y)
            loss.backward()
            optimizer.step()
            seconds.append(time.perf_counter() - start)
    with torch.no_grad():
        accuracy = (model.eval()(tokens).argmax(1) == labels).float().mean().item()
    drifts = [] if check_every is None else list(wrapped.drifts)
    # median: the steps that compile codec kernels (the first, and the first after a re-plan) are outliers
    return rows, dict(loss=loss.item(), accuracy=accuracy, ms=1e3 * statistics.median(seconds), drifts=drifts,
                      plan=first_plan)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--every", type=int, default=25, help="steps between gradient comparisons")
    parser.add_argument("--lr", type=float, default=3e-3)
    ns = parser.parse_args(argv)
    print("# Drift checks: a zero-initialised gate trained for a few hundred steps\n")
    print(f"Command: `python benchmarks/drift.py{' ' + ' '.join(argv) if argv else ''}`  ")
    print(f"Date: {datetime.date.today().isoformat()}  ")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU  ")
    print(f"Model: 2 adaLN-Zero-style blocks, width 128, on digits (16 tokens × 4 pixels), batch {ns.batch}, "
          f"Adam lr {ns.lr}, {ns.steps} steps; budget 1/4\n")
    results = {label: run(check, ns.steps, ns.batch, ns.every, ns.lr)
               for label, check in (("uncompressed", None), ("checks off", 0), ("checks on", 25))}
    print("Plan at initialisation (both compressed runs):\n\n```\n" + results["checks off"][1]["plan"] + "\n```\n")
    print("| step | checks off: grad cosine | rel. error | gate codecs | checks on: grad cosine | rel. error "
          "| gate codecs | drifts found |")
    print("|---|---|---|---|---|---|---|---|")
    for off, on in zip(results["checks off"][0], results["checks on"][0]):
        print(f"| {off[0]} | {off[1]:.5f} | {off[2]:.4f} | {off[3]} | {on[1]:.5f} | {on[2]:.4f} | {on[3]} | {on[4]} |")
    print("\n| run | final loss | accuracy (all 1,797 digits) | median step ms | drifts |")
    print("|---|---|---|---|---|")
    for label, (_, summary) in results.items():
        print(f"| {label} | {summary['loss']:.4f} | {summary['accuracy']:.4f} | {summary['ms']:.1f} "
              f"| {len(summary['drifts'])} |")
    found = results["checks on"][1]["drifts"]
    if found:
        print("\nDrifts found (checks on):\n")
        for d in found:
            print(f"- forward {d.forward}: {d}")


if __name__ == "__main__":
    main()
