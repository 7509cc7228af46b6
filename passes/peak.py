"""Predict the peak memory of one training step's forward and backward from liveness over the graph.

With ``budget_scope="peak"`` the budget bounds the high-water mark of a whole step, not only
what the forward leaves alive: parameters and buffers, optimizer state, the parameter gradients
backward makes, the activations' gradients in flight, the saved tensors (whole, packed, or
recomputed when backward reaches their segment) and each packed tensor's decoded copy while its
backward runs. :func:`predict_peak` walks a graph's nodes (:attr:`MemoryProfile.nodes`) forward
and then in reverse, applying a :class:`Plan`, and returns the largest sum it meets:

- forward, after node ``k``: every storage made so far that a later node reads, that the plan
  keeps whole, or that the forward returns; the packed payloads of saves so far;
- backward, at node ``k`` (reverse order): the saves of nodes ``≤ k`` (the autograd node that
  saved a storage first is the last to release it), packed or whole; a recomputed segment's
  saves from the step backward reaches its last node; the decoded copies node ``k`` reads; each
  parameter's gradient from its last reader on; each activation's gradient from its last reader
  down to its producer; what the forward returned (the caller holds it).

The model is an upper-bound-minded sketch, not an allocator trace (it ignores kernels'
workspaces and the intermediate values inside one op's backward): ``tests/test_peak.py`` checks
it against the measured high-water mark.

A matmul and a ReLU (4 KB each) whose output backward reads: the backward peak is at the
ReLU's backward, which holds its saved output and two gradients. Packing that save as a 1-bit
mask does not lower it: the ReLU's backward decodes the mask just when it needs it.

>>> from actcompile.plan import (Assignment, MemoryProfile, NodeRecord, Plan, Region, SavedTensor, SaveEvent,
...                              TensorKind, Use)
>>> nodes = (NodeRecord("x", "no", (), ((-1, 0),), kind="input"),
...          NodeRecord("w", "no", (), ((-2, 400),), kind="parameter", grad=True),
...          NodeRecord("mm", "yes", ("x", "w"), ((-3, 4000),), grad=True),
...          NodeRecord("relu", "yes", ("mm",), ((0, 4000),), grad=True),
...          NodeRecord("sum", "yes", ("relu",), ((-4, 4),), grad=True))
>>> relu = SavedTensor(0, "relu", 0, (1000,), "float32", 4000, TensorKind.ACTIVATION, (Use("ReluBackward0"),), (1000,))
>>> profile = MemoryProfile(tensors=(relu,), events=(SaveEvent("relu", 0, "ReluBackward0", (1000,), "float32", 0),),
...                         node_order=tuple(n.name for n in nodes), nodes=nodes)
>>> predict_peak(profile, Plan(budget_bytes=0, baseline_bytes=4000, regions=(), skipped=()))
PeakEstimate(forward_bytes=8000, backward_bytes=12000)
>>> mask = Assignment("relu", 0, "mask", (), None, 4000, 128, 0.0)
>>> packed = Plan(budget_bytes=0, baseline_bytes=4000, regions=(Region("r0", "mask", None, (mask,)),), skipped=())
>>> predict_peak(profile, packed, compiled=True)   # + the payload and the kernel's temporaries
PeakEstimate(forward_bytes=8528, backward_bytes=12528)
"""

from __future__ import annotations

import dataclasses

import torch

from actcompile.config import Budget, CompileConfig
from actcompile.errors import BudgetError
from actcompile.plan import RECOMPUTE, MemoryProfile, Plan, SkipReason, TensorKind, format_bytes
from actcompile.passes.policy import choose_plans


# What a codec's pack and unpack allocate besides their input, payload and decoded output, in
# multiples of the tensor's bytes: (pack, unpack), eager and as compiled kernels. Measured on a
# 16 MiB float32 tensor with actcompile.measure.step_high_water (MALLOC_MMAP_THRESHOLD_=65536,
# torch 2.14.1, CPU), rounded up. Eager quantizers make float copies per step (scale, round,
# shift); compiled kernels fuse them away (int4/int2 still pack via one float temporary).
_EAGER_TRANSIENTS = {"int8": (4.1, 2.0), "int4": (4.2, 2.0), "int2": (4.2, 2.0), "fp8": (5.0, 1.0),
                     "mask": (1.6, 1.0), "threshold": (7.3, 1.3), "wavelet": (12.7, 4.6),
                     "fft_lowpass": (1.6, 3.1), "hosvd": (3.1, 1.0), "svd": (1.0, 0.1)}
_COMPILED_TRANSIENTS = {"int8": (0.1, 0.1), "int4": (1.2, 1.0), "int2": (1.2, 1.0), "fp8": (0.1, 1.0),
                        "mask": (0.1, 0.1)}
_UNKNOWN_TRANSIENTS = (4.0, 2.0)


def codec_transients(codec: str, compiled: bool) -> tuple[float, float]:
    """``(pack, unpack)`` temporary bytes of ``codec`` per byte of the tensor (the table above).

    >>> codec_transients("int8", compiled=False), codec_transients("int8", compiled=True)
    ((4.1, 2.0), (0.1, 0.1))
    """
    if compiled and codec in _COMPILED_TRANSIENTS:
        return _COMPILED_TRANSIENTS[codec]
    return _EAGER_TRANSIENTS.get(codec, _UNKNOWN_TRANSIENTS)


@dataclasses.dataclass(frozen=True)
class PeakEstimate:
    """High-water marks of one graph's forward and backward, above what is resident before the step."""

    forward_bytes: int
    backward_bytes: int

    @property
    def bytes(self) -> int:
        return max(self.forward_bytes, self.backward_bytes)


def predict_peak(profile: MemoryProfile, plan: Plan, *, extra_bytes: int = 0, compiled: bool = False) -> PeakEstimate:
    """The step's high-water marks of ``profile``'s graph run with ``plan``; see the module doc.
    ``extra_bytes`` are held throughout (autograd's records, other graphs' saves); ``compiled``:
    the codecs run as compiled kernels (their temporaries: :func:`codec_transients`)."""
    nodes = profile.nodes
    position = {n.name: i for i, n in enumerate(nodes)}
    storages_of = {n.name: [s for s, _ in n.storages] for n in nodes}
    made_at: dict[int, int] = {}
    size: dict[int, int] = {}
    needs_grad: dict[int, bool] = {}
    parameter: set[int] = set()
    outside: set[int] = set()   # model inputs, buffers, held values: not the step's to allocate
    for i, n in enumerate(nodes):
        for s, nbytes in n.storages:
            if s in made_at:
                continue
            made_at[s], size[s], needs_grad[s] = i, nbytes, n.grad
            if n.kind == TensorKind.PARAMETER.value:
                parameter.add(s)
            elif n.kind:
                outside.add(s)
    last_read = dict(made_at)
    for i, n in enumerate(nodes):
        for name in n.inputs:
            for s in storages_of.get(name, ()):
                last_read[s] = max(last_read[s], i)

    tensors = {t.index: t for t in profile.tensors}
    first_saver: dict[int, int] = {}
    saves_at: dict[int, list[int]] = {}
    for e in profile.events:
        at = position.get(e.node)
        if at is None:
            continue
        first_saver[e.storage] = min(first_saver.get(e.storage, at), at)
        saves_at.setdefault(at, []).append(e.storage)
    for s, at in first_saver.items():   # made inside an op and saved, never returned (BatchNorm's statistics)
        if s not in made_at and s in tensors:
            made_at[s], size[s], needs_grad[s], last_read[s] = at, tensors[s].nbytes, False, at
    key_of = {(t.node, t.ordinal): t.index for t in tensors.values()}
    packed = {}    # storage -> payload bytes
    transients = {}   # storage -> its codec's (pack, unpack) temporaries, bytes
    for a in plan.assignments:
        if a.codec != RECOMPUTE and (a.node, a.ordinal) in key_of:
            s = key_of[a.node, a.ordinal]
            packed[s] = a.bytes_after
            transients[s] = tuple(int(f * a.bytes_before) for f in codec_transients(a.codec, compiled))
    segment_end = {}   # first node of a recomputed segment -> position of its last node
    for a in plan.assignments:
        if a.codec == RECOMPUTE:
            names = dict(a.options)["nodes"]
            segment_end[names[0]] = max(position.get(name, -1) for name in names)
    recomputed = {}    # storage -> position backward recomputes it at
    for skip in plan.skipped:
        if skip.reason is SkipReason.RECOMPUTED and (skip.node, skip.ordinal) in key_of:
            recomputed[key_of[skip.node, skip.ordinal]] = segment_end.get(skip.detail, len(nodes) - 1)
    returned = {i for i, t in tensors.items() if t.kind is TensorKind.OUTPUT}
    held_after_forward = {s for s in first_saver if s in tensors and tensors[s].kind is not TensorKind.SHARED
                          and s not in outside and s not in parameter}
    # a captured Function's closure-held storages no hook saw: held until its backward, taken as
    # held throughout (their reader's place in backward is unknown)
    constant = extra_bytes + profile.output_bytes + profile.closure_bytes

    n = len(nodes)
    # output_bytes (in `constant`) already counts the returned storages no backward reads
    counted_as_output = set(storages_of.get("output", ())) - set(tensors)

    # Forward, after node k: what a later node reads (node k's inputs live while it runs), what is
    # kept whole or returned, the payloads so far, and the largest pack's temporaries at node k.
    forward = _Sweep(n)
    for s, at in made_at.items():
        if s in outside or s in parameter or s in counted_as_output:
            continue
        kept_whole = s in held_after_forward and s not in packed and s not in recomputed
        forward.add(at, n - 1 if kept_whole or s in returned else last_read[s], size[s])
        if s in packed and s in first_saver:
            forward.add(first_saver[s], n - 1, packed[s])
    for k, saved in saves_at.items():
        forward.add(k, k, max((transients[s][0] for s in saved if s in transients), default=0))

    # Backward, node k: saves not yet released (their first saver's backward has not run), a
    # recomputed segment's saves from its last node down, node k's decoded copies, gradients.
    backward = _Sweep(n)
    for s in held_after_forward:
        if s in returned:
            continue          # counted with what the caller holds
        if s in recomputed:
            backward.add(first_saver[s], recomputed[s], size[s])
        else:
            backward.add(first_saver[s], n - 1, packed.get(s, size[s]))
    backward.add(0, n - 1, sum(size[s] for s in returned))
    for k, saved in saves_at.items():
        decoded = {s for s in saved if s in packed}   # node k's packed saves, decoded one by one
        backward.add(k, k, sum(size[s] for s in decoded) + max((transients[s][1] for s in decoded), default=0))
    for s, at in made_at.items():
        if not needs_grad[s] or s in outside:
            continue
        if s in parameter:
            backward.add(0, last_read[s], size[s])   # made at its last reader's backward, kept
        elif last_read[s] > at:
            backward.add(at, last_read[s], size[s])  # from its last reader's backward to its maker's
    return PeakEstimate(constant + forward.peak(), constant + backward.peak())


class _Sweep:
    """Bytes alive at each of ``n`` steps, from intervals added in O(1) and summed once."""

    def __init__(self, n: int):
        self.delta = [0] * (n + 1)

    def add(self, first: int, last: int, nbytes: int) -> None:
        if nbytes and first <= last:
            self.delta[first] += nbytes
            self.delta[last + 1] -= nbytes

    def peak(self) -> int:
        alive, peak = 0, 0
        for d in self.delta[:-1]:
            alive += d
            peak = max(peak, alive)
        return peak


def _gradient_bytes(profile: MemoryProfile) -> int:
    return sum(b for n in profile.nodes if n.kind == TensorKind.PARAMETER.value and n.grad for _, b in n.storages)


def step_peak(profiles: list[MemoryProfile], plans: list[Plan], config: CompileConfig, *, static_bytes: int,
              fixed_bytes: int = 0, repeats: list[int] | None = None) -> int:
    """Predicted high-water mark of a training step whose forward runs ``profiles``' graphs with
    ``plans``: ``static_bytes`` (parameters, buffers, optimizer state) plus every graph's planned
    activations and autograd's records, plus the largest excursion one graph's forward or
    backward makes above its own planned bytes (other graphs' saves and gradients held meanwhile)."""
    repeats = list(repeats) if repeats is not None else [1] * len(profiles)
    records = [config.reserve_bytes_per_node * p.autograd_nodes for p in profiles]
    held = fixed_bytes + sum(r * (plan.planned_bytes + rec) for plan, rec, r in zip(plans, records, repeats))
    gradients = [_gradient_bytes(p) for p in profiles]
    excursion = 0
    for i, (profile, plan) in enumerate(zip(profiles, plans)):
        others = sum(g for j, g in enumerate(gradients) if j != i)
        peak = predict_peak(profile, plan, compiled=config.compile_codecs).bytes
        excursion = max(excursion, peak + others - plan.planned_bytes)
    return static_bytes + held + excursion


def choose_plans_for_peak(profiles: list[MemoryProfile], config: CompileConfig, calibrations: list[dict], *,
                          static_bytes: int, fixed_bytes: int = 0, repeats: list[int] | None = None,
                          shares: list[dict] | None = None) -> tuple[list[Plan], int, int]:
    """``budget_scope="peak"``: the least-error plans whose predicted step peak (:func:`step_peak`)
    fits ``config.budget`` (a fraction: of the uncompressed step's predicted peak). Returns
    ``(plans, peak budget bytes, predicted peak bytes)``.

    The activation bytes the plans are fitted to start at the baseline less the peak's excess,
    and shrink by each remaining excess (the peak grows with the activations nearly one for one).
    Not quite: a codec's temporaries (eager quantizers: 4× the tensor) can make a smaller plan's
    peak larger, so if that does not converge, activation budgets from the baseline down to the
    smallest plan are tried, and the largest that fits wins (the least error)."""
    def plans_at(activation_bytes: int) -> tuple[list[Plan], int]:
        plans = choose_plans(profiles, dataclasses.replace(config, budget=Budget(bytes=activation_bytes)),
                             calibrations, fixed_bytes=fixed_bytes, repeats=repeats, shares=shares)
        return plans, step_peak(profiles, plans, config, static_bytes=static_bytes, fixed_bytes=fixed_bytes,
                                repeats=repeats)

    plans = choose_plans(profiles, dataclasses.replace(config, budget=Budget(fraction=1.0)), calibrations,
                         fixed_bytes=fixed_bytes, repeats=repeats, shares=shares)
    peak = step_peak(profiles, plans, config, static_bytes=static_bytes, fixed_bytes=fixed_bytes, repeats=repeats)
    limit = config.budget.resolve(peak)
    if peak <= limit:
        return plans, limit, peak
    if limit <= static_bytes:
        raise BudgetError(f"no plan keeps the step's peak under {format_bytes(limit)} ({limit} B): the "
                          f"parameters, buffers and optimizer state alone take {format_bytes(static_bytes)} ({static_bytes} B) "
                          "(budget_scope='peak')", smallest_bytes=None)
    activations = fixed_bytes + sum(r * p.baseline_bytes for p, r in zip(profiles, repeats or [1] * len(profiles)))
    target = activations - (peak - limit)
    for _ in range(6):
        if target <= 0:
            break
        try:
            plans, peak = plans_at(target)
        except BudgetError:
            break
        if peak <= limit:
            return plans, limit, peak
        target -= peak - limit
    try:
        plans_at(1)
        smallest = 1
    except BudgetError as err:
        smallest = err.smallest_bytes or 1
    least = None
    for step in range(17):   # geometric from the baseline down to the smallest plan
        target = int(activations * (smallest / activations) ** (step / 16))
        try:
            plans, peak = plans_at(max(target, smallest))
        except BudgetError:
            continue
        if peak <= limit:
            return plans, limit, peak
        least = peak if least is None else min(least, peak)
    raise BudgetError(f"no plan keeps the step's peak under {format_bytes(limit)} ({limit} B): the least predicted "
                      f"is {format_bytes(least) if least else 'unknown'}, of which {format_bytes(static_bytes)} are "
                      "parameters, buffers and optimizer state (budget_scope='peak')", smallest_bytes=least)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s distinct parameter and buffer storages (resident before any step)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


# Per-parameter state of torch.optim's optimizers, in parameter-sized tensors, before their first
# step creates it (after that, optimizer_state_bytes counts what the state holds).
_STATE_TENSORS = {
    "Adam": lambda g: 3 if g.get("amsgrad") else 2, "AdamW": lambda g: 3 if g.get("amsgrad") else 2,
    "NAdam": lambda g: 2, "RAdam": lambda g: 2, "Adamax": lambda g: 2, "Adadelta": lambda g: 2,
    "Adagrad": lambda g: 1, "ASGD": lambda g: 1, "Rprop": lambda g: 2,
    "RMSprop": lambda g: 1 + (g.get("momentum", 0) > 0) + bool(g.get("centered")),
    "SGD": lambda g: 1 if g.get("momentum", 0) else 0,
}


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of ``optimizer``'s state: measured when it has any, else predicted for torch.optim's
    optimizers (Adam: two parameter-sized tensors per parameter, SGD with momentum one, …).

    >>> w = torch.nn.Parameter(torch.zeros(256))
    >>> optimizer_state_bytes(torch.optim.Adam([w]))
    2048
    """
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    if tensors:
        return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors}.values())
    kind = type(optimizer).__name__
    per_parameter = _STATE_TENSORS.get(kind)
    if per_parameter is None:
        raise ValueError(f"optimizer={kind}: its state is empty and its size cannot be predicted; take one "
                         f"optimizer step before planning, or use one of {sorted(_STATE_TENSORS)}")
    return sum(per_parameter(group) * p.numel() * p.element_size()
               for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
