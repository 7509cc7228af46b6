"""Offload on an accelerator: the joint plan with and without saves moved to pinned host memory.

For each model and budget (1/4, 1/8, 1/16 of the device memory a training forward of the
uncompressed model leaves allocated, outputs included), two eager-back-end plans: ``offload=False``
(codecs and recomputation) and the default (``offload="auto"``: offload joins them on an
accelerator, priced by the round trip :func:`actcompile.codecs.offload.transfer_copies` measures).
Columns: **activation MB** (``torch.cuda.memory_allocated`` growth across a training forward,
outputs held), **peak MB** (``max_memory_allocated`` over forward+backward above what was
allocated before), **grad cosine** against the uncompressed step, **step ×** (median of 10 steps
interleaved with the uncompressed model's, synchronised), **plan s**, **offloaded** (saves the plan
moves to the host) and the codecs.

Needs CUDA: it exits with a message elsewhere (``--device cpu`` runs the same rows on the CPU,
where no offload is offered: a check of the script itself).

    python benchmarks/offload.py > benchmarks/results/offload.md
    python benchmarks/offload.py --models resnet18 --budgets 0.125
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from speed import build, call  # noqa: E402  (the same models)

MODELS = ("resnet18", "mobilenet_v2", "vit_small", "gpt2_small")
BUDGETS = (0.25, 0.125, 0.0625)


def first_tensor(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else next(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))


class Runner:
    """One model on one device: its inputs, a fixed loss and what a step allocates."""

    def __init__(self, name: str, device: torch.device):
        torch.manual_seed(0)
        model, inputs, _ = build(name)
        self.device = device
        self.original = model = model.to(device)
        self.inputs = tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, inputs)
        out = first_tensor(call(model, self.inputs))
        self.weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, out.dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def allocated(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        import gc

        from actcompile.measure import heap_in_use   # the CPU check: the process heap (MALLOC_ARENA_MAX=1)
        gc.collect()
        return heap_in_use()

    def step(self, model) -> torch.Tensor:
        """One forward+backward of ``model`` (the original or an actcompiled copy); its gradients."""
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(0)
        (first_tensor(call(model, self.inputs)).float() * self.weight).sum().backward()
        return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])

    def activation_bytes(self, model) -> tuple[int, int]:
        """(allocated growth across a training forward, peak over the step above the start)."""
        for p in model.parameters():
            p.grad = None
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        before = self.allocated()
        out = first_tensor(call(model, self.inputs))
        self.sync()
        grown = self.allocated() - before
        (out.float() * self.weight).sum().backward()
        del out
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device) - before if self.device.type == "cuda" else 0
        return grown, peak

    def seconds(self, model) -> float:
        self.sync()
        start = time.perf_counter()
        self.step(model)
        self.sync()
        return time.perf_counter() - start


def rows_for(name: str, budgets, device: torch.device) -> list[dict]:
    from actcompile import actcompile
    from actcompile.errors import BudgetError

    runner = Runner(name, device)
    original = runner.original
    reference = runner.step(original)
    runner.step(original)
    uncompressed, _ = runner.activation_bytes(original)
    rows = []
    for fraction in budgets:
        for offload in (False, "auto"):
            row = dict(model=name, fraction=fraction, offload=offload, budget=int(fraction * uncompressed),
                       uncompressed=uncompressed)
            rows.append(row)
            try:
                trained = actcompile(copy.deepcopy(original), budget=row["budget"], example_inputs=runner.inputs,
                                     offload=offload)
            except BudgetError as err:
                row["error"] = f"no plan (smallest {err.smallest_bytes / 1e6:.2f} MB)"
                continue
            for _ in range(4):
                got = runner.step(trained)
            plan = trained.plan
            row.update(plan_s=plan.planning_seconds, cosine=F.cosine_similarity(got, reference, dim=0).item(),
                       offloaded=sum(1 for a in plan.assignments if a.codec == "offload"),
                       codecs=sorted({a.codec for a in plan.assignments}))
            row["activation"], row["peak"] = runner.activation_bytes(trained)
            times = {"eager": [], "plan": []}
            for _ in range(10):
                times["eager"].append(runner.seconds(original))
                times["plan"].append(runner.seconds(trained))
            row["step"] = statistics.median(times["plan"]) / statistics.median(times["eager"])
            del trained
    return rows


def table(rows) -> str:
    lines = ["| model | budget | offload | uncompressed MB | budget MB | activation MB | peak MB | grad cosine | "
             "step × | plan s | offloaded | codecs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | 1/{round(1 / r['fraction'])} | {r['offload']} | {r['uncompressed'] / 1e6:.2f} | " \
               f"{r['budget'] / 1e6:.2f} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | | |")
            continue
        lines.append(f"{head} {r['activation'] / 1e6:.2f} | {r['peak'] / 1e6:.1f} | {r['cosine']:.5f} | "
                     f"{r['step']:.2f} | {r['plan_s']:.1f} | {r['offloaded']} | {', '.join(r['codecs'])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/offload.py needs a CUDA device (offload moves saves from an accelerator to the host); "
                 "--device cpu checks the script")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(f"Date: {datetime.date.today()}  \nCommand: `python benchmarks/offload.py {' '.join(argv or sys.argv[1:])}`  \n"
          f"Device: {name}, torch {torch.__version__}\n")
    rows = [r for m in args.models for r in rows_for(m, args.budgets, device)]
    print(table(rows))


if __name__ == "__main__":
    main()
