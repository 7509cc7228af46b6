"""Does a transform's error hurt the gradient more than a quantizer's of the same size?

The policy weighs every codec's error alike: a candidate costs ``w × ε²``, ``ε`` its measured
relative reconstruction error, whatever the codec. Quantization error is spread over every
element like noise; a low-rank, low-pass or thresholding codec drops whole components, the same
ones for every position, and an error that does not average out could reach the parameter
gradients more per unit of ``ε`` (``reach.md`` run 3 asked for a "structured-error penalty").

This measures it. Each model plans with one codec family at a time (``recompute=False``; CNNs
add ``mask``, exact for ReLU's own use, so the lossy codec takes the rest), then one step with
the model's real loss (``speed.build``; dropout off) is compared with the uncompressed step.
**ratio** = measured relative L2 error of all parameter gradients ÷ ``√Σε²`` over the plan's
lossy tensors (the per-tensor weighting's cost). Equal ratios across codec families mean the
policy's cost ranks them fairly; a family with a ratio well above the quantizers' would need
the penalty.

    python benchmarks/error_structure.py > benchmarks/results/error_structure.md
    python benchmarks/error_structure.py --models gpt2 --codecs int4 dct
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from speed import build, step  # noqa: E402  (the same models and losses)

# (model, budget): a budget each family can meet alone on most models (the transforms reach
# less far than the quantizers: on ResNet-18 at batch 8, 64², none plans at 0.3)
MODELS = {"resnet18": 0.65, "mobilenet_v2": 0.65, "gpt2": 0.5}
CODECS = ("int8", "int4", "int2", "dct", "fft_lowpass", "wavelet", "svd", "hosvd", "threshold")
CNNS = ("resnet18", "mobilenet_v2")


def flat_gradients(params) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params]).double()


def measure(name: str, budget: float, codecs) -> list[dict]:
    from actcompile import actcompile
    from actcompile.errors import BudgetError

    torch.manual_seed(0)
    model, inputs, loss = build(name)
    params = [p for p in model.parameters() if p.requires_grad]
    step(model, params, inputs, loss)
    reference = flat_gradients(params)
    rows = []
    for codec in codecs:
        names = ["mask", codec] if name in CNNS else [codec]
        row = dict(model=name, budget=budget, codec=codec)
        rows.append(row)
        copied = copy.deepcopy(model)
        own = [p for p in copied.parameters() if p.requires_grad]
        try:
            wrapped = actcompile(copied, budget=budget, example_inputs=inputs, codecs=names, recompute=False)
        except BudgetError as err:
            row["error"] = f"no plan (smallest {err.smallest_bytes / 1e6:.2f} MB)"
            continue
        step(wrapped, own, inputs, loss)   # the first step plans and calibrates
        step(wrapped, own, inputs, loss)
        got = flat_gradients(own)
        lossy = [a for a in wrapped.plan.assignments if a.error > 0]
        cost = math.sqrt(sum(a.error ** 2 for a in lossy))
        measured = ((got - reference).norm() / reference.norm()).item()
        row.update(tensors=len(lossy), cost=cost, measured=measured, ratio=measured / cost if cost else math.nan,
                   cosine=torch.nn.functional.cosine_similarity(got, reference, dim=0).item())
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--codecs", nargs="+", default=list(CODECS))
    ns = parser.parse_args(argv)
    os.environ.setdefault("ACTCOMPILE_COMPILE_CODECS", "0")   # the gradients are the same; compiling is slow
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print("Date:", datetime.date.today().isoformat(), " ")
    print("Command: `python benchmarks/error_structure.py " + " ".join(argv or sys.argv[1:]) + "`  ")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU\n")
    print("| model | budget | codec | lossy tensors | √Σε² | measured gradient error | ratio | cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ns.models:
        for r in measure(name, MODELS[name], ns.codecs):
            head = f"| {r['model']} | {r['budget']} | {r['codec']} "
            if "error" in r:
                print(head + f"| {r['error']} | | | | |")
            else:
                ratio = f"{r['ratio']:.3f}" if r["cost"] > 1e-3 else "-"   # 0/0: nothing measurable lost
                print(head + f"| {r['tensors']} | {r['cost']:.4f} | {r['measured']:.4f} | {ratio} "
                      f"| {r['cosine']:.5f} |", flush=True)


if __name__ == "__main__":
    main()
