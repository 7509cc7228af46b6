"""Lossless codecs for integer and bool saves: narrower storage, the same values bit for bit.

Integer and bool tensors are never stored lossily (an index off by one is a wrong gradient,
not a small one), but most of their bits carry nothing:

- ``bits``: a bool tensor (a ``masked_fill`` or ``where`` condition, a dropout mask) as one bit
  per element, 8× smaller.
- ``pool_offsets``: max-pool indices (int64 flat positions in the input plane, 8 bytes per
  element, more than the values they index) as the offset inside their pooling window:
  ⌈log₂ window⌉ bits rounded up to 1, 2, 4 or 8 (2×2 → 2 bits, 3×3 → 4 bits: 32× and 16×
  smaller). It needs the pooling's geometry, which it reads from the backward that holds the
  indices (:meth:`PoolOffsetsCodec.for_uses`): ``MaxPool{2,3}DWithIndicesBackward0`` and the
  adaptive variants.
- ``narrow``: an integer tensor cast to a narrower integer dtype its values fit (``int16``
  position ids, ``uint8`` class labels). Which dtype fits is measured on the real tensor at
  calibration and checked again at every pack: values that no longer fit are kept as they
  are (never a wrong value), with a :class:`~actcompile.errors.PlanDriftWarning`, because the
  plan's byte count no longer holds. The check reads the data, so ``narrow`` is eager-only.

The policy offers these to integer and bool tensors whatever ``codecs`` names (they lose
nothing), and keeps one only where its measured error on the real tensor is exactly zero.

>>> import torch
>>> x = torch.randn(1, 2, 8, 8)
>>> _, indices = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
>>> codec = PoolOffsetsCodec(kernel=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1), input_size=(8, 8))
>>> packed = codec.pack(indices)
>>> torch.equal(codec.unpack(packed), indices), codec.packed_nbytes(TensorSpec.of(indices)), indices.nbytes
(True, 8, 256)
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar

import torch

from actcompile.codecs import register_codec
from actcompile.codecs.base import TensorSpec
from actcompile.codecs.bits import SUPPORTED_BITS, pack_bits, unpack_bits
from actcompile.errors import CodecError, PlanDriftWarning

INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@register_codec
@dataclasses.dataclass(frozen=True)
class BitsCodec:
    """A bool tensor as 1 bit per element."""

    name: ClassVar[str] = "bits"
    copies: ClassVar[float] = 4   # time, see Codec.copies
    fixed_rate: ClassVar[bool] = True
    lossless_integer: ClassVar[bool] = True
    traceable: ClassVar[bool] = True
    epsilon: float | None = None

    def supports(self, spec: TensorSpec) -> bool:
        return spec.dtype == torch.bool

    def packed_nbytes(self, spec: TensorSpec) -> int:
        return (spec.numel + 7) // 8

    def pack(self, x: torch.Tensor) -> tuple:
        return (pack_bits(x.detach().reshape(-1), 1), tuple(x.shape))

    def unpack(self, packed: tuple) -> torch.Tensor:
        bits, shape = packed
        return unpack_bits(bits, 1, math.prod(shape), torch.int32, shape=shape) != 0


# Backward nodes holding max-pool indices, and whether their windows are adaptive.
POOL_BACKWARDS = {
    "MaxPool2DWithIndicesBackward0": False,
    "MaxPool3DWithIndicesBackward0": False,
    "AdaptiveMaxPool2DBackward0": True,
    "AdaptiveMaxPool3DBackward0": True,
}


@register_codec
@dataclasses.dataclass(frozen=True)
class PoolOffsetsCodec:
    """Max-pool indices as each index's offset inside its window (see the module doc).

    ``input_size`` is the pooled input's spatial size (the indices are flat positions in it);
    ``kernel``/``stride``/``padding``/``dilation`` the pooling's, one entry per spatial dim
    (``adaptive=True``: the windows ``[⌊o·I/O⌋, ⌈(o+1)·I/O⌉)`` of adaptive pooling, the other
    fields unused). An unconfigured instance (``input_size=()``) supports nothing; the policy
    gets a configured one from :meth:`for_uses`.
    """

    name: ClassVar[str] = "pool_offsets"
    copies: ClassVar[float] = 4   # time, see Codec.copies
    fixed_rate: ClassVar[bool] = True
    lossless_integer: ClassVar[bool] = True
    traceable: ClassVar[bool] = True
    epsilon: float | None = None
    input_size: tuple[int, ...] = ()
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    adaptive: bool = False

    def __post_init__(self):
        for field in ("input_size", "kernel", "stride", "padding", "dilation"):
            value = tuple(int(v) for v in getattr(self, field))
            object.__setattr__(self, field, value)
            if value and len(value) != len(self.input_size):
                raise CodecError(f"pool_offsets: {field}={value} needs one entry per spatial dim of "
                                 f"input_size={self.input_size}")

    @classmethod
    def for_uses(cls, uses) -> "PoolOffsetsCodec | None":
        """The codec for indices read by ``uses`` (one max-pool backward), or ``None``."""
        if len({u for u in uses}) != 1 or uses[0].op not in POOL_BACKWARDS:
            return None
        use = uses[0]
        shape = use.scalar("self_shape")
        if shape is None:
            return None
        nd = 3 if "3D" in use.op else 2
        input_size = tuple(shape[-nd:])
        if POOL_BACKWARDS[use.op]:
            return cls(input_size=input_size, adaptive=True)

        def per_dim(name, default):
            value = tuple(use.scalar(name, ()) or default)
            return value * nd if len(value) == 1 else value

        kernel = per_dim("kernel_size", ())
        if len(kernel) != nd:
            return None
        return cls(input_size=input_size, kernel=kernel, stride=per_dim("stride", kernel),
                   padding=per_dim("padding", (0,)), dilation=per_dim("dilation", (1,)))

    def _bits(self, extents: list[int]) -> int | None:
        window = math.prod(extents)
        return next((b for b in SUPPORTED_BITS if 2 ** b >= window), None)

    def _extents(self, out_size: tuple[int, ...]) -> list[int]:
        if not self.adaptive:
            return list(self.kernel)
        return [max(1, max((-(-(k + 1) * i // o)) - (k * i // o) for k in range(o))) if o else 1
                for i, o in zip(self.input_size, out_size)]

    def supports(self, spec: TensorSpec) -> bool:
        nd = len(self.input_size)
        return (nd > 0 and spec.dtype == torch.int64 and len(spec.shape) >= nd + 1
                and self._bits(self._extents(spec.shape[-nd:])) is not None)

    def packed_nbytes(self, spec: TensorSpec) -> int:
        bits = self._bits(self._extents(spec.shape[-len(self.input_size):]))
        return (spec.numel * bits + 7) // 8

    def _geometry(self, shape):
        nd = len(self.input_size)
        out_size = tuple(shape[-nd:])
        starts = [s.reshape((-1,) + (1,) * (nd - 1 - d)) for d, s in enumerate(self._starts(out_size))]
        return nd, starts, self._extents(out_size)

    def _starts(self, out_size):
        starts = []
        for d, (size_in, size_out) in enumerate(zip(self.input_size, out_size)):
            o = torch.arange(size_out)
            starts.append(torch.div(o * size_in, size_out, rounding_mode="floor") if self.adaptive
                          else o * self.stride[d] - self.padding[d])
        return starts

    def _steps(self) -> tuple[int, ...]:
        return (1,) * len(self.input_size) if self.adaptive else self.dilation

    def pack(self, x: torch.Tensor) -> tuple:
        nd, starts, extents = self._geometry(x.shape)
        flat, offset = x.detach(), None
        positions = []
        for size in reversed(self.input_size):   # unravel the flat index, last dim first
            positions.append(flat % size)
            flat = torch.div(flat, size, rounding_mode="floor")
        positions.reverse()
        for position, start, extent, step in zip(positions, starts, extents, self._steps()):
            inside = torch.div(position - start.to(x.device), step, rounding_mode="floor")
            offset = inside if offset is None else offset * extent + inside
        bits = self._bits(extents)
        return (pack_bits(offset.reshape(-1), bits), tuple(x.shape))

    def unpack(self, packed: tuple) -> torch.Tensor:
        payload, shape = packed
        nd, starts, extents = self._geometry(shape)
        offset = unpack_bits(payload, self._bits(extents), math.prod(shape), torch.int64, shape=shape)
        index = None
        insides = []
        for extent in reversed(extents):
            insides.append(offset % extent)
            offset = torch.div(offset, extent, rounding_mode="floor")
        insides.reverse()
        for inside, start, size, step in zip(insides, starts, self.input_size, self._steps()):
            position = start.to(payload.device) + inside * step
            index = position if index is None else index * size + position
        return index


_NARROW_ORDER = ("uint8", "int8", "int16", "int32")


@register_codec
@dataclasses.dataclass(frozen=True)
class NarrowCodec:
    """An integer tensor stored as ``dtype`` (narrower), checked at every pack (see the module doc)."""

    name: ClassVar[str] = "narrow"
    copies: ClassVar[float] = 2   # time, see Codec.copies
    fixed_rate: ClassVar[bool] = True
    lossless_integer: ClassVar[bool] = True
    traceable: ClassVar[bool] = False   # the range check reads the data
    epsilon: float | None = None
    dtype: str = "int16"

    def __post_init__(self):
        if self.dtype not in _NARROW_ORDER:
            raise CodecError(f"narrow: dtype={self.dtype!r}; accepted: {', '.join(_NARROW_ORDER)}")

    @classmethod
    def ladder(cls, spec: TensorSpec) -> list["NarrowCodec"]:
        """Every narrower dtype ``spec``'s integers could be stored as."""
        if spec.dtype not in INTEGER_DTYPES:
            return []
        return [cls(dtype=d) for d in _NARROW_ORDER if getattr(torch, d).itemsize < spec.dtype.itemsize]

    def supports(self, spec: TensorSpec) -> bool:
        return spec.dtype in INTEGER_DTYPES and getattr(torch, self.dtype).itemsize < spec.dtype.itemsize

    def packed_nbytes(self, spec: TensorSpec) -> int:
        return spec.numel * getattr(torch, self.dtype).itemsize

    def pack(self, x: torch.Tensor) -> tuple:
        x = x.detach()
        target = getattr(torch, self.dtype)
        info = torch.iinfo(target)
        if x.numel():
            low, high = torch.aminmax(x)
            if int(low) < info.min or int(high) > info.max:
                warnings.warn(f"narrow: a saved {x.dtype} tensor {tuple(x.shape)} holds values in "
                              f"[{int(low)}, {int(high)}], outside {self.dtype}; kept as {x.dtype} "
                              f"({x.nbytes} B instead of the planned {x.numel() * target.itemsize} B)",
                              PlanDriftWarning, stacklevel=2)
                return (x, x.dtype)
        return (x.to(target), x.dtype)

    def unpack(self, packed: tuple) -> torch.Tensor:
        values, dtype = packed
        return values.to(dtype)
