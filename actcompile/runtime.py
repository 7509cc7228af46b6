"""What runs at train time: pack the planned saved tensors through their codecs, unpack in backward.

The emitted graph brackets every node that saves a planned tensor (or another view of a storage
the plan packs) with :func:`begin_node` / :func:`end_node`; while :func:`compressing` is active,
those markers install autograd's pack/unpack hooks for that node alone, and the pack hook counts
the node's saves and looks up ``(node, ordinal)`` in the plan's table. Every other save goes
straight to autograd, with its own in-place check (measured: no step-time change on ViT-small at
1/4, benchmarks/results/speed.md run 13). A storage saved by several ops is packed once: later
saves get the same packed object (and their own view).
A saved tensor whose shape or dtype differs from the plan is kept as it is and counted in
``guard_failures``: never a wrong codec (Dynamo's guards make this rare: a graph is captured
for one set of shapes). Saves the plan does not pack go to the saved-tensor hooks that were
active outside (``save_on_cpu``), so those compose.

This module imports no pass, so a rewritten module needs only it (and the codecs) to run.

>>> import torch
>>> from actcompile.codecs import get_codec
>>> table = {("relu", 0): Planned(get_codec("mask"), (4, 8), torch.float32)}
>>> x = torch.randn(4, 8, requires_grad=True)
>>> with compressing(table) as stats:
...     begin_node("relu"); y = torch.relu(x); end_node()
>>> stats.packed_tensors, stats.packed_bytes
(1, 8)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
import weakref

import torch
import torch.fx
import torch.utils.checkpoint
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from actcompile.codecs.base import packed_bytes, relative_error, strided_sample
from actcompile.recompute_node import Aside, Packed, recompute_as_one_node

CHECK_VALUES = 1 << 16   # values of a packed tensor a drift check compares (evenly spaced slices)


@dataclasses.dataclass(frozen=True)
class Planned:
    """What the plan says for one save: the codec and the tensor it expects to see (``shape``
    ``None``: a view of the planned storage in a shape of its own, packed as the view it is)."""

    codec: object
    shape: tuple[int, ...] | None
    dtype: torch.dtype


def packable_view(t: torch.Tensor) -> torch.Tensor:
    """What a codec packs for a saved tensor: the tensor itself if it is exactly its storage,
    else a flat view of the whole storage (every view saved of it is then cut back out)."""
    storage = t.untyped_storage()
    if (t.storage_offset() == 0 and t.numel() * t.element_size() == storage.nbytes()
            and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
                 or is_non_overlapping_and_dense(t))):   # the C++ checks first: the Python one is slow
        return t
    return t.as_strided((storage.nbytes() // t.element_size(),), (1,), 0)


@dataclasses.dataclass
class RuntimeStats:
    """Counters of one compressed forward (for tests, benchmarks and re-planning)."""

    packed_tensors: int = 0
    packed_bytes: int = 0        # bytes the codecs hold
    raw_bytes_replaced: int = 0  # bytes of the storages they replaced
    guard_failures: int = 0
    # (node, ordinal) -> the codec's relative error on the real tensor, in a forward run with
    # ``compressing(..., measure=True)`` (a drift check); empty otherwise
    measured_errors: dict = dataclasses.field(default_factory=dict)


class _PackedStorage:
    """One storage's packed form; every save of (a view of) it unpacks from here.

    While a decoded copy is alive (one backward op still holds it), later unpacks reuse it: a
    storage several ops saved (a LayerNorm output read by q, k and v) is decoded once, not once
    per op with the copies alive together.
    """

    __slots__ = ("codec", "payload", "size", "stride", "dtype", "decoded", "__weakref__")

    def __init__(self, codec, payload, size, stride, dtype):
        self.codec, self.payload, self.size, self.stride, self.dtype = codec, payload, size, stride, dtype
        self.decoded = None   # weak reference to the live decoded tensor, if any

    def base(self) -> torch.Tensor:
        live = self.decoded() if self.decoded is not None else None
        if live is not None:
            return live
        decoded = self.codec.unpack(self.payload)
        if decoded.stride() != self.stride:
            decoded = torch.empty_strided(self.size, self.stride, dtype=decoded.dtype,
                                          device=decoded.device).copy_(decoded)
        self.decoded = weakref.ref(decoded)
        return decoded


class _Outer:
    """A save the plan does not pack, handed to the saved-tensor hooks that were active outside."""

    __slots__ = ("packed", "unpack")

    def __init__(self, packed, unpack):
        self.packed, self.unpack = packed, unpack


class _Session:
    """State of one compressed forward: current node, ordinal, storages already packed.

    ``outer`` are the ``(pack, unpack)`` hooks active when it began (``save_on_cpu``, a user's
    own): every save the plan does not pack goes to them, so an outer offload still happens.
    """

    def __init__(self, table: dict, outer=None, packed: dict | None = None, measure: bool = False):
        self.table = table
        self.outer = outer
        self.measure = measure
        self.node: str | None = None
        self.ordinal = 0
        # storage -> its packed form; shared by the graphs of one forward (see sharing_packed).
        # Weak: every SavedVariable keeps its pack hook (this session's bound method) alive until
        # it is released, so a strong reference here kept every packed payload alive until the
        # graph's last saved tensor was freed, not each until its own last use in backward
        # (GPT-2-small at 1/4: backward peak 421.8 MB against uncompressed eager's 359.2).
        self.packed: dict[int, tuple[StorageWeakRef, weakref.ref]] = {} if packed is None else packed
        self.stats = RuntimeStats()
        self.hooked = 0   # hooks installed (push_hooks) and not removed yet
        self.unversioned: frozenset = frozenset()   # storages kept without a version check (StateReadingCall)

    def push_hooks(self) -> None:
        """Send the saves made from now on through :meth:`pack` (until :meth:`pop_hooks`)."""
        torch._C._autograd._push_saved_tensors_default_hooks(self.pack, _unpack)
        self.hooked += 1

    def pop_hooks(self) -> None:
        torch._C._autograd._pop_saved_tensors_default_hooks()
        self.hooked -= 1

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = StorageWeakRef(storage)
        known = self.packed.get(key.cdata)
        planned = None
        if self.node is not None:
            planned = self.table.get((self.node, self.ordinal))
            self.ordinal += 1
        holder = known[1]() if known is not None and not known[0].expired() else None
        if holder is not None and holder.dtype == t.dtype:
            return (holder, tuple(t.shape), t.stride(), t.storage_offset())
        if holder is not None:   # its bits read as another dtype: only the exact bytes will do
            self.stats.guard_failures += 1
            planned = None
        if planned is not None and ((planned.shape is not None and tuple(t.shape) != planned.shape)
                                    or t.dtype != planned.dtype):
            self.stats.guard_failures += 1
            planned = None
        if planned is None:
            if key.cdata in self.unversioned:
                return t.detach() if t.requires_grad else t
            if self.outer is not None:
                return _Outer(self.outer[0](t), self.outer[1])
            # Not t itself: a node saving its own output would then hold a tensor whose grad_fn
            # is that node, a cycle no collector sees. A part of the graph the loss never reaches
            # (in front of a no_grad block) then lived forever: +3.5 MB per step on a small net.
            # Autograd keeps the saved tensor's grad_fn and metadata itself when hooks are on.
            return _Kept(t.detach() if t.requires_grad else t)
        whole = packable_view(t.detach())
        codec = planned.codec
        eager = getattr(codec, "codec", codec)   # the eager codec behind compiled kernels
        if hasattr(codec, "bind"):   # compiled kernels: the pair for this layout, found once
            codec = codec.bind(whole)
        payload = codec.pack(whole)
        if self.measure and not getattr(eager, "exact", False):   # a drift check: does the codec still do on this
            # tensor what was planned? (a codec lossless by construction, offload, always does)
            self._check(eager, codec, whole, payload)
        holder = _PackedStorage(codec, payload, tuple(whole.shape), whole.stride(), whole.dtype)
        self.packed[key.cdata] = (key, weakref.ref(holder))
        self.stats.packed_tensors += 1
        self.stats.packed_bytes += getattr(codec, "payload_bytes", None) or packed_bytes(payload)
        self.stats.raw_bytes_replaced += storage.nbytes()
        return (holder, tuple(t.shape), t.stride(), t.storage_offset())

    def pack_as(self, t: torch.Tensor, key: tuple[str, int]):
        """:meth:`pack` ``t`` as if saved by ``key`` = ``(node, ordinal)`` (a recomputed run keeps
        its argument in the form the plan gives that save); returns what :func:`_unpack` reads.
        The save may have been a view of another shape (``F.linear`` saves a 3-D input as 2-D):
        a contiguous ``t`` with as many elements is packed as that view."""
        planned = self.table.get(tuple(key))
        if (planned is not None and planned.shape is not None and tuple(t.shape) != planned.shape and t.is_contiguous()
                and t.numel() == math.prod(planned.shape)):
            t = t.view(planned.shape)
        node, ordinal = self.node, self.ordinal
        self.node, self.ordinal = key
        try:
            return self.pack(t)
        finally:
            self.node, self.ordinal = node, ordinal

    def _check(self, eager, codec, whole: torch.Tensor, payload) -> None:
        """Record the codec's error on ~:data:`CHECK_VALUES` evenly spaced values of ``whole``.

        A codec that codes slices alike (``calibrates_on_slices``) and is not capped packs just
        those slices, with its ``eager`` form (a compiled kernel would compile for their shape):
        ViT-small at 1/4 measured +0.22× a step when every packed tensor was decoded whole for
        the check. Others (a mask exact only on two-valued data, a capped variable-rate codec)
        decode the real ``payload``.
        """
        def rows(t):   # a flat storage as rows of 256 (one quantizer group), so it can be sampled too
            return t.view(-1, 256) if t.dim() == 1 and t.numel() % 256 == 0 else t

        sample = strided_sample(rows(whole), CHECK_VALUES)
        if not bool(torch.isfinite(sample).all()):   # an overflow is the forward's news, not the codec's
            return
        if getattr(eager, "calibrates_on_slices", False) and getattr(eager, "max_bytes", None) is None:
            decoded = eager.unpack(eager.pack(sample.contiguous()))
        else:
            decoded = strided_sample(rows(codec.unpack(payload)), CHECK_VALUES)
        self.stats.measured_errors[(self.node, self.ordinal - 1)] = relative_error(sample, decoded)


class _Kept:
    """A save the plan keeps as it is, with its version: under saved-tensor hooks autograd no
    longer checks that the tensor was not modified in place after it was saved, so this does
    (PyTorch raises there; without the check backward read the modified values silently)."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.version = tensor, tensor._version

    def unpack(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{self.tensor.dtype} {list(self.tensor.shape)}] is at version {self.tensor._version}; "
                f"expected version {self.version} instead (actcompile checks what autograd's hooks do not)")
        return self.tensor


def _unpack(saved):
    if isinstance(saved, _Kept):
        return saved.unpack()
    if isinstance(saved, torch.Tensor):
        return saved
    if isinstance(saved, _Outer):
        return saved.unpack(saved.packed)
    holder, size, stride, offset = saved
    base = holder.base()
    if size == holder.size and stride == holder.stride and offset == 0:
        return base
    return base.as_strided(size, stride, offset)


_active = threading.local()


def _session() -> _Session | None:
    return getattr(_active, "session", None)


def begin_node(name: str) -> None:
    """Marker the emitted graph calls before a node whose saves the plan compresses: its saves,
    and only its, go through the session's pack hook."""
    session = _session()
    if session is not None:
        session.node, session.ordinal = name, 0
        session.push_hooks()


def end_node() -> None:
    """Marker the emitted graph calls after such a node."""
    session = _session()
    if session is not None and session.hooked:
        session.node = None
        session.pop_hooks()


def recompute(fn, *args, **kwargs):
    """Call ``fn`` now without keeping what it saves; run it again in backward for those tensors.

    Non-reentrant activation checkpointing with the RNG state preserved, so the forward result
    and the recomputed tensors are bit-identical to an ordinary call.
    """
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    call = functools.partial(fn, **kwargs) if kwargs else fn
    return torch.utils.checkpoint.checkpoint(call, *args, use_reentrant=False, preserve_rng_state=True)


class _PackedArgument:
    """An argument of a recomputed run kept packed, with the forward's shape and ``requires_grad``:
    the recomputation must save what the forward saved (the ops' input-gradient formulas), or
    checkpoint refuses it."""

    __slots__ = ("saved", "shape", "requires_grad")

    def __init__(self, saved, shape: torch.Size, requires_grad: bool):
        self.saved, self.shape, self.requires_grad = saved, shape, requires_grad

    def decode(self) -> torch.Tensor:
        return _unpack(self.saved).reshape(self.shape).detach().requires_grad_(self.requires_grad)


def _pack_argument(session, value, key: tuple[str, int]):
    """``value`` kept as the plan packs save ``key``; a tuple or list (``chunk``'s views of one
    storage, read whole by the run) item by item, in a container of its type."""
    if isinstance(value, (tuple, list)):
        return type(value)(_pack_argument(session, v, key) if isinstance(v, torch.Tensor) else v for v in value)
    return _PackedArgument(session.pack_as(value, key), value.shape, value.requires_grad)


def _decode_argument(kept):
    if isinstance(kept, _PackedArgument):
        return kept.decode()
    if isinstance(kept, (tuple, list)):
        return type(kept)(_decode_argument(v) for v in kept)
    return kept


class Recomputed:
    """``fn`` called through :func:`recompute`: a graph node's target (FX cannot print a builtin
    such as ``torch.lstm`` as an argument, but takes any named callable as a target).

    ``held``: positions of arguments that are buffers or other state the forward mutates (a
    training BatchNorm's running statistics): the recomputation runs on copies taken before the
    call, so it sees what the forward saw and the statistics are updated once, not twice.
    ``packed``: ``(position, (node, ordinal))`` of arguments kept for the recomputation in the
    packed form the plan gives that save (the one an earlier save of the storage made, else
    packed here): the forward runs on the real argument, the recomputation on its decoded copy,
    and the argument itself is not kept.
    """

    def __init__(self, fn, held: tuple[int, ...] = (), packed: tuple = (), one_node: bool = False,
                 differentiable: tuple[bool, ...] | None = None):
        self.fn = fn
        self.held = tuple(held)
        self.packed = tuple(packed)
        self.one_node = one_node
        self.differentiable = differentiable
        self.__name__ = f"recompute_{getattr(fn, '__name__', type(fn).__name__)}"

    def __call__(self, *args, **kwargs):
        session = _session()
        if session is None or not torch.is_grad_enabled():
            return self._call(session, args, kwargs)
        # checkpoint saves its tensor arguments through the saved-tensor hooks: under the
        # session's, an argument an earlier node packed is kept in that packed form, not whole
        session.push_hooks()
        try:
            return self._call(session, args, kwargs)
        finally:
            session.pop_hooks()

    def _call(self, session, args, kwargs):
        packed = self.packed if session is not None else ()
        if self.one_node and torch.is_grad_enabled():
            return self._call_as_one_node(session, packed, args, kwargs)
        if not (self.held or packed) or not torch.is_grad_enabled():
            return recompute(self.fn, *args, **kwargs)
        kept = list(args)
        for i in self.held:
            if isinstance(args[i], torch.Tensor):
                kept[i] = args[i].clone()
        for i, key in packed:
            kept[i] = _pack_argument(session, args[i], tuple(key))
        forward = [args]   # the real arguments, dropped once the forward ran
        decoded = {i for i, _ in packed}
        # what is kept as it is must still be what the forward read (checkpoint's own inputs get
        # this check from autograd's saved-tensor versions; these bypass it)
        versions = {i: x._version for i, x in enumerate(kept) if isinstance(x, torch.Tensor) and i not in decoded}
        # checkpoint restores the RNG of the devices among its tensor arguments: one empty
        # tensor per accelerator stands for the arguments it is not given
        devices = [torch.empty(0, device=d) for d in
                   dict.fromkeys(x.device for x in args if isinstance(x, torch.Tensor) and x.device.type != "cpu")]

        def run(*_devices, **kw):
            if forward:
                return self.fn(*forward.pop(), **kw)
            changed = [i for i, v in versions.items() if kept[i]._version != v]
            if changed:
                raise RuntimeError(f"actcompile: arguments {changed} of the recomputed {self.__name__} were modified "
                                   "in place after the forward; recomputing from them would give wrong gradients "
                                   "(plan with recompute=False, or do not modify them in place)")
            return self.fn(*(_decode_argument(x) if i in decoded else x for i, x in enumerate(kept)), **kw)

        del args
        return recompute(run, *devices, **kwargs)

    def _call_as_one_node(self, session, packed, args, kwargs):
        """The run as one autograd node (:mod:`actcompile.recompute_node`): each tensor argument
        is saved (through the hooks around the call), or kept packed, or copied before the call
        (held state), as :meth:`_call` keeps it for checkpoint."""
        kept = []
        packed_at = dict(packed)
        for i, value in enumerate(args):
            if i in self.held and isinstance(value, torch.Tensor):
                kept.append(Aside(_Copied(value.clone())))
            elif i in packed_at:
                kept.extend(Packed(v) for v in tree_leaves(_pack_argument(session, value, tuple(packed_at[i])))
                            if isinstance(v, _PackedArgument))
            else:
                kept.extend("save" for v in tree_leaves(value) if isinstance(v, torch.Tensor))
        run = functools.partial(self.fn, **kwargs) if kwargs else self.fn
        return recompute_as_one_node(run, args, kept, self.differentiable)


class _Copied:
    """A copy of state the forward mutates, taken before the call: what the recomputation reads."""

    __slots__ = ("copy",)

    def __init__(self, copy: torch.Tensor):
        self.copy = copy

    def decode(self) -> torch.Tensor:
        return self.copy


# The markers have effects the graph does not see: keep dead-code elimination off them.
torch.fx.node.has_side_effect(begin_node)
torch.fx.node.has_side_effect(end_node)


@contextlib.contextmanager
def sharing_packed():
    """One forward of several graphs: a storage one graph packed is found packed by the next.

    A tensor made by one graph and saved by it and by a later one is planned once, in the first
    (the later graph's profile calls it SHARED); the later graph's save reuses the packed form.
    """
    previous = getattr(_active, "packed", None)
    _active.packed = {}
    try:
        yield
    finally:
        _active.packed = previous


def checkpointed_region(gmod, *args, **kwargs):
    """A ``torch.utils.checkpoint`` region Dynamo captured (``tag_activation_checkpoint``), run as
    the user's call ran it: with the RNG state preserved, so a dropout in it draws the same mask
    when recomputed. Dynamo's eager implementation turns ``preserve_rng_state`` off (Inductor
    functionalizes the RNG instead; an eager back end does not), and a block with dropout trained
    with gradients off by 4% (relative; ``torch.compile(backend="eager")`` alike)."""
    kwargs = dict(kwargs, use_reentrant=False, early_stop=False)
    kwargs.setdefault("preserve_rng_state", True)
    if "_checkpoint_context_fn" in getattr(gmod, "meta", {}):   # selective checkpointing's policy
        kwargs["context_fn"] = gmod.meta["_checkpoint_context_fn"]
    return torch.utils.checkpoint.checkpoint(gmod, *args, **kwargs)


class StateReadingCall:
    """A checkpointed region (Dynamo's ``tag_activation_checkpoint``) called with the module
    state it reads (``state``: positions of parameters and buffers among its arguments).

    A plain ``torch.utils.checkpoint(block, x)`` keeps ``x`` for the recomputation; the block's
    parameters and buffers are read where they live, at recompute time. Dynamo lifts them into
    the region's arguments, so checkpoint keeps them too, with their versions: a BatchNorm in
    the region bumps ``num_batches_tracked`` when it is recomputed, and backward then refused to
    run (plain: trains; ``torch.compile(backend="eager")`` refuses alike). Here they are kept
    without a version check, as reading them where they live would be; every other save goes
    to the hooks active around the call (the plan's, a user's), else is version-checked.
    """

    def __init__(self, fn, state: tuple[int, ...]):
        self.fn = fn
        self.state = tuple(state)
        self.__name__ = f"state_reading_{getattr(fn, '__name__', type(fn).__name__)}"

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.fn(*args, **kwargs)
        state = frozenset(StorageWeakRef(args[i].untyped_storage()).cdata for i in self.state
                          if isinstance(args[i], torch.Tensor))
        session, hooks = _session(), outer_saved_tensor_hooks()
        if session is not None and hooks is not None and hooks[0] == session.pack:
            before, session.unversioned = session.unversioned, session.unversioned | state
            try:
                return self.fn(*args, **kwargs)
            finally:
                session.unversioned = before

        def pack(t):
            if StorageWeakRef(t.untyped_storage()).cdata in state:
                return t.detach() if t.requires_grad else t
            if hooks is not None:
                return _Outer(hooks[0](t), hooks[1])
            return _Kept(t.detach() if t.requires_grad else t)

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            return self.fn(*args, **kwargs)


def outer_saved_tensor_hooks():
    """The ``(pack, unpack)`` saved-tensor hooks active now, or ``None``."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def inside_checkpoint() -> bool:
    """Is this forward running under ``torch.utils.checkpoint`` (which keeps nothing inside anyway)?"""
    hooks = outer_saved_tensor_hooks()
    return hooks is not None and getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint"


@contextlib.contextmanager
def compressing(table: dict, measure: bool = False):
    """One compressed forward: the node markers install the pack/unpack hooks around the nodes
    the plan names; any a raising forward left installed are removed here.

    Saved-tensor hooks already active (``save_on_cpu``) get every save the plan does not pack:
    outside the marked nodes they are the only hooks, inside them :class:`_Outer` hands them on.
    ``measure``: also record each packed tensor's codec error (``stats.measured_errors``).
    """
    if _session() is not None:
        raise RuntimeError("actcompile: compressed forwards cannot nest in one thread")
    outer = outer_saved_tensor_hooks()
    session = _Session(table, outer, getattr(_active, "packed", None), measure)
    _active.session = session
    try:
        yield session.stats
    finally:
        while session.hooked:
            session.pop_hooks()
        _active.session = None


@contextlib.contextmanager
def preserved_state(module: torch.nn.Module | None = None, tensors=()):
    """Run something (calibration, a probe) without a trace on ``module``'s buffers, on
    ``tensors`` (a captured graph's buffer inputs) or on the RNG.

    BatchNorm's running statistics and every random generator are restored afterwards, so the
    next real forward draws the same dropout masks as it would have without the probe.
    """
    kept = list(module.buffers()) if module is not None else []
    kept += [t for t in tensors if isinstance(t, torch.Tensor)]
    buffers = [(b, b.detach().clone()) for b in kept]
    devices = sorted({b.device.index for b, _ in buffers if b.device.type == "cuda"} |
                     ({torch.cuda.current_device()} if torch.cuda.is_available() and torch.cuda.is_initialized() else set()))
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            # through .data: the values are back as they were, so a backward still to run that
            # saved these buffers (BatchNorm saves its running statistics) must not see a
            # version bump and refuse to run, as it would after a user's in-place write
            with torch.no_grad():
                for live, saved in buffers:
                    live.data.copy_(saved)
