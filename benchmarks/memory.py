"""Activation memory, gradient fidelity and step time of actcompile at 1/2, 1/4 and 1/8 of baseline.

Each (model, budget) runs in a fresh process with MALLOC_ARENA_MAX=1 (see actcompile/measure.py):
baseline = what the uncompressed forward keeps (heap, measured), planned = the plan's bytes,
measured = what the compressed forward keeps (heap). Gradients are compared with the
uncompressed model on the same batch and RNG state. Step time is forward+backward, compressed
over uncompressed, mean of 3 steps after planning, on this machine's CPU.

    python benchmarks/memory.py > benchmarks/results/memory.md
"""

from __future__ import annotations

import datetime
import platform
import re
import sys

import torch

from actcompile.measure import MeasureError, run_isolated

MODELS = {
    "resnet18_b32": "ResNet-18, batch 32, 64×64",
    "mobilenet_v2_b16": "MobileNetV2, batch 16, 96×96",
    "vit_small": "ViT (6 layers, 384 wide, patch 8), batch 16, 64×64",
    "gpt2_small": "GPT-2-small shape (12 layers, 768 wide), batch 2 × 128 tokens",
}
BUDGETS = (0.5, 0.25, 0.125)


def main() -> None:
    print("# actcompile memory benchmark\n")
    print(f"Command: `python benchmarks/memory.py > benchmarks/results/memory.md`  ")
    print(f"Date: {datetime.date.today().isoformat()}  ")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU\n")
    print("| model | budget | baseline MB | planned MB | measured MB | measured/budget | grad cosine "
          "| grad rel. L2 | step time × | plan s | codecs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, label in MODELS.items():
        for budget in BUDGETS:
            try:
                r = run_isolated(name, budget)
            except MeasureError as err:
                found = re.search(r"smallest achievable .*? is [^(]*\((\d+) B\)", err.stderr)
                reason = (f"no plan: smallest achievable {int(found.group(1)) / 1e6:.2f} MB" if found
                          else err.stderr.strip().splitlines()[-1][:120])
                print(f"| {label} | 1/{round(1 / budget)} | | | | | | | | | {reason} |", flush=True)
                continue
            print(f"| {label} | 1/{round(1 / budget)} | {r['measured_bytes'] / 1e6:.2f} | {r['planned_bytes'] / 1e6:.2f} "
                  f"| {r['measured_compressed_bytes'] / 1e6:.2f} | {r['measured_compressed_bytes'] / r['budget_bytes']:.3f} "
                  f"| {r['grad_cosine']:.5f} | {r['grad_rel_error']:.4f} | {r['step_time_ratio']:.2f} "
                  f"| {r['plan_seconds']:.1f} | {', '.join(r['codecs'])} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
