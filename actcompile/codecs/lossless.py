"""Lossless codecs: ``none`` (keep the tensor) and ``mask`` (1 bit per element).

``mask`` stores, per element, whether it lies in an open interval ``(lo, hi)`` (default
``(0, ∞)``, i.e. ``x > 0``) plus one scalar. That is exact for every backward that reads only
that predicate: ReLU and leaky-ReLU (``grad·[x > 0]``), ReLU6/hardtanh (``lo < x < hi``),
threshold; and for two-valued tensors such as the ``{0, 1/(1-p)}`` noise CPU dropout saves.
The policy only picks it where one of those holds.

>>> import torch
>>> noise = torch.tensor([0.0, 2.0, 2.0, 0.0] * 64)
>>> c = MaskCodec()
>>> torch.equal(c.unpack(c.pack(noise)), noise)
True
>>> c.packed_nbytes(TensorSpec.of(noise))
36
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from actcompile.codecs import register_codec
from actcompile.codecs.base import TensorSpec, is_float
from actcompile.codecs.bits import pack_bits, unpack_bits
from actcompile.errors import CodecError


@register_codec
@dataclasses.dataclass(frozen=True)
class NoneCodec:
    """Keep the tensor as it is (the identity; what every tensor the plan skips gets)."""

    name: ClassVar[str] = "none"
    copies: ClassVar[float] = 0   # time, see Codec.copies
    fixed_rate: ClassVar[bool] = True
    sign_exact: ClassVar[bool] = True
    epsilon: float | None = None

    def supports(self, spec: TensorSpec) -> bool:
        return True

    def packed_nbytes(self, spec: TensorSpec) -> int:
        return spec.nbytes

    def pack(self, x: torch.Tensor) -> tuple:
        return (x,)

    def unpack(self, packed: tuple) -> torch.Tensor:
        return packed[0]


# Backward formulas that read only whether their saved tensor lies in an open interval:
# op -> function of the op's scalar arguments giving (lo, hi).
INTERVAL_USES = {
    "ReluBackward0": lambda use: (0.0, math.inf),          # threshold_backward(grad, result, 0)
    "LeakyReluBackward0": lambda use: (0.0, math.inf),     # self > 0 picks grad or grad·slope
    "LeakyReluBackward1": lambda use: (0.0, math.inf),     # in-place: result > 0, same
    "HardtanhBackward0": lambda use: (float(use.scalar("min_val")), float(use.scalar("max_val"))),  # ReLU6
    "ThresholdBackward0": lambda use: (float(use.scalar("threshold")), math.inf),
}


@register_codec
@dataclasses.dataclass(frozen=True)
class MaskCodec:
    """1 bit per element: whether ``x`` lies in the open interval ``(lo, hi)``.

    Unpacks to ``c`` inside (the largest value if ``hi`` is infinite, else the midpoint) and ``lo``
    outside. Exact for backward formulas that read only that predicate (see :meth:`exact_for`),
    and for tensors whose values are only ``lo`` and one other (CPU dropout's noise).
    ``predicate_only`` (what :meth:`exact_for` sets) skips finding the largest value: any ``c``
    inside serves such a backward, and the pack is then one pass over ``x``, not two.
    """

    name: ClassVar[str] = "mask"
    copies: ClassVar[float] = 5   # time, see Codec.copies
    fixed_rate: ClassVar[bool] = True
    default_enabled: ClassVar[bool] = True
    epsilon: float | None = None
    lo: float = 0.0
    hi: float = math.inf
    predicate_only: bool = False

    def __post_init__(self):
        if not self.lo < self.hi:
            raise CodecError(f"mask: lo={self.lo} must be below hi={self.hi}")

    def supports(self, spec: TensorSpec) -> bool:
        return is_float(spec)

    def exact_for(self, uses) -> "MaskCodec | None":
        """The variant of this codec that is lossless for these backward uses, or ``None``."""
        intervals = set()
        for use in uses:
            interval = INTERVAL_USES.get(use.op)
            if interval is None:
                return None
            intervals.add(interval(use))
        if len(intervals) != 1:
            return None
        lo, hi = intervals.pop()
        return dataclasses.replace(self, lo=lo, hi=hi, predicate_only=True)

    def packed_nbytes(self, spec: TensorSpec) -> int:
        return (spec.numel + 7) // 8 + 4   # bits + one float32 scalar

    def pack(self, x: torch.Tensor) -> tuple:
        x = x.detach()
        inside = (x > self.lo) & (x < self.hi)
        if self.predicate_only:
            inner = self.lo + 1 if math.isinf(self.hi) else (self.lo + self.hi) / 2
            value = torch.full((), inner, dtype=torch.float32, device=x.device)
        elif math.isinf(self.hi):
            top = x.reshape(-1).amax().float() if x.numel() else x.new_full((), self.lo + 1, dtype=torch.float32)
            value = torch.where(top > self.lo, top, torch.full_like(top, self.lo + 1))
        else:
            value = torch.full((), (self.lo + self.hi) / 2, dtype=torch.float32, device=x.device)
        return (pack_bits(inside, 1), value.reshape(1), tuple(x.shape), x.dtype)

    def unpack(self, packed: tuple) -> torch.Tensor:
        bits, value, shape, dtype = packed
        inside = unpack_bits(bits, 1, math.prod(shape), torch.int32, shape=shape) != 0
        outside = torch.full((), self.lo, dtype=torch.float32, device=bits.device)
        return torch.where(inside, value, outside).to(dtype).reshape(shape)
