"""How much of the parameter gradient each saved tensor's error can reach: one probe backward.

A codec's relative error ε on a saved tensor reaches the parameter gradients only through the
backward formula that reads it. Which gradients that formula feeds is known from the autograd
graph: a convolution's or matmul's saved input feeds only its weight's gradient (the weight is
the other operand); an elementwise or normalisation backward that reads its input feeds the
gradient it passes on, so every parameter upstream of it. The share of a tensor is

    share(t) = Σ ‖∇p‖² over the parameters p its error reaches / Σ ‖∇p‖² over all parameters,

with the gradients from one probe backward on the real example inputs (a random tangent on
every output: the planner does not know the loss; buffers and RNG are restored). An error ε on
``t`` then moves the whole parameter gradient by about ``ε·√share`` relative (first order, for
errors that do not cancel), so the policy weighs each candidate's ``ε²`` by its share
(``error_weighting="gradient"``) and a plan's predicted gradient error is
``√(Σ share·ε²)`` over its codecs. This is ActNN's observation (a layer's compression error
matters in proportion to the gradient flowing into it) with the probe it needs cut to one
backward, against GACT's repeated perturbed backwards.

>>> import torch
>>> from actcompile.passes.capture import capture_graphs
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
>>> (graph,) = capture_graphs(model, torch.randn(32, 64))
>>> (share,) = gradient_shares(graph).values()   # the Tanh output: read by Tanh's backward and the 2nd Linear's
>>> 0.0 < share < 1.0                              # all but the last bias's gradient
True
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from actcompile.passes.capture import CapturedGraph
from actcompile.passes.memory import _unpacked, record_saves
from actcompile.plan import TensorKind

Key = tuple[str, int]

# Backward formulas reading two operands: the saved attribute whose error reaches only the
# gradient of the other operand (the index into the node's next_functions).
OTHER_OPERAND = {
    "ConvolutionBackward0": {"input": (1,), "weight": (0,)},
    "AddmmBackward0": {"mat1": (2,), "mat2": (1,)},
    "MmBackward0": {"self": (1,), "mat2": (0,)},
    "BmmBackward0": {"self": (1,), "mat2": (0,)},
    "MulBackward0": {"self": (1,), "other": (0,)},
}


def gradient_shares(graph: CapturedGraph, seed: int = 0) -> dict[Key, float]:
    """``{(node, ordinal): share}`` for the first save of every saved activation storage (see the module doc)."""
    first_of_storage: dict[int, Key] = {}
    key_of_save: list[Key] = []

    def on_save(node, ordinal, t, kind):
        storage = StorageWeakRef(t.untyped_storage()).cdata
        key = first_of_storage.setdefault(storage, (node, ordinal))
        key_of_save.append(key if kind is TensorKind.ACTIVATION else None)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # inputs made by an earlier graph carry its (planning-time) history: the probe stops at them
        inputs = [x.detach().requires_grad_(x.requires_grad)
                  if isinstance(x, torch.Tensor) and x.grad_fn is not None else x for x in graph.flat_inputs]
        record = record_saves(graph.gm, inputs, on_save, fake=False,
                              input_kinds=graph.input_kinds, keep=True)
        outputs = [t for t in tree_leaves(record.output)
                   if isinstance(t, torch.Tensor) and t.grad_fn is not None and t.is_floating_point()]
        if not outputs:
            return {}
        reached = _reached_parameters(outputs)
        leaves = list(reached.leaves)
        if not leaves:   # no parameter gradient flows through this graph (a loss after a graph break)
            return {}
        tangents = _tangents(outputs, seed)
        grads = torch.autograd.grad(outputs, leaves, tangents, allow_unused=True)
    norms = [float(g.double().pow(2).sum()) if g is not None else 0.0 for g in grads]
    total = sum(norms)
    if total <= 0.0:
        return {}
    masks: dict[Key, int] = {}   # a storage saved by several ops: the union of what each save reaches
    for save, mask in reached.by_save.items():
        key = key_of_save[save] if save < len(key_of_save) else None
        if key is not None:
            masks[key] = masks.get(key, 0) | mask
    return {key: sum(norms[i] for i in _bits(mask)) / total for key, mask in masks.items()}


def probe_gradients(graph: CapturedGraph, substitutes: dict | None = None, seed: int = 0) -> dict[int, torch.Tensor]:
    """``{id(parameter): gradient}`` of one probe backward of ``graph`` on its real inputs (a
    random tangent on every output, drawn from ``seed``, as :func:`gradient_shares`), with every
    activation save ``(node, ordinal)`` in ``substitutes`` read by backward as its codec's
    pack + unpack: what a plan's codecs do to the gradient, measured, not predicted.

    >>> from actcompile.codecs import get_codec
    >>> from actcompile.passes.capture import capture_graphs
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    >>> (graph,) = capture_graphs(model, torch.randn(32, 64))
    >>> exact = probe_gradients(graph)
    >>> keys = {(n, o) for n in ("tanh", "input_2") for o in range(2)}   # whatever the Tanh output is saved as
    >>> coarse = probe_gradients(graph, {k: get_codec("int2") for k in keys})
    >>> 0 < gradient_error([(exact, coarse)]) < 1
    True
    """
    substitutes = substitutes or {}

    def on_save(node, ordinal, t, kind):
        codec = substitutes.get((node, ordinal))
        if codec is None or kind is not TensorKind.ACTIVATION or not t.is_floating_point():
            return None
        x = t.detach()
        return codec.unpack(codec.pack(x.contiguous())).reshape(x.shape)

    def forward(*inputs):
        return record_saves(graph.gm, list(inputs), on_save, fake=False, input_kinds=graph.input_kinds,
                            keep=True).output

    return _seeded_step(graph, forward, seed)


def run_gradients(graph: CapturedGraph, module, seed: int = 0) -> dict[int, torch.Tensor]:
    """``{id(parameter): gradient}`` of one backward of ``module`` (``graph``'s module as the
    runtime runs it: a plan's codecs, its recomputed runs from their packed boundaries) on
    ``graph``'s real inputs, with :func:`probe_gradients`' random tangent and RNG: compared with
    ``probe_gradients(graph)``, what the plan does to a training step's gradient."""
    return _seeded_step(graph, module, seed)


def _seeded_step(graph: CapturedGraph, forward, seed: int) -> dict[int, torch.Tensor]:
    """``forward`` on ``graph``'s real inputs and a backward of a random tangent on every float
    output, both from ``seed`` (the same dropout masks and tangents on every call)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inputs = [x.detach().requires_grad_(x.requires_grad)
                  if isinstance(x, torch.Tensor) and x.grad_fn is not None else x for x in graph.flat_inputs]
        outputs = [t for t in tree_leaves(forward(*inputs))
                   if isinstance(t, torch.Tensor) and t.grad_fn is not None and t.is_floating_point()]
        leaves = _parameters_below(outputs)
        if not outputs or not leaves:
            return {}
        tangents = _tangents(outputs, seed)
        grads = torch.autograd.grad(outputs, leaves, tangents, allow_unused=True)
    return {id(p): g for p, g in zip(leaves, grads) if g is not None}


def _tangents(outputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """A random tangent per output, from generators of their own seeded by ``seed``.

    Not from the global RNG: the probe's forward restores it after it runs (``record_saves``),
    the runtime's leaves it past the dropout masks it drew, so tangents drawn from it differed
    between the two wherever a model has dropout (a 2-layer TransformerEncoder at 1/8 was
    measured at 1.41, √2: uncorrelated gradients, where its step's error is 0.04)."""
    generators = {}
    for t in outputs:
        generators.setdefault(t.device, torch.Generator(device=t.device).manual_seed(seed + 1))
    return [torch.randn(t.shape, generator=generators[t.device], dtype=t.dtype, device=t.device) for t in outputs]


def gradient_error(pairs) -> float:
    """‖g̃ − g‖ / ‖g‖ over every parameter of every ``(exact, probed)`` pair of
    :func:`probe_gradients` results (one pair per graph), in float64; 0 where nothing flows."""
    diff = norm = 0.0
    for exact, probed in pairs:
        for key, g in exact.items():
            other = probed.get(key)
            g64 = g.double()
            diff += float((g64 - (other.double() if other is not None else 0.0)).pow(2).sum())
            norm += float(g64.pow(2).sum())
    return (diff / norm) ** 0.5 if norm > 0 else 0.0


def _parameters_below(outputs) -> list[torch.Tensor]:
    """The parameters (requiring grad) the outputs' autograd graph accumulates gradients into."""
    found, seen, stack = {}, set(), [t.grad_fn for t in outputs]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if isinstance(variable, torch.nn.Parameter) and variable.requires_grad:
            found.setdefault(id(variable), variable)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return list(found.values())


class _Reach:
    def __init__(self):
        self.leaves: list[torch.Tensor] = []
        self.by_save: dict[int, int] = {}   # save index -> bitmask of leaves its error reaches


def _reached_parameters(outputs) -> _Reach:
    """Walk the autograd graph once: for every save, the leaves (parameters) its error reaches."""
    reach = _Reach()
    leaf_bit: dict[int, int] = {}
    below: dict[object, int] = {}          # autograd node -> bitmask of leaves upstream of it
    order, seen = [], set()
    stack = [(t.grad_fn, False) for t in outputs]
    while stack:                           # iterative post-order: children before parents
        fn, expanded = stack.pop()
        if fn is None or (not expanded and fn in seen):
            continue
        if expanded:
            order.append(fn)
            continue
        seen.add(fn)
        stack.append((fn, True))
        stack.extend((next_fn, False) for next_fn, _ in fn.next_functions if next_fn is not None)
    for fn in order:
        variable = getattr(fn, "variable", None)
        if variable is not None:           # AccumulateGrad: a leaf the gradient lands in
            if isinstance(variable, torch.nn.Parameter) and variable.requires_grad:
                bit = leaf_bit.setdefault(id(variable), len(reach.leaves))
                if bit == len(reach.leaves):
                    reach.leaves.append(variable)
                below[fn] = 1 << bit
            else:
                below[fn] = 0
            continue
        below[fn] = 0
        for next_fn, _ in fn.next_functions:
            if next_fn is not None:
                below[fn] |= below.get(next_fn, 0)
    for fn in order:
        if getattr(fn, "variable", None) is not None:
            continue
        operands = OTHER_OPERAND.get(type(fn).__name__, {})
        for attr in dir(fn):
            if not attr.startswith("_saved_"):
                continue
            _unpacked.tokens = []
            try:
                getattr(fn, attr)
            except RuntimeError:
                continue
            tokens, _unpacked.tokens = _unpacked.tokens, []
            if not tokens:
                continue
            targets = operands.get(attr.removeprefix("_saved_"))
            if targets is None:
                mask = below[fn]
            else:
                nexts = fn.next_functions
                mask = 0
                for i in targets:
                    if i < len(nexts) and nexts[i][0] is not None:
                        mask |= below.get(nexts[i][0], 0)
            for token in tokens:
                reach.by_save[token] = reach.by_save.get(token, 0) | mask
    _unpacked.tokens = []
    return reach


def _bits(mask: int):
    i = 0
    while mask:
        if mask & 1:
            yield i
        mask >>= 1
        i += 1
