"""Choose, for every saved tensor, a codec (or none) so that the plan fits the budget at least error.

``choose_plan`` is pure: the profile says what is saved, the calibration what each codec's
error is on each tensor, the config what the budget and the enabled codecs are. It is a
multiple-choice knapsack (:mod:`actcompile.passes.solvers`): each candidate tensor keeps its
bytes at no cost, or takes a codec at a cost of ``w × error²``, its squared relative error
weighted by ``w``. With ``error_weighting="tensor"`` (default) ``w = 1``: a saved tensor feeds
one op's gradient, and per-op gradient norms do not grow with activation size (late layers
have small activations but most parameters), so every tensor's relative error counts alike.
With ``"bytes"``, ``w`` is the tensor's size. Measured on ResNet-18 at 1/4 of its activation
bytes: gradient cosine 0.99943 per-tensor vs. 0.99875 size-weighted. Lossless choices cost nothing and are taken
first. A run of nodes may be recomputed in backward instead (activation checkpointing,
:mod:`actcompile.passes.segments`): one item decides a segment's storages together, each its own
codec or all freed by recomputing it (what it reads kept whole or packed), at a cost of λ × its
predicted time (``time_weight``, see :class:`CompileConfig`); that also frees what no codec may touch (an
LSTM's uint8 workspace, int64 indices with narrowing off). A budget already met (with room for
autograd's records: a byte budget just above the storages is not met) compresses nothing; a budget no choice meets raises
:class:`~actcompile.errors.BudgetError` with the smallest bytes reachable.

A small reserve (per autograd node and per packable tensor, see :class:`CompileConfig`) is
kept free under the budget for what the heap holds besides the saved storages (autograd's own
records, the packed values' tensor objects), so *measured* bytes stay under it.

>>> from actcompile.plan import MemoryProfile, SavedTensor, TensorKind, Use
>>> from actcompile.config import CompileConfig, parse_budget
>>> from actcompile.codecs import get_codec
>>> t = SavedTensor(0, "relu", 0, (1024, 256), "float32", 2**20, TensorKind.ACTIVATION,
...                 (Use("ReluBackward0"),), (1024, 256))
>>> profile = MemoryProfile(tensors=(t,), events=(), node_order=("relu",))
>>> config = CompileConfig(budget=parse_budget(0.5), codecs=(get_codec("mask"), get_codec("int8")))
>>> calibration = {("relu", 0): [(get_codec("mask"), 2.0, 32772), (get_codec("int8"), 0.004, 270336)]}
>>> plan = choose_plan(profile, config, calibration)
>>> [(a.codec, a.error, a.bytes_after) for a in plan.assignments]   # mask is exact for ReLU's use
[('mask', 0.0, 32772)]
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from actcompile.codecs.base import codec_options
from actcompile.config import CompileConfig
from actcompile.errors import BudgetError
from actcompile.plan import (RECOMPUTE, Assignment, MemoryProfile, Plan, Region, SavedTensor, Skip, SkipReason,
                             TensorKind, format_bytes)
from actcompile.passes.rules import exact_for_use, others_of, reads_sign, saves_by_storage, split_candidates
from actcompile.passes.segments import Segment, find_segments
from actcompile.passes.solvers import Option, choose_options, choose_options_within, merge_items, smallest_total

Key = tuple[str, int]
# A recomputation from a lossy boundary re-makes the segment's ReLU (and other branching) masks
# from noisy values: masks flip where |x| is below the noise, and a flipped mask passes or blocks
# a whole gradient element. Such a segment's boundary error is weighed this many times more.
# Measured on ResNet-18 (b8, 64²) at 1/4, 1/8, 1/16, gradient cosine: ×1 0.99801, 0.99831,
# 0.99261; ×100 0.99980, 0.99890, 0.99261; ×1000 0.99980, 0.99974, 0.99403; ×10⁴ 0.99980,
# 0.99974, 0.98866; only lossless boundaries 0.99980, 0.99974, 0.97761.
BRANCHING_SPREAD = 1000.0
# the CPU generator's state, kept by a recomputed run that draws random numbers
CPU_RNG_STATE_BYTES = torch.get_rng_state().numel()


def _options(t: SavedTensor, measured: list[tuple[object, float, int]]) -> list[tuple[object, float, int]]:
    """``(codec, error, bytes)`` choices for ``t``; the first is 'keep as is'."""
    out = [(None, 0.0, t.nbytes)]
    exact_only = not getattr(torch, t.dtype).is_floating_point   # integers and bools: never lossy
    for codec, error, nbytes in measured:
        if exact_only and error != 0.0:
            continue
        if hasattr(codec, "exact_for"):
            if exact_for_use(codec, t.uses):
                error = 0.0           # exact for the only use backward makes of it
            elif error != 0.0:
                continue              # loses values some backward reads
        if error != error or error == float("inf") or nbytes >= t.nbytes:
            continue
        out.append((codec, error, nbytes))
    return out


def _weight(t: SavedTensor, config: CompileConfig, shares: dict | None) -> float:
    if config.tolerance is not None:
        # The predicted gradient error is √(Σ share·ε²): weigh by the share itself, so the plan's
        # prediction stays under the tolerance, but never below gradient_floor / len(shares): a
        # share of 0 (a zero-initialised head hides the trunk) is where training has not moved yet.
        if not shares:
            return 1.0
        share = shares.get((t.node, t.ordinal), max(shares.values()))
        return max(share, config.gradient_floor / len(shares))
    if config.error_weighting == "bytes":
        return float(t.nbytes)
    if config.error_weighting == "gradient" and shares:
        # A share measured at one point of training can be 0 where training has not moved yet
        # (a zero-initialised head or gate hides every gradient behind it): every tensor keeps
        # ``gradient_floor`` of the per-tensor weight, the rest follows its share (scaled so
        # shares that sum to 1 average to 1). A tensor the probe did not reach gets the largest.
        share = shares.get((t.node, t.ordinal))
        if share is None:
            share = max(shares.values())
        floor = config.gradient_floor
        return floor + (1.0 - floor) * len(shares) * share
    return 1.0


def choose_plan(profile: MemoryProfile, config: CompileConfig,
                calibration: dict[Key, list[tuple[object, float, int]]]) -> Plan:
    """The least-error plan whose planned activation bytes fit ``config.budget``; see the module doc."""
    return choose_plans([profile], config, [calibration])[0]


@dataclasses.dataclass
class _Group:
    """A recomputable segment and the candidate storages decided with it (see :meth:`_GraphProblem.build`)."""

    segment: Segment
    members: list[int]            # positions in _GraphProblem.candidates
    merged: list[Option]          # the members' Pareto-best sums of options (solvers.merge_items)
    picks: list[tuple[int, ...]]  # per merged option: each member's option index
    freed: frozenset[int]         # storage indices recomputing frees
    fixed_freed: int              # bytes of freed storages no codec may touch (counted in `fixed` otherwise)
    held_bytes: int               # bytes held whole when it is recomputed (besides its boundary members)
    boundary: list[int]           # positions of the members it reads from outside: kept for the
                                  # recomputation, each whole or packed by a codec that keeps its values
    boundary_options: list[Option]          # their Pareto-best sums (error weighed with what it propagates to)
    boundary_picks: list[tuple[int, ...]]   # per such sum: each boundary member's option index
    seconds: float                # predicted time of one recomputation
    records: int = 0              # bytes of autograd records recomputing it frees (run as one node)


@dataclasses.dataclass
class _GraphProblem:
    """One graph's share of the knapsack: its items, and how to read the chosen options back."""

    profile: MemoryProfile
    candidates: list[SavedTensor]
    skips: list[Skip]
    per_tensor: list[list[tuple[object, float, int]]]
    groups: list[_Group]
    singles: list[int]          # positions of the candidates decided alone
    fixed: int
    reserve: int
    items: list[list[Option]]   # one knapsack item per single candidate, then one per group
    shares: dict                # (node, ordinal) -> gradient share (passes/sensitivity.py), if probed
    repeats: int

    @classmethod
    def build(cls, profile: MemoryProfile, config: CompileConfig, calibration: dict,
              repeats: int = 1, shares: dict | None = None, cost_per_second: float = 0.0,
              lossless_boundaries: bool = False) -> "_GraphProblem":
        """``repeats``: how often the forward runs this graph (one block's code, called per block);
        its plan applies to every call, so its bytes count that many times.

        A recomputable segment (:mod:`actcompile.passes.segments`) becomes one item deciding the
        candidate storages it reads from outside and those it saves first together: each its own
        option (their merged Pareto front, :func:`merge_items`), or recompute it: what it alone
        made is freed, what it reads is kept whole or in a codec that keeps its values (its error
        weighed also for what is recomputed from it), at λ × time. Every option's cost adds
        ``cost_per_second`` × its predicted time (:func:`_codec_seconds`, :func:`_seconds`).
        """
        candidates, skips = split_candidates(profile, config)
        per_tensor = [_options(t, calibration.get((t.node, t.ordinal), [])) for t in candidates]
        weights = [_weight(t, config, shares) for t in candidates]
        options = [[Option(repeats * nbytes, repeats * (w * error**2 + cost_per_second * _codec_seconds(codec, t, config)))
                    for codec, error, nbytes in opts]
                   for t, w, opts in zip(candidates, weights, per_tensor)]
        position = {t.index: k for k, t in enumerate(candidates)}
        tensors = {t.index: t for t in profile.tensors}
        segments = find_segments(profile) if config.recompute and config.tolerance is None else []
        # Each storage is decided in one group. What a segment reads from outside goes to it first:
        # recomputing it needs that storage whole or in a value-keeping codec, and every save of it
        # packs it the same way (Assignment.saved_by), whichever group the saving node is in.
        claimed: set[int] = set()
        reads = []
        for s in segments:
            reads.append([i for i in s.boundary if i in position and i not in claimed])
            claimed.update(reads[-1])
        owned = [[i for i in s.owned if i in position and i not in claimed] for s in segments]
        for mine in owned:
            claimed.update(mine)
        groups, grouped = [], set()
        for segment, mine, read in zip(segments, owned, reads):
            members = mine + read
            freed = frozenset(segment.freed)
            boundary = [i for i in members if i in set(segment.boundary)]
            crossing = sum(tensors[i].nbytes for i in members if i not in freed and i not in boundary)
            held_elsewhere = sum(tensors[i].nbytes for i in segment.boundary
                                 if i in position and i not in members)   # its own item may pack it too
            held = crossing + segment.extra_bytes + held_elsewhere + run_reserve(segment, config)
            # run as one autograd node, its own nodes' records are freed with the forward
            records = config.reserve_bytes_per_node * max(0, segment.autograd_nodes - 1)
            fixed_freed = sum(tensors[i].nbytes for i in freed if i not in position)
            # A boundary member's error reaches what is recomputed from it too: its weight grows by
            # the freed members' weights (shared among the boundary members; see BRANCHING_SPREAD).
            spread = sum(weights[position[i]] for i in members if i in freed) / max(1, len(boundary))
            if any(reads_sign(tensors[i]) for i in freed):
                spread *= BRANCHING_SPREAD
            value_options = [[(j, Option(repeats * nbytes, repeats * ((weights[position[i]] + spread) * error**2
                                                                   + cost_per_second * _codec_seconds(codec, tensors[i], config))))
                              for j, (codec, error, nbytes) in enumerate(per_tensor[position[i]])
                              if codec is None or (not exact_for_use(codec, tensors[i].uses)
                                                   and not (lossless_boundaries and error > 0))]
                             for i in boundary]   # a mask exact only for its ReLU use loses the values
            sums, sum_picks = merge_items([[o for _, o in opts] for opts in value_options])
            sum_picks = [tuple(opts[p][0] for opts, p in zip(value_options, picks)) for picks in sum_picks]
            if held + min(o.nbytes for o in sums) >= sum(tensors[i].nbytes for i in members) + fixed_freed + records:
                continue   # recomputing it frees nothing
            merged, picks = merge_items([options[position[i]] for i in members])
            groups.append(_Group(segment, [position[i] for i in members], merged, picks, freed, fixed_freed, held,
                                 [position[i] for i in boundary], sums, sum_picks,
                                 predicted_seconds(segment.flops, segment.moved_bytes, config), records))
            grouped.update(members)
        singles = [k for k, t in enumerate(candidates) if t.index not in grouped]
        items = [options[k] for k in singles]
        for g in groups:   # keep (each member its option, and its nodes' records), or recompute
            recompute_cost = cost_per_second * repeats * g.seconds
            items.append([Option(o.nbytes + repeats * (g.fixed_freed + g.records), o.cost) for o in g.merged]
                         + [Option(repeats * g.held_bytes + o.nbytes, o.cost + recompute_cost) for o in g.boundary_options])
        fixed = repeats * (profile.baseline_bytes - sum(t.nbytes for t in candidates)
                           - sum(g.fixed_freed for g in groups))
        # the records a recomputed group frees are in its keep options instead
        reserve = repeats * (config.reserve_bytes_per_node * profile.autograd_nodes - sum(g.records for g in groups)
                             + config.reserve_bytes_per_packed * len(candidates))
        return cls(profile, candidates, skips, per_tensor, groups, singles, fixed, reserve, items,
                   dict(shares or {}), repeats)

    def share_of(self, t: SavedTensor) -> float | None:
        """``t``'s gradient share; one the probe did not reach counts as the largest (as it is weighed)."""
        if not self.shares:
            return None
        return self.shares.get((t.node, t.ordinal), max(self.shares.values()))

    def records_freed(self, assignments: list[Assignment]) -> int:
        """Bytes of autograd records the recomputed runs among ``assignments`` free (see _Group.records)."""
        recomputed = {a.node for a in assignments if a.codec == RECOMPUTE}
        return sum(g.records for g in self.groups if g.segment.nodes[0] in recomputed)

    def decode(self, chosen: list[int]) -> tuple[list[Assignment], list[Skip]]:
        """The assignments and skips of ``chosen`` (one option index per item of :attr:`items`)."""
        picks = {k: chosen[j] for j, k in enumerate(self.singles)}
        recomputed = []
        for g, pick in zip(self.groups, chosen[len(self.singles):]):
            if pick >= len(g.picks):
                recomputed.append(g)
                picks.update(zip(g.boundary, g.boundary_picks[pick - len(g.picks)]))   # kept for it
            else:
                picks.update(zip(g.members, g.picks[pick]))
        # A recomputed segment also frees storages no codec may touch (too small, integer): their
        # skip says so, as the recompute assignment's bytes_before counts them.
        by_index = {t.index: t for t in self.profile.tensors}
        freed_whole = {(by_index[i].node, by_index[i].ordinal): g.segment.nodes[0]
                       for g in recomputed for i in g.freed if i in by_index}
        skips = [Skip(s.node, s.ordinal, SkipReason.RECOMPUTED, freed_whole[s.node, s.ordinal], s.nbytes)
                 if (s.node, s.ordinal) in freed_whole else s for s in self.skips]
        assignments = []
        for g in recomputed:
            freed = [k for k in g.members if self.candidates[k].index in g.freed]
            freed_set, boundary_set = set(freed), set(g.boundary)   # a segment may have thousands of members
            for k in g.members:
                t = self.candidates[k]
                if k in freed_set:
                    skips.append(Skip(t.node, t.ordinal, SkipReason.RECOMPUTED, g.segment.nodes[0], t.nbytes))
                elif k not in boundary_set:
                    skips.append(Skip(t.node, t.ordinal, SkipReason.NOT_NEEDED,
                                      f"held whole to recompute {g.segment.nodes[0]}..{g.segment.nodes[-1]}", t.nbytes))
            index_of = {self.candidates[k].index: k for k in g.boundary}
            packed = tuple((name, self.candidates[index_of[i]].node, self.candidates[index_of[i]].ordinal)
                           for name, i in g.segment.boundary_inputs
                           if i in index_of and self.per_tensor[index_of[i]][picks[index_of[i]]][0] is not None)
            before = sum(self.candidates[k].nbytes for k in freed) + g.fixed_freed
            crossing = sum(self.candidates[k].nbytes for k in g.members if k not in freed_set and k not in boundary_set)
            assignments.append(Assignment(node=g.segment.nodes[0], ordinal=0, codec=RECOMPUTE,
                                          options=(("nodes", g.segment.nodes), ("held", g.segment.held),
                                                   ("packed", packed), ("one_node", g.segment.one_node)),
                                          epsilon=None, bytes_before=before, bytes_after=g.held_bytes - crossing,
                                          error=0.0))   # the crossing storages stay in the baseline
        events = saves_by_storage(self.profile)   # storage -> its saves
        for k in sorted(picks):
            t, opts = self.candidates[k], self.per_tensor[k]
            codec, error, nbytes = opts[picks[k]]
            if codec is None:
                reason = SkipReason.NOT_NEEDED if len(opts) > 1 else SkipReason.NO_CODEC
                skips.append(Skip(t.node, t.ordinal, reason, "", t.nbytes))
                continue
            if not codec.fixed_rate and getattr(codec, "max_bytes", 0) is None:
                # another batch may need more bytes for the same ε: cap it at what was planned
                codec = dataclasses.replace(codec, max_bytes=nbytes)
            others = others_of(events, t)
            saved_by = tuple((e.node, e.ordinal) for e in others if e.shape == t.shape)
            viewed_by = tuple((e.node, e.ordinal) for e in others if e.shape != t.shape)
            assignments.append(Assignment(node=t.node, ordinal=t.ordinal, codec=codec.name,
                                          options=codec_options(codec), epsilon=codec.epsilon,
                                          bytes_before=t.nbytes, bytes_after=nbytes, error=error,
                                          shape=t.shape, dtype=t.dtype,
                                          gradient_share=self.share_of(t),
                                          exact_by_use=exact_for_use(codec, t.uses), saved_by=saved_by,
                                          viewed_by=viewed_by))
        return assignments, skips


def run_reserve(segment: Segment, config: CompileConfig) -> int:
    """What the runtime holds for recomputing ``segment`` besides what it reads: one autograd
    node's (and the CPU generator's state where it draws random numbers), or checkpoint's frame."""
    if not segment.one_node:
        return config.reserve_bytes_per_checkpoint
    return config.reserve_bytes_per_segment + (CPU_RNG_STATE_BYTES if segment.random else 0)


def _codec_seconds(codec, t: SavedTensor, config: CompileConfig) -> float:
    """Predicted pack + unpack time of ``codec`` on ``t`` at ``config.bytes_per_second``: the
    codec's ``copies`` of ``t`` (benchmarks/results/codecs.md run 4, eager: DCT ~3, HOSVD ~5,
    SVD ~8, FFT low-pass ~15, threshold ~40, wavelet ~90, quantizers ~12), or 2 where a
    fixed-rate codec runs as compiled kernels (int8 1.1–1.3 copies, mask 0.8–1.3). An offload
    costs ``config.transfer_copies`` copies (the measured round trip, see
    :func:`actcompile.codecs.offload.transfer_copies`)."""
    if codec is None:
        return 0.0
    if getattr(codec, "host_resident", False):   # an offload: out to host memory and back
        return config.transfer_copies * 2 * t.nbytes / config.bytes_per_second
    if codec.fixed_rate and config.compile_codecs and getattr(codec, "traceable", True):
        copies = 2.0
    else:
        copies = getattr(codec, "copies", 12.0)
    return copies * 2 * t.nbytes / config.bytes_per_second


def _time_price(profiles: list[MemoryProfile], config: CompileConfig, shares: list, repeats: list[int]) -> float:
    """λ·time in the error's units: recomputing the whole forward once costs ``time_weight`` × Σ of
    the error weights (a mean squared relative error of ``time_weight`` on every compressible tensor)."""
    if config.tolerance is not None or config.time_weight == 0:
        return 0.0   # a tolerance bounds the error alone
    weight = sum(r * _weight(t, config, s) for p, s, r in zip(profiles, shares, repeats)
                 for t in split_candidates(p, config)[0])
    seconds = sum(r * predicted_seconds(n.flops, sum(b for _, b in n.storages), config)
                  for p, r in zip(profiles, repeats) for n in p.nodes)
    return config.time_weight * weight / seconds if seconds > 0 else 0.0


def predicted_seconds(flops: int, moved_bytes: int, config: CompileConfig) -> float:
    """The time model: FLOPs at ``config.flops_per_second``, plus the bytes an op writes and reads
    again at ``config.bytes_per_second`` (elementwise ops, which count no FLOPs, are bound by those)."""
    return flops / config.flops_per_second + 2 * moved_bytes / config.bytes_per_second


def smallest_plan_bytes(profile: MemoryProfile, config: CompileConfig, calibration: dict) -> int:
    """The least activation bytes any plan of this graph keeps (every tensor at its smallest option)."""
    problem = _GraphProblem.build(profile, config, calibration)
    return problem.fixed + problem.reserve + smallest_total(problem.items)


def choose_plans(profiles: list[MemoryProfile], config: CompileConfig, calibrations: list[dict], *,
                 fixed_bytes: int = 0, repeats: list[int] | None = None,
                 shares: list[dict] | None = None, lossless_boundaries: bool = False) -> list[Plan]:
    """One plan per graph of a forward, chosen jointly: all graphs share ``config.budget``.

    A forward split by graph breaks runs several graphs; one knapsack over all their saved
    tensors puts the bytes where they cost least error, whichever graph holds them.
    ``fixed_bytes`` are kept by the forward outside these graphs (already-planned graphs):
    they count against the budget and cannot be compressed here. Each plan's ``budget_bytes``
    is its share: its planned bytes plus the slack left under the budget, split by baseline.
    ``repeats[i]`` is how often the forward runs graph ``i`` (default once each).
    ``shares[i]`` are graph ``i``'s gradient shares (:func:`~actcompile.passes.sensitivity.gradient_shares`):
    with ``error_weighting="gradient"`` they weigh each tensor's error, and each assignment records its share.
    ``lossless_boundaries``: a recomputed run reads what it reads from outside whole or losslessly
    packed, never through a lossy codec (the plan :func:`actcompile.api._measured_choice` tries
    where one recomputed from lossy boundaries measured a large gradient error).
    """
    repeats = list(repeats) if repeats is not None else [1] * len(profiles)
    baselines = [p.baseline_bytes for p in profiles]
    baseline = sum(b * r for b, r in zip(baselines, repeats)) + fixed_bytes
    budget_bytes = config.budget.resolve(baseline)
    if budget_bytes <= 0 < baseline:
        raise BudgetError(f"budget {config.budget} resolves to {budget_bytes} bytes; it must be at least 1 byte",
                          smallest_bytes=None)
    shares = list(shares) if shares is not None else [None] * len(profiles)
    price = _time_price(profiles, config, shares, repeats)
    problems = [_GraphProblem.build(p, config, c, r, s, price, lossless_boundaries)
                for p, c, r, s in zip(profiles, calibrations, repeats, shares)]
    # Already met (or nothing saved): every item keeps its bytes. Uncompressed, the heap holds the
    # storages plus autograd's own records; a byte budget must leave room for those too (only a
    # fraction of 1 means "as it is").
    records = sum(r * config.reserve_bytes_per_node * p.autograd_nodes for p, r in zip(profiles, repeats))
    met = baseline <= max(budget_bytes, 0) and (config.budget.fraction == 1.0 or baseline + records <= budget_bytes)
    items = [item for problem in problems for item in problem.items]
    fixed = fixed_bytes + sum(p.fixed for p in problems)
    reserve = sum(p.reserve for p in problems)
    if config.tolerance is not None:
        if any(s is None and p.candidates for s, p in zip(shares, problems)):
            raise ValueError("tolerance= needs each graph's gradient shares (passes/sensitivity.py); none were given")
        chosen = choose_options_within(items, config.tolerance ** 2)
        budget_bytes = fixed + reserve + sum(opts[i].nbytes for opts, i in zip(items, chosen))
        met = False
    if met:
        decoded = [problem.decode([0] * len(problem.items)) for problem in problems]
    else:
        if config.tolerance is None:
            chosen = choose_options(items, budget_bytes - fixed - reserve)
        if chosen is None:
            smallest = fixed + reserve + sum(min(o.nbytes for o in opts) for opts in items)
            # Worth saying only where returning less could let a plan fit: a forward returning a
            # key/value cache or logits larger than the overshoot, not a scalar loss.
            returned = sum(r * p.returned_bytes for p, r in zip(profiles, repeats))
            held = (f"; of the bytes that cannot be compressed, {format_bytes(returned)} is what the forward "
                    f"returns (its outputs and the saves they alias, e.g. a key/value cache or logits): the "
                    f"caller holds those, so they count and are never packed; a forward that returns less "
                    f"keeps less" if returned and returned >= smallest - budget_bytes else "")
            closure = sum(r * p.closure_held_bytes for p, r in zip(profiles, repeats))
            if closure:
                held += (f"; {format_bytes(closure)} is saved by custom autograd.Functions that torch.compile "
                         "captured: they keep what they save in their backward's closure, out of every "
                         "saved-tensor hook's reach, so no codec can pack it")
            vmapped = sum(r * t.nbytes for p, r in zip(profiles, repeats) for t in p.tensors
                          if t.kind is TensorKind.VMAPPED)
            if vmapped and vmapped >= smallest - budget_bytes:
                held += (f"; {format_bytes(vmapped)} is saved inside torch.vmap, which autograd's hooks see as "
                         "batched tensors no codec can pack (a loop or a batched op instead of vmap can be planned)")
            raise BudgetError(
                f"no plan fits the budget of {format_bytes(budget_bytes)} ({budget_bytes} B): the smallest "
                f"achievable with codecs {[c.name for c in config.codecs]} is {format_bytes(smallest)} "
                f"({smallest} B) of {format_bytes(baseline)} uncompressed; {format_bytes(fixed)} of it cannot "
                f"be compressed (each with its reason in actcompile.explain(model, example_inputs, "
                f"budget=1.0).skipped) and {format_bytes(reserve)} is kept free for autograd's own records, "
                f"the packed tensors' holders and the recomputed runs (reserve_bytes_per_node, "
                f"reserve_bytes_per_packed, reserve_bytes_per_segment, reserve_bytes_per_checkpoint){held}",
                smallest_bytes=smallest,
            )
        decoded, offset = [], 0
        for problem in problems:
            decoded.append(problem.decode(chosen[offset:offset + len(problem.items)]))
            offset += len(problem.items)
    planned = [b - sum(a.bytes_before - a.bytes_after for a in assignments)
               for b, (assignments, _) in zip(baselines, decoded)]
    slack = max(0, budget_bytes - fixed_bytes - sum(p * r for p, r in zip(planned, repeats)))
    total = max(baseline - fixed_bytes, 1)
    shares = [p + slack * b // total for p, b in zip(planned, baselines)]   # per call
    return [Plan(budget_bytes=share, baseline_bytes=problem.profile.baseline_bytes,
                 regions=_regions(assignments, problem.profile.node_order), skipped=tuple(skips),
                 node_order=_saving_nodes(assignments, skips, problem.profile.node_order),
                 records_bytes=config.reserve_bytes_per_node * problem.profile.autograd_nodes
                 - problem.records_freed(assignments))
            for share, problem, (assignments, skips) in zip(shares, problems, decoded)]


def _saving_nodes(assignments, skips, node_order: tuple[str, ...]) -> tuple[str, ...]:
    """The nodes the plan has a record of, in graph order."""
    named = {a.node for a in assignments} | {s.node for s in skips}
    return tuple(n for n in node_order if n in named)


def _regions(assignments: list[Assignment], node_order: tuple[str, ...]) -> tuple[Region, ...]:
    """Group assignments, in graph order, into runs sharing codec, options and ε."""
    position = {name: i for i, name in enumerate(node_order)}
    ordered = sorted(assignments, key=lambda a: (position[a.node], a.ordinal))
    runs = itertools.groupby(ordered, key=lambda a: (a.codec, a.options, a.epsilon))
    return tuple(Region(name=f"r{i}", codec=codec, epsilon=eps, assignments=tuple(group))
                 for i, ((codec, _, eps), group) in enumerate(runs))
