"""Capture a model's forward with Dynamo, the front end of ``torch.compile``, as FX graphs.

Dynamo keeps what a plain tracer loses: a custom ``autograd.Function`` stays an
``autograd_function_apply`` with its own backward, ``no_grad``/``autocast`` regions stay as
grad-mode and autocast calls, ``torch.utils.checkpoint`` stays a higher-order op, module hooks
are inlined, Python attributes read in ``forward`` are guarded (a change re-captures), and a
branch on data is a *graph break*: the forward is split into several graphs with ordinary
Python between them, each branch captured when it is first taken.

Every graph Dynamo hands to :data:`CAPTURE_BACKEND` becomes a :class:`GraphRunner`. One backend
serves every model (Dynamo's cache is keyed on the ``forward`` code and the backend; a backend
per wrapper would use up Dynamo's recompile limit of 8 with the ninth model of one class), so a
runner knows nothing of plans: it asks the *handler* installed for the current thread by
:func:`handling` what to do, and runs its graph plainly when there is none.

:func:`capture_graphs` runs one forward and returns the graphs it went through, each with the
real inputs it was called with and what each input is (a parameter, a buffer, the caller's
input, or an activation made earlier in the forward):

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
>>> (graph,) = capture_graphs(model, torch.randn(2, 4))
>>> [k.value for k in graph.input_kinds]
['parameter', 'parameter', 'input']
>>> [n.target.__name__ for n in graph.gm.graph.nodes if n.op == "call_function"]
['linear', 'relu']
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from typing import Callable, NamedTuple

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from actcompile import meta
from actcompile.errors import ActCompileError, InputMismatchError, TraceError
from actcompile.plan import TensorKind


# -- inputs ---------------------------------------------------------------------------------
class Inputs(NamedTuple):
    """Positional and keyword arguments of one call, for models that take both."""

    args: tuple
    kwargs: dict


def normalize_inputs(model, example_inputs) -> tuple[tuple, dict]:
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


# -- the backend and its runners ------------------------------------------------------------
class GraphRunner:
    """What Dynamo calls in place of one captured graph.

    ``name`` is Dynamo's compile id (``"0/1"``: frame 0, its second compilation), ``gm`` the
    graph with a FakeTensor in every node's ``meta["example_value"]``. Its placeholders are the
    graph's inputs in order: Dynamo lifts parameters and buffers into inputs.
    """

    def __init__(self, gm: torch.fx.GraphModule, name: str):
        self.gm = gm
        self.name = name
        # Read now: Dynamo drops its placeholder records once the backend returns.
        self.from_locals = tuple(_from_locals(meta.placeholder_source(n)) for n in gm.graph.find_nodes(op="placeholder"))
        for node, local in zip(gm.graph.find_nodes(op="placeholder"), self.from_locals):
            if not local:
                meta.mark_module_state(node)

    def __call__(self, *flat_inputs):
        handler = getattr(_current, "handler", None)
        if handler is None:
            return self.gm(*flat_inputs)
        return handler(self, list(flat_inputs))

    def __repr__(self) -> str:
        return f"GraphRunner({self.name}, {len(self.gm.graph.nodes)} nodes)"


class _CaptureBackend:
    """The Dynamo backend: wraps every graph in a :class:`GraphRunner` (and compiles nothing)."""

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> GraphRunner:
        compile_id = torch._guards.CompileContext.current_compile_id()
        return GraphRunner(gm, str(compile_id) if compile_id is not None else "?")


CAPTURE_BACKEND = _CaptureBackend()
_current = threading.local()

Handler = Callable[[GraphRunner, list], object]


@contextlib.contextmanager
def handling(handler: Handler):
    """Route every :class:`GraphRunner` call on this thread to ``handler(runner, flat_inputs)``."""
    previous = getattr(_current, "handler", None)
    _current.handler = handler
    try:
        yield
    finally:
        _current.handler = previous


# Dynamo keeps at most ``recompile_limit`` (default 8) graphs per code object, never evicting
# those of dead models; every model of one class shares its ``forward``'s code. So each model
# gets a top frame of its own (a fresh code object, see :func:`dynamo_forward`), and a forward
# split by graph breaks, whose later frames are the class's shared code, may keep this many.
RECOMPILE_LIMIT = 64


def dynamo_forward(model: torch.nn.Module):
    """``model(*args, **kwargs)`` through Dynamo with our backend; parameters keep their own names.

    Dynamo starts from a frame of our own that calls ``model``, so it inlines ``Module.__call__``:
    the root's hooks are captured too (``torch.nn`` modules, which Dynamo will not start in,
    work the same), and nothing named ``_orig_mod`` ever appears in a ``state_dict``. Shapes
    are static: each batch shape is captured (and planned) on its own.
    """
    def call(*args, **kwargs):
        return model(*args, **kwargs)

    # A fresh code object: Dynamo's cache lives on it, so this model's graphs neither count
    # against another model's recompile limit nor outlive this model.
    call.__code__ = call.__code__.replace(co_name=f"actcompile_{type(model).__name__}")
    compiled = torch.compile(call, backend=CAPTURE_BACKEND, dynamic=False)
    config = torch._dynamo.config

    def forward(*args, **kwargs):
        # allow_rnn: an nn.LSTM/GRU/RNN is one torch.lstm call in the graph (it runs the same
        # kernel), instead of a graph break that would run the whole forward uncaptured.
        with config.patch(allow_rnn=True, recompile_limit=max(config.recompile_limit, RECOMPILE_LIMIT),
                          accumulated_recompile_limit=max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)):
            return compiled(*args, **kwargs)

    return forward


# -- what each graph input is ---------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


def _from_locals(source) -> bool:
    """Does a placeholder's value come from a local variable of the captured frame (or an item of
    a list/dict held in one)?

    Anything else (an attribute, a global, a closure cell) is held by the program beyond the
    forward: compressing a save of it would free nothing.
    """
    while source is not None and type(source).__name__ in ("GetItemSource", "DictGetItemSource"):
        source = source.base
    return source is None or type(source).__name__ == "LocalSource"


def input_kinds(runner: GraphRunner, flat_inputs: list, model: torch.nn.Module,
                args: tuple, kwargs: dict) -> tuple[TensorKind | None, ...]:
    """The :class:`TensorKind` of each graph input (``None`` for non-tensors), by storage."""
    held = {_storage_key(p): TensorKind.PARAMETER for p in model.parameters()}
    for b in model.buffers():
        held.setdefault(_storage_key(b), TensorKind.BUFFER)
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor):
            held.setdefault(_storage_key(t), TensorKind.INPUT)
    kinds = []
    for from_locals, x in zip(runner.from_locals, flat_inputs):
        if not isinstance(x, torch.Tensor):
            kinds.append(None)
        elif isinstance(x, torch.nn.Parameter):
            kinds.append(TensorKind.PARAMETER)
        elif _storage_key(x) in held:
            kinds.append(held[_storage_key(x)])
        elif not from_locals:
            kinds.append(TensorKind.HELD)
        else:
            kinds.append(TensorKind.ACTIVATION)
    return tuple(kinds)


# -- one forward, captured ------------------------------------------------------------------
@dataclasses.dataclass
class CapturedGraph:
    """One graph a forward went through, the real inputs it got, and what each input is."""

    runner: GraphRunner
    flat_inputs: list
    input_kinds: tuple[TensorKind | None, ...]
    saved_later: set = dataclasses.field(default_factory=set)   # (node, ordinal) a later graph saves again
    # positions (in tree_leaves of the graph's output) of what the forward returns to its caller
    returned: frozenset = frozenset()

    @property
    def gm(self) -> torch.fx.GraphModule:
        return self.runner.gm

    @property
    def name(self) -> str:
        return self.runner.name


def run_dropping_saves(fn: Callable, *args, on_save: Callable | None = None, **kwargs):  # for the Python between graphs
    """Call ``fn`` with grad enabled but keep nothing for backward: the result cannot be
    differentiated, and running it costs no activation memory. ``on_save(tensor)`` sees each
    save dropped (those of the captured graphs are recorded by their runs' own hooks)."""
    @torch._dynamo.disable   # Dynamo traces the hooks active around it: ours runs as plain Python
    def drop(t):
        if on_save is not None:
            on_save(t)

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(drop, _no_unpack):
            return fn(*args, **kwargs)
    finally:   # Dynamo may keep the hook it traced under (a guard): it must not keep what on_save holds
        on_save = None


class CapturedGraphs(list):
    """The graphs of one forward, in call order (a ``list`` of :class:`CapturedGraph`), and
    ``uncaptured_bytes``: the activation storages the forward keeps that no graph made or saves.

    Dynamo runs some code as plain Python: between the graphs of a graph break, and a whole
    frame it gave up on (a data-dependent branch inside a loop makes it run the loop's frame
    plainly, capturing only the calls it makes). What that code saves for backward, and what it
    returns to the caller, is held by the forward, cannot be planned, and counts against the
    budget (measured: such a model kept 3.7-12.7x its budget while this went uncounted)."""

    uncaptured_bytes: int = 0


def _no_unpack(_):
    raise RuntimeError("actcompile: a capture forward keeps nothing for backward")


def capture_graphs(model: torch.nn.Module, example_inputs, *, forward=None,
                   on_graph: Callable[[CapturedGraph], object] | None = None) -> CapturedGraphs:
    """Run one training forward of ``model`` through Dynamo; the graphs it ran, in call order
    (with the bytes plain Python between them keeps: :class:`CapturedGraphs`).

    The forward keeps no activations (saves are dropped) and leaves no trace: buffers (BatchNorm
    statistics) and every RNG are restored afterwards. ``forward`` is an existing
    :func:`dynamo_forward` of ``model`` to reuse (else one is made). ``on_graph`` is called with
    each graph as it is reached. Raises :class:`InputMismatchError` if the inputs do not fit
    ``model.forward`` or the model cannot run on them, :class:`TraceError` if it runs but no
    graph could be captured. ``on_graph`` may return a callable ``(node, ordinal, tensor, kind)``:
    it then sees every save of that graph's real run (a calibration done in the same forward).
    """
    from actcompile.passes.memory import record_saves
    from actcompile.runtime import preserved_state

    args, kwargs = normalize_inputs(model, example_inputs)
    forward = forward or dynamo_forward(model)
    graphs: list[CapturedGraph] = []
    saved: dict[int, tuple[StorageWeakRef, CapturedGraph, tuple[str, int]]] = {}   # storage -> first save

    def first_save(t: torch.Tensor):
        found = saved.get(_storage_key(t))
        return found if found is not None and not found[0].expired() else None

    def record(runner: GraphRunner, flat_inputs: list):
        kinds = list(input_kinds(runner, flat_inputs, model, args, kwargs))
        # Made by an earlier graph, which saves it too. (An input plain Python saved stays an
        # activation here, counted twice: a graph called again, as in a loop, is planned from its
        # first call, and on the other calls the same input may be the graph's own to pack.)
        for i, x in enumerate(flat_inputs):
            if kinds[i] is TensorKind.ACTIVATION and first_save(x) is not None:
                kinds[i] = TensorKind.SHARED
        graph = CapturedGraph(runner, flat_inputs, tuple(kinds))
        graphs.append(graph)
        observer = on_graph(graph) if on_graph is not None else None

        def on_save(node, ordinal, t, kind):
            if observer is not None:
                observer(node, ordinal, t, kind)
            if kind is TensorKind.SHARED:
                _, earlier, key = first_save(t)
                earlier.saved_later.add(key)
            elif kind is TensorKind.ACTIVATION and first_save(t) is None:
                saved[_storage_key(t)] = (StorageWeakRef(t.untyped_storage()), graph, (node, ordinal))

        out = record_saves(runner.gm, flat_inputs, on_save, fake=False, input_kinds=graph.input_kinds).output
        outputs.append([(i, StorageWeakRef(t.untyped_storage())) for i, t in enumerate(tree_leaves(out))
                        if isinstance(t, torch.Tensor)])
        return out

    outputs: list[list] = []   # per graph: (leaf position, storage) of each tensor it returned
    held = {_storage_key(t) for t in (*model.parameters(), *model.buffers(), *tree_leaves((args, kwargs)))
            if isinstance(t, torch.Tensor)}

    uncaptured: dict[int, tuple[StorageWeakRef, int]] = {}   # storage -> (ref, bytes) saved outside the graphs
    kept_outputs: set[tuple[int, int]] = set()   # (graph, leaf position) of graph outputs plain Python saved

    def count_uncaptured(t: torch.Tensor):
        key = _storage_key(t)
        known = uncaptured.get(key)
        if key in held or (known is not None and not known[0].expired()):
            return   # module state, the caller's input, or counted
        made_by = [(g, i) for g, leaves in enumerate(outputs) for i, ref in leaves if not ref.expired() and ref.cdata == key]
        if made_by:   # a graph's output, kept whole by the Python that saved it: counted by its graph
            kept_outputs.update(made_by)   # as an output (held, never packed), like what the caller gets
            return
        uncaptured[key] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())

    versions = [(t, t._version) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    with preserved_state(model), handling(record):
        try:
            result = run_dropping_saves(forward, *args, on_save=count_uncaptured, **kwargs)
        except ActCompileError:   # from planning inside the forward (an on_graph observer): as it is
            raise
        except Exception as err:
            shapes = [tuple(t.shape) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            first = str(err).splitlines()[0] if str(err) else ""
            raise InputMismatchError(f"{type(model).__name__} cannot run on the example inputs (shapes "
                                     f"{shapes}): {type(err).__name__}: {first}") from err
    if any(t._version != v for t, v in versions):
        raise TraceError(f"{type(model).__name__}.forward modifies its input tensors in place; actcompile "
                         "runs the forward once to plan, which would change them before the real forward. "
                         "Clone the input inside forward (or outside, before calling the model)")
    if not graphs:
        raise TraceError(f"Dynamo captured no graph of {type(model).__name__}.forward (it ran as plain Python): "
                         "nothing can be planned. Run with TORCH_LOGS=graph_breaks to see why")
    # What the caller gets back stays alive after the forward (DESIGN.md: outputs count as bytes).
    handed_back = {_storage_key(t) for t in tensors_in(result)}
    for g, (graph, leaves) in enumerate(zip(graphs, outputs)):
        graph.returned = frozenset(i for i, ref in leaves if (not ref.expired() and ref.cdata in handed_back)
                                   or (g, i) in kept_outputs)
    from_graphs = {ref.cdata for leaves in outputs for _, ref in leaves if not ref.expired()}
    for t in tensors_in(result):   # returned, made by plain Python
        if _storage_key(t) not in from_graphs:
            count_uncaptured(t)
    captured = CapturedGraphs(graphs)
    captured.uncaptured_bytes = sum(nbytes for _, nbytes in uncaptured.values())
    return captured


def tensors_in(obj, depth: int = 6) -> list[torch.Tensor]:
    """Every tensor in what a forward returned: nested tuples, lists, dicts (a Hugging Face
    ``ModelOutput``) and plain objects (a KV cache keeps its tensors in attributes)."""
    found, seen, stack = [], set(), [(obj, depth)]
    while stack:
        x, left = stack.pop()
        if isinstance(x, torch.Tensor):
            found.append(x)
            continue
        if left <= 0 or id(x) in seen or x is None or isinstance(x, (str, bytes, int, float, bool, torch.nn.Module)):
            continue
        seen.add(id(x))
        if isinstance(x, dict):
            stack += [(v, left - 1) for v in x.values()]
        elif isinstance(x, (list, tuple, set)):
            stack += [(v, left - 1) for v in x]
        elif hasattr(x, "__dict__"):
            stack += [(v, left - 1) for v in vars(x).values()]
    return found
