"""Codec pack/unpack as compiled kernels: Inductor-generated per codec and input shape, cached.

A codec's ``pack``/``unpack`` are written as plain torch ops (so ``make_fx`` can trace them and
they run anywhere); run eagerly, each op is one pass over memory and a codec is 3-15 passes.
:class:`CompiledCodec` runs the same functions through ``torch.compile(fullgraph=True)`` with
static shapes, so Inductor fuses each into one or two kernels (measured on CPU, 70 MB
activation, pack + unpack as a multiple of ``x.clone()``: int8 17× eager → 1.6× compiled,
mask 3.3× → 1.5×; see ``benchmarks/results/codecs.md``).

Kernels are cached per ``(codec, input signature)`` in one process-wide table, each with a
code object of its own (Dynamo's cache and recompile limit are per code object, so no two keys
compete). Where compilation fails (no C++ compiler, an op Inductor cannot lower) the codec's
own eager function is used for that key, with one warning: never an error at train time.

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

MAX_KERNELS = 512   # compiled functions kept (least recently used dropped first)

_kernels: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()


def _signature(value):
    """What a compiled kernel specializes on: tensor shapes, strides, dtypes, devices; constants."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    return value


def _compile(fn, label: str):
    def kernel(*args):
        return fn(*args)

    # A code object per kernel: Dynamo caches per code object (see the module doc).
    kernel.__code__ = kernel.__code__.replace(co_name=label)
    return torch.compile(kernel, fullgraph=True, dynamic=False)


class _Kernel:
    """One compiled function, falling back to ``eager`` (for good) if it cannot be compiled."""

    __slots__ = ("compiled", "eager", "label")

    def __init__(self, eager, label: str):
        self.eager, self.label = eager, label
        self.compiled = _compile(eager, label)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as err:   # compilation, not the codec, failed: the eager ops still work
                self.compiled = None
                warnings.warn(f"actcompile: could not compile {self.label} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); running it eagerly",
                              RuntimeWarning, stacklevel=2)
        return self.eager(*args)


def _kernel(codec, method: str, args: tuple) -> _Kernel:
    key = (codec, method, _signature(args))
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


class CompiledCodec:
    """``codec`` with ``pack``/``unpack`` run as cached compiled kernels; the same results.

    It is a runtime adapter, not a codec of its own: planning, sizes and options stay the
    wrapped codec's (``name``, ``packed_nbytes``, ``epsilon`` ... are passed through).
    """

    __slots__ = ("codec",)

    def __init__(self, codec):
        self.codec = codec

    def pack(self, x: torch.Tensor) -> tuple:
        return _kernel(self.codec, "pack", (x,))(x)

    def unpack(self, packed: tuple) -> torch.Tensor:
        return _kernel(self.codec, "unpack", (packed,))(packed)

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def __repr__(self) -> str:
        return f"CompiledCodec({self.codec!r})"


def clear_kernels() -> None:
    """Drop every cached kernel (tests; after changing Inductor's configuration)."""
    with _lock:
        _kernels.clear()


def cached_kernels() -> int:
    """How many compiled kernels the cache holds."""
    return len(_kernels)
