"""The codec protocol: how one saved tensor is packed for backward and restored.

A codec is a frozen dataclass. ``packed_nbytes`` is arithmetic on a :class:`TensorSpec` (so a
plan can be made on FakeTensors); ``pack`` returns a plain nested tuple of fresh tensors and
Python constants (AOTAutograd's hook inlining rejects NamedTuples, and a view would keep the
whole intermediate alive); ``unpack`` inverts it with the original shape and dtype.

>>> import torch
>>> from actcompile.codecs import get_codec
>>> codec = get_codec("int8")
>>> x = torch.randn(4, 1024)
>>> packed = codec.pack(x)
>>> packed_bytes(packed) == codec.packed_nbytes(TensorSpec.of(x))
True
>>> relative_error(x, codec.unpack(packed)) < 0.01
True
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Protocol, runtime_checkable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor: all ``packed_nbytes`` and ``supports`` may look at."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls(tuple(t.shape), t.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@runtime_checkable
class Codec(Protocol):
    name: ClassVar[str]
    fixed_rate: ClassVar[bool]
    epsilon: float | None

    def supports(self, spec: TensorSpec) -> bool: ...
    def packed_nbytes(self, spec: TensorSpec) -> int: ...
    def pack(self, x: torch.Tensor) -> tuple: ...
    def unpack(self, packed: tuple) -> torch.Tensor: ...


def is_float(spec: TensorSpec) -> bool:
    return spec.dtype in FLOAT_DTYPES


def packed_bytes(packed) -> int:
    """Bytes of every tensor inside a packed (nested tuple) value: what the codec really holds."""
    if isinstance(packed, torch.Tensor):
        return packed.untyped_storage().nbytes()
    if isinstance(packed, (tuple, list)):
        return sum(packed_bytes(p) for p in packed)
    return 0


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """‖x − x̂‖₂ / ‖x‖₂ in float64 (0 when both are zero)."""
    x64, y64 = x.detach().double(), x_hat.detach().double()
    ref = torch.linalg.vector_norm(x64).item()
    diff = torch.linalg.vector_norm(x64 - y64).item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def codec_options(codec) -> tuple[tuple[str, object], ...]:
    """The codec's dataclass fields other than ``epsilon``, as a sorted tuple (JSON-able)."""
    return tuple(sorted((f.name, getattr(codec, f.name)) for f in dataclasses.fields(codec)
                        if f.name != "epsilon"))
