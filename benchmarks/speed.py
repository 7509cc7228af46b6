"""Step time, activation memory, peak memory and gradient fidelity: actcompile against its peers.

For each model and way of training it, one fresh process measures (``--one``, run by ``main``):

- **activation MB**: heap bytes (glibc ``mallinfo2``, ``MALLOC_ARENA_MAX=1``) a training
  forward leaves alive: what autograd saved and the outputs the caller holds (runs 1-10
  dropped the outputs first);
- **peak MB**: the process's peak resident memory over one forward+backward (``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``, ``MALLOC_MMAP_THRESHOLD_=65536`` so freed
  tensors leave the process at once), above what it held before the step: activations,
  parameter gradients, and whatever backward materialises at once (compiled kernels bypass the
  dispatcher, so this is read off the OS, not counted by a hook);
- **grad cosine**: all parameter gradients against the uncompressed eager step, same batch,
  same seed, with the model's real loss (cross-entropy against labels; the LM loss);
- **step ×**: median forward+backward time over the uncompressed eager step's, the two
  interleaved in one process (without the mmap threshold, which slows every allocation); for
  the eager back end, steady-state steps, after its early drift checks (``warmup_steps``);
- **step × compile** (the ``compile+…`` ways): the same over plain ``torch.compile``'s step,
  timed interleaved with them in the same process (across processes the plain compiled step
  moved from 1.11× to 1.29× eager on this machine);
- **cosine vs eager actcompile** (``compile+actcompile``): gradient cosine against the eager
  back end at the same budget fraction, same batch and seed.

Ways: ``eager``; ``actcompile`` (eager back end, compiled codec kernels) at 1/2, 1/4, 1/8 of
the planned activation bytes; ``checkpoint`` (``torch.utils.checkpoint.checkpoint_sequential``
over the model's block sequence, 2, 4 and 8 segments; HF's gradient checkpointing for GPT-2);
``compile`` (``torch.compile``, Inductor); ``compile+amb`` (``torch._functorch.config.
activation_memory_budget`` at 1/2, 1/4, 1/8); ``compile+fp8`` (Inductor's
``activation_quantization_aten_pass``: saved float32 values over 0.05 MB cast to e4m3 with a
scale); ``compile+actcompile`` (``torch.compile(backend="actcompile")``, the Inductor back end, at 1/2,
1/4, 1/8 of the bytes Inductor saves).

    python benchmarks/speed.py > benchmarks/results/speed.md
    python benchmarks/speed.py --models resnet18_b32 --ways eager actcompile --budgets 0.25   # a subset
    python benchmarks/speed.py --models mobilenet_v2_b16 --ways actcompile --budgets 0.25 --repeats 5   # a spread
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

MODELS = {
    "resnet18_b32": "ResNet-18, batch 32, 64×64",
    "mobilenet_v2_b16": "MobileNetV2, batch 16, 96×96",
    "convnext_tiny_b16": "ConvNeXt-T, batch 16, 64×64",
    "vit_small": "ViT (6 layers, 384 wide, patch 8), batch 16, 64×64",
    "gpt2_small": "GPT-2-small shape (12 layers, 768 wide), batch 2 × 128 tokens",
}
BUDGETS = (0.5, 0.25, 0.125)
SEGMENTS = (2, 4, 8)
WAYS = ("eager", "actcompile", "checkpoint", "compile", "compile+amb", "compile+fp8", "compile+actcompile")
FP8_PASS = {"activation_quantization_aten_pass": {
    "allowed_dtypes": "torch.float32", "size_in_mb": 0.05, "quant_type": "torch.float8_e4m3fn",
    "use_scaling": True, "skip_dynamo_guards": True}}


# -- one measurement (child process) --------------------------------------------------------
def build(name: str):
    """``(model, inputs, loss(outputs))`` with dropout off (compiled RNG streams differ from eager)."""
    from actcompile.zoo import build as zoo_build

    model, x = zoo_build(name)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        # A zero-initialised head (torchvision's ViT) passes no gradient to the trunk, so a
        # gradient cosine would compare the head's gradient only: small random weights, as the
        # first optimizer steps would give it (runs 1-8 measured the ViT with its zero head).
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    if name.startswith("gpt2"):
        return model, {"input_ids": x, "labels": x}, lambda out: out.loss
    labels = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    return model, x, lambda out: F.cross_entropy(out, labels)


def blocks(model) -> list[torch.nn.Module]:
    """The model as a sequence of blocks for ``checkpoint_sequential`` (the trunk only)."""
    import torchvision

    if isinstance(model, torchvision.models.ResNet):
        # the stem stays whole: its ReLU is in-place, so it cannot start a checkpointed segment
        stem = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return [stem, *model.layer1, *model.layer2, *model.layer3, *model.layer4]
    if isinstance(model, torchvision.models.ConvNeXt):
        return [block for stage in model.features for block in (stage if isinstance(stage, torch.nn.Sequential) and
                                                                 len(stage) > 1 else [stage])]
    if hasattr(model, "features"):
        return list(model.features)
    raise TypeError(f"no block sequence for {type(model).__name__}")


class Checkpointed(torch.nn.Module):
    """``model`` with its trunk run through ``checkpoint_sequential`` in ``segments`` segments
    (at most one per block: 8 segments of a 6-block ViT are its 6 blocks, each its own segment)."""

    def __init__(self, model, segments: int):
        super().__init__()
        self.model, self.segments = model, segments

    def forward(self, x):
        import torchvision
        from torch.utils.checkpoint import checkpoint_sequential

        m = self.model
        if isinstance(m, torchvision.models.VisionTransformer):
            h = m._process_input(x)
            h = torch.cat([m.class_token.expand(h.shape[0], -1, -1), h], dim=1) + m.encoder.pos_embedding
            h = checkpoint_sequential(m.encoder.layers, min(self.segments, len(m.encoder.layers)), h,
                                      use_reentrant=False)
            return m.heads(m.encoder.ln(h)[:, 0])
        trunk = blocks(m)
        h = checkpoint_sequential(trunk, min(self.segments, len(trunk)), x, use_reentrant=False)
        if isinstance(m, torchvision.models.ResNet):
            return m.fc(torch.flatten(m.avgpool(h), 1))
        if isinstance(m, torchvision.models.ConvNeXt):
            return m.classifier(m.avgpool(h))
        return m.classifier(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))   # MobileNetV2


def configure(way: str, setting, model, inputs):
    """The callable to train with, and a context its steps run in."""
    context = contextlib.nullcontext()
    if way == "eager":
        return model, context
    if way == "actcompile":
        from actcompile import actcompile

        return actcompile(model, budget=setting, example_inputs=inputs), context
    if way == "checkpoint":
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return model, context
        return Checkpointed(model, setting), context
    if way == "compile":
        return torch.compile(model), context
    if way == "compile+amb":
        return torch.compile(model), torch._functorch.config.patch(activation_memory_budget=setting)
    if way == "compile+fp8":
        return torch.compile(model), torch._inductor.config.patch(post_grad_fusion_options=FP8_PASS)
    if way == "compile+actcompile":   # registered through the torch_dynamo_backends entry point
        return torch.compile(model, backend="actcompile", options={"budget": setting}), context
    raise ValueError(f"unknown way {way!r}; ways: {WAYS}")


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def step(model, params, inputs, loss):
    for p in params:
        p.grad = None
    torch.manual_seed(0)
    loss(call(model, inputs)).backward()


def measure_memory(trained, params, inputs, loss) -> dict:
    """``activation_bytes``: heap growth across a training forward (what it leaves alive);
    ``peak_bytes``: VmHWM over one forward+backward above the resident memory before it."""
    from actcompile.measure import heap_in_use, step_high_water

    for p in params:
        p.grad = None
    torch.manual_seed(0)
    before = heap_in_use()
    out = call(trained, inputs)
    activation = heap_in_use() - before
    del out
    for p in params:
        p.grad = None
    peak = step_high_water(lambda: step(trained, params, inputs, loss))
    return dict(activation_bytes=activation, peak_bytes=peak)


def warmup_steps(way: str, trained, what: str) -> int:
    """Steps before measuring: two (compile, plan, warm up); for either back end of actcompile,
    past its early drift checks (forwards 1, 2, 4, …, below ``check_every``; then one every
    ``check_every``-th), so the measured steps are the steady state a training run spends its
    time in. Run 9 timed two checked steps of seven; until run 16 the memory process measured its
    peak on forward 4, a checked one. ``what`` is kept for callers; ``backend="actcompile"`` by
    name runs with the default ``check_every``."""
    from actcompile.config import CompileConfig

    if way not in ("actcompile", "compile+actcompile"):
        return 2
    every = getattr(getattr(trained, "compile_config", None), "check_every", CompileConfig.check_every)
    if every <= 2:
        return 2
    return max(2, 1 << ((every - 1).bit_length() - 1))   # the last early check (32 for every=50)


def measure_one(name: str, way: str, setting, what: str) -> dict:
    torch.manual_seed(0)
    model, inputs, loss = build(name)
    params = [p for p in model.parameters() if p.requires_grad]
    step(model, params, inputs, loss)
    reference = [p.grad.detach().clone() for p in params]
    eager_twin = None
    if what == "memory" and way == "compile+actcompile":   # the eager back end at the same budget
        import copy

        eager_twin = copy.deepcopy(model)
    trained, context = configure(way, setting, model, inputs)
    plain = None
    if what == "time" and way.startswith("compile+"):   # plain torch.compile, timed alongside
        import copy

        plain_model = copy.deepcopy(model)
        plain = (torch.compile(plain_model), [p for p in plain_model.parameters() if p.requires_grad])
        for _ in range(2):                    # compiled before ``context`` patches Inductor's config
            step(plain[0], plain[1], inputs, loss)
    with context:
        for _ in range(warmup_steps(way, trained, what)):   # compiles, plans, warms up
            step(trained, params, inputs, loss)
        got = torch.cat([p.grad.flatten() for p in params]).double()
        ref = torch.cat([g.flatten() for g in reference]).double()
        result = dict(model=name, way=way, setting=setting,
                      grad_cosine=F.cosine_similarity(got, ref, dim=0).item())
        if what == "memory":
            result.update(measure_memory(trained, params, inputs, loss))
            if hasattr(trained, "plan"):
                result["budget_bytes"] = trained.plan.budget_bytes
            if eager_twin is not None:
                result["cosine_vs_eager_actcompile"] = _cosine_vs_eager_actcompile(eager_twin, setting, inputs,
                                                                                     loss, got)
        else:
            runs = [("eager", model, params), (way, trained, params)] + ([("compile", *plain)] if plain else [])
            times = {label: [] for label, _, _ in runs}
            for _ in range(7):                # interleaved, so drift hits all alike
                for label, m, ps in runs:
                    start = time.perf_counter()
                    step(m, ps, inputs, loss)
                    times[label].append(time.perf_counter() - start)
            result["step_ratio"] = statistics.median(times[way]) / statistics.median(times["eager"])
            result["eager_step_s"] = statistics.median(times["eager"])
            if plain:
                result["compile_ratio"] = statistics.median(times[way]) / statistics.median(times["compile"])
    return result


def _cosine_vs_eager_actcompile(model, setting, inputs, loss, got: torch.Tensor) -> float:
    """Gradient cosine of the compiled back end's step (``got``) against the eager back end's at
    the same budget fraction. Each back end plans its own graph (Inductor's saved values are not
    eager autograd's), so "the same plan" is the same budget, each against its own baseline."""
    from actcompile import actcompile

    twin = actcompile(model, budget=setting, example_inputs=inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(2):
        step(twin, params, inputs, loss)
    eager = torch.cat([p.grad.flatten() for p in params]).double()
    return F.cosine_similarity(got, eager, dim=0).item()


# -- the table (parent process) -------------------------------------------------------------
def run_child(name, way, setting, what) -> dict:
    env = dict(os.environ, MALLOC_ARENA_MAX="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               TORCHINDUCTOR_COMPILE_THREADS="1")
    if what == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--one", name, way, json.dumps(setting), what]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        return {"error": lines[-1][:160] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def settings(way, ns):
    if way in ("actcompile", "compile+amb", "compile+actcompile"):
        return ns.budgets
    if way == "checkpoint":
        return ns.segments
    return (None,)


def label(way, setting) -> str:
    if setting is None:
        return way
    if way == "checkpoint":
        return f"checkpoint ({setting} segments)"
    return f"{way} 1/{round(1 / setting)}"


def _median_timing(timings: list[dict]) -> dict:
    """The timing process whose step ratio is the median of ``timings`` (an error if all failed)."""
    good = sorted((t for t in timings if "step_ratio" in t), key=lambda t: t["step_ratio"])
    return good[len(good) // 2] if good else timings[0]


def _spread(timings: list[dict], key: str) -> str:
    """``key`` of one timing process, or of several as ``median (min–max)``; '' if none has it."""
    values = sorted(t[key] for t in timings if key in t)
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({values[0]:.2f}–{values[-1]:.2f})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "WAY", "SETTING", "WHAT"), help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--ways", nargs="*", default=list(WAYS))
    parser.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS))
    parser.add_argument("--segments", nargs="*", type=int, default=list(SEGMENTS))
    parser.add_argument("--repeats", type=int, default=1,
                        help="timing processes per row: step × is then their median (min–max). On this "
                             "machine one row's ratio moved by ±0.12 between identical processes")
    ns = parser.parse_args(argv)
    if ns.one:
        name, way, setting, what = ns.one
        print(json.dumps(measure_one(name, way, json.loads(setting), what)))
        return
    print("# actcompile speed benchmark\n")
    print(f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`".rstrip() + "  ")
    print(f"Date: {datetime.date.today().isoformat()}  ")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU\n")
    print("| model | way | activation MB | peak MB | grad cosine | step × | eager step ms | step × compile "
          "| cosine vs eager actcompile |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ns.models:
        for way in ns.ways:
            for setting in settings(way, ns):
                memory = run_child(name, way, setting, "memory")
                if "error" in memory:
                    print(f"| {MODELS.get(name, name)} | {label(way, setting)} | {memory['error']} | | | | | | |", flush=True)
                    continue
                timings = [run_child(name, way, setting, "time") for _ in range(max(1, ns.repeats))]
                timing = timings[0] if len(timings) == 1 else _median_timing(timings)
                ratio = _spread(timings, "step_ratio") or timing.get("error", "")
                eager_ms = f"{timing['eager_step_s'] * 1e3:.0f}" if "eager_step_s" in timing else ""
                versus_compile = _spread(timings, "compile_ratio")
                versus_eager = memory.get("cosine_vs_eager_actcompile")
                versus_eager = "" if versus_eager is None else f"{versus_eager:.5f}"
                print(f"| {MODELS.get(name, name)} | {label(way, setting)} | {memory['activation_bytes'] / 1e6:.2f} "
                      f"| {memory['peak_bytes'] / 1e6:.1f} | {memory['grad_cosine']:.5f} | {ratio} | {eager_ms} "
                      f"| {versus_compile} | {versus_eager} |",
                      flush=True)


if __name__ == "__main__":
    sys.exit(main())
