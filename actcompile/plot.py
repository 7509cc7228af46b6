"""A picture of a plan: the bytes each node saves before and after, and the budget.

Top panel: one bar pair per node that saves something, in graph order (graphs one after the
other): its bytes uncompressed (grey) and as planned (coloured by what the plan does with
it: a codec, ``recompute``, or ``kept``). Bottom panel: the same bytes added up along the
forward, with the budget as a line: the planned curve ends at the plan's bytes, under it.
What the forward returns and no backward reads (fixed bytes, no node of their own) is the
last bar, ``outputs``.

Needs matplotlib, an optional extra (``pip install 'actcompile[plot]'``); importing actcompile
never does. Draws on a ``Figure`` of its own (no pyplot state), so it works headless.

>>> from actcompile import explain
>>> from actcompile.zoo import build
>>> model, x = build("inplace_cnn")
>>> plan = explain(model, x, budget=0.25)
>>> rows = plot_rows(plan)
>>> sum(r.before for r in rows) == plan.baseline_bytes, sum(r.after for r in rows) == plan.planned_bytes
(True, True)
>>> plan.plot("/tmp/plan.png")   # doctest: +SKIP
"""

from __future__ import annotations

from typing import NamedTuple

from actcompile.plan import ModelPlan, Plan, SkipReason

# Skipped saves whose bytes are activation bytes the plan keeps (the others are parameters,
# buffers, inputs, bytes counted in another graph, or freed by a recomputed node, whose
# ``recompute`` assignment counts them).
_KEPT = {SkipReason.OUTPUT, SkipReason.NOT_FLOAT, SkipReason.TOO_SMALL, SkipReason.NO_CODEC, SkipReason.NOT_NEEDED,
         SkipReason.VMAPPED, SkipReason.CLOSURE}


class Row(NamedTuple):
    graph: str
    node: str
    before: int   # bytes the node's saves take uncompressed
    after: int    # bytes they take as planned
    kind: str     # the codec (or "recompute") of its largest assignment, else "kept"


def plot_rows(plan: Plan | ModelPlan) -> list[Row]:
    """The bars :func:`plot_plan` draws: one :class:`Row` per saving node in graph order, then one
    for the fixed bytes no node accounts for (the forward's returned outputs). Their ``before``
    sums to the plan's baseline, their ``after`` to its planned bytes."""
    sections = [(s.graph, s.plan) for s in plan.sections] if isinstance(plan, ModelPlan) else [("", plan)]
    rows = []
    for graph, p in sections:
        before: dict[str, int] = {}
        after: dict[str, int] = {}
        largest: dict[str, tuple[int, str]] = {}
        for a in p.assignments:
            before[a.node] = before.get(a.node, 0) + a.bytes_before
            after[a.node] = after.get(a.node, 0) + a.bytes_after
            largest[a.node] = max(largest.get(a.node, (-1, "")), (a.bytes_before, a.codec))
        for s in p.skipped:
            if s.reason in _KEPT:
                before[s.node] = before.get(s.node, 0) + s.nbytes
                after[s.node] = after.get(s.node, 0) + s.nbytes
        order = list(p.node_order) + sorted(set(before) - set(p.node_order))   # old plans: no order kept
        for node in order:
            if before.get(node, 0):
                rows.append(Row(graph, node, before[node], after[node], largest.get(node, (0, "kept"))[1]))
        # Plans made before freed small saves were marked RECOMPUTED count them twice: never below 0
        fixed = max(0, p.baseline_bytes - sum(before.values()))
        if fixed:
            rows.append(Row(graph, "outputs", fixed, fixed, "kept"))
    return rows


def plot_plan(plan: Plan | ModelPlan, path, *, title: str | None = None, dpi: int = 120):
    """Draw ``plan`` (see the module doc) and save it to ``path`` (the suffix picks the format:
    .png, .svg, .pdf). Returns the matplotlib ``Figure``."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plan.plot() needs matplotlib: pip install 'actcompile[plot]' (or matplotlib)") from err
    rows = plot_rows(plan)
    kinds = sorted({r.kind for r in rows} - {"kept"}) + ["kept"]
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan"]
    colour = {k: palette[i % len(palette)] for i, k in enumerate(kinds)}
    colour["kept"] = "0.35"
    scale, unit = (2**20, "MiB") if plan.baseline_bytes >= 2**20 else (2**10, "KiB")

    figure = Figure(figsize=(max(8.0, min(24.0, 0.12 * len(rows) + 4)), 7))
    FigureCanvasAgg(figure)
    bars, cumulative = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 2)})
    x = range(len(rows))
    bars.bar(x, [r.before / scale for r in rows], width=0.9, color="0.85", label="uncompressed")
    for kind in kinds:
        shown = [(i, r.after / scale) for i, r in enumerate(rows) if r.kind == kind]
        if shown:
            bars.bar([i for i, _ in shown], [h for _, h in shown], width=0.6, color=colour[kind], label=kind)
    bars.set_ylabel(f"saved per node ({unit})")
    bars.legend(ncol=min(len(kinds) + 1, 6), fontsize="small")
    bars.set_title(title or f"plan: {plan.planned_bytes / scale:.2f} {unit} of {plan.baseline_bytes / scale:.2f} "
                   f"{unit}, budget {plan.budget_bytes / scale:.2f} {unit}")

    total_before, total_after, ys_before, ys_after = 0, 0, [], []
    for r in rows:
        total_before += r.before
        total_after += r.after
        ys_before.append(total_before / scale)
        ys_after.append(total_after / scale)
    cumulative.step(x, ys_before, where="mid", color="0.5", label="uncompressed, added up")
    cumulative.step(x, ys_after, where="mid", color="tab:blue", label="planned, added up")
    cumulative.axhline(plan.budget_bytes / scale, color="tab:red", linestyle="--", label="budget")
    cumulative.set_ylabel(f"held after forward ({unit})")
    cumulative.legend(fontsize="small")
    if len(rows) <= 60:
        cumulative.set_xticks(list(x), [r.node for r in rows], rotation=90, fontsize="x-small")
    else:
        cumulative.set_xlabel(f"{len(rows)} saving nodes, in graph order")
    figure.tight_layout()
    with matplotlib.rc_context({"svg.fonttype": "none"}):   # SVG text stays text (searchable)
        figure.savefig(path, dpi=dpi)
    return figure
