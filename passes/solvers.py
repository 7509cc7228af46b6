"""Multiple-choice knapsack over plain lists: one option per item, total size ≤ capacity, least cost
(or, :func:`choose_options_within`, total cost ≤ a bound, least size).

Greedy on each item's lower convex hull of (bytes, cost): every step from one hull point to the
next saves bytes at a rising marginal cost per byte, so taking the globally cheapest step first
(a heap) until the total fits is the Lagrangian relaxation's path. ResNet-50's ~400 items with
5 options each solve in about a millisecond. Its last step can overshoot badly where items are
few and large (a 128 KiB tensor sent to int2 to free the last 1.3 KiB), so where the problem is
small enough (:data:`EXACT_CELLS`) a dynamic program over the capacity in :data:`EXACT_BUCKETS`
steps (item sizes rounded up: its answer always fits) solves it exactly too, and the cheaper of
the two answers is taken.

>>> items = [[Option(100, 0.0), Option(30, 1.0), Option(10, 5.0)],
...          [Option(100, 0.0), Option(50, 0.1)]]
>>> choose_options(items, capacity=90)
[1, 1]
>>> choose_options(items, capacity=200)
[0, 0]
>>> choose_options(items, capacity=10) is None
True
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np   # not torch: the compiled back end plans inside FakeTensorMode

EXACT_BUCKETS = 4096            # capacity resolution of the dynamic program
EXACT_CELLS = 40_000_000        # items × options × buckets above which only the greedy runs


@dataclasses.dataclass(frozen=True)
class Option:
    nbytes: int
    cost: float


def _lower_hull(options: list[Option]) -> list[int]:
    """Indices of the options on the lower convex hull, from largest to smallest bytes."""
    order = sorted(range(len(options)), key=lambda i: (-options[i].nbytes, options[i].cost))
    hull: list[int] = []
    for i in order:
        o = options[i]
        if hull and o.nbytes == options[hull[-1]].nbytes:
            continue   # same size, no cheaper
        while hull and o.cost < options[hull[-1]].cost:
            hull.pop()  # smaller and cheaper: the larger option is dominated
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            # slope (cost per byte saved) a→b must be below a→o, else b is not on the hull
            if (b.cost - a.cost) * (a.nbytes - o.nbytes) >= (o.cost - a.cost) * (a.nbytes - b.nbytes):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def choose_options(items: list[list[Option]], capacity: int) -> list[int] | None:
    """Index of the chosen option per item, or ``None`` if even the smallest options exceed capacity.

    The greedy (:func:`greedy_options`) and, where small enough, the exact program
    (:func:`exact_options`): whichever costs less.
    """
    greedy = greedy_options(items, capacity)
    if greedy is None or not items:
        return greedy
    cells = len(items) * max(len(opts) for opts in items) * EXACT_BUCKETS
    exact = exact_options(items, capacity) if cells <= EXACT_CELLS else None

    def cost(chosen):
        return sum(opts[i].cost for opts, i in zip(items, chosen))

    return exact if exact is not None and cost(exact) < cost(greedy) else greedy


def exact_options(items: list[list[Option]], capacity: int, buckets: int = EXACT_BUCKETS) -> list[int] | None:
    """The least-cost choice by dynamic programming over the capacity cut into ``buckets`` units,
    each item's bytes rounded up to whole units (so the answer fits; exact when ``capacity <
    buckets``); ``None`` if the rounded problem has no solution.

    >>> exact_options([[Option(100, 0.0), Option(60, 1.0), Option(10, 50.0)],
    ...                [Option(40, 0.0), Option(30, 0.1), Option(20, 5.0)]], capacity=85)
    [1, 2]
    """
    if capacity < 0:
        return None
    unit = max(1, -(-capacity // buckets))
    cap = capacity // unit
    best = np.zeros(cap + 1)   # least cost within c units, no item yet
    picks = []
    for opts in items:
        candidates = np.full((len(opts), cap + 1), np.inf)
        for o, option in enumerate(opts):
            width = -(-option.nbytes // unit)
            if width <= cap:
                candidates[o, width:] = best[:cap + 1 - width] + option.cost
        pick = candidates.argmin(axis=0)
        best = candidates[pick, np.arange(cap + 1)]
        picks.append(pick)
    if not np.isfinite(best[cap]):
        return None
    chosen, c = [], cap
    for opts, pick in zip(reversed(items), reversed(picks)):
        o = int(pick[c])
        chosen.append(o)
        c -= -(-opts[o].nbytes // unit)
    return chosen[::-1]


def greedy_options(items: list[list[Option]], capacity: int) -> list[int] | None:
    """The Lagrangian path (see the module doc): every item starts at its largest option; hull
    steps are taken cheapest-per-byte first until the total fits."""
    hulls = [_lower_hull(opts) for opts in items]
    position = [0] * len(items)
    total = sum(items[k][h[0]].nbytes for k, h in enumerate(hulls))
    if sum(min(o.nbytes for o in opts) for opts in items) > capacity:
        return None
    heap = []

    def push(k):
        h, p = hulls[k], position[k]
        if p + 1 < len(h):
            a, b = items[k][h[p]], items[k][h[p + 1]]
            heapq.heappush(heap, ((b.cost - a.cost) / (a.nbytes - b.nbytes), k))

    for k in range(len(items)):
        push(k)
    while total > capacity and heap:
        _, k = heapq.heappop(heap)
        h, p = hulls[k], position[k]
        total -= items[k][h[p]].nbytes - items[k][h[p + 1]].nbytes
        position[k] = p + 1
        push(k)
    return [hulls[k][position[k]] for k in range(len(items))]


def choose_options_within(items: list[list[Option]], max_cost: float) -> list[int]:
    """Index of the chosen option per item: least total bytes whose total cost stays ≤ ``max_cost``.

    The same path as :func:`choose_options` from the other end: hull steps are taken cheapest
    cost-per-byte first while the total cost allows them; a step that would pass ``max_cost``
    ends its item (its later steps cost more per byte), the others go on.

    >>> items = [[Option(100, 0.0), Option(30, 1.0), Option(10, 5.0)], [Option(100, 0.0), Option(50, 0.1)]]
    >>> choose_options_within(items, max_cost=1.1)
    [1, 1]
    >>> choose_options_within(items, max_cost=0.0)
    [0, 0]
    """
    hulls = [_lower_hull(opts) for opts in items]
    position = [0] * len(items)
    cost = sum(items[k][h[0]].cost for k, h in enumerate(hulls))
    heap = []

    def push(k):
        h, p = hulls[k], position[k]
        if p + 1 < len(h):
            a, b = items[k][h[p]], items[k][h[p + 1]]
            heapq.heappush(heap, ((b.cost - a.cost) / (a.nbytes - b.nbytes), k, b.cost - a.cost))

    for k in range(len(items)):
        push(k)
    while heap:
        _, k, step_cost = heapq.heappop(heap)
        if cost + step_cost > max_cost:
            continue
        cost += step_cost
        position[k] += 1
        push(k)
    return [hulls[k][position[k]] for k in range(len(items))]


def smallest_total(items: list[list[Option]]) -> int:
    """The least total bytes any choice reaches."""
    return sum(min(o.nbytes for o in opts) for opts in items)


def merge_items(items: list[list[Option]], limit: int = 128) -> tuple[list[Option], list[tuple[int, ...]]]:
    """One item standing for all of ``items`` together: its options are the Pareto-best sums
    (no other sum is both smaller and cheaper), at most ``limit`` of them (the lower convex
    hull's points first, then evenly spaced by bytes), each with the member options it sums.
    The first is always every member's first option (``keep as is``), even where dominated.

    The policy decides a recomputable segment's storages together (recompute them all, or give
    each its own option): the merged item is the second choice, next to the first. The front is
    kept as arrays, each sum pointing back at the sum it extends (not a tuple of picks per sum:
    that made merging a segment of ``m`` members cost ``m²``; a 10,000-node graph's segments
    merged in ~3 s that way, see ``benchmarks/results/planning.md`` run 4). Pruning keeps every
    corner of the front's lower convex hull (what the knapsack's greedy walks); among points
    collinear on it, which ones are kept may differ from a one-pass monotone chain's choice.

    >>> options, picks = merge_items([[Option(100, 0.0), Option(10, 1.0)], [Option(50, 0.0), Option(20, 0.5)]])
    >>> [(o.nbytes, o.cost) for o in options], picks
    ([(150, 0.0), (120, 0.5), (60, 1.0), (30, 1.5)], [(0, 0), (0, 1), (1, 0), (1, 1)])
    """
    front_bytes, front_cost = np.zeros(1, dtype=np.int64), np.zeros(1)
    steps: list[tuple[np.ndarray, np.ndarray]] = []   # per member: (parent in the previous front, its option)
    for opts in items:
        option_bytes = np.array([o.nbytes for o in opts], dtype=np.int64)
        option_cost = np.array([o.cost for o in opts], dtype=np.float64)
        sum_bytes = (front_bytes[:, None] + option_bytes[None, :]).ravel()
        sum_cost = (front_cost[:, None] + option_cost[None, :]).ravel()
        order = np.lexsort((sum_cost, sum_bytes))      # smallest first, then cheapest
        sum_bytes, sum_cost = sum_bytes[order], sum_cost[order]
        # keep each sum cheaper than every smaller one
        cheapest_before = np.minimum.accumulate(sum_cost)
        kept = np.ones(len(order), dtype=bool)
        kept[1:] = sum_cost[1:] < cheapest_before[:-1]
        order, sum_bytes, sum_cost = order[kept], sum_bytes[kept], sum_cost[kept]
        if len(order) > limit:
            keep = _pareto_hull(sum_bytes, sum_cost)
            rest = np.flatnonzero(~keep)
            room = max(0, limit - int(keep.sum()))
            if room and len(rest):
                keep[rest[(np.arange(room) * len(rest)) // room]] = True
            order, sum_bytes, sum_cost = order[keep], sum_bytes[keep], sum_cost[keep]
        order, sum_bytes, sum_cost = order[::-1], sum_bytes[::-1], sum_cost[::-1]   # largest first, as options go
        steps.append((order // len(opts), order % len(opts)))
        front_bytes, front_cost = sum_bytes, sum_cost
    picks = np.zeros((len(front_bytes), len(items)), dtype=np.int64)
    at = np.arange(len(front_bytes))
    for member in range(len(items) - 1, -1, -1):
        parent, option = steps[member]
        picks[:, member] = option[at]
        at = parent[at]
    first = (Option(sum(opts[0].nbytes for opts in items), sum(opts[0].cost for opts in items)), (0,) * len(items))
    merged = [(Option(b, c), tuple(row))
              for b, c, row in zip(front_bytes.tolist(), front_cost.tolist(), picks.tolist())]
    merged = [first] + [m for m in merged if m[1] != first[1]]   # every member's first option stays first
    return [o for o, _ in merged], [p for _, p in merged]


def _pareto_hull(nbytes: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Which points of a Pareto front (bytes rising, cost falling) are on its lower convex hull:
    a point on or above the chord of its two neighbours is not, and all such points are dropped
    at once, until none is left (each pass drops only points off the hull)."""
    on = np.ones(len(nbytes), dtype=bool)
    while True:
        idx = np.flatnonzero(on)
        if len(idx) < 3:
            return on
        b, c = nbytes[idx].astype(np.float64), cost[idx]
        # slope a→j ≥ slope j→o (bytes rising): j is not below the chord a→o
        left = (c[1:-1] - c[:-2]) * (b[2:] - b[1:-1])
        right = (c[2:] - c[1:-1]) * (b[1:-1] - b[:-2])
        off = left >= right
        if not off.any():
            return on
        on[idx[1:-1][off]] = False
