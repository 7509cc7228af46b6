"""The records that flow between passes: what autograd saves, and what the plan does about it.

All records are frozen dataclasses that refer to graph nodes by name, validate their fields on
construction, and (for :class:`Plan`) round-trip through JSON::

    >>> t = Assignment(node="relu", ordinal=0, codec="mask", options=(), epsilon=None,
    ...                bytes_before=4096, bytes_after=128, error=0.0)
    >>> r = Region(name="r0", codec="mask", epsilon=None, assignments=(t,))
    >>> p = Plan(budget_bytes=1000, baseline_bytes=4096, regions=(r,), skipped=())
    >>> p.planned_bytes
    128
    >>> Plan.from_json(p.to_json()) == p
    True
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math


def format_bytes(n: int) -> str:
    """``1536 -> '1.5 KiB'``: bytes for people."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _require(cond: bool, record: str, field: str, value, valid: str) -> None:
    if not cond:
        raise ValueError(f"{record}.{field}={value!r}: {valid}")


class TensorKind(str, enum.Enum):
    """What a saved storage is; only ACTIVATION counts towards activation bytes."""

    ACTIVATION = "activation"
    PARAMETER = "parameter"
    BUFFER = "buffer"
    INPUT = "input"
    HELD = "held"    # held by the program beyond the forward: a module attribute, a global, a constant
    SHARED = "shared"   # an activation an earlier graph of the forward saves too: counted there
    OUTPUT = "output"   # returned by the forward: the caller holds it, so packing it would free nothing
    VMAPPED = "vmapped"   # saved inside a torch.vmap the graph traced: counted, never packed
    # saved by a custom autograd.Function Dynamo captured, which keeps it in its backward's
    # closure where no saved-tensor hook reaches: counted until backward, never packed
    CLOSURE = "closure"


@dataclasses.dataclass(frozen=True)
class SaveEvent:
    """One call of autograd's pack hook: node ``node`` saved its ``ordinal``-th tensor."""

    node: str
    ordinal: int
    op: str          # the autograd node that holds it for backward, e.g. "ReluBackward0"
    shape: tuple[int, ...]
    dtype: str
    storage: int     # index into MemoryProfile.tensors

    def __post_init__(self):
        _require(self.ordinal >= 0, "SaveEvent", "ordinal", self.ordinal, "must be >= 0")


# the kinds of saved storage that are activation bytes (the rest: parameters, inputs, what the
# program holds anyway, what an earlier graph counted)
COUNTED_KINDS = (TensorKind.ACTIVATION, TensorKind.OUTPUT, TensorKind.VMAPPED, TensorKind.CLOSURE)


@dataclasses.dataclass(frozen=True)
class Use:
    """One backward use of a saved tensor: the autograd node and its scalar arguments.

    >>> Use("HardtanhBackward0", (("max_val", 6.0), ("min_val", 0.0))).scalar("max_val")
    6.0
    """

    op: str
    scalars: tuple[tuple[str, object], ...] = ()

    def scalar(self, name: str, default=None):
        return dict(self.scalars).get(name, default)


LATER_USE = "(a later graph)"   # Use.op of a save a later graph makes: its backward is not known here


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """One distinct storage autograd holds for backward, however many ops saved it."""

    index: int
    node: str                  # node of the first save: the one a plan decision is keyed on
    ordinal: int
    shape: tuple[int, ...]     # of the first saved view
    dtype: str
    nbytes: int                # bytes of the whole storage
    kind: TensorKind
    uses: tuple[Use, ...]      # every autograd node that holds (a view of) it, in save order
    packed_shape: tuple[int, ...]  # what a codec packs: ``shape``, or (elements,) of the whole
                                   # storage when the first save is a partial view of it
    saved_later: bool = False  # a later graph of the forward saves this storage too (and shares
                               # its packed form): its uses there are in ``uses`` as LATER_USE

    def __post_init__(self):
        _require(self.nbytes >= 0, "SavedTensor", "nbytes", self.nbytes, "must be >= 0")
        _require(isinstance(self.kind, TensorKind), "SavedTensor", "kind", self.kind,
                 f"must be one of {[k.value for k in TensorKind]}")

    @property
    def is_activation(self) -> bool:
        return self.kind is TensorKind.ACTIVATION

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(u.op for u in self.uses)


@dataclasses.dataclass(frozen=True)
class NodeRecord:
    """One node of a captured graph, as :mod:`actcompile.passes.segments` needs it to tell what
    recomputing a run of nodes in backward frees, holds and costs.

    ``storages`` are the storages of the tensors the node returns, as ``(storage, bytes)``:
    ``storage`` is the index into :attr:`MemoryProfile.tensors` of a saved one, or ``-k - 1``
    (``k`` ≥ 0, unique in the profile) for one autograd does not keep.
    """

    name: str
    recompute: str              # "yes"; "in-place" (writes its first argument: only where that is made
                                # in the same run); "no" (side effects, higher-order ops, placeholders)
    inputs: tuple[str, ...]     # the nodes it reads
    storages: tuple[tuple[int, int], ...] = ()
    flops: int = 0              # torch.utils.flop_counter's count (0 for ops it has no formula for)
    kind: str = ""              # placeholders: the TensorKind value of the graph input
    grad: bool = False          # what it returns requires grad (backward makes a gradient for it)
    random: bool = False        # it draws random numbers (an op tagged nondeterministic_seeded)

    def __post_init__(self):
        _require(self.recompute in RECOMPUTE_KINDS, "NodeRecord", "recompute", self.recompute,
                 f"must be one of {RECOMPUTE_KINDS}")


RECOMPUTE_KINDS = ("yes", "in-place", "no")


@dataclasses.dataclass(frozen=True)
class MemoryProfile:
    """What autograd saves when ``graph`` runs forward on the example inputs.

    ``tensors`` are the distinct storages; ``events`` every save, in order.
    ``baseline_bytes`` counts the activation storages and what the forward returns to its
    caller (saved or not: ``output_bytes`` are the returned storages no backward reads), not
    parameters, buffers or inputs: the heap growth a user measures across the forward.
    """

    tensors: tuple[SavedTensor, ...]
    events: tuple[SaveEvent, ...]
    node_order: tuple[str, ...]
    mode: str = "fake"   # "fake" (FakeTensors) or "real" (needed for data-dependent control flow)
    autograd_nodes: int = 0   # nodes of the autograd graph the forward leaves behind
    nodes: tuple[NodeRecord, ...] = ()   # every node, in graph order (what recomputing runs of them does)
    output_bytes: int = 0     # storages the forward returns that no backward reads (fixed bytes)
    # storages only a captured custom autograd.Function keeps (TensorKind.CLOSURE, seen by no hook)
    closure_bytes: int = 0

    @property
    def baseline_bytes(self) -> int:
        return (sum(t.nbytes for t in self.tensors if t.kind in COUNTED_KINDS) + self.output_bytes
                + self.closure_bytes)

    @property
    def closure_held_bytes(self) -> int:
        """What captured custom ``autograd.Function`` s keep for backward out of every hook's reach
        (:attr:`TensorKind.CLOSURE`): fixed bytes until their backward runs."""
        return self.closure_bytes + sum(t.nbytes for t in self.tensors if t.kind is TensorKind.CLOSURE)

    @property
    def returned_bytes(self) -> int:
        """Storages the forward returns to its caller, saved by a backward too or not: held by the
        caller, so fixed bytes no codec may pack."""
        return self.output_bytes + sum(t.nbytes for t in self.tensors if t.kind is TensorKind.OUTPUT)

    def bytes_by_node(self) -> dict[str, int]:
        """Saved activation bytes (outputs saved too included) attributed to the node that first
        saved each storage; returned storages no backward reads (``output_bytes``) are nobody's."""
        out: dict[str, int] = {}
        for t in self.tensors:
            if t.kind in COUNTED_KINDS:
                out[t.node] = out.get(t.node, 0) + t.nbytes
        return out


class SkipReason(str, enum.Enum):
    PARAMETER = "parameter"
    BUFFER = "buffer"
    INPUT = "model input (held by the caller anyway)"
    HELD = "held by the program (a module attribute or global), freed by nothing"
    SHARED = "saved by an earlier graph too, and counted there"
    OUTPUT = "returned by the forward (the caller holds it): packing it would free nothing"
    NOT_FLOAT = "integer/bool tensor"
    TOO_SMALL = "below size floor"
    NO_CODEC = "no enabled codec supports it"
    RECOMPUTED = "freed: its node is recomputed in backward"
    NOT_NEEDED = "budget met without it"
    VMAPPED = ("saved inside a torch.vmap: autograd's hooks get it as a batched tensor, which has no storage "
               "a codec can pack")
    CLOSURE = ("saved by a custom autograd.Function that torch.compile captured: it keeps the tensor in its "
               "backward's closure, where no saved-tensor hook reaches, so packing the other saves of it frees nothing")


@dataclasses.dataclass(frozen=True)
class Skip:
    """A saved tensor the plan leaves as it is, and why."""

    node: str
    ordinal: int
    reason: SkipReason
    detail: str = ""
    nbytes: int = 0
    # SHARED: the storage's other (node, ordinal) saves in this graph. An earlier graph may have
    # packed it, so every save of it must run under the pack hook (passes/emit.py marks them).
    saved_by: tuple[tuple[str, int], ...] = ()


RECOMPUTE = "recompute"   # Assignment.codec of a node re-run in backward instead of saving its internals


@dataclasses.dataclass(frozen=True)
class Assignment:
    """One saved storage, the codec that packs it, and what that costs and saves.

    With ``codec == RECOMPUTE`` it is a whole node, re-run in backward (activation
    checkpointing): ``bytes_before`` its internal saved storages, ``bytes_after`` its arguments.
    """

    node: str
    ordinal: int
    codec: str
    options: tuple[tuple[str, object], ...]
    epsilon: float | None
    bytes_before: int
    bytes_after: int
    error: float   # measured relative L2 error on the calibration batch
    shape: tuple[int, ...] = ()   # of the saved tensor, checked at run time
    dtype: str = "float32"
    gradient_share: float | None = None   # share of the parameter gradient its error reaches
                                          # (passes/sensitivity.py); None where not probed
    exact_by_use: bool = False   # exact whatever the values: every backward reading it reads only
                                 # what the codec keeps (a ReLU's mask); drift checks skip it
    saved_by: tuple[tuple[str, int], ...] = ()   # the other (node, ordinal) saves of the same storage:
                                                 # whichever runs first packs it (the first may be recomputed)
    viewed_by: tuple[tuple[str, int], ...] = ()  # saves of it as a view of another shape (F.linear's
                                                 # 2-D view of a 3-D input): they reuse the packed form

    def __post_init__(self):
        _require(self.bytes_before >= 0, "Assignment", "bytes_before", self.bytes_before, "must be >= 0")
        _require(self.bytes_after >= 0, "Assignment", "bytes_after", self.bytes_after, "must be >= 0")
        _require(self.epsilon is None or 0 < self.epsilon < 1, "Assignment", "epsilon",
                 self.epsilon, "must be None or in (0, 1)")
        _require(self.error >= 0 and not math.isnan(self.error), "Assignment", "error",
                 self.error, "must be a non-negative number")


@dataclasses.dataclass(frozen=True)
class Region:
    """A run of consecutive nodes whose saved tensors share one codec and ε."""

    name: str
    codec: str
    epsilon: float | None
    assignments: tuple[Assignment, ...]

    def __post_init__(self):
        _require(len(self.assignments) > 0, "Region", "assignments", self.assignments, "must be non-empty")

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a.node for a in self.assignments))

    @property
    def bytes_before(self) -> int:
        return sum(a.bytes_before for a in self.assignments)

    @property
    def bytes_after(self) -> int:
        return sum(a.bytes_after for a in self.assignments)

    @property
    def error(self) -> float:
        """Size-weighted RMS of the measured relative errors of the region's tensors."""
        total = self.bytes_before
        if total == 0:
            return 0.0
        return math.sqrt(sum(a.bytes_before * a.error**2 for a in self.assignments) / total)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which saved tensors get which codec, and the bytes that result. Pure data."""

    budget_bytes: int
    baseline_bytes: int
    regions: tuple[Region, ...]
    skipped: tuple[Skip, ...]
    # the nodes that save something, in graph order (for plot()); () in plans made before it was kept
    node_order: tuple[str, ...] = ()
    # what the uncompressed forward's heap holds besides its storages: autograd's records, the
    # per-node reserve (CompileConfig.reserve_bytes_per_node, or the size a heap check measured)
    # times the autograd nodes it leaves; 0 where not profiled here or no reserve is kept (the
    # compiled back end's plans: Inductor's partition decides what is saved)
    records_bytes: int = 0

    def __post_init__(self):
        _require(self.budget_bytes >= 0, "Plan", "budget_bytes", self.budget_bytes, "must be >= 0")
        _require(self.baseline_bytes >= 0, "Plan", "baseline_bytes", self.baseline_bytes, "must be >= 0")
        _require(self.records_bytes >= 0, "Plan", "records_bytes", self.records_bytes, "must be >= 0")

    @property
    def predicted_heap_bytes(self) -> int:
        """The analyzer's prediction of the heap growth across an uncompressed forward: the
        storages (``baseline_bytes``) and autograd's records (``records_bytes``)."""
        return self.baseline_bytes + self.records_bytes

    @property
    def assignments(self) -> tuple[Assignment, ...]:
        return tuple(a for r in self.regions for a in r.assignments)

    @property
    def planned_bytes(self) -> int:
        saved = sum(a.bytes_before - a.bytes_after for a in self.assignments)
        return self.baseline_bytes - saved

    @property
    def predicted_gradient_error(self) -> float | None:
        """``√(Σ share·error²)`` over the codecs: the parameter gradient's predicted relative
        error (first order; see :mod:`actcompile.passes.sensitivity`), or None if not probed."""
        return predicted_gradient_error(self.assignments)

    # -- JSON -----------------------------------------------------------------------------
    def to_json(self) -> str:
        def encode(obj):
            if isinstance(obj, enum.Enum):
                return obj.name
            raise TypeError(type(obj))

        return json.dumps(dataclasses.asdict(self), default=encode, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        def tuples(v):   # JSON has lists where the records have tuples
            return tuple(tuples(x) for x in v) if isinstance(v, list) else v

        def assignment(d):
            options = tuple((k, tuples(v)) for k, v in d["options"])
            d = dict(d, options=options, shape=tuple(d["shape"]), saved_by=tuples(d.get("saved_by", [])),
                     viewed_by=tuples(d.get("viewed_by", [])))
            return Assignment(**d)

        regions = tuple(
            Region(name=r["name"], codec=r["codec"], epsilon=r["epsilon"],
                   assignments=tuple(assignment(a) for a in r["assignments"]))
            for r in data["regions"]
        )
        skipped = tuple(Skip(**dict(s, reason=SkipReason(s["reason"]), saved_by=tuples(s.get("saved_by", []))))
                        for s in data["skipped"])
        return cls(budget_bytes=data["budget_bytes"], baseline_bytes=data["baseline_bytes"],
                   regions=regions, skipped=skipped, node_order=tuple(data.get("node_order", ())),
                   records_bytes=data.get("records_bytes", 0))

    def plot(self, path, **options):
        """Save a picture of this plan to ``path`` (see :func:`actcompile.plot.plot_plan`; needs matplotlib)."""
        from actcompile.plot import plot_plan

        return plot_plan(self, path, **options)

    # -- table ----------------------------------------------------------------------------
    def region_rows(self) -> list[tuple[str, ...]]:
        """One row per region: name, nodes, codec, ε, bytes before → after, error."""
        rows = []
        for r in self.regions:
            nodes = r.nodes
            shown = ", ".join(nodes[:3]) + (f", … (+{len(nodes) - 3})" if len(nodes) > 3 else "")
            eps = "-" if r.epsilon is None else f"{r.epsilon:g}"
            rows.append((r.name, shown, r.codec, eps,
                         f"{format_bytes(r.bytes_before)} → {format_bytes(r.bytes_after)}",
                         f"{r.error:.3g}"))
        return rows

    def __str__(self) -> str:
        return _table([_HEADER] + self.region_rows(), _footer(self))


_HEADER = ("region", "nodes", "codec", "ε", "before → after", "error")


def _table(rows: list[tuple[str, ...]], footer: str) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("-" * len(lines[0]))
    lines.append(footer)
    return "\n".join(lines)


def predicted_gradient_error(assignments) -> float | None:
    """See :attr:`Plan.predicted_gradient_error`."""
    lossy = [a for a in assignments if a.error > 0]
    if any(a.gradient_share is None for a in lossy):
        return None
    return math.sqrt(sum(a.gradient_share * a.error ** 2 for a in lossy))


def _footer(plan) -> str:
    predicted = plan.predicted_gradient_error
    return (f"baseline {format_bytes(plan.baseline_bytes)} | planned {format_bytes(plan.planned_bytes)}"
            f" | budget {format_bytes(plan.budget_bytes)} | {len(plan.regions)} regions,"
            f" {len(plan.skipped)} tensors left as they are"
            + ("" if predicted is None else f" | predicted gradient error {predicted:.3g}"))


@dataclasses.dataclass(frozen=True)
class Section:
    """The plan of one captured graph (``graph`` is Dynamo's compile id, e.g. ``"0/0"``)."""

    graph: str
    plan: Plan


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """The plan of one forward: a section per graph it runs (graph breaks split a forward), one budget.

    It reads like a :class:`Plan` (``regions``, ``assignments``, ``skipped``, bytes) over all
    sections, and prints as one table with a column naming each region's graph::

        >>> a = Assignment("relu", 0, "mask", (), None, 4096, 128, 0.0)
        >>> one = Plan(budget_bytes=600, baseline_bytes=4096, regions=(Region("r0", "mask", None, (a,)),), skipped=())
        >>> two = Plan(budget_bytes=400, baseline_bytes=0, regions=(), skipped=())
        >>> plan = ModelPlan(budget_bytes=1000, sections=(Section("0/0", one), Section("1/0", two)))
        >>> plan.planned_bytes, plan.baseline_bytes
        (128, 4096)
        >>> ModelPlan.from_json(plan.to_json()) == plan
        True
    """

    budget_bytes: int
    sections: tuple[Section, ...]
    # wall-clock seconds capture, profiling, calibration and the knapsack took (None: not planned
    # here, e.g. read from JSON without it); not part of what the plan *is*, so not compared
    planning_seconds: float | None = dataclasses.field(default=None, compare=False)
    # budget_scope="peak" (passes/peak.py): the step's peak the budget bounds, and the predicted
    # peak of this plan (parameters, optimizer state, gradients, activations, transients);
    # budget_bytes is then the activation bytes the plan was fitted to
    peak_budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    # the parameter gradient's relative error one probe backward measured with this plan's codecs,
    # where planning compared plans by it (codecs outside the default set chosen: api._measured_choice)
    measured_gradient_error: float | None = dataclasses.field(default=None, compare=False)
    # activation bytes the forward keeps that no captured graph made or saves: what code Dynamo
    # ran as plain Python saved for backward or returned (capture.CapturedGraphs); held as they
    # are, counted in the baseline and the planned bytes
    uncaptured_bytes: int = 0

    def __post_init__(self):
        _require(self.budget_bytes > 0, "ModelPlan", "budget_bytes", self.budget_bytes, "must be > 0")
        _require(self.uncaptured_bytes >= 0, "ModelPlan", "uncaptured_bytes", self.uncaptured_bytes, "must be >= 0")
        _require((self.peak_budget_bytes is None) == (self.predicted_peak_bytes is None), "ModelPlan",
                 "predicted_peak_bytes", self.predicted_peak_bytes, "must be given with peak_budget_bytes")

    @property
    def baseline_bytes(self) -> int:
        return self.uncaptured_bytes + sum(s.plan.baseline_bytes for s in self.sections)

    @property
    def planned_bytes(self) -> int:
        return self.uncaptured_bytes + sum(s.plan.planned_bytes for s in self.sections)

    @property
    def predicted_heap_bytes(self) -> int:
        """As :attr:`Plan.predicted_heap_bytes`, over every section (and the uncaptured bytes)."""
        return self.uncaptured_bytes + sum(s.plan.predicted_heap_bytes for s in self.sections)

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(r for s in self.sections for r in s.plan.regions)

    @property
    def assignments(self) -> tuple[Assignment, ...]:
        return tuple(a for s in self.sections for a in s.plan.assignments)

    @property
    def skipped(self) -> tuple[Skip, ...]:
        return tuple(k for s in self.sections for k in s.plan.skipped)

    @property
    def predicted_gradient_error(self) -> float | None:
        """As :attr:`Plan.predicted_gradient_error`, over every section (each graph's shares are
        of the gradients its own probe reached)."""
        return predicted_gradient_error(self.assignments)

    def section(self, graph: str) -> Plan:
        """The plan of the graph with compile id ``graph``."""
        for s in self.sections:
            if s.graph == graph:
                return s.plan
        raise KeyError(f"no graph {graph!r} in this plan; graphs: {[s.graph for s in self.sections]}")

    def plot(self, path, **options):
        """Save a picture of this plan to ``path`` (see :func:`actcompile.plot.plot_plan`; needs matplotlib)."""
        from actcompile.plot import plot_plan

        return plot_plan(self, path, **options)

    def to_json(self) -> str:
        data = {"budget_bytes": self.budget_bytes, "planning_seconds": self.planning_seconds,
                "sections": [{"graph": s.graph, "plan": json.loads(s.plan.to_json())} for s in self.sections]}
        if self.peak_budget_bytes is not None:
            data.update(peak_budget_bytes=self.peak_budget_bytes, predicted_peak_bytes=self.predicted_peak_bytes)
        if self.measured_gradient_error is not None:
            data.update(measured_gradient_error=self.measured_gradient_error)
        if self.uncaptured_bytes:
            data.update(uncaptured_bytes=self.uncaptured_bytes)
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ModelPlan":
        data = json.loads(text)
        return cls(budget_bytes=data["budget_bytes"], planning_seconds=data.get("planning_seconds"),
                   sections=tuple(Section(s["graph"], Plan.from_dict(s["plan"])) for s in data["sections"]),
                   peak_budget_bytes=data.get("peak_budget_bytes"), predicted_peak_bytes=data.get("predicted_peak_bytes"),
                   measured_gradient_error=data.get("measured_gradient_error"),
                   uncaptured_bytes=data.get("uncaptured_bytes", 0))

    def __str__(self) -> str:
        rows = [("graph",) + _HEADER]
        for s in self.sections:
            section_rows = s.plan.region_rows() or [("", "(nothing compressed)", "", "", "", "")]
            rows += [(s.graph,) + row for row in section_rows]
        graphs = f"{len(self.sections)} graph{'s' if len(self.sections) != 1 else ''}"
        took = "" if self.planning_seconds is None else f" | planned in {self.planning_seconds:.2f} s"
        peak = ("" if self.peak_budget_bytes is None else f" | step peak {format_bytes(self.predicted_peak_bytes)} "
                f"predicted of {format_bytes(self.peak_budget_bytes)}")
        plain = ("" if not self.uncaptured_bytes else
                 f" | {format_bytes(self.uncaptured_bytes)} kept by code Dynamo ran uncaptured")
        return _table(rows, f"{_footer(self)} | {graphs}{plain}{took}{peak}")
