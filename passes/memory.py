"""Which tensors autograd saves for backward, attributed to the node whose op saved them, in bytes.

``profile_memory`` runs the graph forward node by node on FakeTensors (no real activation
memory) inside ``saved_tensors_hooks``, so every call of the pack hook is recorded against the
node running it as a :class:`~actcompile.plan.SaveEvent` ``(node, ordinal, op, shape, dtype,
storage)``. Afterwards it walks the autograd graph the outputs hold: that names the backward
formula reading each save (``op``) and drops saves nothing holds any more. Saves are
deduplicated by storage (a tensor saved by two ops, or two views of one storage, count once);
parameters, buffers and the model's inputs are marked (from the capture's input kinds) and
excluded from activation bytes. Where a meta kernel cannot know what its op saves, the profile
runs on the real inputs instead, dropping every saved tensor as soon as it is recorded (so it
still holds no activations) and restoring buffers and RNG afterwards.

>>> import torch
>>> from actcompile.passes.capture import capture_graphs
>>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
>>> (graph,) = capture_graphs(model, torch.randn(64, 256))
>>> profile = profile_memory(graph)
>>> profile.baseline_bytes == 64 * 256 * 4 + 64 * 4 * 4   # the ReLU output (saved by ReLU and by
True
>>> profile.output_bytes                                    # Linear, once) and the output
1024
>>> sorted(t.kind.value for t in profile.tensors)
['activation', 'input', 'parameter']
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, NamedTuple

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from actcompile.plan import LATER_USE, MemoryProfile, NodeRecord, SavedTensor, SaveEvent, TensorKind, Use
from actcompile.runtime import packable_view, preserved_state
from actcompile.passes.rules import recompute_kind, vmapped_nodes
from actcompile.passes.capture import CapturedGraph


class _SaveRecorder(torch.fx.Interpreter):
    """Runs the graph node by node, so each save is attributed to the node running it."""

    def __init__(self, gm, on_save: Callable[[str, int, torch.Tensor], None], on_node=None, after_node=None):
        super().__init__(gm)
        self.on_save = on_save
        self.on_node = on_node
        self.after_node = after_node
        self.node: str | None = None
        self.ordinal = 0
        self.saves = 0
        self.keep = False   # keep the saved tensors (a probe backward runs), else only tokens

    def run_node(self, n):
        self.node, self.ordinal = n.name, 0
        try:
            if self.on_node is not None:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                self.on_node(n, [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)])
            result = super().run_node(n)
            if self.after_node is not None:
                self.after_node(n, [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)])
            return result
        except Exception as err:
            if getattr(err, "_actcompile_node", None) is None:
                err._actcompile_node = n.format_node()
                err.add_note(f"while running node: {n.format_node()}")
            raise

    def pack(self, t: torch.Tensor):
        index = self.saves
        substitute = self.on_save(self.node, self.ordinal, t)
        self.ordinal += 1
        self.saves += 1
        if self.keep:   # detached: t itself, saved by the node making it, would be a leaked cycle (runtime.py)
            if substitute is not None:   # what backward reads instead (a probe of a codec's effect)
                return index, tuple(t.shape), substitute
            return index, tuple(t.shape), t.detach() if t.requires_grad else t
        return index, tuple(t.shape)   # only a token is kept: the profile holds no activations


class SaveRecord(NamedTuple):
    holders: dict[int, Use]   # save index -> the autograd node reading it, for saves still held
    autograd_nodes: int       # nodes of the autograd graph the forward leaves behind
    output: object            # what the graph returned (it cannot be differentiated: nothing was kept)
    # storage key -> (weak ref, bytes) of the activation storages among the ``returned`` outputs
    returned: dict = {}
    # the same, of what a captured custom autograd.Function's node keeps without the saved-tensor hooks
    closure: dict = {}


def record_saves(gm: torch.fx.GraphModule, flat_inputs: list, on_save, *, fake: bool,
                 input_kinds=None, on_node=None, after_node=None, keep: bool = False, returned=frozenset(),
                 modes=()) -> SaveRecord:
    """Run ``gm`` forward once with grad enabled, calling ``on_save(node, ordinal, tensor, kind)``
    at every save (with ``keep``, a tensor it returns is what backward reads instead; and
    ``on_node(node, tensor arguments)`` before every node and ``after_node(node, tensors
    returned)`` after it, if given), inside ``modes`` (dispatch
    modes such as a ``FlopCounterMode``, entered after the fake mode).

    ``kind`` says whether the saved storage is a parameter, buffer, model input or activation:
    ``input_kinds`` gives it for each graph input (default: every input is a model input).
    On FakeTensors, the inputs (and any parameters the graph module owns) are swapped for fakes.
    Returns a :class:`SaveRecord`: ``{save index: Use}`` (the autograd node reading it) for the
    saves the outputs' autograd graph still holds at the end of the forward (see
    :func:`_saving_nodes`; other saves were released), the number of autograd nodes in that
    graph, and the graph's output. With ``keep`` (real tensors only) the saves stay alive, so
    the output can be differentiated; reading a ``_saved_*`` attribute still records its token.
    ``returned``: positions (in ``tree_leaves`` of the output) of what the forward hands to its
    caller; their activation storages are in ``SaveRecord.returned``, and what a custom
    ``autograd.Function`` saved out of the hooks' sight (held as it is) in ``SaveRecord.closure``.
    """
    recorder = _SaveRecorder(gm, None, on_node, after_node)
    recorder.keep = keep and not fake
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    state = dict(gm.named_parameters())   # tied weights once; functional_call re-ties the rest
    state.update(gm.named_buffers())
    kinds = list(input_kinds) if input_kinds is not None else [TensorKind.INPUT] * len(flat_inputs)
    with contextlib.ExitStack() as stack:
        if fake:
            stack.enter_context(mode)
            state = {name: _fake_like(mode, t) for name, t in state.items()}
            flat_inputs = [_fake_like(mode, x) if isinstance(x, torch.Tensor) else x for x in flat_inputs]
            for m in modes:
                stack.enter_context(m)
        else:
            for m in modes:
                stack.enter_context(m)
            stack.enter_context(preserved_state(gm, [x for x, kind in zip(flat_inputs, kinds)
                                                     if kind in (TensorKind.BUFFER, TensorKind.HELD)]))
        owned: dict[int, TensorKind] = {}
        buffer_names = {name for name, _ in gm.named_buffers()}
        for name, t in state.items():
            kind = TensorKind.BUFFER if name in buffer_names else TensorKind.PARAMETER
            owned.setdefault(StorageWeakRef(t.untyped_storage()).cdata, kind)
        for x, kind in zip(flat_inputs, kinds):
            if isinstance(x, torch.Tensor) and kind is not TensorKind.ACTIVATION:
                owned.setdefault(StorageWeakRef(x.untyped_storage()).cdata, kind or TensorKind.INPUT)

        def kind_of(t):
            return owned.get(StorageWeakRef(t.untyped_storage()).cdata, TensorKind.ACTIVATION)

        vmapped = vmapped_nodes(gm.graph)

        def save_kind(node, t):
            kind = kind_of(t)
            return TensorKind.VMAPPED if kind is TensorKind.ACTIVATION and node in vmapped else kind

        recorder.on_save = lambda node, ordinal, t: on_save(node, ordinal, t, save_kind(node, t))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(recorder.pack, _token_unpack))
        out = torch.func.functional_call(_Runner(recorder), {f"gm.{k}": v for k, v in state.items()},
                                         tuple(flat_inputs), strict=False, tie_weights=True)
        # an earlier graph's autograd nodes (reached through real inputs) are not this graph's
        earlier = {x.grad_fn for x in flat_inputs if isinstance(x, torch.Tensor) and x.grad_fn is not None}
        holders, nodes, unhooked = _saving_nodes(out, earlier)

        def activation_storages(tensors) -> dict:
            found = {}
            for t in tensors:
                if isinstance(t, torch.Tensor) and kind_of(t) is TensorKind.ACTIVATION:
                    storage = t.untyped_storage()
                    found[StorageWeakRef(storage).cdata] = (StorageWeakRef(storage), storage.nbytes())
            return found

        handed_back = activation_storages(t for i, t in enumerate(tree_leaves(out)) if i in returned)
        closure = {key: v for key, v in activation_storages(unhooked).items() if key not in handed_back}
        return SaveRecord(holders, nodes, out, handed_back, closure)


_unpacked = threading.local()


def _token_unpack(token):
    tokens = getattr(_unpacked, "tokens", None)   # None in a backward on another thread: nothing to record
    if tokens is not None:
        tokens.append(token[0])
    if len(token) == 3:   # kept (record_saves(keep=True)): backward can run
        return token[2]
    return torch.empty(token[1], device="meta")   # the shape, for formulas that need it (pool offsets)


def _saving_nodes(out, stop=frozenset()) -> tuple[dict[int, Use], int, list[torch.Tensor]]:
    """Walk the autograd graph from ``out``, up to the nodes in ``stop`` (where the graph's
    inputs were made): which autograd node holds each save token.

    Reading a node's ``_saved_*`` attributes runs the unpack hook on its tokens, which tells
    exactly which backward formula reads each saved tensor (``ReluBackward0`` reads only the
    sign), and gives the formula's scalar arguments (``HardtanhBackward0``'s ``min_val``). What a
    custom ``autograd.Function`` saves, captured by Dynamo, no hook sees (:func:`_saved_in_closure`):
    those tensors are the third item, alive until backward and out of any codec's reach.
    Saves no output reaches are not in the result: they are freed with the forward.
    """
    roots = [t.grad_fn for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    found: dict[int, Use] = {}
    unhooked: list[torch.Tensor] = []
    seen, stack = set(), list(roots)
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen or fn in stop:
            continue
        seen.add(fn)
        _unpacked.tokens = []
        scalars = []
        for attr in dir(fn):
            if attr.startswith("_saved_"):
                try:
                    value = getattr(fn, attr)
                except RuntimeError:   # already freed / not a tensor; nothing to attribute
                    continue
                name = attr.removeprefix("_saved_")
                if isinstance(value, (bool, int, float)):
                    scalars.append((name, value))
                elif isinstance(value, (tuple, list)) and all(type(v) is int for v in value):
                    scalars.append((name, tuple(value)))          # kernel_size, stride, ...
                elif isinstance(value, torch.Tensor):
                    scalars.append((name + "_shape", tuple(value.shape)))   # pool offsets need the input's
        unhooked.extend(_saved_in_closure(fn))
        use = Use(type(fn).__name__, tuple(scalars))
        for token in _unpacked.tokens:
            if isinstance(token, int):
                found[token] = use
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    _unpacked.tokens = []
    return found, len(seen), unhooked


def _saved_in_closure(fn) -> list[torch.Tensor]:
    """What Dynamo's ``autograd_function_apply`` saved for ``fn``, a custom ``autograd.Function``'s
    node: its ``ApplyTemplate`` keeps the forward's saved values in the closure of its backward
    (``torch/_functorch/autograd_function.py``), not in ``ctx.saved_tensors``, so they never pass
    the saved-tensor hooks (measured on torch 2.14: a GradReverse saving its 256 KiB input left
    the heap 1.57× the budget). ``[]`` for any other node, or where torch keeps them otherwise."""
    backward = getattr(getattr(fn, "_forward_cls", None), "backward", None)
    code = getattr(backward, "__code__", None)
    if code is None or "saved_values" not in code.co_freevars or backward.__closure__ is None:
        return []
    try:
        values = backward.__closure__[code.co_freevars.index("saved_values")].cell_contents
    except ValueError:   # the cell is empty: nothing saved yet
        return []
    return [v for v in (values or ()) if isinstance(v, torch.Tensor)]


def _fake_like(mode: FakeTensorMode, t: torch.Tensor) -> torch.Tensor:
    fake = mode.from_tensor(t)
    if isinstance(t, torch.nn.Parameter) and not isinstance(fake, torch.nn.Parameter):
        fake = torch.nn.Parameter(fake, requires_grad=t.requires_grad)
    return fake


class _Runner(torch.nn.Module):
    """Lets ``functional_call`` swap the graph's parameters while the recorder runs it."""

    def __init__(self, recorder: _SaveRecorder):
        super().__init__()
        self.gm = recorder.module
        self.__dict__["recorder"] = recorder

    def forward(self, *flat_inputs):
        return self.recorder.run(*flat_inputs)


def unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under functorch's wrappers (a node inside a traced ``torch.vmap``
    returns a batched tensor, which has no storage of its own).

    >>> x = torch.zeros(3, 4)
    >>> unwrapped(x) is x
    True
    """
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


class _NodeLog:
    """Per node, in graph order: what it reads, the storages it returns, its FLOPs (see
    :class:`~actcompile.plan.NodeRecord`). Storages are named by number as they first appear;
    one freed and its address reused is a new storage (its weak reference has expired)."""

    def __init__(self, placeholder_kinds: dict[str, TensorKind]):
        self.placeholder_kinds = placeholder_kinds
        self.flops = FlopCounterMode(display=False)
        self.draws = _RandomDraws()
        self.numbers: dict[int, tuple[StorageWeakRef, int]] = {}   # storage key -> (ref, number)
        self.rows: list[tuple] = []   # (name, recompute kind, inputs, [(number, bytes)], flops, kind, grad, random)
        self.counted = 0

    def number(self, storage) -> int:
        ref = StorageWeakRef(storage)
        known = self.numbers.get(ref.cdata)
        if known is None or known[0].expired():
            known = self.numbers[ref.cdata] = (ref, len(self.numbers))
        return known[1]

    def __call__(self, node: torch.fx.Node, returned: list[torch.Tensor]) -> None:
        total = self.flops.get_total_flops()
        storages = {}
        for t in returned:
            storage = unwrapped(t).untyped_storage()
            storages.setdefault(self.number(storage), storage.nbytes())
        kind = self.placeholder_kinds.get(node.name)
        self.rows.append((node.name, recompute_kind(node), tuple(n.name for n in node.all_input_nodes),
                          tuple(storages.items()), total - self.counted, kind.value if kind is not None else "",
                          any(t.requires_grad for t in returned), self.draws.seen))
        self.counted = total
        self.draws.seen = False

    def records(self, saved_number: dict[int, int]) -> tuple[NodeRecord, ...]:
        """The rows with each storage named by its saved index (``saved_number``: number -> index)
        or ``-number - 1``."""
        def name(number):
            return saved_number.get(number, -number - 1)

        return tuple(NodeRecord(node, recompute, inputs, tuple((name(k), nbytes) for k, nbytes in storages), flops,
                                kind, grad, random)
                     for node, recompute, inputs, storages, flops, kind, grad, random in self.rows)


class _RandomDraws(TorchDispatchMode):
    """Notes whether an op drawing random numbers ran (``seen``): a recomputed run that draws
    none needs no RNG state of its own (:mod:`actcompile.recompute_node`)."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seen = True
        return func(*args, **(kwargs or {}))


class _Collector:
    """Builds SaveEvents and deduplicated SavedTensors from the stream of pack-hook calls."""

    def __init__(self, saved_later=frozenset(), log: _NodeLog | None = None):
        self.saved_later = saved_later   # (node, ordinal) of saves a later graph saves again
        self.log = log
        self.saves: list[tuple] = []     # (node, ordinal, shape, dtype, storage index)
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.first: list[dict] = []
        self.saved_number: dict[int, int] = {}   # the node log's number of each saved storage -> its index

    def __call__(self, node, ordinal, t, kind):
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        known = self.storages.get(ref.cdata)
        if known is not None and not known[0].expired():
            index = known[1]
        else:
            index = len(self.first)
            packed = packable_view(t)
            self.storages[ref.cdata] = (ref, index)
            if self.log is not None:
                self.saved_number[self.log.number(storage)] = index
            self.first.append(dict(index=index, node=node, ordinal=ordinal, shape=tuple(t.shape),
                                   dtype=str(t.dtype).removeprefix("torch."), nbytes=storage.nbytes(),
                                   kind=kind, packed_shape=tuple(packed.shape)))
        self.saves.append((node, ordinal, tuple(t.shape), str(t.dtype).removeprefix("torch."), index))

    def profile(self, holders: dict[int, Use], autograd_nodes: int, node_order, mode,
                returned: dict | None = None, closure: dict | None = None) -> MemoryProfile:
        """Keep the storages some autograd node still holds; name the nodes that read each.

        ``returned`` (:attr:`SaveRecord.returned`): what the forward hands its caller. A saved
        storage among them is an OUTPUT (packing it would free nothing); the others count as
        ``output_bytes``. ``closure`` (:attr:`SaveRecord.closure`): what captured custom
        ``autograd.Function`` s keep where no hook sees it; a saved storage among them is a
        CLOSURE save, the others count as ``closure_bytes``."""
        if self.saves and not holders:   # outputs autograd cannot walk: keep every save
            holders = {i: Use("?", ()) for i in range(len(self.saves))}
        events, uses = [], {}
        for i, (node, ordinal, shape, dtype, index) in enumerate(self.saves):
            if i in holders:
                events.append(SaveEvent(node, ordinal, holders[i].op, shape, dtype, index))
                uses.setdefault(index, []).append(holders[i])
        later = {index for node, ordinal, _, _, index in self.saves if (node, ordinal) in self.saved_later}
        for index in later:   # read by a backward of another graph too: no codec exact only for ours
            uses.setdefault(index, []).append(Use(LATER_USE, ()))
        returned, closure = ({key: nbytes for key, (ref, nbytes) in (held or {}).items() if not ref.expired()}
                             for held in (returned, closure))
        saved_keys = {index: key for key, (ref, index) in self.storages.items() if not ref.expired()}
        for f in self.first:
            key = saved_keys.get(f["index"])
            if f["kind"] is TensorKind.ACTIVATION and key in returned:
                f["kind"] = TensorKind.OUTPUT
            elif f["kind"] is TensorKind.ACTIVATION and key in closure:
                f["kind"] = TensorKind.CLOSURE
        kept = {saved_keys[f["index"]] for f in self.first if f["index"] in uses and f["index"] in saved_keys}
        tensors = tuple(SavedTensor(**dict(f, uses=tuple(uses[f["index"]]), saved_later=f["index"] in later))
                        for f in self.first if f["index"] in uses)
        return MemoryProfile(tensors=tensors, events=tuple(events), node_order=tuple(node_order), mode=mode,
                             autograd_nodes=autograd_nodes,
                             nodes=self.log.records({k: i for k, i in self.saved_number.items() if i in uses})
                             if self.log is not None else (),
                             output_bytes=sum(n for key, n in returned.items() if key not in kept),
                             closure_bytes=sum(n for key, n in closure.items() if key not in kept))


def _has_unknown_workspace(profile: MemoryProfile) -> bool:
    """An empty saved activation on FakeTensors: a meta kernel that cannot know a backend's
    workspace size (oneDNN's LSTM saves a ~1 MB uint8 workspace its meta kernel reports as 0)."""
    return any(t.nbytes == 0 for t in profile.tensors if t.is_activation)


def profile_memory(graph: CapturedGraph, *, mode: str = "auto") -> MemoryProfile:
    """The :class:`MemoryProfile` of one forward of a captured graph on the inputs it was captured with.

    ``mode="fake"`` runs on FakeTensors, ``"real"`` on the real inputs (dropping saved tensors at
    once), ``"auto"`` (default) fake unless the graph has an op without a meta kernel or one
    that cannot tell the size of what it saves (an empty saved workspace).
    """
    if mode not in ("auto", "fake", "real"):
        raise ValueError(f"profile_memory(mode={mode!r}): accepted are 'auto', 'fake', 'real'")
    gm = graph.gm
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    kinds = {n.name: kind or TensorKind.INPUT for n, kind in zip(placeholders, graph.input_kinds)}
    for attempt in (("fake", "real") if mode == "auto" else (mode,)):
        log = _NodeLog(kinds)
        collector = _Collector(frozenset(graph.saved_later), log)
        try:
            record = record_saves(gm, graph.flat_inputs, collector, fake=attempt == "fake",
                                  input_kinds=graph.input_kinds, after_node=log, returned=graph.returned,
                                  modes=(log.flops, log.draws))
        except Exception as err:
            if attempt == "fake" and mode == "auto" and needs_real_inputs(err):
                continue
            raise
        profile = collector.profile(record.holders, record.autograd_nodes, (n.name for n in gm.graph.nodes), attempt,
                                    record.returned, record.closure)
        if attempt == "fake" and mode == "auto" and _has_unknown_workspace(profile):
            continue
        return profile
    raise AssertionError("unreachable")


def needs_real_inputs(err: BaseException) -> bool:
    """Did a FakeTensor run fail where the real inputs would not (data-dependent values, no meta kernel)?"""
    text = f"{type(err).__name__}: {err}"
    return any(s in text for s in ("DataDependent", "data-dependent", "data dependent", "GuardOnDataDependent",
                                   "Unbacked", "item()", "meta kernel", "DynamicOutputShape",
                                   "UnsupportedOperatorException"))
