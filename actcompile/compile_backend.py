"""The ``torch.compile`` back end: Inductor, with the saved-for-backward values planned and packed.

::

    compiled = torch.compile(model, backend="actcompile", options={"budget": 0.25})
    # or, to inspect the plans afterwards:
    be = actcompile.backend(budget=0.25)
    compiled = torch.compile(model, backend=be)
    loss = compiled(x).sum(); loss.backward()
    print(be.plans[0])                 # one Plan per compiled graph

``"actcompile"`` is registered through the ``torch_dynamo_backends`` entry-point group, so no
import is needed. Each graph Dynamo captures is compiled by Inductor's ``compile_fx`` with a
custom partitioner (:class:`SavedValuePartitioner`): Inductor's own
min-cut partition first, then the plan over the values it saves, packed in the forward and
unpacked at first use in the backward (see :mod:`actcompile.passes.inductor`). Where that plan
must lose precision, the graph is partitioned again at lower ``activation_memory_budget``
values (:data:`RECOMPUTE_BUDGETS`: Inductor recomputes more of the forward in backward, its own
runtime-priced choice) and the same bytes planned out of what it still saves; the partition over
the budget by the least, then costing the least (gradient error, measured on one probe backward,
+ λ·time), is kept (``backend.memory_budgets`` says which, per graph). Saved 4-D
inputs cross as flat views of themselves (:mod:`actcompile.passes.saved_inputs`), so the forward
holds the plan's bytes and nothing more (plain Inductor holds channels-last copies of the conv
weights it saves: 46 MB on ResNet-18 at batch 32). The budget is a
fraction of the bytes Inductor would save plus what the forward returns (the caller holds its
outputs: counted, never packed, as in the eager back end), or bytes. Options are the same as
:func:`actcompile.actcompile`'s and give the same errors.

Graph breaks split a forward into several graphs, compiled one by one as the first forward
reaches them. They share one budget (:class:`ForwardBudget`): a fraction is of the bytes all of
them would save, and each graph is planned to what the budget allows the graphs compiled so far,
less what those before it were planned to keep. A graph that cannot be brought to its share (a
loss after a graph break saves a few KiB of integer labels and softmax statistics, none of it
compressible) keeps what it must and the graphs compiled after it pay the difference. If nothing
pays, the first backward raises :class:`~actcompile.errors.BudgetError`, naming the bytes.

>>> import torch
>>> class Net(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.a, self.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 8)
...     def forward(self, x):
...         return self.b(torch.tanh(self.a(x)))
>>> be = backend(budget=0.5)
>>> out = torch.compile(Net(), backend=be)(torch.randn(64, 256))
>>> out.sum().backward()
>>> plan = be.plans[0]
>>> plan.planned_bytes <= plan.budget_bytes
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import warnings
from typing import Any, Callable, Sequence

import torch
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from actcompile.config import Budget, CompileConfig
from actcompile.errors import BudgetError
from actcompile.plan import Plan, SkipReason, format_bytes

TAIL_RESERVE = 0.01   # of its share, each graph leaves to the graphs compiled after it (see ForwardBudget)
# Inductor's ``activation_memory_budget`` values at which a graph whose plan must lose precision
# is partitioned again: Inductor then recomputes more of the forward in backward (its own
# runtime-priced choice), and the same bytes are planned out of what it still saves. The partition
# kept is the one over the budget by the least, then the cheapest by the eager policy's objective
# (gradient error + λ·time, ``time_weight``), the gradient error measured (see _better).
RECOMPUTE_BUDGETS = (0.5, 0.25, 0.125)


@dataclasses.dataclass
class _Partition:
    """One partition of a joint graph and the plan of what its forward saves."""

    fwd: torch.fx.GraphModule
    bwd: torch.fx.GraphModule
    plan: Plan
    least: int                 # the least bytes any plan of this partition keeps
    forward_seconds: float     # predicted (passes.inductor.graph_seconds)
    backward_seconds: float    # predicted, with what it recomputes of the forward
    gradient_error: float | None = None   # measured (passes.inductor.measured_gradient_error), once asked
    measured: bool = False                # asked (gradient_error None: it could not be measured)

    @property
    def redraws_random(self) -> bool:
        """Does its backward draw random numbers (recompute a random op of the forward)?"""
        return draws_random(self.bwd)


def draws_random(gm: torch.fx.GraphModule) -> bool:
    """Does ``gm`` call a random op (an aten/prims op tagged ``nondeterministic_seeded``)?

    A backward that does recomputes the forward's randomness with fresh numbers: Inductor's
    partitions at ``activation_memory_budget`` < 1 recompute ``prims.inductor_seeds`` (the seeds
    of every dropout mask in the graph) in backward on CPU, so the dropout masks backward uses
    are not the forward's. Measured on a 2+2-layer T5 with attention dropout 0.1: plain
    ``torch.compile`` at ``activation_memory_budget=0.25`` gives gradients at cosine 0.898
    against ``torch.compile``'s default partition, the same forward loss. The back end marks
    the random ops saved before partitioning (:func:`_save_random_ops_`; the same T5: 0.99995)
    and, should a backward still draw, never keeps that partition.

    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> draws_random(make_fx(lambda x: torch.nn.functional.dropout(x, 0.5))(torch.ones(4)))
    True
    >>> draws_random(make_fx(lambda x: x.relu())(torch.ones(4)))
    False
    >>> q = torch.ones(1, 1, 4, 8)
    >>> attention = torch.nn.functional.scaled_dot_product_attention
    >>> draws_random(make_fx(lambda q: attention(q, q, q))(q)), draws_random(make_fx(lambda q: attention(q, q, q, dropout_p=0.1))(q))
    (False, True)
    """
    return any(_draws_random(n) for n in gm.graph.nodes)


def _save_random_ops_(joint: torch.fx.GraphModule) -> None:
    """Mark the joint graph's random ops saved (``CheckpointPolicy.MUST_SAVE``), so that a
    partition recomputing more of the forward reuses their outputs (the dropout seeds: a few
    bytes) instead of drawing new ones in backward (see :func:`draws_random`)."""
    from torch.utils.checkpoint import CheckpointPolicy

    for node in joint.graph.nodes:
        if _draws_random(node):
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def _draws_random(node: torch.fx.Node) -> bool:
    """Is ``node`` a random op? Ops tagged ``nondeterministic_seeded`` that take a ``dropout_p``
    (CPU flash attention) draw nothing at ``dropout_p=0``: GPT-2's attention at every one of its
    partitions."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    for i, argument in enumerate(target._schema.arguments):
        if argument.name == "dropout_p":
            p = node.kwargs.get("dropout_p", node.args[i] if i < len(node.args) else argument.default_value)
            return p != 0
    return True


def _squared_error(plan: Plan) -> float:
    """The plan's summed squared relative error over its codecs (what the knapsack minimises)."""
    return sum(a.error ** 2 for a in plan.assignments)


def _candidates(p: _Partition) -> int:
    """How many saved values of ``p``'s plan could be packed (those it packs and those it may leave)."""
    return max(1, len(p.plan.assignments) + sum(1 for s in p.plan.skipped if s.reason is SkipReason.NOT_NEEDED))


def _time_price(default: _Partition, config: CompileConfig) -> float:
    """λ in the error's units, as the eager policy prices time (``CompileConfig.time_weight``):
    recomputing the whole forward once costs ``time_weight`` on every saved value the plan could
    pack (a mean squared relative error of ``time_weight`` each)."""
    return config.time_weight * _candidates(default) / max(default.forward_seconds, 1e-9)


def _cost(p: _Partition, price: float, config: CompileConfig, candidates: int) -> float:
    """Error + λ·(backward time, recomputation included, + codec time: compiled pack and unpack
    ~2 copies of each packed value). The error is the measured gradient error g as ``candidates``
    values each at ε = g (the units of the knapsack's Σε²), or the plan's Σε² if not measured."""
    codec_seconds = sum(4 * a.bytes_before for a in p.plan.assignments) / config.bytes_per_second
    error = _squared_error(p.plan) if p.gradient_error is None else candidates * p.gradient_error ** 2
    return error + price * (p.backward_seconds + codec_seconds)


def _better(candidate: _Partition, current: _Partition, allowed: int, price: float, config: CompileConfig,
            candidates: int, measure: Callable[[_Partition], None] = lambda p: None) -> bool:
    """Does ``candidate`` (a partition recomputing more) keep fewer bytes over ``allowed``, or as
    few at a lower cost? A lossy plan over a partition that recomputes more is judged by its
    measured gradient error, never by its codecs' ε alone: backward recomputes from what the
    forward saved, and a lossy value feeding a recomputed BatchNorm is amplified far past its
    own error (ResNet-18, batch 32, at 1/4: five int8 values, summed ε² 1e-4, gradient cosine 0.9945, where
    the default partition's 37 packed values, summed ε² 0.02, gave 0.9996), while a recomputed
    attention reads an int8 query at about its ε. ``measure(p)`` sets ``p.gradient_error`` (asked
    only where a lossy plan is compared). Where it cannot be measured (no real inputs), a lossy
    plan recomputes more only if that keeps fewer bytes over the budget."""
    over = max(0, candidate.plan.planned_bytes - allowed)
    over_now = max(0, current.plan.planned_bytes - allowed)
    if over != over_now:
        return over < over_now
    if _squared_error(candidate.plan) > 0 or _squared_error(current.plan) > 0:
        measure(candidate)
        measure(current)
    if _squared_error(candidate.plan) > 0 and (candidate.gradient_error is None or current.gradient_error is None):
        return False
    return _cost(candidate, price, config, candidates) < _cost(current, price, config, candidates)


@dataclasses.dataclass
class _GraphBytes:
    baseline: int   # what the graph would save uncompressed
    planned: int    # what its plan keeps
    least: int      # the least any plan of it keeps


class ForwardBudget:
    """One budget for the graphs of one forward, which Dynamo compiles one after another.

    Each graph (one entry per Dynamo frame; a recompile replaces the frame's entry) is planned to
    ``budget(baselines so far) - planned bytes of the others``, less :data:`TAIL_RESERVE` of that
    for graphs still to come if it must compress: the slack a plan leaves goes to the next graph, and a graph that
    cannot meet its share is planned to the least it can keep, its excess carried as
    :attr:`overshoot_bytes` until a later graph pays it.

    >>> ledger = ForwardBudget(Budget(fraction=0.25))
    >>> ledger.share("0", 4000)           # the first graph: 1/4 of its 4000 B, 1% kept back
    990
    >>> ledger.record("0", baseline=4000, planned=980, least=500)
    >>> ledger.share("1", 40)             # a small graph after a break: 1/4 of 4040 B less 980 planned
    29
    >>> ledger.record("1", baseline=40, planned=40, least=40)   # it can compress nothing
    >>> ledger.overshoot_bytes
    10
    """

    def __init__(self, budget: Budget):
        self.budget = budget
        self.graphs: dict[str, _GraphBytes] = {}

    def share(self, key: str, baseline: int) -> int:
        """The bytes graph ``key``, saving ``baseline`` bytes uncompressed, may keep."""
        others = [g for k, g in self.graphs.items() if k != key]
        allowed = self.budget.resolve(baseline + sum(g.baseline for g in others)) - sum(g.planned for g in others)
        return allowed if baseline <= allowed else int(allowed * (1 - TAIL_RESERVE))

    def record(self, key: str, *, baseline: int, planned: int, least: int) -> None:
        self.graphs[key] = _GraphBytes(baseline, planned, least)

    @property
    def budget_bytes(self) -> int:
        return self.budget.resolve(sum(g.baseline for g in self.graphs.values()))

    @property
    def overshoot_bytes(self) -> int:
        """Planned bytes of all graphs over the budget (0 when the forward meets it)."""
        return max(0, sum(g.planned for g in self.graphs.values()) - self.budget_bytes)

    def check(self) -> None:
        """Raise :class:`BudgetError` if the graphs compiled so far are planned over the budget."""
        over = self.overshoot_bytes
        if not over:
            return
        least = sum(g.least for g in self.graphs.values())
        at_least = [f"graph {k} keeps {format_bytes(g.planned)} of {format_bytes(g.baseline)}"
                    for k, g in self.graphs.items() if g.planned <= g.least]   # least adds the heap reserve
        why = f" ({'; '.join(at_least)}, the least it can)" if at_least else ""
        raise BudgetError(
            f"torch.compile(backend='actcompile'): the forward's {len(self.graphs)} graph(s) are planned to keep "
            f"{format_bytes(self.budget_bytes + over)}, {format_bytes(over)} over the budget ({self.budget}: "
            f"{format_bytes(self.budget_bytes)}), and no graph compiled after them could pay it{why}. "
            f"The least all graphs can keep is {format_bytes(least)} ({least} B)",
            smallest_bytes=least)


class SavedValuePartitioner(CustomPartitionerFn):
    """Inductor's min-cut partition, then the saved values planned and packed (one graph)."""

    def __init__(self, config: CompileConfig, real_inputs: Sequence | None, plans: list, packed: list,
                 ledger: ForwardBudget, key: str, memory_budgets: list):
        self.config, self.real_inputs, self.plans, self.packed = config, real_inputs, plans, packed
        self.ledger, self.key, self.memory_budgets = ledger, key, memory_budgets
        self.check = None   # a SavedValueCheck once a training graph is partitioned with something packed

    def __call__(self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
        from actcompile.passes.inductor import SavedValueCheck, _fake_mode_of, compress_saved_
        from actcompile.passes.saved_inputs import save_inputs_flat_

        n = kwargs["num_fwd_outputs"]
        spare = _copy_graph_module(gm) if self._may_recompute() else None   # the partitioner rewrites gm
        best = self._partition_and_plan(gm, joint_inputs, kwargs, self.ledger.share)
        memory_budget = torch._functorch.config.activation_memory_budget
        baseline = best.plan.baseline_bytes   # what Inductor saves by its own choice: the budget's "1"
        allowed = self.ledger.share(self.key, baseline)
        least = best.least
        if spare is not None and (_squared_error(best.plan) > 0 or best.plan.planned_bytes > allowed):
            price, candidates = _time_price(best, self.config), _candidates(best)
            default_redraws = best.redraws_random   # Inductor's own choice (or the user's budget): kept
            for lower in RECOMPUTE_BUDGETS:
                # the same bytes, out of what Inductor saves when it recomputes more of the forward
                alternative = self._partition_and_plan(_copy_graph_module(spare), joint_inputs, kwargs,
                                                       lambda key, _saved: self.ledger.share(key, baseline),
                                                       memory_budget=lower)
                if alternative.redraws_random and not default_redraws:
                    continue   # other dropout masks than the forward's (were its seeds not saved?)
                least = min(least, alternative.least)
                if _better(alternative, best, allowed, price, self.config, candidates, self._measure):
                    best, memory_budget = alternative, lower
        fwd, bwd, plan = best.fwd, best.bwd, best.plan
        self.ledger.record(self.key, baseline=baseline, planned=plan.planned_bytes, least=least)
        if self.config.check_every and plan.assignments:
            self.check = SavedValueCheck.of(fwd, n, plan)   # before the rewrite: the values as made
        self.packed.append(compress_saved_(fwd, bwd, n, plan, _fake_mode_of(fwd)))
        save_inputs_flat_(fwd, bwd, n)   # else Inductor holds channels-last copies of saved weights
        self.plans.append(plan)
        self.memory_budgets.append(memory_budget)
        return fwd, bwd

    def _measure(self, p: _Partition) -> None:
        """Measure the gradient error of ``p``'s plan on the real inputs (once; if there are any).
        A probe that fails (an op with no eager kernel for these inputs, memory) leaves it
        unmeasured, with a warning: the plan is then judged as without real inputs."""
        from actcompile.passes.inductor import measured_gradient_error

        if p.measured:
            return
        p.measured = True
        try:
            p.gradient_error = measured_gradient_error(p.fwd, p.bwd, p.plan, self._real_inputs_of(p.fwd))
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
            warnings.warn(f"actcompile: the gradient error of compiled graph {self.key}'s plan could not be measured "
                          f"({type(e).__name__}: {str(e)[:200]}); a lossy plan there recomputes no more than "
                          f"Inductor's own partition unless that is over the budget", stacklevel=2)

    def _real_inputs_of(self, fwd: torch.fx.GraphModule) -> Sequence | None:
        """The real inputs, if they are ``fwd``'s (one per placeholder)."""
        real = self.real_inputs
        return real if real is not None and len(real) == len(fwd.graph.find_nodes(op="placeholder")) else None

    def _may_recompute(self) -> bool:
        """Is a partition that recomputes more worth trying? With ``recompute=True`` (the
        default), a budget below 1, and Inductor's own memory budget not already lower."""
        return (self.config.recompute and self.config.tolerance is None and self.config.budget.fraction != 1.0
                and torch._functorch.config.activation_memory_budget > max(RECOMPUTE_BUDGETS))

    def _partition_and_plan(self, gm, joint_inputs, kwargs, share, memory_budget: float | None = None) -> "_Partition":
        """Inductor's min-cut partition of the joint graph ``gm`` (at
        ``activation_memory_budget=memory_budget`` if given), then the plan of what it saves,
        keeping at most ``share(key, saved bytes)``."""
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        from actcompile.passes.branch_masks import save_branch_masks_
        from actcompile.passes.inductor import _fake_mode_of, graph_seconds, plan_saved
        from actcompile.plan import RECOMPUTE

        patch = (torch._functorch.config.patch(activation_memory_budget=memory_budget) if memory_budget is not None
                 else contextlib.nullcontext())
        if memory_budget is not None:
            _save_random_ops_(gm)
        with patch:
            fwd, bwd = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        n = kwargs["num_fwd_outputs"]
        real = self._real_inputs_of(fwd)
        share = functools.partial(share, self.key)
        plan, least = plan_saved(fwd, bwd, n, self.config, real, share)
        packed = {a.node for a in plan.assignments if a.codec != RECOMPUTE}
        # masks backward would recompute from a packed value: computed exactly in forward instead
        if packed and save_branch_masks_(fwd, bwd, n, packed, _fake_mode_of(fwd)):
            plan, least = plan_saved(fwd, bwd, n, self.config, real, share)   # the saved values changed
        return _Partition(fwd, bwd, plan, least, graph_seconds(fwd, self.config), graph_seconds(bwd, self.config))

    def uuid(self):
        return None   # the plan depends on the real values: never reuse a cached artifact

    def __deepcopy__(self, memo):
        # Inductor deep-copies its config (which holds this object) for debug repro strings;
        # the real inputs it keeps may be non-leaf tensors, which cannot be deep-copied.
        return self


class ActCompileBackend:
    """A ``torch.compile`` backend object; ``plans`` lists one :class:`Plan` per compiled graph
    (a recompile, or a drift check's re-plan, adds one), ``packed`` where each graph's packing
    landed (:class:`~actcompile.passes.inductor.PackedValue`), ``drifts`` what the drift checks
    found (:class:`CheckedGraph`)."""

    def __init__(self, budget=None, codecs=None, **options):
        from actcompile.api import make_config

        self.config = make_config(budget, codecs, **options)
        if self.config.budget_scope != "activations":
            raise ValueError(f"budget_scope={self.config.budget_scope!r} is not supported by the Inductor back end yet: "
                             "its peak model reads the eager graph's liveness; give budget_scope='activations' (or "
                             "use actcompile(model, budget_scope='peak'), the eager back end)")
        self.plans: list[Plan] = []
        # per plan: the activation_memory_budget Inductor partitioned its graph at (1.0: its default;
        # lower where recomputing more of the forward let the plan lose less, RECOMPUTE_BUDGETS)
        self.memory_budgets: list[float] = []
        self.packed: list[list] = []
        self.drifts: list = []   # every Drift its graphs' checks found (actcompile.api.Drift), oldest first
        self.forward_budget = ForwardBudget(self.config.budget)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **_):
        real = [x for x in example_inputs]
        if any(isinstance(x, torch._subclasses.fake_tensor.FakeTensor) for x in real):
            real = None
        compile_id = torch._guards.CompileContext.current_compile_id()
        key = str(compile_id.frame_id) if compile_id is not None else str(len(self.plans))
        pristine = _copy_graph_module(gm) if self.config.check_every else None   # compile_fx may mutate gm
        compiled, check = self._compile(gm, example_inputs, real, key)
        if check is None and not self.forward_budget.overshoot_bytes:
            return compiled
        return CheckedGraph(self, pristine, key, compiled, check)

    def _compile(self, gm: torch.fx.GraphModule, example_inputs, real, key: str):
        """``gm`` compiled by Inductor with its saved values planned (graph ``key`` of the
        forward's budget), and the drift check of its plan (``None``: nothing to check)."""
        from torch._inductor.compile_fx import compile_fx

        partitioner = SavedValuePartitioner(self.config, real, self.plans, self.packed, self.forward_budget, key,
                                            self.memory_budgets)
        # The plan depends on the real values, not only on the graph: no cached artifact may
        # stand in for it (Inductor's FX graph cache and AOTAutograd's cache both key on the graph).
        with torch._functorch.config.patch(enable_autograd_cache=False):
            compiled = compile_fx(gm, example_inputs, config_patches={
                "custom_partitioner_fn": partitioner, "fx_graph_cache": False, "fx_graph_remote_cache": False})
        return compiled, partitioner.check


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with a graph of its own (its attributes, parameters included, shared)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in graph.nodes:   # Dynamo's record of each input holds its example tensor: not ours to keep
        node.meta = {k: v for k, v in node.meta.items() if k != "grapharg"}
    copied = torch.fx.GraphModule(gm, graph)
    copied.meta = dict(getattr(gm, "meta", {}))
    return copied


class CheckedGraph:
    """One compiled graph as Dynamo calls it, keeping its plan true and its budget whole.

    *Drift checks*, at the eager back end's schedule (training forwards 1, 2, 4, … below
    ``check_every``, then every ``check_every``-th): before the compiled forward runs, the
    graph's forward runs eagerly and without grad on the same inputs (its writes to them, a
    BatchNorm's running statistics, left out), and each packed value's codec error is measured
    as the value is made (:class:`~actcompile.passes.inductor.SavedValueCheck`; each value freed
    after its last use, so a check holds about what an inference forward does). One that left
    ``drift_tolerance`` × its planned error warns (:class:`~actcompile.errors.PlanDriftWarning`),
    is recorded in the backend's ``drifts``, and the graph is compiled again at once, planned on
    these values: this forward already runs the new plan. A graph is re-planned at most
    :data:`MAX_REPLANS` times (a code object run for several blocks, each unlike the one it was
    planned on, would drift at every check), and not at all when its shapes are symbolic (a
    recompile outside Dynamo would fix them): the warning says so. *The budget*: if the graphs
    compiled so far are planned over it, backward checks that a later graph paid
    (:meth:`ForwardBudget.check`).
    """

    def __init__(self, backend: "ActCompileBackend", pristine, key: str, compiled, check):
        functools.update_wrapper(self, compiled)   # what Dynamo reads off a compiled function
        self.backend, self.pristine, self.key = backend, pristine, key
        self.compiled, self.check = compiled, check
        self.forwards = 0   # training forwards run (the checks' schedule counts them)
        self.replans = 0

    def __call__(self, *args):
        # Dynamo calls it with positional inputs, whatever ``_boxed_call`` (copied from
        # aot_module_simplified's ``forward``) says.
        if self.check is not None and torch.is_grad_enabled():
            self.forwards += 1
            if self._checking():
                self._check_drift(list(args))
        outputs = self.compiled(*args)
        ledger = self.backend.forward_budget
        if ledger.overshoot_bytes:
            first = next((o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad), None)
            if first is not None:
                first.register_hook(_paid_check(ledger))
        return outputs

    def _checking(self) -> bool:
        from actcompile.api import is_check_forward

        return is_check_forward(self.forwards, self.backend.config.check_every)

    def _check_drift(self, inputs: list) -> None:
        from actcompile.api import find_drifts
        from actcompile.errors import PlanDriftWarning

        try:
            measured = self.check.measure(inputs)
        except Exception as err:   # a check must never be what stops training
            warnings.warn(f"actcompile: the drift check of compiled graph {self.key} failed and is turned off for it "
                          f"({type(err).__name__}: {err})", PlanDriftWarning, stacklevel=3)
            self.check = None
            return
        drifts = find_drifts(self.check.plan, measured, self.backend.config.drift_tolerance, self.forwards,
                             f"graph {self.key}")
        if not drifts:
            return
        self.backend.drifts.extend(drifts)
        shown = "; ".join(map(str, drifts[:5])) + (f"; … (+{len(drifts) - 5})" if len(drifts) > 5 else "")
        found = f"actcompile: {len(drifts)} packed value(s) of compiled graph {self.key} no longer match their plan ({shown})"
        if self.replans >= MAX_REPLANS or _symbolic(self.pristine):
            why = (f"re-planned {self.replans} times already" if self.replans >= MAX_REPLANS
                   else "its shapes are symbolic and a recompile here would fix them")
            warnings.warn(f"{found}; the plan is kept ({why}): torch._dynamo.reset() and compile again to re-plan",
                          PlanDriftWarning, stacklevel=3)
            self.check = None
            return
        warnings.warn(f"{found}; compiling it again with a plan calibrated on this forward's values",
                      PlanDriftWarning, stacklevel=3)
        self.replans += 1
        # (requires_grad kept: the planner's gradient probe tells parameters by it)
        real = [x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in inputs]
        self.compiled, self.check = self.backend._compile(_copy_graph_module(self.pristine), inputs, real, self.key)


MAX_REPLANS = 3   # drift re-plans of one compiled graph (see CheckedGraph)


def _symbolic(gm: torch.fx.GraphModule) -> bool:
    """Does ``gm`` take a symbolic size (a SymInt input, or a tensor of symbolic shape)?"""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.SymInt) or (isinstance(value, torch.Tensor)
                                               and any(isinstance(d, torch.SymInt) for d in value.shape)):
            return True
    return False


def _paid_check(forward_budget: ForwardBudget):
    """A hook on a forward output: when backward reaches it (the forward has ended), check that
    a later graph paid the bytes a graph's plan is over the budget."""

    def check(grad):
        forward_budget.check()
        return grad

    return check


def backend(budget=None, codecs=None, **options) -> ActCompileBackend:
    """A backend for ``torch.compile(model, backend=...)`` with this budget and these options."""
    return ActCompileBackend(budget, codecs, **options)


def registered_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **_):
    """What ``backend="actcompile"`` runs (the ``torch_dynamo_backends`` entry point)."""
    # One backend per torch.compile call, so the graphs of its forward share one budget: Dynamo
    # passes that call's own options dict with every graph (held here so its id stays unique).
    known = _REGISTERED.get(id(options))
    if known is not None and known[0] is options:
        return known[1](gm, example_inputs)
    _forget_finished_calls()
    backend_for_call = _registered_for(options)
    _REGISTERED[id(options)] = (options, backend_for_call)
    return backend_for_call(gm, example_inputs)


_REGISTERED: dict[int, tuple[dict, ActCompileBackend]] = {}


def _forget_finished_calls() -> None:
    """Drop the backends of ``torch.compile`` calls that are gone.

    The compiled callable holds its options dict (``torch._TorchCompileWrapper.kwargs``); once
    it is collected, only this table refers to the dict, and no graph can ask for its backend
    again. A dict cannot be weakly referenced, so its reference count says so: a probe dict
    held exactly as the table holds its entries gives the count meaning "only ours" on this
    interpreter (it differs between CPython versions). Where counts are not reliable (no
    ``sys.getrefcount``, or a free-threaded build) nothing is dropped.

    >>> _REGISTERED[-1] = ({"budget": 0.5}, None)   # a call nothing holds any more
    >>> _forget_finished_calls(); -1 in _REGISTERED
    False
    """
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    if not hasattr(sys, "getrefcount") or not gil:
        return
    probe = {}
    _REGISTERED[id(probe)] = (probe, None)
    del probe
    counts = {key: sys.getrefcount(options) for key, (options, _) in list(_REGISTERED.items())}
    only_ours = min(counts.values())   # the probe's: nothing but the table holds it
    for key, count in counts.items():
        if count <= only_ours:
            del _REGISTERED[key]


def _registered_for(options: dict | None) -> ActCompileBackend:
    options = dict(options or {})
    if "budget" not in options and "tolerance" not in options:
        raise TypeError("torch.compile(backend='actcompile') needs options={'budget': ...}: a size such as "
                        "'2GB', an int of bytes, or a float in (0, 1] of the bytes Inductor would save plus the outputs")
    return ActCompileBackend(options.pop("budget", None), options.pop("codecs", None), **options)
