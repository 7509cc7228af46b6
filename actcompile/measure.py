"""Measure what a forward really keeps alive for backward, independently of the analyzer.

The process heap in use (glibc ``mallinfo2``: arena bytes in use plus mmapped bytes) is read
after ``gc.collect()`` before the forward and after it, with its outputs still held (as the
caller holds them until the loss is computed; DESIGN.md counts them) and with them the autograd
graph and everything it saved. glibc's counters see
its main arena only, so run the measuring process with ``MALLOC_ARENA_MAX=1`` (then this agrees
with a count of saved storages within ~3%); :func:`run_isolated` does that.

``python -m actcompile.measure resnet18 --budget 0.25`` prints one JSON line: predicted and
measured bytes, uncompressed and compressed, forward max |Δ|, gradient cosine and relative error.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import time

import torch
from torch.utils._pytree import tree_leaves


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        libc = ctypes.CDLL("libc.so.6")
        function = libc.mallinfo2
    except (OSError, AttributeError):   # not glibc (macOS, musl), or glibc < 2.33
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _mallinfo2()


def heap_measurable() -> bool:
    """Can :func:`heap_in_use` read the heap here (glibc ≥ 2.33)?"""
    return _MALLINFO2 is not None


def heap_in_use() -> int:
    """Bytes the C heap has handed out and not taken back (after a garbage collection)."""
    if _MALLINFO2 is None:
        raise RuntimeError("heap_in_use needs glibc's mallinfo2 (glibc >= 2.33 on Linux)")
    gc.collect()
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def resident_set() -> dict[str, int]:
    """The process's resident bytes now (``VmRSS``) and at their high-water mark (``VmHWM``)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def step_high_water(step) -> int:
    """Resident bytes ``step()`` adds at its high-water mark (``VmHWM`` reset before it, Linux).

    Run the process with ``MALLOC_MMAP_THRESHOLD_=65536`` as well as ``MALLOC_ARENA_MAX=1``: then
    every tensor above 64 KiB is its own mapping, returned when freed, so what the heap caches
    from earlier steps does not hide this one's allocations."""
    gc.collect()
    before = resident_set()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets VmHWM to VmRSS
    step()
    return resident_set()["VmHWM"] - before


def float_outputs(out) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]


def call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def kept_by_forward(model, inputs) -> int:
    """Heap bytes a training forward leaves alive: what it saved for backward and its outputs."""
    before = heap_in_use()
    out = call(model, inputs)
    after = heap_in_use()
    del out
    return after - before


def training_loss(out, seed: int = 0) -> torch.Tensor:
    """A loss that weighs every output element differently (a fixed random projection)."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in float_outputs(out):
        weights = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype)
        total = total + (t * weights).sum()
    return total


def forward_backward(model, inputs, seed: int = 0):
    """``(outputs, {param name: grad})`` of one step from a fixed RNG state."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = call(model, inputs)
    training_loss(out).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def compare_gradients(reference: dict, other: dict) -> tuple[float, float]:
    """``(cosine, relative L2 error)`` of all parameter gradients flattened together."""
    a = torch.cat([reference[n].double().flatten() for n in reference])
    b = torch.cat([other[n].double().flatten() for n in reference])
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return cosine, (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a)).item()


def max_output_difference(a, b) -> float:
    pairs = list(zip(float_outputs(a), float_outputs(b)))
    if not pairs:
        return math.inf
    return max((x.detach() - y.detach()).abs().max().item() for x, y in pairs)


def measure_model(name: str, budget, *, steps_for_time: int = 3) -> dict:
    """Everything the tests and the memory benchmark assert or report for one zoo model."""
    from actcompile import actcompile
    from actcompile.zoo import build

    model, inputs = build(name)
    with torch.no_grad():           # warm up lazy allocations (thread pools, kernels) outside the count
        call(model, inputs)
    # budget 1.0, no codec to calibrate: the analyzer's prediction, and the model as Dynamo captured it
    captured = actcompile(model, budget=1.0, example_inputs=inputs, codecs=["none"])
    predicted = captured.plan.predicted_heap_bytes   # storages and autograd's records
    measured = kept_by_forward(model, inputs)
    forward_backward(captured, inputs)
    measured_captured = kept_by_forward(captured, inputs)
    del captured
    start = time.perf_counter()
    compiled = actcompile(model, budget=budget, example_inputs=inputs)
    plan_seconds = time.perf_counter() - start
    forward_backward(compiled, inputs)   # the first step compiles the codec kernels: code, not activations
    measured_compressed = kept_by_forward(compiled, inputs)

    ref_out, ref_grads = forward_backward(model, inputs)
    out, grads = forward_backward(compiled, inputs)
    cosine, rel = compare_gradients(ref_grads, grads)

    def step_time(m):
        start = time.perf_counter()
        for _ in range(steps_for_time):
            forward_backward(m, inputs)
        return (time.perf_counter() - start) / steps_for_time

    t_ref, t_cmp = (step_time(model), step_time(compiled)) if steps_for_time else (math.nan, math.nan)
    plan = compiled.plan
    return dict(model=name, predicted_bytes=predicted, measured_bytes=measured, measured_captured_bytes=measured_captured,
                budget_bytes=plan.budget_bytes, planned_bytes=plan.planned_bytes,
                measured_compressed_bytes=measured_compressed,
                forward_max_abs_diff=max_output_difference(ref_out, out),
                grad_cosine=cosine, grad_rel_error=rel, step_time_ratio=t_cmp / t_ref, plan_seconds=plan_seconds,
                regions=len(plan.regions), codecs=sorted({r.codec for r in plan.regions}))


class MeasureError(RuntimeError):
    def __init__(self, message: str, stderr: str):
        super().__init__(message)
        self.stderr = stderr


def run_isolated(name: str, budget, timeout: float = 600, *, timed: bool = True, threads: int | None = None) -> dict:
    """:func:`measure_model` in a fresh process with ``MALLOC_ARENA_MAX=1`` (see the module doc);
    ``timed=False`` skips the step timing (``step_time_ratio`` is then NaN); ``threads``: its
    intra-op threads (default ``OMP_NUM_THREADS`` or 2; 1 when several run side by side)."""
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "2"))
    env = dict(os.environ, MALLOC_ARENA_MAX="1", OMP_NUM_THREADS=str(threads))
    extra = [] if timed else ["--steps-for-time", "0"]
    proc = subprocess.run([sys.executable, "-m", "actcompile.measure", name, "--budget", str(budget), *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise MeasureError(f"measuring {name} failed:\n{proc.stderr[-4000:]}", proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m actcompile.measure", description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--budget", default="0.25", help="a budget string, or a float fraction of baseline")
    parser.add_argument("--steps-for-time", type=int, default=3, help="steps timed per model (0: no timing)")
    ns = parser.parse_args(argv)
    try:
        budget = float(ns.budget)
    except ValueError:
        budget = ns.budget
    print(json.dumps(measure_model(ns.model, budget, steps_for_time=ns.steps_for_time)))


if __name__ == "__main__":
    main()
