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
    each its own option): the merged item is the second choice, next to the first.

    >>> options, picks = merge_items([[Option(100, 0.0), Option(10, 1.0)], [Option(50, 0.0), Option(20, 0.5)]])
    >>> [(o.nbytes, o.cost) for o in options], picks
    ([(150, 0.0), (120, 0.5), (60, 1.0), (30, 1.5)], [(0, 0), (0, 1), (1, 0), (1, 1)])
    """
    front: list[tuple[Option, tuple[int, ...]]] = [(Option(0, 0.0), ())]
    for opts in items:
        sums = [(Option(a.nbytes + o.nbytes, a.cost + o.cost), picks + (i,))
                for a, picks in front for i, o in enumerate(opts)]
        sums.sort(key=lambda s: (s[0].nbytes, s[0].cost))
        front = []
        for s in sums:   # smallest first: keep each sum cheaper than every smaller one
            if not front or s[0].cost < front[-1][0].cost:
                front.append(s)
        if len(front) > limit:
            options = [o for o, _ in front]
            keep = set(_lower_hull(options))
            rest = [i for i in range(len(front)) if i not in keep]
            room = max(0, limit - len(keep))
            if room:
                keep.update(rest[int(k * len(rest) / room)] for k in range(room))
            front = [front[i] for i in sorted(keep)]
        front.sort(key=lambda s: (-s[0].nbytes, s[0].cost))
    first = (Option(sum(opts[0].nbytes for opts in items), sum(opts[0].cost for opts in items)), (0,) * len(items))
    front = [first] + [s for s in front if s[1] != first[1]]   # every member's first option stays first
    return [o for o, _ in front], [p for _, p in front]
