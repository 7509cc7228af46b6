"""Every registered codec at ε ∈ {0.01, 0.05, 0.2, 0.45} on a ~70 MB activation of a real model on real images.

The activation: torchvision ResNet-18 (random weights, seeded; nothing downloaded) on
scikit-learn's two bundled photos and their mirror images (4 × 3 × 427 × 640), saved tensor
``relu`` (post-ReLU stem, 4 × 64 × 214 × 320 fp32) and ``conv1`` (the smooth pre-BN map).
Columns: compression ratio (dense bytes / packed bytes), measured relative L2 error,
encode+decode time as a multiple of ``x.clone()`` of the same tensor (median of 3), eager and as
the compiled kernels training uses (:class:`~actcompile.codecs.kernels.CompiledCodec`, after a
first call that compiles; a codec Dynamo cannot compile whole runs eagerly there too), and the
gradient error (relative L2, all parameters) when that codec alone packs every activation
ResNet-18 saves (batch 8, 64×64) at that ε that the policy would let it pack: codecs that are not
sign-exact leave the tensors a ReLU backward branches on alone.

    python benchmarks/codecs.py > benchmarks/results/codecs.md

The weights are random (no download), so these maps are less natural than a trained network's:
after BN with default statistics a few channels dominate, which flatters low-rank and low-pass
codecs at large ε. Timings are CPU, 2 threads.
"""

from __future__ import annotations

import datetime
import math
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torchvision

from actcompile.codecs import available_codecs, get_codec
from actcompile.codecs.base import packed_bytes, relative_error
from actcompile.measure import compare_gradients, forward_backward
from actcompile.api import ActCompiledModule
from actcompile.passes.capture import capture_graphs
from actcompile.passes.memory import profile_memory
from actcompile.passes.rules import codec_choices, split_candidates, spec_of
from actcompile.config import CompileConfig, parse_budget
from actcompile.plan import Assignment, ModelPlan, Plan, Region, Section, Use
from actcompile.codecs.base import codec_options
from actcompile.codecs.kernels import CompiledCodec
from actcompile.zoo import build

EPSILONS = (0.01, 0.05, 0.2, 0.45)
TARGETS = {"int8": 3, "mask": 1.5, "dct": 10, "hosvd": 10}   # compiled pack+unpack, × a copy (issue #6)


def activations() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_sample_images

    images = torch.tensor(np.stack(load_sample_images().images), dtype=torch.float32).permute(0, 3, 1, 2) / 255
    images = torch.cat([images, images.flip(-1)])
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        conv = model.conv1(images)
        relu = model.relu(model.bn1(conv))
    return {"relu": relu.contiguous(), "conv1": conv.contiguous()}


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gradient_error(codec) -> float:
    """Relative L2 error of ResNet-18's gradients when ``codec`` packs every saved activation."""
    model, x = build("resnet18")
    config = CompileConfig(budget=parse_budget(1.0), codecs=(codec,), epsilons=(codec.epsilon or 0.1,))
    sections = []
    for graph in capture_graphs(model, x):
        profile = profile_memory(graph)
        candidates, _ = split_candidates(profile, config)
        assignments = tuple(
            Assignment(t.node, t.ordinal, chosen.name, codec_options(chosen), chosen.epsilon, t.nbytes,
                       chosen.packed_nbytes(spec_of(t)), 0.0, t.shape, t.dtype)
            for t in candidates for chosen in codec_choices(t, config)[:1])
        regions = (Region("all", codec.name, codec.epsilon, assignments),) if assignments else ()
        sections.append(Section(graph.name, Plan(budget_bytes=profile.baseline_bytes,
                                                 baseline_bytes=profile.baseline_bytes, regions=regions, skipped=())))
    compressed = ActCompiledModule(model, config)
    compressed.use_plan(ModelPlan(budget_bytes=max(1, sum(s.plan.baseline_bytes for s in sections)),
                                  sections=tuple(sections)), x)
    _, reference = forward_backward(model, x)
    _, grads = forward_backward(compressed, x)
    return compare_gradients(reference, grads)[1]


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="codec size, error and speed against a copy")
    parser.add_argument("--codecs", nargs="*", default=None,
                        help="a subset of the registered codecs (and 'mask (ReLU)'); default: all")
    ns = parser.parse_args(argv)
    # the lossless integer codecs (bits, narrow, pool_offsets) code integer saves, not these
    # float maps: tests/test_integer_codecs.py holds them bit-exact
    names = [*(n for n in available_codecs() if not getattr(get_codec(n), "lossless_integer", False)), "mask (ReLU)"]
    if ns.codecs is not None:
        unknown = sorted(set(ns.codecs) - set(names))
        if unknown:
            parser.error(f"unknown codecs {unknown}; known: {names}")
        names = [n for n in names if n in ns.codecs]
    print("# actcompile codec benchmark\n")
    arguments = "".join(f" {a!r}" if " " in a else f" {a}" for a in sys.argv[1:])
    print(f"Command: `python benchmarks/codecs.py{arguments} > benchmarks/results/codecs.md`  ")
    print(f"Date: {datetime.date.today().isoformat()}  ")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU\n")
    tensors = activations()
    for label, x in tensors.items():
        copy = timed(lambda: x.clone())
        print(f"\n## `{label}`: {tuple(x.shape)} fp32, {x.nbytes / 1e6:.1f} MB; copy {copy * 1e3:.1f} ms\n")
        print("| codec | ε | ratio | rel. error | enc+dec × copy, eager | compiled | ResNet-18 grad rel. error | target |")
        print("|---|---|---|---|---|---|---|---|")
        for name in names:
            if name == "none":
                continue
            fixed = get_codec(name.split()[0]).fixed_rate
            for eps in ([None] if fixed else EPSILONS):
                if name == "mask (ReLU)":   # the variant a plan uses for ReLU's output (predicate only)
                    codec = get_codec("mask").exact_for((Use("ReluBackward0"),))
                else:
                    codec = get_codec(name) if eps is None else get_codec(name, epsilon=eps)
                packed = codec.pack(x)
                y = codec.unpack(packed)
                ratio = x.nbytes / packed_bytes(packed) if packed_bytes(packed) else math.inf
                seconds_eager = timed(lambda: codec.unpack(codec.pack(x)))
                fast = CompiledCodec(codec)
                fast.unpack(fast.pack(x))   # compiles
                seconds = timed(lambda: fast.unpack(fast.pack(x)))
                grad = "n/a (exact only for ReLU uses)" if name.startswith("mask") else (
                    f"{gradient_error(codec):.4f}" if label == "relu" else "")
                target = ""
                if name.split()[0] in TARGETS:
                    ok = seconds / copy <= TARGETS[name.split()[0]]
                    target = f"≤ {TARGETS[name.split()[0]]}× copy: {'met' if ok else 'MISSED'}"
                if name == "hosvd" and eps == 0.45:
                    target += f"; ≥ 10× smaller: {'met' if ratio >= 10 else 'MISSED'}"
                eps_text = "-" if eps is None else f"{eps:g}"
                ratio_text = "∞ (stores nothing)" if math.isinf(ratio) else f"{ratio:.2f}"
                print(f"| {name} | {eps_text} | {ratio_text} | {relative_error(x, y):.4f} | {seconds_eager / copy:.1f} "
                      f"| {seconds / copy:.1f} "
                      f"| {grad} | {target} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
