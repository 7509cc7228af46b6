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
}


def spec_of(t: SavedTensor) -> TensorSpec:
    """The spec of what a codec packs for ``t`` (see :func:`actcompile.runtime.packable_view`)."""
    return TensorSpec(t.packed_shape, getattr(torch, t.dtype))


def exact_for_use(codec, uses) -> bool:
    """True if every backward in ``uses`` reads only what ``codec`` keeps exactly."""
    exact_for = getattr(codec, "exact_for", None)
    if exact_for is None or not uses:
        return False
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


def recomputable(node: torch.fx.Node, held_inputs: frozenset[str] = frozenset()) -> bool:
    """Can ``node`` run again in backward with the same result and no side effect?

    Not: a node reading a buffer or other held state (``held_inputs``, placeholder names: a
    training BatchNorm would update its running statistics twice), modules with buffers or
    ``inplace=True``, mutating ATen ops, higher-order ops (a custom Function, a checkpoint), and
    Python callables outside torch.
    """
    if any(a.name in held_inputs for a in node.all_input_nodes):
        return False
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        return False
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return (next(module.buffers(), None) is None
                and not any(getattr(m, "inplace", False) for m in module.modules()))
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return not target._schema.is_mutable
        module = getattr(target, "__module__", "") or ""
        name = getattr(target, "__name__", "")
        return (module.startswith("torch") and not name.endswith("_")
                and not node.kwargs.get("inplace", False))
    return False


@dataclasses.dataclass(frozen=True)
class RecomputeCandidate:
    """A node whose saved tensors no codec can shrink enough, and what recomputing it costs."""

    node: str
    internal: tuple[SavedTensor, ...]   # storages only this node saves: freed if it is recomputed
    bytes_before: int
    bytes_after: int                    # its arguments, held raw for the recomputation instead
    arguments: tuple[int, ...]          # storage indices of its activation arguments (kept exact)


def recompute_candidates(profile: MemoryProfile, config: CompileConfig) -> list[RecomputeCandidate]:
    """Recomputable nodes holding ≥ ``min_tensor_bytes`` that no codec may touch (integers no
    lossless codec narrows, such as oneDNN's uint8 LSTM workspace), where recomputing saves bytes."""
    savers: dict[int, set[str]] = {}
    for e in profile.events:
        savers.setdefault(e.storage, set()).add(e.node)
    by_index = {t.index: t for t in profile.tensors}
    out = []
    for node, args in profile.node_inputs:
        internal = tuple(t for t in profile.tensors if t.is_activation and savers[t.index] == {node})
        stuck = sum(t.nbytes for t in internal
                    if not getattr(torch, t.dtype).is_floating_point and not integer_codecs(t, config))
        if stuck < max(config.min_tensor_bytes, 1):
            continue
        # Arguments are held raw for the recomputation (a lossy copy could change, say, which
        # element a max-pool picks): count them whole, even where a codec would have shrunk them.
        held = {}
        for k, (index, nbytes) in enumerate(args):
            if index < 0:
                held[-k - 1] = nbytes                       # not saved by anyone else
            elif by_index.get(index) is not None and by_index[index].is_activation:
                held[index] = nbytes
        before = sum(t.nbytes for t in internal)
        after = sum(held.values())
        if after < before:
            arguments = tuple(i for i in held if i >= 0 and i not in {t.index for t in internal})
            out.append(RecomputeCandidate(node, internal, before, after, arguments))
    return out


def split_candidates(profile: MemoryProfile, config: CompileConfig) -> tuple[list[SavedTensor], list[Skip]]:
    """The saved tensors a plan may compress, and a Skip for every other one."""
    candidates, skips = [], []
    for t in profile.tensors:
        if t.kind in _KIND_REASON:
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
        return integer_codecs(t, config)
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
