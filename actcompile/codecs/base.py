"""The codec protocol: how one saved tensor is packed for backward and restored.

A codec is a frozen dataclass. ``packed_nbytes`` is arithmetic on a :class:`TensorSpec` (so a
plan can be made on FakeTensors); ``pack`` returns a plain nested tuple of fresh tensors and
Python constants (AOTAutograd's hook inlining rejects NamedTuples, and a view would keep the
whole intermediate alive); ``unpack`` inverts it with the original shape and dtype.

A codec with ``sign_exact = True`` keeps every zero and every sign exactly; only those are
offered for tensors a ReLU-like backward reads (see ``actcompile.passes.rules``): a smooth
reconstruction that turns exact zeros into ±tiny values would open or close ReLU's gradient
mask and wreck the gradient (measured: DCT at ε = 0.01 on every ResNet-18 activation, gradient
error 280%).

Non-finite input never crashes a codec and never disappears from what backward reads: the
quantizers turn the group holding a NaN/Inf into NaN; ``threshold`` keeps NaN/Inf entries (they
rank largest); ``dct``, ``fft_lowpass`` and ``wavelet`` spread them over their block, the whole
tensor, or the coefficients they touch; ``svd`` and ``hosvd`` unpack all-NaN; ``none`` keeps them.
``mask`` keeps only whether ``lo < x < hi`` (NaN is outside), which is all its backward reads, and
``random`` ignores its input. ``tests/test_codecs.py`` holds each codec to this.

Tracing (``make_fx``, the compile path): fixed-rate codecs trace as they are; variable-rate
codecs trace when given their fixed-size option (``keep``, ``rank``, ``ranks``,
``compress_rate``), while in ``epsilon`` mode their pack reads data to choose a size (``.item()``)
and cannot be traced. ``random`` creates its generator at unpack: a traced unpack would replay
different noise.

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
    # Optional, ``copies: ClassVar[float]``: pack + unpack time, eager, in copies of the tensor
    # (benchmarks/results/codecs.md run 4, 70 MB maps), the policy's price of the codec's time
    # (passes/policy.py _codec_seconds); a codec without it is priced as a quantizer (12).
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


def strided_sample(x: torch.Tensor, values: int, kept_dims: int = 1) -> torch.Tensor:
    """A view of evenly spaced slices of ``x``'s leading dims (all but the last ``kept_dims``),
    about ``values`` elements, spread over every leading dim (one image's statistics are not the
    batch's); ``x`` itself if it is under twice that or has no leading dims.

    >>> strided_sample(torch.zeros(64, 1000), 4096).shape
    torch.Size([4, 1000])
    """
    wanted = x.numel() / values
    leading = x.dim() - kept_dims
    if wanted < 2 or leading < 1:
        return x
    index = [slice(None)] * x.dim()
    for dim in range(leading):
        step = min(x.shape[dim], max(1, round(wanted ** (1 / (leading - dim)))))
        index[dim] = slice(None, None, step)
        wanted /= step
    return x[tuple(index)]


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """‖x − x̂‖₂ / ‖x‖₂ in float64 (0 when both are zero)."""
    x64, y64 = x.detach().double(), x_hat.detach().double()
    ref = torch.linalg.vector_norm(x64).item()
    diff = torch.linalg.vector_norm(x64 - y64).item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


@dataclasses.dataclass(frozen=True)
class VariableRate:
    """Fields shared by variable-rate codecs: the error target and an optional byte cap.

    ``epsilon`` bounds the relative L2 error (the codec keeps as little as meets it);
    ``max_bytes`` caps what one packed tensor may hold: the codec then keeps what fits and its
    error is whatever that reaches. ``packed_nbytes`` is the cap, or the worst case without one.
    """

    epsilon: float | None = None
    max_bytes: int | None = None

    DEFAULT_EPSILON: ClassVar[float] = 0.1
    # Error and bytes per value are the same on evenly spaced slices of the leading dims (each
    # slice is coded alike: blocks, per-image transforms, elementwise): calibration may measure
    # a sample (passes/calibrate.py). Not so for low rank, whose batch mode is part of the code.
    calibrates_on_slices: ClassVar[bool] = True
    # In the default set, but checked: calibration measures a transform's relative error, which
    # reaches the gradient unlike quantization noise (a band, a rank, the largest values kept);
    # a plan that takes one is kept only if one probe backward shows it moves the gradient no
    # more than the plan without them (actcompile/api.py _measured_choice).
    default_enabled: ClassVar[bool] = True
    gradient_checked: ClassVar[bool] = True

    def _size_option(self):
        """The codec's own fixed-size option (a keep fraction, a rank), or None."""
        return None

    @property
    def target_epsilon(self) -> float | None:
        """``epsilon``; else None if a size option is given; else ``DEFAULT_EPSILON``."""
        if self.epsilon is not None:
            return self.epsilon
        return None if self._size_option() is not None else self.DEFAULT_EPSILON

    def _validate(self) -> None:
        from actcompile.errors import CodecError

        if self.epsilon is not None and not (0.0 < self.epsilon < 1.0):
            raise CodecError(f"{self.name}: epsilon={self.epsilon} must be in (0, 1)")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise CodecError(f"{self.name}: max_bytes={self.max_bytes} must be >= 0")

    def _capped(self, worst_case: int) -> int:
        return worst_case if self.max_bytes is None else min(worst_case, self.max_bytes)


def energy_cut(ordered_energy: torch.Tensor, total: float, epsilon: float) -> int:
    """How many leading terms of ``ordered_energy`` (squared magnitudes, in the order they would
    be kept) to keep so that the dropped energy is at most ``epsilon² · total``: for an
    orthonormal representation that is exactly the relative L2 error bound."""
    if total <= 0 or ordered_energy.numel() == 0:
        return 0
    tail = total - torch.cumsum(ordered_energy.double(), 0)          # energy dropped if k = i + 1
    allowed = (epsilon ** 2) * total
    ok = torch.nonzero(tail <= allowed)
    return int(ok[0].item()) + 1 if ok.numel() else ordered_energy.numel()


def squared_norm(x: torch.Tensor) -> float:
    """``Σ x²`` to ~1e-9 relative, at about a copy's cost: BLAS dots of 64K-value chunks, summed
    in float64. A single float32 dot or sum down 17M values can drift by 1e-3 relative, past the
    ε² = 1e-4 an ε-mode codec compares against; casting to float64 first costs 3× as much.

    >>> squared_norm(torch.full((1000,), 2.0))
    4000.0
    """
    flat = x.detach().reshape(-1).float()
    return math.fsum(float(torch.dot(chunk, chunk)) for chunk in flat.split(1 << 16))


def unit_roundoff(dtype: torch.dtype) -> float:
    """Relative rounding error of one value of ``dtype`` (what casting a result back adds)."""
    return torch.finfo(dtype).eps / 2


def codec_options(codec) -> tuple[tuple[str, object], ...]:
    """The codec's dataclass fields other than ``epsilon``, as a sorted tuple (JSON-able)."""
    return tuple(sorted((f.name, getattr(codec, f.name)) for f in dataclasses.fields(codec)
                        if f.name != "epsilon"))
