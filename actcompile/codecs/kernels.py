"""Codec pack/unpack as compiled kernels: Inductor-generated per codec and input layout, cached.

A codec's ``pack``/``unpack`` are written as plain torch ops (so ``make_fx`` can trace them and
they run anywhere); run eagerly, each op is one pass over memory and a codec is 3-15 passes.
:class:`CompiledCodec` traces the same functions with ``make_fx`` on fake tensors and hands the
graph to Inductor (``compile_fx``), which fuses each into one or two kernels (measured on CPU,
70 MB activation, pack + unpack as a multiple of ``x.clone()``: int8 17× eager → about 2×
compiled; see ``benchmarks/results/codecs.md``).

The compiled artifact is called directly, not through ``torch.compile``: no Dynamo frame, no
guards, no cache lookup per call (measured, a 290 KB int8 pack: 150 µs through
``torch.compile``, 90 µs direct, of which the kernel is most). What a kernel specializes on —
the input's shape, strides, dtype and device — is decided once per planned tensor: the runtime
calls :meth:`CompiledCodec.bind` with the first tensor it packs and keeps the returned
``(pack, unpack)`` pair, so a training step does one dictionary lookup per saved tensor.

A codec may name Inductor options for its kernels (``inductor_options``, a class attribute):
the quantizers ask Inductor to compute their per-group scale and zero point once rather than
inside every loop that reads them.

Kernels are cached per ``(codec, input layout)`` in one process-wide table (identical layers
share them). Where compilation fails (no C++ compiler, an op Inductor cannot lower, a codec
whose output sizes depend on the data) the codec's own eager function is used for that key,
with one warning: never an error at train time.

>>> import torch
>>> from actcompile.codecs import get_codec
>>> fast = CompiledCodec(get_codec("int8"))
>>> x = torch.randn(64, 256)
>>> torch.equal(fast.unpack(fast.pack(x)), get_codec("int8").unpack(get_codec("int8").pack(x)))
True
"""

from __future__ import annotations

import collections
import threading
import warnings

import torch

from actcompile.codecs.base import packed_bytes

MAX_KERNELS = 512   # compiled functions kept (least recently used dropped first)

_kernels: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()
_CONSTANT_TYPES = (int, float, bool, str, type(None), torch.dtype, torch.device)


def layout(value):
    """What a compiled kernel specializes on: tensor shapes, strides, dtypes, devices; constants."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        return tuple(layout(v) for v in value)
    return value


class _Unsupported(Exception):
    """The function cannot become one static kernel (it returns values that depend on the data)."""


_SLOT = object()   # where a tensor goes back into a rebuilt (nested) value


def _tensors(value, out: list) -> list:
    """The tensors inside a nested tuple/list, in order (lighter than pytree: payloads are shallow)."""
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _tensors(v, out)
    return out


def _template(value):
    """``value`` with every tensor replaced by a slot (the rest are constants of the kernel)."""
    if isinstance(value, torch.Tensor):
        return _SLOT
    if isinstance(value, (tuple, list)):
        return type(value)(_template(v) for v in value)
    return value


def _rebuild(template, tensors):
    if template is _SLOT:
        return next(tensors)
    if isinstance(template, (tuple, list)):
        return type(template)(_rebuild(t, tensors) for t in template)
    return template


def _is_constant(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_constant(v) for v in value)
    return value is _SLOT or isinstance(value, _CONSTANT_TYPES)


def _compile(fn, args: tuple):
    """``fn(*args)`` as a callable over the same (nested) arguments, running one Inductor graph.

    Tensors in ``args`` become the graph's inputs; everything else in ``args`` and every
    non-tensor in the result is a constant of the kernel (the cache key holds them).
    """
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    arg_template = _template(args)
    traced = {}

    def flat(*tensors):
        out = fn(*_rebuild(arg_template, iter(tensors)))
        traced["template"] = _template(out)
        return _tensors(out, [])

    example = _tensors(args, [])
    with torch.no_grad():
        # Once eagerly first: a codec's cached constants (a DCT matrix behind an lru_cache) are
        # then real tensors, which the trace lifts into the graph. Made first under the fake
        # trace, they would be cached as FakeTensors and break every later eager call.
        fn(*args)
        gm = make_fx(flat, tracing_mode="fake", _allow_non_fake_inputs=True)(*example)
    out_template = traced["template"]
    if not _is_constant(out_template):
        raise _Unsupported("returns values computed from the data (not tensors or constants)")
    fake_outs = [n.meta.get("val") for n in gm.graph.find_nodes(op="output")[0].args[0]]
    if any(not isinstance(s, int) for v in fake_outs if isinstance(v, torch.Tensor) for s in v.shape):
        raise _Unsupported("output sizes depend on the data")
    options = dict(getattr(getattr(fn, "__self__", None), "inductor_options", {}))
    with torch.no_grad():
        compiled = compile_fx(gm, example, config_patches=options)

    def run(*call_args):
        with torch.no_grad():
            outs = compiled(*_tensors(call_args, []))
        return _rebuild(out_template, iter(outs))

    return run


class _Kernel:
    """One compiled function (compiled at its first call), falling back to ``eager`` for good
    if it cannot be compiled."""

    __slots__ = ("compiled", "eager", "label", "failed")

    def __init__(self, eager, label: str):
        self.eager, self.label = eager, label
        self.compiled, self.failed = None, False

    def __call__(self, *args):
        if self.compiled is None and not self.failed:
            try:
                self.compiled = _compile(self.eager, args)
            except Exception as err:   # compilation, not the codec, failed: the eager ops still work
                self.failed = True
                warnings.warn(f"actcompile: could not compile {self.label} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); running it eagerly",
                              RuntimeWarning, stacklevel=2)
        if self.compiled is not None:
            return self.compiled(*args)
        return self.eager(*args)


def _kernel(codec, method: str, args: tuple) -> _Kernel:
    key = (codec, method, layout(args))
    with _lock:
        kernel = _kernels.get(key)
        if kernel is not None:
            _kernels.move_to_end(key)
            return kernel
        kernel = _Kernel(getattr(codec, method), f"actcompile_{codec.name}_{method}")
        _kernels[key] = kernel
        while len(_kernels) > MAX_KERNELS:
            _kernels.popitem(last=False)
        return kernel


class _Bound:
    """The pack kernel for one input layout and, once a payload exists, its unpack kernel."""

    __slots__ = ("codec", "pack_kernel", "unpack_kernel", "payload_bytes")

    def __init__(self, codec, x: torch.Tensor):
        self.codec = codec
        self.pack_kernel = _kernel(codec, "pack", (x,))
        self.unpack_kernel = None
        self.payload_bytes = None   # bytes one payload holds: the same for every pack of this layout

    def pack(self, x: torch.Tensor) -> tuple:
        packed = self.pack_kernel(x)
        if self.payload_bytes is None:
            self.payload_bytes = packed_bytes(packed)
        return packed

    def unpack(self, packed: tuple) -> torch.Tensor:
        if self.unpack_kernel is None:   # a pack kernel's payloads all have one layout
            self.unpack_kernel = _kernel(self.codec, "unpack", (packed,))
        return self.unpack_kernel(packed)


class CompiledCodec:
    """``codec`` with ``pack``/``unpack`` run as cached compiled kernels; the same results.

    It is a runtime adapter, not a codec of its own: planning, sizes and options stay the
    wrapped codec's (``name``, ``packed_nbytes``, ``epsilon`` ... are passed through).
    :meth:`bind` gives the pair for one input layout, looked up once per planned tensor.
    """

    __slots__ = ("codec", "_bound")

    def __init__(self, codec):
        self.codec = codec
        self._bound = {}

    def bind(self, x: torch.Tensor) -> _Bound:
        """``(pack, unpack)`` kernels for tensors laid out like ``x`` (cached on this adapter)."""
        key = (x.shape, x.stride(), x.dtype, x.device)
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = _Bound(self.codec, x)
        return bound

    def pack(self, x: torch.Tensor) -> tuple:
        return self.bind(x).pack(x)

    def unpack(self, packed: tuple) -> torch.Tensor:
        return _kernel(self.codec, "unpack", (packed,))(packed)

    def __getattr__(self, name):
        if name in CompiledCodec.__slots__:   # not set yet (while unpickling)
            raise AttributeError(name)
        return getattr(self.codec, name)

    def __reduce__(self):   # copies and pickles keep the codec, not the compiled kernels
        return (CompiledCodec, (self.codec,))

    def __repr__(self) -> str:
        return f"CompiledCodec({self.codec!r})"


def clear_kernels() -> None:
    """Drop every cached kernel (tests; after changing Inductor's configuration).

    Adapters already bound keep the kernels they hold."""
    with _lock:
        _kernels.clear()


def cached_kernels() -> int:
    """How many compiled kernels the cache holds."""
    return len(_kernels)
