"""Which saved tensors may be compressed, and with which codecs: the never-compress rules.

Never compressed: parameters, buffers, the model's inputs (the caller holds them anyway),
and tensors below the size floor. Each gets a :class:`~actcompile.plan.Skip` with its reason.
Integer and bool tensors are never stored lossily: they get only the lossless integer codecs
(:func:`integer_codecs`: bool as bits, max-pool indices as window offsets, a narrower integer
dtype), each kept by the policy only where measured exact; with none that applies, they are
skipped as ``NOT_FLOAT``.

A codec may have ``exact_for(uses)``: the variant of itself that is lossless for those backward
uses even though it does not reproduce the values (``mask`` keeps only ``x > 0``, all ReLU's
backward reads), or ``None``. Such a codec is offered for a tensor only in that variant, or
where its measured error on the tensor is exactly zero (a two-valued tensor such as CPU
dropout noise).

>>> from actcompile.codecs import get_codec
>>> from actcompile.plan import Use
>>> exact_for_use(get_codec("mask"), (Use("ReluBackward0"),))
True
>>> exact_for_use(get_codec("mask"), (Use("ReluBackward0"), Use("ConvolutionBackward0")))
False
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import weakref

import torch

from actcompile.codecs.base import TensorSpec
from actcompile.codecs.lossless import INTERVAL_USES
from actcompile.config import CompileConfig
from actcompile.plan import MemoryProfile, SavedTensor, Skip, SkipReason, TensorKind

_KIND_REASON = {
    TensorKind.PARAMETER: SkipReason.PARAMETER,
    TensorKind.BUFFER: SkipReason.BUFFER,
    TensorKind.INPUT: SkipReason.INPUT,
    TensorKind.HELD: SkipReason.HELD,
    TensorKind.SHARED: SkipReason.SHARED,
    TensorKind.OUTPUT: SkipReason.OUTPUT,
    TensorKind.VMAPPED: SkipReason.VMAPPED,
    TensorKind.CLOSURE: SkipReason.CLOSURE,
}


def spec_of(t: SavedTensor) -> TensorSpec:
    """The spec of what a codec packs for ``t`` (see :func:`actcompile.runtime.packable_view`)."""
    return TensorSpec(t.packed_shape, getattr(torch, t.dtype))


def exact_for_use(codec, uses) -> bool:
    """True if every backward in ``uses`` reads only what ``codec`` keeps exactly."""
    if getattr(codec, "exact_for", None) is None or not uses:
        return False
    uses = tuple(uses)
    try:
        hash((codec, uses))
    except TypeError:   # a codec that cannot be hashed: asked afresh
        return _exact_for_use.__wrapped__(codec, uses)
    return _exact_for_use(codec, uses)


@functools.lru_cache(maxsize=4096)   # asked per candidate and per assignment: thousands on a deep graph
def _exact_for_use(codec, uses: tuple) -> bool:
    """:func:`exact_for_use` for a codec that has ``exact_for`` and a non-empty ``uses``."""
    exact_for = codec.exact_for
    # the variant exact_for gives may also skip work those uses never read (mask's
    # predicate_only); a codec that keeps the same thing without that shortcut is as exact
    if "predicate_only" in {f.name for f in dataclasses.fields(codec)}:
        codec = dataclasses.replace(codec, predicate_only=True)
    return exact_for(uses) == codec


def integer_codecs(t: SavedTensor, config: CompileConfig) -> list:
    """The lossless codecs that may store integer or bool ``t`` narrower (none if
    ``config.narrow_integers`` is off). Pool offsets need the pooling's geometry, from ``t.uses``."""
    from actcompile.codecs.integer import BitsCodec, NarrowCodec, PoolOffsetsCodec

    spec = spec_of(t)
    if not config.narrow_integers or spec.dtype.is_floating_point or spec.dtype.is_complex:
        return []
    choices = [BitsCodec()] + NarrowCodec.ladder(spec)
    pool = PoolOffsetsCodec.for_uses(t.uses)
    if pool is not None:
        choices.insert(0, pool)
    return [c for c in choices if c.supports(spec)]


_IN_PLACE_OPERATORS = frozenset({"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior",
                                  "ixor", "ilshift", "irshift", "imatmul"})


def _writes_a_tensor(node: torch.fx.Node) -> bool:
    """Is the first argument of ``node`` a graph node holding a tensor (by Dynamo's example value)?"""
    first = node.args[0] if node.args else None
    return isinstance(first, torch.fx.Node) and isinstance(first.meta.get("example_value"), torch.Tensor)


def _argument(node: torch.fx.Node, name: str):
    """The value of ``node``'s argument ``name``, passed by keyword or by position
    (``F.leaky_relu(x, 0.1, True)`` is in place), or None."""
    if name in node.kwargs:
        return node.kwargs[name]
    if node.op != "call_function" or not callable(node.target):
        return None
    try:
        bound = torch.fx.operator_schemas.normalize_function(node.target, node.args, node.kwargs,
                                                             normalize_to_only_use_kwargs=True)
    except Exception:   # no signature to bind to: nothing known
        bound = None
    return bound.kwargs.get(name) if bound is not None else None


_VMAP_ENTER, _VMAP_EXIT = "_vmap_increment_nesting", "_vmap_decrement_nesting"
_VMAPPED: "weakref.WeakKeyDictionary[torch.fx.Graph, tuple[int, frozenset[str]]]" = weakref.WeakKeyDictionary()


def vmapped_nodes(graph: torch.fx.Graph) -> frozenset[str]:
    """Names of the nodes inside a ``torch.vmap`` Dynamo traced into ``graph`` (between its
    ``_vmap_increment_nesting`` and ``_vmap_decrement_nesting`` calls, those included): they
    make batched tensors, which autograd's hooks get as such (no storage to pack) and which a
    recomputation outside the vmap could not re-make.

    >>> g = torch.fx.Graph(); x = g.placeholder("x")
    >>> sorted(vmapped_nodes(g)), [n.name for n in g.nodes]
    ([], ['x'])
    """
    known = _VMAPPED.get(graph)
    if known is not None and known[0] == len(graph.nodes):   # recompute_kind asks once per node
        return known[1]
    inside, depth = set(), 0
    for node in graph.nodes:
        name = getattr(node.target, "__name__", "")
        if name == _VMAP_ENTER:
            depth += 1
        if depth > 0:
            inside.add(node.name)
        if name == _VMAP_EXIT:
            depth = max(depth - 1, 0)
    _VMAPPED[graph] = (len(graph.nodes), frozenset(inside))
    return _VMAPPED[graph][1]


def recompute_kind(node: torch.fx.Node) -> str:
    """May ``node`` run again in backward with the same result and no side effect?

    ``"yes"``; ``"in-place"`` where it writes its first argument (``x += y``, ``relu_``,
    ``inplace=True``): it may, but only together with the node that made that argument, so that
    the recomputation writes a fresh tensor and never one from outside; ``"no"`` for
    placeholders and outputs, side effects (grad-mode and autocast switches, asserts),
    higher-order ops (a custom Function, a checkpoint), mutating ops that write elsewhere, modules
    with buffers, and Python callables outside torch. Nodes reading buffers (a training
    BatchNorm's running statistics) are ``"yes"``: a recomputation runs on copies of them
    (:class:`actcompile.runtime.Recomputed`), so the statistics are updated once.

    >>> import operator
    >>> g = torch.fx.Graph(); x = g.placeholder("x")
    >>> [recompute_kind(n) for n in (x, g.call_function(torch.relu, (x,)), g.call_function(operator.iadd, (x, x)))]
    ['no', 'yes', 'in-place']
    """
    if node.op in ("placeholder", "output") or node.name in vmapped_nodes(node.graph):
        return "no"
    if node.op == "get_attr":
        return "yes"
    target = node.target
    if target is operator.setitem and _writes_a_tensor(node):
        return "in-place"   # ``out[:, t] = v`` writes ``out`` (HF RWKV's CPU kernel fills its output so)
    if isinstance(target, torch._ops.HigherOrderOperator) or target in torch.fx.node._side_effectful_functions:
        return "no"
    writes_first = bool(_argument(node, "inplace"))
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(target)
        if next(module.buffers(), None) is not None:
            return "no"
        writes_first = writes_first or any(getattr(m, "inplace", False) for m in module.modules())
    elif node.op == "call_method":
        writes_first = writes_first or (target.endswith("_") and not target.startswith("__"))
    elif isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        written = [a.alias_info is not None and a.alias_info.is_write for a in schema.arguments]
        if any(written[1:]):
            return "no"
        writes_first = writes_first or (bool(written) and written[0])
    elif node.op == "call_function":
        module = getattr(target, "__module__", "") or ""
        name = getattr(target, "__name__", "")
        if module in ("_operator", "operator"):
            writes_first = writes_first or name in _IN_PLACE_OPERATORS
        elif not module.startswith("torch"):
            return "no"
        else:
            writes_first = writes_first or (name.endswith("_") and not name.startswith("__"))
    if writes_first and not (node.args and isinstance(node.args[0], torch.fx.Node)):
        return "no"
    return "in-place" if writes_first else "yes"


def saves_by_storage(profile: MemoryProfile) -> dict[int, list]:
    """``{storage index: its save events}``; :func:`others_of` reads a tensor's other saves from it."""
    events: dict[int, list] = {}
    for e in profile.events:
        events.setdefault(e.storage, []).append(e)
    return events


def others_of(events: dict[int, list], t: SavedTensor) -> list:
    """The saves of ``t``'s storage other than ``t``'s own (every one must run under the pack hook)."""
    return [e for e in events.get(t.index, ()) if (e.node, e.ordinal) != (t.node, t.ordinal)]


def split_candidates(profile: MemoryProfile, config: CompileConfig) -> tuple[list[SavedTensor], list[Skip]]:
    """The saved tensors a plan may compress, and a Skip for every other one."""
    candidates, skips = [], []
    events = saves_by_storage(profile)
    for t in profile.tensors:
        if t.kind is TensorKind.SHARED:   # each save of it must see the hooks: an earlier graph may pack it
            others = tuple((e.node, e.ordinal) for e in others_of(events, t))
            skips.append(Skip(t.node, t.ordinal, SkipReason.SHARED, t.kind.value, t.nbytes, others))
        elif t.kind in _KIND_REASON:
            skips.append(Skip(t.node, t.ordinal, _KIND_REASON[t.kind], t.kind.value, t.nbytes))
        elif not getattr(torch, t.dtype).is_floating_point and not integer_codecs(t, config):
            skips.append(Skip(t.node, t.ordinal, SkipReason.NOT_FLOAT, t.dtype, t.nbytes))
        elif t.nbytes < config.min_tensor_bytes:
            skips.append(Skip(t.node, t.ordinal, SkipReason.TOO_SMALL,
                              f"{t.nbytes} B < min_tensor_bytes={config.min_tensor_bytes}", t.nbytes))
        else:
            candidates.append(t)
    return candidates, skips


# Backward formulas that branch on the saved value (its sign, or an interval): a codec that
# moves a value across the branch point changes the gradient's mask, not just its size.
# "compared": the compiled back end's name for a backward comparison no mask reproduces.
BRANCHING_USES = frozenset(INTERVAL_USES) | {"compared"}


def reads_sign(t: SavedTensor) -> bool:
    """Does some backward branch on this tensor's values?"""
    return any(u.op in BRANCHING_USES for u in t.uses)


def codec_choices(t: SavedTensor, config: CompileConfig) -> list:
    """Every codec instance the policy may try on ``t`` (variable-rate ones at each ε of the ladder).

    Tensors some ReLU-like backward branches on get only sign-exact codecs (or ``mask``);
    integer and bool tensors only the lossless integer codecs.
    """
    spec = spec_of(t)
    if not spec.dtype.is_floating_point:
        host = [c for c in config.codecs if getattr(c, "host_resident", False)]   # offload moves any dtype
        return integer_codecs(t, config) + host
    choices = []
    branching = reads_sign(t)
    for codec in config.codecs:
        if not codec.supports(spec):
            continue
        if branching and not hasattr(codec, "exact_for"):
            if "sign_exact" in {f.name for f in dataclasses.fields(codec)}:
                codec = dataclasses.replace(codec, sign_exact=True)
            elif not getattr(codec, "sign_exact", False):
                continue
        if hasattr(codec, "exact_for"):
            codec = codec.exact_for(t.uses) or codec   # else kept only if measured exact
        if codec.fixed_rate or codec.epsilon is not None:
            choices.append(codec)
        else:
            choices.extend(dataclasses.replace(codec, epsilon=eps) for eps in config.epsilons)
    return choices
