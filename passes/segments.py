"""Runs of nodes a plan may recompute in backward instead of keeping what they save.

Activation checkpointing, decided per run of nodes: a :class:`Segment` is a run that can run
again in backward (:func:`~actcompile.passes.rules.recompute_kind`). Recomputing it frees the
storages it alone made and saved, keeps what it reads from outside (its boundary) for the
recomputation (whole, or packed by a codec: :class:`actcompile.runtime.Recomputed`), and costs its
forward time once more. The policy weighs that against codecs on
the same storages (:mod:`actcompile.passes.policy`).

Runs are found in graph order. A node joins the run being built if it may be recomputed (an
in-place node only if the run made the storage it writes). A node that may not, but reads
nothing the run made and writes nothing the run read, is stepped over (a BatchNorm's
``num_batches_tracked += 1``: the recomputed run is called after it, which changes nothing it
reads); any other ends the run. Each run is then cut into about √(its saving nodes) segments,
each cut where the fewest bytes cross it, so the policy chooses segment by segment and each
segment's boundary stays small.

>>> import torch
>>> from actcompile.passes.capture import capture_graphs
>>> from actcompile.passes.memory import profile_memory
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh())
>>> (graph,) = capture_graphs(model, torch.randn(512, 64))
>>> [s.nodes for s in find_segments(profile_memory(graph))]
[('input_1', 'input_2'), ('input_3', 'input_4')]
"""

from __future__ import annotations

import dataclasses
import math

from actcompile.plan import MemoryProfile, NodeRecord, SavedTensor, TensorKind

_HELD_KINDS = (TensorKind.BUFFER.value, TensorKind.HELD.value)


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of nodes recomputed together, and what recomputing it frees, holds and costs."""

    nodes: tuple[str, ...]      # in graph order
    owned: tuple[int, ...]      # saved storages (MemoryProfile.tensors indices) first saved by its nodes:
                                # decided with it (its saves are not made when it is recomputed)
    freed: tuple[int, ...]      # of those, the activations made and saved only here: recomputing frees them
    boundary: tuple[int, ...]   # saved activations made outside that it reads: held (whole, or as its
                                # codec packs it) for the recomputation
    boundary_inputs: tuple[tuple[str, int], ...]   # (node it reads, storage index) of each of those
    extra_bytes: int            # held whole for the recomputation besides: activations made outside
                                # that nobody saves, copies of the buffers it reads
    held: tuple[str, ...]       # placeholders of buffers and other held state it reads (copied for it)
    flops: int
    moved_bytes: int            # bytes of the tensors its nodes return (the time of memory-bound ops)
    # May it run as one autograd node (actcompile.recompute_node)? Not where a tensor it hands on
    # shares storage with one it reads from outside. Then ``autograd_nodes``, the nodes of the run
    # that compute a new tensor requiring grad (a lower bound on the autograd nodes it would
    # leave: views and a Linear's transposed weight leave theirs too), are freed with the forward.
    one_node: bool = False
    autograd_nodes: int = 0
    random: bool = False        # some node draws random numbers: the run keeps an RNG state


def find_segments(profile: MemoryProfile) -> list[Segment]:
    """The segments of ``profile``'s graph a plan may recompute (see the module doc)."""
    records = {r.name: r for r in profile.nodes}
    first_maker: dict[int, str] = {}
    for r in profile.nodes:
        for storage, _ in r.storages:
            first_maker.setdefault(storage, r.name)
    savers: dict[int, set[str]] = {}
    for e in profile.events:
        savers.setdefault(e.storage, set()).add(e.node)
    tensors = {t.index: t for t in profile.tensors}
    saved_by_node: dict[str, list[tuple[int, int]]] = {}   # node -> (position in profile.tensors, storage)
    for position, t in enumerate(profile.tensors):
        saved_by_node.setdefault(t.node, []).append((position, t.index))
    readers: dict[str, list[str]] = {}
    for r in profile.nodes:
        for name in r.inputs:
            readers.setdefault(name, []).append(r.name)
    segments = []
    for run in _runs(profile.nodes, records, first_maker):
        for piece in _cut(run, records, first_maker, profile):
            segment = _segment(piece, records, first_maker, tensors, saved_by_node, savers, readers)
            if segment.owned:
                segments.append(segment)
    return segments


def _runs(nodes: tuple[NodeRecord, ...], records: dict[str, NodeRecord], first_maker: dict[int, str]) -> list[list[str]]:
    runs, run, made, read = [], [], set(), set()

    def writes_own(r: NodeRecord) -> bool:   # an in-place node writing a storage this run made
        written = r.inputs[0] if r.inputs else None
        return written in made and all(first_maker.get(s) in made for s, _ in records[written].storages)

    for r in nodes:
        if r.recompute == "yes" or (r.recompute == "in-place" and writes_own(r)):
            run.append(r.name)
            made.add(r.name)
            read.update(r.inputs)
            continue
        steps_over = (run and r.recompute == "in-place" and not made.intersection(r.inputs)
                      and r.inputs[0] not in read)
        if steps_over:
            continue
        if run:
            runs.append(run)
        run, made, read = [], set(), set()
    if run:
        runs.append(run)
    return runs


def _cut(run: list[str], records: dict[str, NodeRecord], first_maker: dict[int, str],
         profile: MemoryProfile) -> list[list[str]]:
    """``run`` cut into about √(saving nodes) pieces, each cut where the fewest bytes cross it."""
    savers = {e.node for e in profile.events}
    pieces = max(1, round(math.sqrt(sum(1 for n in run if n in savers))))
    m = len(run)
    if pieces == 1 or m < 2:
        return [run]
    position = {n: i for i, n in enumerate(run)}
    # crossing[p]: bytes made before position p (or outside the run) and read at p or later
    diff = [0] * (m + 2)
    last_read: dict[str, int] = {}
    for j, n in enumerate(run):
        for i in records[n].inputs:
            last_read[i] = j
    for i, j in last_read.items():
        start = position.get(i, -1) + 1
        r = records.get(i)
        held_anyway = r is None or (r.kind and r.kind != TensorKind.ACTIVATION.value)   # parameters, inputs
        nbytes = 0 if held_anyway else sum(b for _, b in r.storages)
        diff[start] += nbytes
        diff[j + 1] -= nbytes
    crossing, total = [], 0
    for p in range(m):
        total += diff[p]
        crossing.append(total)
    # no cut between an in-place node and the node that made what it writes
    allowed = [True] * m
    for j, n in enumerate(run):
        r = records[n]
        if r.recompute == "in-place":
            for s, _ in records[r.inputs[0]].storages:
                maker = position.get(first_maker.get(s), j)
                for p in range(maker + 1, j + 1):
                    allowed[p] = False
    cuts, width = [], m / pieces
    for k in range(1, pieces):
        lo, hi = max(1, int(k * width - width / 2)), min(m - 1, int(k * width + width / 2))
        window = [p for p in range(lo, hi + 1) if allowed[p] and (not cuts or p > cuts[-1])]
        if window:
            cuts.append(min(window, key=lambda p: (crossing[p], abs(p - k * width))))
    bounds = [0, *cuts, m]
    return [run[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _segment(piece: list[str], records: dict[str, NodeRecord], first_maker: dict[int, str],
             tensors: dict[int, SavedTensor], saved_by_node: dict[str, list[tuple[int, int]]],
             savers: dict[int, set[str]], readers: dict[str, list[str]]) -> Segment:
    """``piece`` as a :class:`Segment`; ``tensors`` by storage index, ``saved_by_node`` the
    storages each node saves first, with their position in the profile, ``readers`` the nodes
    reading each node (all built once per profile, so a segment costs its own nodes, not the
    whole graph)."""
    inside = set(piece)
    owned = tuple(i for _, i in sorted(p for n in piece for p in saved_by_node.get(n, ())))
    freed = tuple(i for i in owned
                  if tensors[i].is_activation and not tensors[i].saved_later
                  and first_maker.get(i, tensors[i].node) in inside and savers.get(i, set()) <= inside)
    boundary, extra, held = {}, 0, []
    for name in dict.fromkeys(i for n in piece for i in records[n].inputs if i not in inside):
        r = records[name]
        if r.kind in _HELD_KINDS:
            held.append(name)
            extra += sum(b for _, b in r.storages)
            continue
        if r.kind == TensorKind.SHARED.value:   # an earlier graph's plan packs it; held whole here, it stays whole
            extra += sum(b for _, b in r.storages)
            continue
        if r.kind and r.kind != TensorKind.ACTIVATION.value:
            continue   # parameters and the caller's inputs are held anyway
        if len(r.storages) > 1:   # a tuple of several storages (``sort``'s values and indices) is one
            extra += sum(b for _, b in r.storages)   # argument: the run keeps it whole, not packed
            continue
        for storage, nbytes in r.storages:
            if storage >= 0:
                if tensors[storage].is_activation:
                    boundary.setdefault(storage, []).append(name)
                elif tensors[storage].kind is TensorKind.SHARED:
                    extra += nbytes
            else:
                extra += nbytes
    made = {s: b for n in piece for s, b in records[n].storages if first_maker.get(s) in inside}
    read = {s for n in piece for i in records[n].inputs if i not in inside for s, _ in records[i].storages}
    handed_on = [n for n in piece if any(r not in inside for r in readers.get(n, ()))]
    one_node = not any(s in read for n in handed_on for s, _ in records[n].storages)
    computing = sum(1 for n in piece if records[n].grad and any(first_maker.get(s) == n for s, _ in records[n].storages))
    return Segment(nodes=tuple(piece), owned=owned, freed=freed, boundary=tuple(boundary),
                   boundary_inputs=tuple((name, storage) for storage, names in boundary.items() for name in names),
                   extra_bytes=extra,
                   held=tuple(held), flops=sum(records[n].flops for n in piece), moved_bytes=sum(made.values()),
                   one_node=one_node, autograd_nodes=computing if one_node else 0,
                   random=any(records[n].random for n in piece))
