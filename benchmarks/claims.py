"""The research papers' memory claims, re-measured with our codecs at the authors' settings, and
what a budgeted plan does at the same memory.

* TMLR 2024 (Vu et al., thresholding/DCT/wavelet): ResNet-18 in its CIFAR form (batch 128,
  3×32×32, 100 classes) with Conv+BN+ReLU compressed in all blocks (paper: −63% activation
  memory), and a 3-D U-Net (batch 1, 4 channels, 96³; paper: −95%). Their settings: λ = 100
  (keep the largest 1% of the values or of the 8×8-block DCT or db3 3-level wavelet coefficients).
  The U-Net's widths are 16-32-64-128-256 (theirs start at 64: a 96³ forward at that width takes
  minutes per convolution on this 2-core machine); the ratio the claim is about does not depend
  on the width much, the absolute MB do.
* NeurIPS 2024 (Nguyen et al., HOSVD): the convolution inputs at explained variance 0.8
  (ε = √(1 − 0.8) ≈ 0.447).
* Band-limited training (Dziedzic et al., ICML 2019): the convolution inputs' spectrum halved.

Each method runs as the research code does: every module of the listed kinds packs what it
saves with the codec (saved-tensor hooks entered around the module). Columns:

* ``codec ratio`` — packed bytes / raw bytes of the tensors the method packs: the papers' metric;
* ``heap MB`` — heap growth across the training forward (what it leaves alive, outputs
  included; ``MALLOC_ARENA_MAX=1``), measured; ``vs plain`` its share of the uncompressed model's;
* ``peak MB`` — resident high-water mark over forward + backward above the memory before it;
* ``grad cos`` — cosine of all parameter gradients against the uncompressed step (the model's
  loss: cross-entropy; per-voxel BCE for the U-Net; fixed random labels);
* ``step s`` — one forward + backward.

Then ``actcompile`` planned with the method's measured heap bytes as its budget: the same memory,
chosen per tensor.

    python benchmarks/claims.py > benchmarks/results/claims.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from finetune import compress_saves_in_, measured_heap_process  # noqa: E402  (one implementation each)

CONV_BN_RELU = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv3d, nn.BatchNorm3d)
LAMBDA_100 = {
    "DCT λ=100": ("dct", dict(block=8, select="largest", keep=0.01)),
    "threshold λ=100": ("threshold", dict(keep=0.01)),
    "wavelet db3 L3 λ=100": ("wavelet", dict(wave="db3", levels=3, keep=0.01)),
}
METHODS = {   # model: {row: (codec, options, module kinds whose saves are packed)}
    "resnet18_cifar": {
        **{f"{k} (Conv+BN+ReLU)": (*v, CONV_BN_RELU) for k, v in LAMBDA_100.items()},
        "HOSVD v=0.8 (conv inputs)": ("hosvd", dict(epsilon=math.sqrt(1 - 0.8)), (nn.Conv2d,)),
        "band-limit 50% (conv inputs)": ("fft_lowpass", dict(compress_rate=0.5), (nn.Conv2d,)),
    },
    "unet3d": {f"{k} (Conv+BN+ReLU)": (*v, CONV_BN_RELU) for k, v in LAMBDA_100.items()},
}
CLAIMED = {"resnet18_cifar": "−63%", "unet3d": "−95%"}


# -- the papers' models ---------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1, self.relu1 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 as the CIFAR papers build it: a 3×3 stem, no max-pool, four stages of two blocks."""

    def __init__(self, classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU()
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def conv3d_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(),
                         nn.Conv3d(cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU())


class UNet3D(nn.Module):
    """The TMLR paper's 3-D U-Net shape (four poolings, transposed-conv upsampling, skip concats)."""

    def __init__(self, channels: int = 4, classes: int = 3, widths=(16, 32, 64, 128, 256)):
        super().__init__()
        self.down = nn.ModuleList()
        cin = channels
        for w in widths:
            self.down.append(conv3d_block(cin, w))
            cin = w
        self.ups = nn.ModuleList(nn.ConvTranspose3d(hi, lo, 2, stride=2) for hi, lo in zip(widths[:0:-1], widths[-2::-1]))
        self.dec = nn.ModuleList(conv3d_block(2 * lo, lo) for lo in widths[-2::-1])
        self.head = nn.Conv3d(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        for up, dec, skip in zip(self.ups, self.dec, skips[-2::-1]):
            x = dec(torch.cat([up(x), skip], 1))
        return self.head(x)


def build(name: str):
    """``(model, inputs, loss(out))``, all from fixed seeds."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "resnet18_cifar":
        x = torch.randn(128, 3, 32, 32, generator=g)
        labels = torch.randint(0, 100, (128,), generator=g)
        return CifarResNet18(100), x, lambda out: F.cross_entropy(out, labels)
    if name == "unet3d":
        x = torch.randn(1, 4, 96, 96, 96, generator=g)
        target = (torch.rand(1, 3, 96, 96, 96, generator=g) > 0.9).float()
        return UNet3D(), x, lambda out: F.binary_cross_entropy_with_logits(out, target)
    raise ValueError(f"unknown model {name!r}; models: {', '.join(METHODS)}")


# -- measuring ------------------------------------------------------------------------------
def measure(model, x, loss, reference, *, warm: bool) -> dict:
    """One training forward (the heap it leaves), then one step (its resident peak, its time, its
    gradients); ``warm``: one step before, for what compiles on first use (codec kernels)."""
    from actcompile.measure import heap_in_use, step_high_water

    if warm:
        loss(model(x)).backward()
    model.zero_grad(set_to_none=True)
    before = heap_in_use()
    out = model(x)
    heap = heap_in_use() - before
    del out
    seconds = []

    def step():
        start = time.perf_counter()
        loss(model(x)).backward()
        seconds.append(time.perf_counter() - start)

    peak = step_high_water(step)
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    cosine = 1.0 if reference is None else F.cosine_similarity(grads, reference, dim=0).item()
    return dict(heap_mb=heap / 1e6, peak_mb=peak / 1e6, cos=cosine, step_s=seconds[0], grads=grads)


def rows_for(name: str) -> list[dict]:
    from actcompile import actcompile
    from actcompile.codecs import get_codec
    from actcompile.errors import BudgetError

    model, x, loss = build(name)
    plain = measure(model, x, loss, None, warm=True)
    rows = [dict(way="uncompressed", ratio=None, **plain)]
    print(f"  {name} uncompressed: {plain['heap_mb']:.1f} MB", file=sys.stderr, flush=True)
    for way, (codec_name, options, kinds) in METHODS[name].items():
        tally = {}
        compressed = compress_saves_in_(copy.deepcopy(model), get_codec(codec_name, **options), kinds, tally)
        r = measure(compressed, x, loss, plain["grads"], warm=False)
        ratio = tally["packed_bytes"] / tally["raw_bytes"] if tally.get("raw_bytes") else None
        rows.append(dict(way=way, ratio=ratio, **r))
        print(f"  {name} {way}: {r['heap_mb']:.1f} MB, cos {r['cos']:.4f}", file=sys.stderr, flush=True)
        budget = int(r["heap_mb"] * 1e6)
        start = time.perf_counter()
        try:
            planned = actcompile(copy.deepcopy(model), budget=budget, example_inputs=x)
        except BudgetError as err:
            rows.append(dict(way=f"actcompile at that heap ({r['heap_mb']:.1f} MB)", error=str(err).splitlines()[0]))
            continue
        plan_s = time.perf_counter() - start
        a = measure(planned, x, loss, plain["grads"], warm=True)
        codecs = ", ".join(sorted({assignment.codec for assignment in planned.plan.assignments}))
        rows.append(dict(way=f"actcompile at that heap ({r['heap_mb']:.1f} MB)", ratio=None, plan_s=plan_s,
                         codecs=codecs, **a))
        print(f"  {name} actcompile: {a['heap_mb']:.1f} MB, cos {a['cos']:.4f}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(METHODS))
    ns = parser.parse_args(argv)
    measured_heap_process(__file__, argv)
    torch.set_num_threads(2)
    print(f"Date: {datetime.date.today()}  \nCommand: `python benchmarks/claims.py {' '.join(argv or sys.argv[1:])}`  \n"
          f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU\n")
    for name in ns.models:
        rows = rows_for(name)
        plain = rows[0]["heap_mb"]
        print(f"\n### {name} (paper: {CLAIMED[name]})\n")
        print("| way | codec ratio (papers' metric) | heap MB | vs plain | peak MB | grad cos | step s | plan s | codecs |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['way']} | {r['error']} | | | | | | | |")
                continue
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f} ({r['ratio'] - 1:+.0%})"
            plan_s = f"{r['plan_s']:.1f}" if "plan_s" in r else "-"
            print(f"| {r['way']} | {ratio} | {r['heap_mb']:.1f} | {r['heap_mb'] / plain:.3f} ({r['heap_mb'] / plain - 1:+.0%}) | "
                  f"{r['peak_mb']:.1f} | {r['cos']:.4f} | {r['step_s']:.2f} | {plan_s} | {r.get('codecs', '-')} |", flush=True)


if __name__ == "__main__":
    main()
