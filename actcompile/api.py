"""``actcompile(model, budget=...)`` and ``explain(...)``: normalise arguments, run the pipeline.

::

    model = actcompile(model, budget="2GB")      # plans on the first training call
    loss = model(x).sum(); loss.backward()       # saved activations ≤ 2 GB
    print(model.plan)                            # one table: regions, codecs, bytes, errors

The returned module shares ``model``'s Parameters, buffers and submodules (an optimizer built on
``model.parameters()`` trains it), has the same ``state_dict()`` keys, and leaves ``model``
itself untouched. It plans once per input signature (shapes, dtypes, devices, and which
submodules are in training mode) and caches the result; in eval mode or under
``torch.no_grad()`` it simply runs ``model``. If a saved tensor ever differs from what the plan
expected (an opaque module took another branch), that tensor is kept as it is and the next
call plans again for what it saw.

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
import warnings

import torch
from torch import nn

from actcompile.codecs import get_codec
from actcompile.config import CompileConfig, default_codecs, parse_budget
from actcompile.errors import CodecError
from actcompile.passes.calibrate import calibrate
from actcompile.passes.emit import CompressedGraphModule, emit_regions
from actcompile.passes.memory import profile_memory
from actcompile.passes.policy import choose_plan
from actcompile.passes.rules import codec_choices, split_candidates
from actcompile.passes.trace import Inputs, normalize_inputs, trace_module
from actcompile.plan import Plan

_OPTION_NAMES = {f.name for f in dataclasses.fields(CompileConfig)} - {"budget", "codecs"}


def make_config(budget, codecs=None, **options) -> CompileConfig:
    """A :class:`CompileConfig` from what a user passes; every mistake named with what is accepted."""
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; accepted: {sorted(_OPTION_NAMES)}")
    if codecs == "all":
        codecs = default_codecs(everything=True)
    elif codecs is not None:
        if isinstance(codecs, str) or not hasattr(codecs, "__iter__"):
            codecs = (codecs,)
        codecs = tuple(get_codec(c) for c in codecs)
        if not codecs:
            raise CodecError("codecs=[] enables nothing; give codec names (see actcompile.codecs.available_codecs())")
    if "epsilons" in options:
        options["epsilons"] = tuple(options["epsilons"])
    return CompileConfig(budget=parse_budget(budget), codecs=codecs or (), **options)


def plan_module(model: nn.Module, example_inputs, config: CompileConfig):
    """Run the pipeline: ``(traced GraphModule, Plan)`` for ``model`` on ``example_inputs``."""
    gm = trace_module(model, example_inputs)
    profile = profile_memory(gm, example_inputs)
    candidates, _ = split_candidates(profile, config)
    choices = {(t.node, t.ordinal): codec_choices(t, config) for t in candidates}
    expected = {(t.node, t.ordinal): (t.shape, t.dtype) for t in candidates}
    calibration = calibrate(gm, example_inputs, {k: v for k, v in choices.items() if v}, expected)
    return gm, choose_plan(profile, config, calibration)


def explain(model: nn.Module, example_inputs, budget, codecs=None, **options) -> Plan:
    """The :class:`Plan` ``actcompile`` would make for ``model`` on ``example_inputs``; rewrites nothing."""
    config = make_config(budget, codecs, **options)
    with _training(model):
        return plan_module(model, example_inputs, config)[1]


class _training:
    """Plans describe training forwards: trace in train mode, then restore the user's flags."""

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
        self.__dict__["config"] = config
        self.__dict__["_plans"] = {}       # signature -> Plan (kept when pickled)
        self.__dict__["_compiled"] = {}    # signature -> CompressedGraphModule (rebuilt after unpickling)
        self.__dict__["_last"] = None

    # -- planning ----------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The plan of the input signature this module last ran (or was planned) with."""
        if self._last is None:
            raise RuntimeError("not planned yet: call the module once in training mode, or pass "
                               "example_inputs= to actcompile()")
        return self._plans[self._last]

    def _prepare(self, args, kwargs) -> tuple:
        key = _signature(args, kwargs, self._original)
        if key not in self._compiled:   # a new signature: check the call fits forward, then plan
            example = Inputs(args, kwargs)
            normalize_inputs(self._original, example)
            with _training(self._original):
                if key in self._plans:      # unpickled or deep-copied: re-trace, keep the plan
                    gm, plan = trace_module(self._original, example), self._plans[key]
                else:
                    gm, plan = plan_module(self._original, example, self.config)
            self._plans[key] = plan
            self._compiled[key] = emit_regions(gm, plan)
        self.__dict__["_last"] = key
        return key

    # -- running -----------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self._original(*args, **kwargs)
        key = self._prepare(args, kwargs)
        compiled: CompressedGraphModule = self._compiled[key]
        out = compiled(*args, **kwargs)
        if compiled.last_stats is not None and compiled.last_stats.guard_failures:
            warnings.warn(f"actcompile: {compiled.last_stats.guard_failures} saved tensor(s) differed from the "
                          "plan (data-dependent control flow); they were kept uncompressed and the next call "
                          "re-plans", RuntimeWarning, stacklevel=2)
            del self._compiled[key], self._plans[key]
        return out

    @property
    def last_stats(self):
        """Counters of the last compressed forward (packed tensors and bytes, guard failures)."""
        return self._compiled[self._last].last_stats if self._last in self._compiled else None

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
        state["_compiled"] = {}   # derived: rebuilt from the kept plans on the next call
        return state

    def extra_repr(self) -> str:
        return f"budget={self.config.budget}, codecs={[c.name for c in self.config.codecs]}"


def actcompile(model: nn.Module, budget, example_inputs=None, codecs=None, **options) -> ActCompiledModule:
    """Return ``model`` with its saved activations compressed to fit ``budget``; see the module doc.

    ``budget``: ``"2GB"`` (10⁹), ``"2GiB"`` (2³⁰), an int of bytes, or a float in (0, 1] of the
    uncompressed activation bytes. ``example_inputs`` (a tensor, a tuple of args or a dict of
    kwargs) plans at once; otherwise the first training call plans. ``codecs`` restricts the
    codecs the policy may use (names or instances). ``options`` are :class:`CompileConfig` fields.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"actcompile needs an nn.Module, got {type(model).__name__}")
    compiled = ActCompiledModule(model, make_config(budget, codecs, **options))
    if example_inputs is not None:
        args, kwargs = normalize_inputs(model, example_inputs)
        compiled._prepare(args, kwargs)
    return compiled
