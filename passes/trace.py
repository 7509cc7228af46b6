"""Capture any ``nn.Module`` as an FX ``GraphModule`` with a FakeTensor on every tensor node.

Three captures are tried in order, each where the one before cannot follow the model:

1. ``torch.fx.symbolic_trace``: module-level graph; ``torch.nn`` modules stay leaves.
2. ``torch.export`` (non-strict): ATen-level graph; follows HF transformers and other code
   with Python-level shape logic. ``get_attr`` targets are bound to the *original* model's
   Parameters and buffers, so nothing is copied.
3. symbolic tracing with *opaque* leaves: a submodule whose forward cannot be traced (a
   data-dependent ``if``, unsupported Python) becomes one ``call_module`` node that runs its
   own Python at train time, so an input taking the other branch still runs the other branch.
   If the root's own forward branches on data, the root is that one opaque node.

No capture specializes a data-dependent branch: symbolic tracing and export both refuse one
(they raise), and only the opaque capture accepts it, by not looking inside.

>>> import torch
>>> gm = trace_module(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), torch.randn(2, 4))
>>> [n.op for n in gm.graph.nodes]
['placeholder', 'call_module', 'call_module', 'output']
>>> tuple(gm.graph.find_nodes(op="call_module")[0].meta["val"].shape)
(2, 4)
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
from typing import NamedTuple
import linecache
import traceback

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch._subclasses.fake_tensor import FakeTensorMode

from actcompile import meta
from actcompile.errors import InputMismatchError, TraceError

CAPTURE = "actcompile_capture"   # GraphModule.meta key: which capture produced the graph


# -- inputs ---------------------------------------------------------------------------------
class Inputs(NamedTuple):
    """Positional and keyword arguments of one call, for models that take both."""

    args: tuple
    kwargs: dict


def normalize_inputs(model: torch.nn.Module, example_inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from a tensor, a tuple/list of positional args, a dict of kwargs or ``Inputs``.

    Checks them against ``model.forward``'s signature and raises :class:`InputMismatchError`
    naming the parameters it takes.
    """
    if isinstance(example_inputs, Inputs):
        args, kwargs = tuple(example_inputs.args), dict(example_inputs.kwargs)
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise InputMismatchError(
            f"example_inputs of type {type(example_inputs).__name__}: accepted are a Tensor, a tuple "
            f"or list of positional arguments, a dict of keyword arguments, or Inputs(args, kwargs)"
        )
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return args, kwargs
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        raise InputMismatchError(
            f"example inputs do not match {type(model).__name__}.forward{signature}: {err}"
        ) from None
    return args, kwargs


def flatten_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The values of ``gm``'s placeholders, in order, for a call ``gm(*args, **kwargs)``."""
    codegen = gm.graph._codegen
    if isinstance(codegen, torch.fx.graph._PyTreeCodeGen):
        from torch.fx._pytree import tree_flatten_spec

        return list(tree_flatten_spec((args, kwargs), codegen.pytree_info.in_spec))
    signature = inspect.signature(gm.forward)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return [bound.arguments[p] for p in signature.parameters]


# -- the three captures --------------------------------------------------------------------
def _symbolic(model, args, kwargs) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(model)
    gm.meta[CAPTURE] = "symbolic_trace"
    return gm


def _register_hf_pytrees(model) -> None:
    """HF models return cache objects that torch.export must know how to flatten."""
    try:
        from transformers import PreTrainedModel
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:
        return
    if isinstance(model, PreTrainedModel):
        register_cache_pytrees_for_model(model)


@contextlib.contextmanager
def _quiet():
    """torch.export prints the partial graph and logs warnings when it gives up; we try another capture."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _export(model, args, kwargs) -> torch.fx.GraphModule:
    _register_hf_pytrees(model)
    with _quiet():
        exported = torch.export.export(model, args, kwargs, strict=False).module()
    # Bind every attribute the graph reads to the original model where it has it (the same
    # Parameter objects), else to what export made (lifted constants, its input guard).
    owners = {}
    for node in exported.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                owners[node.target] = _getattr_path(model, node.target)
            except AttributeError:
                owners[node.target] = _getattr_path(exported, node.target)
    gm = torch.fx.GraphModule(owners, exported.graph, class_name=f"{type(model).__name__}Graph")
    gm.meta[CAPTURE] = "export"
    return gm


def _getattr_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class _OpaqueTracer(torch.fx.Tracer):
    """Symbolic tracer that keeps given submodules as leaves and reports where tracing failed."""

    def __init__(self, opaque: set[str]):
        super().__init__()
        self.opaque = opaque
        self.failed_at: str | None = None

    def is_leaf_module(self, m, qualname):
        return qualname in self.opaque or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:   # innermost module first: the exception passes it first
                self.failed_at = self.path_of_module(m)
            raise


def _opaque_root(model) -> torch.fx.GraphModule:
    """A graph of one node: the whole model, run as its own Python."""
    graph = torch.fx.Graph()
    params = inspect.signature(model.forward).parameters.values()
    args, kwargs = [], {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TraceError(f"{type(model).__name__}.forward takes *args/**kwargs; an opaque capture needs named parameters")
        node = graph.placeholder(p.name, default_value=p.default)   # Parameter.empty is FX's "no default"
        if p.kind == p.POSITIONAL_ONLY:
            args.append(node)
        else:
            kwargs[p.name] = node
    call = graph.call_module("model", tuple(args), kwargs)
    meta.set_opaque(call, True)
    graph.output(call)
    return torch.fx.GraphModule({"model": model}, graph, class_name=f"Opaque{type(model).__name__}")


def _opaque(model, args, kwargs) -> torch.fx.GraphModule:
    opaque: set[str] = set()
    while True:
        tracer = _OpaqueTracer(opaque)
        try:
            graph = tracer.trace(model)
        except Exception:
            if tracer.failed_at is None or tracer.failed_at in opaque:
                gm = _opaque_root(model)
                break
            opaque.add(tracer.failed_at)
            continue
        gm = torch.fx.GraphModule(tracer.root, graph, class_name=f"{type(model).__name__}Graph")
        break
    for node in gm.graph.find_nodes(op="call_module"):
        if node.target in opaque:
            meta.set_opaque(node, True)
    gm.meta[CAPTURE] = "opaque"
    return gm


_CAPTURES = (("symbolic_trace", _symbolic), ("torch.export", _export), ("opaque symbolic_trace", _opaque))


# -- values ---------------------------------------------------------------------------------
def is_data_dependent(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return any(s in text for s in ("DataDependent", "data-dependent", "data dependent",
                                   "GuardOnDataDependent", "Unbacked", "item()"))


def annotate_values(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Put a FakeTensor into ``node.meta["val"]`` of every tensor node (FakeTensorProp).

    An opaque node that branches on data cannot run on FakeTensors; then the graph runs once on
    the real inputs (buffers and RNG restored afterwards) and the real results are faked.
    """
    flat = flatten_inputs(gm, args, kwargs)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        FakeTensorProp(gm, mode).propagate(*flat)
        return
    except Exception as err:
        if not is_data_dependent(err):
            raise
    from actcompile.runtime import preserved_state

    class _RealToFake(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            meta.set_val(n, torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, result))
            return result

    with preserved_state(gm), torch.no_grad():
        _RealToFake(gm).run(*flat)


def check_runs(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise :class:`InputMismatchError` if ``model`` cannot run on these inputs at all.

    Tried on FakeTensors first (free); if that fails for a reason other than the inputs (a
    data-dependent branch, an op without a meta kernel), on the real inputs without grad.
    """
    from actcompile.runtime import preserved_state

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode, torch.no_grad():
            fake = torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
            model(*fake[0], **fake[1])
        return
    except Exception:
        pass
    try:
        with preserved_state(model), torch.no_grad():
            model(*args, **kwargs)
    except Exception as err:
        shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        raise InputMismatchError(
            f"{type(model).__name__} cannot run on the example inputs (shapes {shapes}): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err


# -- entry point ----------------------------------------------------------------------------
def _user_frame(err: BaseException) -> str:
    """The innermost source line outside torch/actcompile where the exception was raised."""
    frames = traceback.extract_tb(err.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "/actcompile/" not in frame.filename and "/passes/" not in frame.filename:
            line = frame.line or linecache.getline(frame.filename, frame.lineno).strip()
            return f"{frame.filename}:{frame.lineno}: {line}"
    return "(no source line outside torch)"


def trace_module(model: torch.nn.Module, example_inputs) -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule with ``node.meta["val"]`` FakeTensors; see the module doc.

    ``gm.meta["actcompile_capture"]`` names the capture that succeeded. Raises
    :class:`TraceError` naming the model and the failing source line if none does, and
    :class:`InputMismatchError` if the example inputs do not fit ``model.forward``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"trace_module needs an nn.Module, got {type(model).__name__}")
    from actcompile.runtime import preserved_state

    args, kwargs = normalize_inputs(model, example_inputs)
    failures = []
    with preserved_state(model):   # tracing runs the model; its buffers and the RNG stay as they were
        check_runs(model, args, kwargs)
        for name, capture in _CAPTURES:
            try:
                gm = capture(model, args, kwargs)
                annotate_values(gm, args, kwargs)
                return gm
            except InputMismatchError:
                raise
            except Exception as err:  # each capture fails in its own way; the next one may not
                failures.append((name, err))
    lines = [f"could not capture {type(model).__name__} as a graph:"]
    for name, err in failures:
        lines.append(f"  {name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                     f"\n    at {_user_frame(err)}")
    raise TraceError("\n".join(lines)) from failures[-1][1]
