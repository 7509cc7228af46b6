"""``actcompile(model, budget=...)`` and ``explain(...)``: normalise arguments, run the pipeline.

::

    model = actcompile(model, budget="2GB")      # plans on the first training call
    loss = model(x).sum(); loss.backward()       # saved activations ≤ 2 GB
    print(model.plan)                            # one table: graphs, regions, codecs, bytes, errors

The returned module shares ``model``'s Parameters, buffers and submodules (an optimizer built on
``model.parameters()`` trains it), has the same ``state_dict()`` keys, and leaves ``model``
itself untouched; attributes it does not have come from ``model`` (``wrapped.config`` of a
Hugging Face model is its config). A training forward runs ``model``'s forward through Dynamo
(:mod:`actcompile.passes.capture`), so every construct behaves as without actcompile: custom
``autograd.Function`` backwards, ``no_grad``/``autocast`` regions, ``checkpoint``, hooks,
Python attributes (guarded: a change re-captures), data-dependent branches (graph breaks: the
forward runs as several graphs with Python between them).

Planning happens once per input signature (shapes, dtypes, devices, which submodules train):
one capture forward (it keeps nothing) finds the graphs, each is profiled and calibrated on
its real inputs, and one knapsack over all of them shares the budget. A graph Dynamo captures
later (an attribute changed, a layer was frozen, a branch not taken before) is planned when it
first runs, at the budget's ratio to the baseline of the planned forward. Each batch shape is
its own signature (planned once, then cached); Dynamo's recompile limit (8 per ``forward``)
caps how many are kept, past which the forward runs uncompressed with a warning. In eval mode
or under ``torch.no_grad()`` the module simply runs ``model``.

Plans stay true while training moves: at compressed training forwards 1, 2, 4, 8, … and then
every ``check_every``-th, each packed tensor's codec error is measured on the real tensor; one over ``drift_tolerance`` × its
planned error (+ :data:`~actcompile.config.DRIFT_SLACK`) is recorded in ``drifts``, warned
about (:class:`~actcompile.errors.PlanDriftWarning`) and its signature re-planned at the next
forward (a zero-initialised gate, all zeros at planning, gets a 1-bit mask that turns wrong
once the gate moves).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
>>> x = torch.randn(128, 512)
>>> small = actcompile(net, budget=0.5, example_inputs=x)
>>> small.plan.planned_bytes <= small.plan.budget_bytes
True
>>> torch.equal(small(x), net(x))
True
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import time
import warnings
import weakref

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from actcompile.codecs import get_codec
from actcompile.config import DRIFT_SLACK, Budget, CompileConfig, default_codecs, parse_budget, quantizer_codecs
from actcompile.errors import BudgetError, CodecError, GradientErrorWarning, PlanDriftWarning
from actcompile.passes.calibrate import Calibrator, calibrate
from actcompile.passes.capture import (CapturedGraph, GraphRunner, Inputs, capture_graphs, dynamo_forward,
                                       handling, input_kinds, normalize_inputs)
from actcompile.passes.emit import CompressedGraphModule, emit_regions
from actcompile.passes.memory import profile_memory
from actcompile.passes.peak import choose_plans_for_peak, optimizer_state_bytes, resident_bytes
from actcompile.passes.policy import choose_plans
from actcompile.passes.rules import codec_choices, split_candidates
from actcompile.passes.sensitivity import gradient_error, gradient_shares, probe_gradients, run_gradients
from actcompile.measure import heap_in_use, heap_measurable
from actcompile.plan import RECOMPUTE, ModelPlan, Plan, Section, format_bytes
from actcompile.progress import Progress
from actcompile.runtime import RuntimeStats, inside_checkpoint, preserved_state, sharing_packed

_OPTION_NAMES = {f.name for f in dataclasses.fields(CompileConfig)} - {"budget", "codecs"}
# a measured relative error of the parameter gradient above this is warned of (GradientErrorWarning):
# gradient cosine about 0.95 or less (issue #7's floor at 1/16), where the benchmark models' plans
# measure at most ~0.11 at 1/16 (benchmarks/results/reach.md)
GRADIENT_ERROR_WARNING = 0.3
# a plan that gives a saved tensor a codec this lossy (relative error, as int2 is), or any lossy
# codec while it keeps at most TIGHT_FRACTION of the baseline, is measured (one probe step) before
# it is kept: its gradient may be far off what the knapsack predicts (BatchNorm over a few values
# per channel, recomputed from an int4 boundary: inception_v3 at 1/8, batch 2, cosine 0.84)
RISKY_ERROR = 0.2
# A measured relative gradient error above this, on a plan recomputing runs from lossy boundaries,
# makes _measured_choice try the plan whose recomputed runs read nothing lossy (one more step).
RETRY_ERROR = 0.05
TIGHT_FRACTION = 0.125


def make_config(budget, codecs=None, optimizer=None, **options) -> CompileConfig:
    """A :class:`CompileConfig` from what a user passes; every mistake named with what is accepted.

    Exactly one of ``budget`` and ``tolerance=`` (the predicted gradient error to stay under,
    planned at the least memory; the budget is then the whole baseline). ``optimizer`` (with
    ``budget_scope="peak"``): its state counts in the step's peak."""
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer= must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if options.get("budget_scope") != "peak":
            raise ValueError("optimizer= counts its state in the step's peak: it needs budget_scope='peak'")
        options["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; accepted: {sorted(_OPTION_NAMES)}")
    if (budget is None) == (options.get("tolerance") is None):
        raise TypeError("give exactly one of budget= (bytes such as '2GB', or a fraction of the baseline such "
                        "as 0.25) and tolerance= (the parameter gradient's predicted relative error, such as "
                        f"0.01); got budget={budget!r}, tolerance={options.get('tolerance')!r}")
    if budget is None:
        budget = 1.0
    if codecs == "all":
        codecs = default_codecs(everything=True)
    elif codecs == "quantizers":
        codecs = quantizer_codecs()
    elif codecs is not None:
        if isinstance(codecs, str) or not hasattr(codecs, "__iter__"):
            codecs = (codecs,)
        codecs = tuple(get_codec(c) for c in codecs)
        if not codecs:
            raise CodecError("codecs=[] enables nothing; give codec names (see actcompile.codecs.available_codecs())")
    if "epsilons" in options:
        options["epsilons"] = tuple(options["epsilons"])
    return CompileConfig(budget=parse_budget(budget), codecs=codecs or (), **options)


def config_for_device(config: CompileConfig, model: nn.Module, args=(), kwargs=None) -> CompileConfig:
    """``config`` with ``offload`` resolved for where ``model`` and its inputs live: on an
    accelerator (``offload`` ``"auto"`` or ``True``) the :class:`~actcompile.codecs.offload.Offload`
    codec joins ``codecs``, priced by the round trip measured there; on the CPU none is offered,
    and asking for one (``offload=True``, or ``codecs=["offload"]``) is refused: host and device
    are one memory there, so moving a tensor would free nothing.

    >>> config = make_config(0.25)
    >>> config_for_device(config, nn.Linear(2, 2), (torch.zeros(1, 2),)) is config
    True
    >>> config_for_device(make_config(0.25, offload=True), nn.Linear(2, 2), (torch.zeros(1, 2),))
    Traceback (most recent call last):
    ...
    ValueError: offload=True moves saved tensors from an accelerator to host memory, but this model and its inputs are on the CPU, where that frees nothing; accepted there: offload='auto' (the default) or False
    """
    tensors = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
    devices = [t.device for t in itertools.chain(model.parameters(), model.buffers(), tensors)]
    accelerator = next((d for d in devices if d.type not in ("cpu", "meta")), None)
    named = [c for c in config.codecs if getattr(c, "host_resident", False)]
    if accelerator is None:
        if config.offload is True or named:
            asked = "offload=True" if config.offload is True else "codecs=[..., 'offload']"
            raise ValueError(f"{asked} moves saved tensors from an accelerator to host memory, but this model and "
                             "its inputs are on the CPU, where that frees nothing; accepted there: offload='auto' "
                             "(the default) or False" + ("" if config.offload is True else
                                                          ", and codecs without 'offload'"))
        return config
    if config.offload is False and not named:
        return config
    from actcompile.codecs.offload import Offload, transfer_copies
    codecs = config.codecs if named else config.codecs + (Offload(),)
    return dataclasses.replace(config, codecs=codecs, transfer_copies=transfer_copies(accelerator))


def _candidate_choices(profile, config: CompileConfig) -> tuple[dict, dict]:
    """``({key: codecs to try}, {key: (shape, dtype)})`` for the saves of ``profile`` the policy may pack."""
    candidates, _ = split_candidates(profile, config)
    choices = {(t.node, t.ordinal): codec_choices(t, config) for t in candidates}
    expected = {(t.node, t.ordinal): (t.shape, t.dtype) for t in candidates}
    return {k: v for k, v in choices.items() if v}, expected


def _early_calibrator(graph: CapturedGraph, config: CompileConfig, whole: frozenset) -> Calibrator:
    """A :class:`Calibrator` for ``graph``'s saves during the capture forward itself, from a profile
    made before the forward has run on (what later graphs save again and what the forward returns
    are not known yet: its candidates are a superset of the final profile's). A save the forward
    turns out to return is read after backward too, so a ``mask`` exact by its backward use alone
    no longer is: the measured mask is calibrated as well."""
    choices, expected = _candidate_choices(profile_memory(graph), config)
    for codecs in choices.values():
        codecs += [dataclasses.replace(c, predicate_only=False) for c in codecs if getattr(c, "predicate_only", False)]
    return Calibrator(choices, expected, whole)


def _calibrated(graph: CapturedGraph, config: CompileConfig, whole: frozenset = frozenset(),
                early: Calibrator | None = None):
    """``(profile, calibration, shares)`` of one captured graph: what it saves, each codec's error
    on it, and (with ``error_weighting="gradient"``) each saved tensor's gradient share.
    ``whole``: ``(node, ordinal)`` keys calibrated on the whole tensor (their plan drifted).
    ``early``: a calibrator that ran in the capture forward; what it measured (with the codecs
    the final profile offers) is used, and only the rest costs a calibration forward."""
    profile = profile_memory(graph)
    choices, expected = _candidate_choices(profile, config)
    measured = early.results if early is not None else {}
    calibration = {k: [m for m in measured[k] if m[0] in codecs] for k, codecs in choices.items()
                   if k in measured and all(c in [m[0] for m in measured[k]] for c in codecs)}
    rest = {k: v for k, v in choices.items() if k not in calibration}
    if rest:
        calibration.update(calibrate(graph, rest, expected, whole))
    weighted = config.error_weighting == "gradient" or config.tolerance is not None
    shares = gradient_shares(graph) if weighted and choices else None
    return profile, calibration, shares


def _gradient_checked(codec) -> bool:
    """A codec a plan takes only if a probe backward vouches for it: the transforms (DCT,
    wavelet, FFT low-pass, SVD/HOSVD, thresholding: ``gradient_checked``) and any codec outside
    the default set (a registered codec of one's own), not the quantizers, ``mask`` or the
    lossless integer codecs."""
    if getattr(codec, "lossless_integer", False):
        return False
    return getattr(codec, "gradient_checked", False) or not getattr(codec, "default_enabled", False)


def _measured_choice(graphs: list[CapturedGraph], plans: list[Plan], measured: list, config: CompileConfig,
                     progress: Progress | None = None, **knapsack) -> tuple[list[Plan], float | None]:
    """``plans`` or the plans the knapsack makes without the :func:`_gradient_checked` codecs,
    whichever measurably moves the parameter gradient less, and that measured relative error.

    Compared where ``plans`` hold such a codec and others were offered too: the knapsack weighs
    every codec's relative error alike (per unit of gradient share), but a transform's error is
    structured, and how much of it the gradient sees differs by model. Measured at 1/8 without
    recompute (``benchmarks/results/planning.md`` run 5): with the transforms, ResNet-18's
    gradient cosine fell from 0.99154 to 0.98041 (a DCT) while MobileNetV2's rose from 0.97919
    to 0.98987 (HOSVD). Measured alone where only such codecs reach the budget, or where a plan
    takes a codec as lossy as :data:`RISKY_ERROR` on a tensor, or any lossy codec while keeping at
    most :data:`TIGHT_FRACTION` of the baseline: wide_resnet50_2 at 1/16 (batch 2,
    its BatchNorms recomputed from int2 boundaries) trained with gradient cosine 0.05, which the
    knapsack's prediction cannot see. Each graph runs one exact probe backward
    (:func:`~actcompile.passes.sensitivity.probe_gradients`) and one step per plan as the runtime
    runs it (:func:`~actcompile.passes.sensitivity.run_gradients`: its codecs and its recomputed
    runs, the same random tangent): about three training steps of the example inputs.
    Not with ``tolerance`` (its plans hold the least memory under it, whatever the error).
    ``measured``: :func:`_calibrated` per graph; ``knapsack``: ``choose_plans``' keywords.
    """
    if config.tolerance is not None:
        return plans, None
    checked = {c.name for c in config.codecs if _gradient_checked(c)}
    compare = len(checked) < len(config.codecs) and any(a.codec in checked for p in plans for a in p.assignments)
    lossy = [a for p in plans for a in p.assignments if a.codec != RECOMPUTE and a.error > 0]
    recomputes = any(a.codec == RECOMPUTE for p in plans for a in p.assignments)
    tight = sum(p.planned_bytes for p in plans) <= TIGHT_FRACTION * sum(p.baseline_bytes for p in plans)
    risky = any(a.error >= RISKY_ERROR for a in lossy) or ((tight or recomputes) and bool(lossy))
    if not (compare or risky):
        return plans, None
    if progress is not None:
        progress.phase("measuring what the plan does to the gradient")
    alternative = None
    if compare:
        calibrations = [{key: [m for m in entries if m[0].name not in checked] for key, entries in calibration.items()}
                        for _, calibration, _ in measured]
        try:
            alternative = choose_plans([p for p, _, _ in measured], config, calibrations,
                                       shares=[s for _, _, s in measured], **knapsack)
        except BudgetError:   # only the transforms reach the budget: nothing to compare, but measured
            pass
    exact = [probe_gradients(g) for g in graphs]

    def error(candidate):
        return gradient_error([(e, run_gradients(g, emit_regions(g.gm, plan))) for e, g, plan in zip(exact, graphs, candidate)])

    candidates = [(error(plans), plans)]
    if alternative is not None:
        candidates.append((error(alternative), alternative))
    best, best_plans = min(candidates, key=lambda c: c[0])
    retries = []
    if best > RETRY_ERROR and recomputes and lossy:
        # A recomputed run re-makes what it saves from its lossy boundaries: through a LayerNorm
        # with a near-constant row (rstd up to 1/√eps) an int8 boundary's error grew 10⁶-fold
        # (HF ViTMAE at 1/4: gradient cosine 0.049, every planned ε ≤ 0.01). Try the plan whose
        # recomputed runs read only what is kept whole or losslessly packed.
        retries.append((config, dict(lossless_boundaries=True)))
    if best > RETRY_ERROR and lossy and config.recompute and 0 < config.time_weight <= CompileConfig.time_weight:
        # The knapsack's error is each tensor's alone; a recurrence compounds it step after step
        # (a GRUCell loop at 1/8: predicted error small, measured 0.28 with int4/int8 on its
        # states). Try the plan that recomputes wherever that fits, whatever the time: at 1/8 it
        # measured 1e-7 there. The better measured plan is kept. Not where time_weight was raised
        # above its default: time was said to matter more than that.
        retries.append((dataclasses.replace(config, time_weight=0.0), {}))
    for retry_config, options in retries:
        try:
            retry = choose_plans([p for p, _, _ in measured], retry_config, [c for _, c, _ in measured],
                                 shares=[s for _, _, s in measured], **options, **knapsack)
        except BudgetError:
            continue
        if any(retry == c for _, c in candidates):
            continue
        candidates.append((error(retry), retry))
        best, best_plans = min(candidates, key=lambda c: c[0])
        if best <= RETRY_ERROR:
            break
    return best_plans, best


def explain(model: nn.Module, example_inputs, budget=None, codecs=None, **options) -> ModelPlan:
    """The :class:`ModelPlan` ``actcompile`` would make for ``model`` on ``example_inputs``; rewrites nothing."""
    wrapper = ActCompiledModule(model, make_config(budget, codecs, **options))
    args, kwargs = normalize_inputs(model, example_inputs)
    with _training(model):
        return wrapper._plan_forward(_signature(args, kwargs, model), args, kwargs)


class _training:
    """Plans describe training forwards: capture in train mode, then restore the user's flags."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        if not self.model.training:
            self.model.train()

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag


def _signature(args, kwargs, model) -> tuple:
    def describe(v):
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), v.dtype, v.device.type, v.requires_grad)
        if isinstance(v, (list, tuple)):
            return tuple(describe(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((k, describe(x)) for k, x in v.items()))
        return ("V", type(v).__name__, v if isinstance(v, (int, float, str, bool, type(None))) else id(v))

    return (describe(args), describe(kwargs), tuple(m.training for m in model.modules()))


@dataclasses.dataclass(frozen=True)
class Drift:
    """A packed tensor whose codec error, measured in training, left what its plan assumed."""

    forward: int          # the compressed training forward that measured it (1 = the first)
    graph: str
    node: str
    ordinal: int
    codec: str
    planned_error: float
    measured_error: float

    def __str__(self) -> str:
        return (f"{self.graph}:{self.node}[{self.ordinal}] {self.codec}: relative error {self.measured_error:.3g}, "
                f"planned {self.planned_error:.3g}")


# Heap checks (ActCompiledModule._check_heap) a plan must pass in a row before its
# signature's heap is no longer measured (forwards 4, 8 and 16 after planning at the default
# check_every): readings of one graph under one plan agree to a few hundred bytes (measured).
HEAP_CHECKS_TRUSTED = 3


def is_check_forward(n: int, every: int) -> bool:
    """Is training forward ``n`` (1 = the first) a drift check? Forwards 1, 2, 4, 8, … below
    ``every``, then every ``every``-th (0: never): training moves fastest at its start (a
    zero-initialised gate leaves zero after one step), so early drift is caught early at a
    handful of extra checks. Both back ends keep this schedule.

    >>> [n for n in range(1, 130) if is_check_forward(n, 50)]
    [1, 2, 4, 8, 16, 32, 50, 100]
    """
    return bool(every) and (n % every == 0 or (n < every and n & (n - 1) == 0))


def find_drifts(plan: Plan, measured: dict, tolerance: float, forward: int, graph: str) -> list[Drift]:
    """The assignments of ``plan`` whose ``measured`` error (by ``(node, ordinal)``) left
    ``tolerance`` × the planned one (+ :data:`~actcompile.config.DRIFT_SLACK`); both back ends.

    A codec exact by its use (a ReLU's mask) is right whatever the values: not checked. Nor is a
    recomputed run: its assignment is named after the run's first node, whose own save may be
    packed by a codec under the same ``(node, ordinal)`` (a run reading a packed boundary value).
    """
    found = []
    for a in plan.assignments:
        got = measured.get((a.node, a.ordinal))
        # exact by use: the flag, or (plans written before it) the mask variant exact_for makes
        if got is None or a.codec == RECOMPUTE or a.exact_by_use or dict(a.options).get("predicate_only"):
            continue
        if not got <= tolerance * a.error + DRIFT_SLACK:   # NaN drifts too
            found.append(Drift(forward, graph, a.node, a.ordinal, a.codec, a.error, got))
    return found


@dataclasses.dataclass
class _GraphState:
    """One captured graph as this module runs it: its plan and the rewritten graph."""

    plan: Plan
    compiled: CompressedGraphModule
    autograd_nodes: int | None = None   # what its forward leaves (None: adopted, not profiled here)


def _add_stats(total: RuntimeStats, more: RuntimeStats | None) -> None:
    if more is not None:
        for field in dataclasses.fields(RuntimeStats):
            if isinstance(getattr(more, field.name), int):   # measured_errors are per graph (its node names)
                setattr(total, field.name, getattr(total, field.name) + getattr(more, field.name))


class ActCompiledModule(nn.Module):
    """``model`` with planned activation compression; made by :func:`actcompile`."""

    def __init__(self, model: nn.Module, config: CompileConfig):
        super().__init__()
        # Share, don't copy: same Parameter objects, same submodules, same state_dict keys.
        self._parameters = dict(model._parameters)
        self._buffers = dict(model._buffers)
        self._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
        self._modules = dict(model._modules)
        self.training = model.training
        self.__dict__["_original"] = model
        self.__dict__["compile_config"] = config
        self.__dict__["_plans"] = {}       # signature -> ModelPlan (kept when pickled)
        self.__dict__["_last"] = None
        self._reset_derived()

    def _reset_derived(self) -> None:
        """State rebuilt after unpickling or copying: Dynamo's forward and each graph's rewrite."""
        self.__dict__["_forward"] = None
        self.__dict__["_graphs"] = weakref.WeakKeyDictionary()   # GraphRunner -> _GraphState
        self.__dict__["_ratio"] = None     # budget / baseline of the last planned forward
        self.__dict__["_call"] = None      # (args, kwargs) of the forward running now
        self.__dict__["_ran"] = []         # runners the last forward went through
        self.__dict__["_stats"] = None
        self.__dict__["_ready"] = set()    # signatures planned (or adopted) in this process
        self.__dict__["_stale"] = set()    # signatures whose plan drifted: re-planned at their next forward
        self.__dict__["_pinned"] = set()   # signatures given a plan with use_plan(): never re-planned here
        self.__dict__["_forwards"] = 0     # compressed training forwards run (drift checks count them)
        self.__dict__["drifts"] = []       # every Drift found, oldest first
        self.__dict__["_nodes"] = {}       # signature -> autograd nodes its forward leaves (planned here)
        self.__dict__["_over_budget"] = {}  # signature -> heap growth of its last check, if over the budget
        self.__dict__["_heap_passes"] = {}  # signature -> heap checks in a row its plan met the budget
        self.__dict__["_reserve_due"] = {}  # signature -> (reserve per node, why): re-planned at its next forward
        self.__dict__["forward"] = _signed_forward(self)
        self.__dict__["_since_plan"] = {}   # signature -> forwards run since it was last planned

    # -- planning ----------------------------------------------------------------------------
    @property
    def plan(self) -> ModelPlan:
        """The plan of the input signature this module last ran (or was planned) with."""
        if self._last is None:
            raise RuntimeError("not planned yet: call the module once in training mode, or pass "
                               "example_inputs= to actcompile()")
        return self._plans[self._last]

    def _dynamo(self):
        if self._forward is None:
            self.__dict__["_forward"] = dynamo_forward(self._original)
        return self._forward

    def _plan_forward(self, key, args, kwargs) -> ModelPlan:
        """Capture one forward, then plan every graph in it not planned yet, under one budget."""
        started = time.perf_counter()
        self.__dict__["compile_config"] = config_for_device(self.compile_config, self._original, args, kwargs)
        known = self._plans.get(key)
        adopting = known is not None and key not in self._stale
        early: dict[GraphRunner, Calibrator] = {}

        progress = Progress() if self.compile_config.progress else None

        def calibrate_in_capture(graph: CapturedGraph):   # one real forward both captures and calibrates
            if adopting or graph.runner in self._graphs or graph.runner in early:
                return None
            calibrator = _early_calibrator(graph, self.compile_config, self._drifted_keys(graph.name))
            if progress is not None and calibrator.choices:
                progress.phase(f"graph {graph.name}: calibrating {len(calibrator.choices)} saved tensors")
                calibrator.on_measured = progress.step
            early[graph.runner] = calibrator
            return calibrator

        if progress is not None:
            progress.phase("capturing the forward with Dynamo")
        graphs = capture_graphs(self._original, Inputs(args, kwargs), forward=self._dynamo(),
                                on_graph=calibrate_in_capture)
        if adopting and self._adopt(known, graphs):
            plan = known
        else:
            first_calls: dict[int, CapturedGraph] = {}   # a graph called twice: its first call, which
            for g in graphs:                              # is the one calibrate_in_capture measured
                if g.runner not in self._graphs:
                    first_calls.setdefault(id(g.runner), g)
            new = list(first_calls.values())
            repeats = [sum(1 for g in graphs if g.runner is n.runner) for n in new]
            fixed = sum(self._graphs[g.runner].plan.planned_bytes for g in graphs if g.runner in self._graphs)
            fixed += graphs.uncaptured_bytes   # kept by plain Python between and around the graphs
            with preserved_state(self._original):
                measured = [_calibrated(g, self.compile_config, self._drifted_keys(g.name), early.get(g.runner))
                            for g in new]
            config, peak, checked = self.compile_config, {}, {}
            if progress is not None:
                progress.phase(f"choosing codecs for {len(new)} graph(s) under the budget")
            arguments = ([p for p, _, _ in measured], config, [c for _, c, _ in measured])
            if config.budget_scope == "peak":
                plans, limit, predicted = choose_plans_for_peak(
                    *arguments, static_bytes=resident_bytes(self._original) + config.optimizer_state_bytes,
                    fixed_bytes=fixed, repeats=repeats, shares=[s for _, _, s in measured])
                peak = dict(peak_budget_bytes=limit, predicted_peak_bytes=predicted)
            else:
                try:
                    plans = choose_plans(*arguments, fixed_bytes=fixed, repeats=repeats,
                                         shares=[s for _, _, s in measured])
                except BudgetError as err:
                    if not graphs.uncaptured_bytes:
                        raise
                    raise BudgetError(f"{err}; {format_bytes(graphs.uncaptured_bytes)} of what cannot be compressed "
                                      "is saved or returned by code Dynamo ran as plain Python, outside any graph "
                                      "(a graph break: TORCH_LOGS=graph_breaks shows where)",
                                      smallest_bytes=err.smallest_bytes) from None
                with preserved_state(self._original):
                    plans, gradient_error_measured = _measured_choice(new, plans, measured, config, progress,
                                                                      fixed_bytes=fixed, repeats=repeats)
                if gradient_error_measured is not None:
                    checked = dict(measured_gradient_error=gradient_error_measured)
                if gradient_error_measured is not None and gradient_error_measured > GRADIENT_ERROR_WARNING:
                    warnings.warn(
                        f"{type(self._original).__name__}: the plan for budget {config.budget} changes the parameter "
                        f"gradient by {gradient_error_measured:.3g} (relative L2 error, one training step on the "
                        "example inputs). A larger budget (or a smaller time_weight) keeps it closer; tolerance= "
                        "plans by gradient error instead", GradientErrorWarning, stacklevel=3)
            for g, p, (profile, _, _) in zip(new, plans, measured):
                self._graphs[g.runner] = self._state(g.gm, p, profile.autograd_nodes)
            counts = [self._graphs[g.runner].autograd_nodes for g in graphs]
            if None not in counts:   # every graph's records known: the heap check can spread an excess
                self._nodes[key] = sum(counts)
            baseline = fixed + sum(p.baseline_bytes * r for p, r in zip(plans, repeats))
            budget_bytes = self.compile_config.budget.resolve(baseline)
            if config.tolerance is not None or peak:   # the activation bytes the tolerance or peak needs
                budget_bytes = fixed + sum(p.budget_bytes * r for p, r in zip(plans, repeats))
            plan = ModelPlan(max(budget_bytes, 1), tuple(Section(g.name, self._graphs[g.runner].plan) for g in graphs),
                             planning_seconds=time.perf_counter() - started, uncaptured_bytes=graphs.uncaptured_bytes,
                             **peak, **checked)
            if progress is not None:
                progress.done(f"planned in {plan.planning_seconds:.1f} s: {format_bytes(plan.planned_bytes)} of "
                              f"{format_bytes(plan.baseline_bytes)}, budget {format_bytes(plan.budget_bytes)}")
        self.__dict__["_ratio"] = plan.budget_bytes / max(plan.baseline_bytes, 1)
        self._plans[key] = plan
        self._since_plan[key] = 0
        self._over_budget.pop(key, None)   # a reading of another plan
        self._heap_passes.pop(key, None)
        self._ready.add(key)
        self._stale.discard(key)
        self.__dict__["_last"] = key
        return plan

    def _state(self, gm, plan: Plan, autograd_nodes: int | None = None) -> _GraphState:
        return _GraphState(plan, emit_regions(gm, plan, self.compile_config.compile_codecs), autograd_nodes)

    def plan_for(self, example_inputs, *, pin: bool = False) -> ModelPlan:
        """The plan for ``example_inputs``' signature: planned now (a training forward that keeps
        nothing) unless one is already kept for it. ``pin``: never re-plan that signature in this
        process (drift and heap checks then only warn), as for a plan shared with other processes."""
        args, kwargs = normalize_inputs(self._original, example_inputs)
        key = _signature(args, kwargs, self._original)
        if key not in self._plans or key in self._stale:
            with _training(self._original):
                self._plan_forward(key, args, kwargs)
        if pin:
            self._pinned.add(key)
        return self._plans[key]

    def signature_of(self, example_inputs) -> str:
        """What identifies ``example_inputs``' plan (shapes, dtypes, devices, which submodules
        train), as text: two processes whose signatures differ cannot run one plan."""
        args, kwargs = normalize_inputs(self._original, example_inputs)
        return repr(_signature(args, kwargs, self._original))

    def use_plan(self, plan: ModelPlan, example_inputs) -> None:
        """Run with ``plan`` (from another process, a file, rank 0) for ``example_inputs``' signature.

        The forward is captured once and each section's plan is applied to its graph, in call
        order; raises ``ValueError`` if the plan does not fit the captured graphs.
        """
        args, kwargs = normalize_inputs(self._original, example_inputs)
        with _training(self._original):
            key = _signature(args, kwargs, self._original)
            graphs = capture_graphs(self._original, Inputs(args, kwargs), forward=self._dynamo())
            if not self._adopt(plan, graphs):
                raise ValueError(f"the plan's {len(plan.sections)} section(s) do not fit the {len(graphs)} graph(s) "
                                 f"captured for these inputs (graphs {[g.name for g in graphs]}): plan for them "
                                 "with actcompile()/explain() instead")
        self._plans[key] = plan
        self._ready.add(key)
        self._pinned.add(key)
        self.__dict__["_ratio"] = plan.budget_bytes / max(plan.baseline_bytes, 1)
        self.__dict__["_last"] = key

    def _adopt(self, known: ModelPlan, graphs: list[CapturedGraph]) -> bool:
        """Use a kept plan (unpickled, copied, broadcast) for freshly captured graphs, if it fits them."""
        if len(known.sections) != len(graphs):
            return False
        for section, g in zip(known.sections, graphs):
            names = {n.name for n in g.gm.graph.nodes}
            if any(a.node not in names for a in section.plan.assignments):
                return False
        for section, g in zip(known.sections, graphs):
            self._graphs[g.runner] = self._state(g.gm, section.plan)
        return True

    def _plan_late(self, runner: GraphRunner, flat_inputs: list) -> _GraphState:
        """A graph Dynamo captured outside planning (a guard failed): plan it now, at the budget's ratio.

        What the forward will hand its caller is not known yet (the graph runs inside it), so
        every tensor the graph returns is taken as handed back: counted, never packed. Taken as
        not returned, a late graph packed the model's own output, which the caller holds: the
        heap kept that output's bytes above the plan (256 KiB on a 2 MiB MLP)."""
        args, kwargs = self._call
        returned = frozenset(range(len(tree_leaves(runner.gm.graph.output_node().args[0]))))
        graph = CapturedGraph(runner, flat_inputs, input_kinds(runner, flat_inputs, self._original, args, kwargs),
                              returned=returned)
        ratio = min(1.0, self._ratio if self._ratio is not None else 1.0)
        config = dataclasses.replace(self.compile_config, budget=Budget(fraction=max(ratio, 1e-9)))
        profile, calibration, shares = _calibrated(graph, config, self._drifted_keys(runner.name))
        try:
            (plan,) = choose_plans([profile], config, [calibration], shares=[shares])
        except BudgetError as err:
            # Training is under way: a graph that cannot reach the ratio (a hook's own frame,
            # re-captured when a Python counter it reads changes, keeping only what it returns)
            # runs with the least it can keep, said once, rather than stop the step.
            least = Budget(bytes=err.smallest_bytes) if err.smallest_bytes else Budget(fraction=1.0)
            (plan,) = choose_plans([profile], dataclasses.replace(config, budget=least), [calibration],
                                   shares=[shares])
            warnings.warn(f"actcompile: a graph captured during training ({runner.name}) cannot be planned "
                          f"at the budget's ratio {ratio:.3g}: it keeps {plan.planned_bytes} B of its "
                          f"{plan.baseline_bytes} B ({err})", PlanDriftWarning, stacklevel=3)
        state = self._state(runner.gm, plan, profile.autograd_nodes)
        self._graphs[runner] = state
        return state

    # -- running -----------------------------------------------------------------------------
    def _run_graph(self, runner: GraphRunner, flat_inputs: list):
        state = self._graphs.get(runner)
        if state is None:
            state = self._plan_late(runner, flat_inputs)
        self._ran.append(runner)
        checking = self._checking()
        state.compiled.measure_errors = checking
        try:
            out = state.compiled(*flat_inputs)
        finally:
            state.compiled.measure_errors = False
        _add_stats(self._stats, state.compiled.last_stats)
        if checking and state.compiled.last_stats is not None:
            self.drifts.extend(self._drifted(runner.name, state.plan, state.compiled.last_stats.measured_errors))
        return out

    # -- plans that stay true ----------------------------------------------------------------
    def _checking(self) -> bool:
        return is_check_forward(self._forwards, self.compile_config.check_every)

    def _drifted(self, graph: str, plan: Plan, measured: dict) -> list[Drift]:
        return find_drifts(plan, measured, self.compile_config.drift_tolerance, self._forwards, graph)

    def _drifted_keys(self, graph: str) -> frozenset:
        """``(node, ordinal)`` of the tensors of ``graph`` that ever drifted: calibrated on the
        whole tensor from then on (a sample or an estimate that misled once would mislead again)."""
        return frozenset((d.node, d.ordinal) for d in self.drifts if d.graph == graph)

    def _replan_after(self, key, drifts: list[Drift]) -> None:
        """Warn, and plan signature ``key`` again at its next forward, calibrated on that forward's
        values (the drifted tensors on their whole); a plan given with :meth:`use_plan` (the same
        on every rank) is kept: the warning says so."""
        shown = "; ".join(map(str, drifts[:5])) + (f"; … (+{len(drifts) - 5})" if len(drifts) > 5 else "")
        if key in self._pinned:
            warnings.warn(f"actcompile: {len(drifts)} packed tensor(s) no longer match their plan ({shown}); "
                          "the plan came from use_plan(), so it is kept: re-plan (explain()) and use_plan() "
                          "the new one on every rank", PlanDriftWarning, stacklevel=3)
            return
        warnings.warn(f"actcompile: {len(drifts)} packed tensor(s) no longer match their plan ({shown}); "
                      "the next forward re-calibrates and re-plans", PlanDriftWarning, stacklevel=3)
        self._forget_graphs_ran(key)

    def _forget_graphs_ran(self, key) -> None:
        """Drop the plans of the graphs the last forward ran: signature ``key`` is planned again,
        every graph under one budget, at its next forward."""
        for runner in self._ran:
            self._graphs.pop(runner, None)
        self._ready.discard(key)
        self._stale.add(key)

    @torch._dynamo.disable
    def forward(self, *args, **kwargs):
        # Never traced by an outer torch.compile (it would see our hooks, not the model): under
        # torch.compile(actcompile(model)) this runs as the eager back end. For Inductor, compile
        # the plain model with torch.compile(model, backend="actcompile").
        if not (self.training and torch.is_grad_enabled()) or inside_checkpoint():
            # Nothing to keep (eval, no_grad), or an outer checkpoint that keeps nothing inside.
            return self._original(*args, **kwargs)
        key = _signature(args, kwargs, self._original)
        if key in self._reserve_due:
            self._apply_reserve(key, args, kwargs)
        if key not in self._ready:
            self._plan_forward(key, args, kwargs)
        self.__dict__["_forwards"] += 1
        self._since_plan[key] = self._since_plan.get(key, 0) + 1
        heap_before = self._heap_before(key)
        found_before = len(self.drifts)
        self.__dict__["_ran"] = []
        self.__dict__["_stats"] = RuntimeStats()
        self.__dict__["_call"] = (args, kwargs)
        try:
            with handling(self._run_graph), sharing_packed():
                out = self._dynamo()(*args, **kwargs)
        finally:
            self.__dict__["_call"] = None
        if not self._ran:
            warnings.warn("actcompile: Dynamo ran this forward without any captured graph (its recompile limit "
                          "was reached?), so nothing was compressed; set torch._dynamo.config.recompile_limit "
                          "higher, or keep input shapes fixed", RuntimeWarning, stacklevel=2)
        else:
            sections = tuple(Section(r.name, self._graphs[r].plan) for r in self._ran)
            if sections != self._plans[key].sections:   # a graph planned late: Dynamo recompiled
                self._resection(key, sections)
        if self._stats.guard_failures:
            warnings.warn(f"actcompile: {self._stats.guard_failures} saved tensor(s) differed from the plan; "
                          "they were kept uncompressed", RuntimeWarning, stacklevel=2)
        self.__dict__["_last"] = key
        if len(self.drifts) > found_before:
            self._replan_after(key, self.drifts[found_before:])
        elif heap_before is not None and self._ran:
            self._check_heap(key, heap_in_use() - heap_before)
        return out

    def _resection(self, key, sections: tuple[Section, ...]) -> None:
        """Signature ``key``'s plan after a forward ran other graphs than it was planned with (a
        guard failed: a changed attribute, a frozen layer, the other branch; the new graph was
        planned late, at the budget's ratio).

        The budget is resolved again against the graphs this forward ran (a fraction of what
        they save), so the heap check holds them to their own budget: against the old one, a
        graph that saves more read as autograd's records taking ~14 KB per node. Where their
        plans keep more than it (a budget in bytes, a graph that saves more), the whole forward is
        planned again at its next call, every graph under one budget.
        """
        plan, config = self._plans[key], self.compile_config
        resolved = config.tolerance is None and config.budget_scope == "activations"
        budget = config.budget.resolve(sum(s.plan.baseline_bytes for s in sections)) if resolved else plan.budget_bytes
        self._plans[key] = dataclasses.replace(plan, budget_bytes=max(budget, 1), sections=sections)
        counts = [self._graphs[r].autograd_nodes for r in self._ran]
        if None in counts:
            self._nodes.pop(key, None)   # records unknown: no heap check until it is planned here
        else:
            self._nodes[key] = sum(counts)
        self._heap_passes.pop(key, None)   # a new set of graphs: measure its heap again
        self._over_budget.pop(key, None)
        if resolved and self._plans[key].planned_bytes > self._plans[key].budget_bytes and key not in self._pinned:
            self._forget_graphs_ran(key)

    def _heap_before(self, key) -> int | None:
        """The heap in use before a drift-check forward whose growth can be held to the budget,
        else None. Not checked: the first forwards after planning (caches still grow), a budget
        of 1.0 ("as it is": it promises nothing about autograd's records), tolerance and peak
        scopes, plans given with use_plan(), a model on an accelerator (the C heap is not its
        memory), where glibc's mallinfo2 is missing, and a plan whose heap met its budget at
        :data:`HEAP_CHECKS_TRUSTED` checks in a row: autograd's records per node are a property
        of the graph and its plan (ResNet-18's six readings agreed to 300 B), and each check costs
        two full garbage collections: 0.3 s each, profiled in a process that had imported
        transformers, or ~12 ms a step at one check in 50 on a small GPT-2 whose step is ~130 ms.
        """
        config = self.compile_config
        if (self._since_plan.get(key, 0) < 3 or not self._checking() or key in self._pinned or key not in self._nodes
                or self._heap_passes.get(key, 0) >= HEAP_CHECKS_TRUSTED
                or config.tolerance is not None or config.budget_scope != "activations"
                or config.budget.fraction == 1.0 or not heap_measurable()
                or any(p.device.type != "cpu" for p in self._original.parameters())):
            return None
        return heap_in_use()

    def _check_heap(self, key, grown: int) -> None:
        """Hold the measured heap growth of a forward (its outputs still held) to the plan's budget.

        The reserve kept for autograd's records (``reserve_bytes_per_node``) is a prior: nodes
        that save many small views hold more (a split/cat-heavy forward: 1,257 B per node,
        measured). If two drift-check forwards in a row grew the heap past the budget, the
        reserve per node becomes what the larger growth held beyond the planned storages, per
        autograd node (less the per-packed reserve), +3%, and the next forward is planned again
        with it (:meth:`_apply_reserve`) — not this one: its backward is still to run on what it
        saved, and planning runs the model (BatchNorm's running statistics, saved for that
        backward, are written and restored), at the cost of a second forward's memory.
        """
        budget = self._plans[key].budget_bytes
        previous = self._over_budget.pop(key, None)
        if grown <= budget:
            self._heap_passes[key] = self._heap_passes.get(key, 0) + 1
            return
        self._heap_passes[key] = 0
        if previous is None:
            self._over_budget[key] = grown
            return
        grown = max(grown, previous)
        nodes = max(1, self._nodes[key])
        old = self.compile_config
        # what the heap held beyond the planned storages and the packed tensors' own reserve,
        # per autograd node, +3%
        plan = self._plans[key]
        packed = sum(1 for a in plan.assignments if a.codec != RECOMPUTE)
        beyond = grown - plan.planned_bytes - old.reserve_bytes_per_packed * packed
        overhead = -(-beyond * 103 // (100 * nodes))
        reserve = max(old.reserve_bytes_per_node + 16, overhead)
        measured = (f"this forward kept {format_bytes(grown)} on the heap, over its budget of {format_bytes(budget)}: "
                    f"autograd's records take more than the {old.reserve_bytes_per_node} B per node reserved")
        self._reserve_due[key] = (reserve, measured)

    def _apply_reserve(self, key, args, kwargs) -> None:
        """Plan signature ``key`` again with the reserve :meth:`_check_heap` measured; if no plan
        fits with it, keep the previous plan and warn that the budget is not met."""
        reserve, measured = self._reserve_due.pop(key)
        old = self.compile_config
        self.__dict__["compile_config"] = dataclasses.replace(old, reserve_bytes_per_node=reserve)
        try:
            self._plan_again(key, args, kwargs)
        except BudgetError as err:
            self.__dict__["compile_config"] = old
            self._plan_again(key, args, kwargs)
            warnings.warn(f"actcompile: {measured}, and no plan fits the budget with the "
                          f"{reserve} B per node measured ({err}); the previous plan is kept "
                          "and the budget is not met", PlanDriftWarning, stacklevel=4)
            return
        warnings.warn(f"actcompile: {measured}; re-planned with {self.compile_config.reserve_bytes_per_node} B per node",
                      PlanDriftWarning, stacklevel=4)

    def _plan_again(self, key, args, kwargs) -> None:
        for runner in self._ran:
            self._graphs.pop(runner, None)
        self._stale.add(key)
        self._plan_forward(key, args, kwargs)

    @property
    def last_stats(self) -> RuntimeStats | None:
        """Counters of the last compressed forward, summed over its graphs (packed tensors and bytes)."""
        return self._stats

    def train(self, mode: bool = True):
        super().train(mode)
        self._original.training = mode
        return self

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None:   # mid-unpickling: nothing to fall back to yet
                raise
            return getattr(original, name)

    def __getstate__(self):
        state = self.__dict__.copy()
        for derived in ("_forward", "_graphs", "_ratio", "_call", "_ran", "_stats", "_ready", "_stale", "_pinned",
                        "_forwards", "drifts", "_nodes", "_over_budget", "_heap_passes", "_reserve_due", "_since_plan",
                        "forward"):
            state.pop(derived, None)   # rebuilt: the kept plans are adopted on the next call
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._reset_derived()

    def extra_repr(self) -> str:
        config = self.compile_config
        goal = f"tolerance={config.tolerance:g}" if config.tolerance is not None else f"budget={config.budget}"
        return f"{goal}, codecs={[c.name for c in config.codecs]}"


def _signed_forward(module: ActCompiledModule):
    """``module.forward`` with the wrapped model's signature, for code that reads it to decide what
    to pass (Hugging Face's ``Trainer`` drops dataset columns the forward does not name)."""
    def forward(*args, **kwargs):
        return ActCompiledModule.forward(module, *args, **kwargs)

    try:
        forward.__signature__ = inspect.signature(module._original.forward)
    except (TypeError, ValueError):   # a builtin or C forward: no signature to copy
        pass
    forward.__doc__ = ActCompiledModule.forward.__doc__
    return forward


def actcompile(model: nn.Module, budget=None, example_inputs=None, codecs=None, **options) -> ActCompiledModule:
    """Return ``model`` with its saved activations compressed to fit ``budget``; see the module doc.

    ``budget``: ``"2GB"`` (10⁹), ``"2GiB"`` (2³⁰), an int of bytes, or a float in (0, 1] of the
    uncompressed activation bytes. Or, instead, ``tolerance=0.01``: the least memory whose
    predicted parameter-gradient error (``plan.predicted_gradient_error``, from one probe
    backward's gradient shares) stays ≤ 0.01. With ``budget_scope="peak"`` (and ``optimizer=opt``,
    whose state counts too) the budget bounds a training step's whole high-water mark, predicted
    from liveness over the graph (``plan.predicted_peak_bytes``; :mod:`actcompile.passes.peak`).
    ``example_inputs`` (a tensor, a tuple of args or a dict of
    kwargs) plans at once; otherwise the first training call plans. ``codecs`` restricts the
    codecs the policy may use (names or instances). ``options`` are :class:`CompileConfig` fields.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"actcompile needs an nn.Module, got {type(model).__name__}")
    compiled = ActCompiledModule(model, make_config(budget, codecs, **options))
    if example_inputs is not None:
        compiled.plan_for(example_inputs)
    return compiled
