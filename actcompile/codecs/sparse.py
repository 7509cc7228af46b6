"""Sparse codecs: ``threshold`` (keep the largest-|x| entries) and the ``random`` control.

``threshold`` stores a bitmap of kept positions (1 bit per element) and the kept values in the
input dtype: ``n/8 + k·itemsize`` bytes, smaller than dense for any keep fraction below 96.9%
(fp32) or 93.8% (bf16). The published version stores int64 COO indices, 12 bytes per kept fp32
value, and grows memory above a third kept. The keep count comes from ``epsilon`` (as few as
meet it: the dropped entries' energy is exactly the squared error), from ``keep`` (a fraction),
or from ``max_bytes``.

``random`` stores nothing but shape, dtype, device and a seed, and unpacks Gaussian noise from a
private generator: the control that measures everything-but-activations memory. The policy
never picks it unless it is named in ``codecs=`` (it is in neither default set).

>>> import torch
>>> from actcompile.codecs import get_codec
>>> x = torch.randn(64, 1024)
>>> codec = get_codec("threshold", epsilon=0.2)
>>> packed = codec.pack(x)
>>> relative_error(x, codec.unpack(packed)) <= 0.2, packed_bytes(packed) < x.nbytes
(True, True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from actcompile.codecs import register_codec
from actcompile.codecs.base import TensorSpec, VariableRate, is_float, packed_bytes, relative_error  # noqa: F401
from actcompile.codecs.bits import pack_bits, unpack_bits
from actcompile.errors import CodecError


@register_codec
@dataclasses.dataclass(frozen=True)
class RandomCodec:
    """Keeps nothing; unpacks N(0, 1) noise of the right shape (a control, chosen only by name)."""

    name: ClassVar[str] = "random"
    copies: ClassVar[float] = 0   # time, see Codec.copies
    fixed_rate: ClassVar[bool] = True
    epsilon: float | None = None
    seed: int = 0

    def supports(self, spec: TensorSpec) -> bool:
        return is_float(spec)

    def packed_nbytes(self, spec: TensorSpec) -> int:
        return 0

    def pack(self, x: torch.Tensor) -> tuple:
        return (tuple(x.shape), x.dtype, str(x.device))

    def unpack(self, packed: tuple) -> torch.Tensor:
        shape, dtype, device = packed
        generator = torch.Generator(device=device).manual_seed(self.seed)
        return torch.randn(shape, generator=generator, device=device).to(dtype)


def _energy_histogram(magnitude: torch.Tensor, bins: int = 8192) -> tuple[float, torch.Tensor, float]:
    """``(top, cumulative energy per bin, total energy)`` of the finite ``magnitude``: what
    :func:`_cut_threshold` reads, the same at every ε (calibration's ladder builds it once)."""
    finite = magnitude[torch.isfinite(magnitude)]
    top = float(finite.max().item()) if finite.numel() else 0.0
    if top == 0.0:
        return 0.0, magnitude.new_zeros(0, dtype=torch.float64), 0.0
    energy = magnitude.double().square().nan_to_num(posinf=0.0)
    index = (magnitude * ((bins - 1) / top)).clamp(max=bins - 1).long()
    histogram = torch.bincount(index, weights=energy, minlength=bins)
    return top, torch.cumsum(histogram, 0), energy.sum().item()


def _cut_threshold(magnitude: torch.Tensor, epsilon: float, histogram=None) -> float:
    """A ``t`` such that dropping every ``|x| < t`` loses at most ``ε²`` of the energy.

    One pass: an energy-weighted histogram of magnitudes (``bincount``, on any device;
    ``histogram`` if :func:`_energy_histogram` already built it), then the highest bin edge below
    which the energy fits. Conservative by at most one bin, cheaper than sorting millions of values.
    """
    top, cumulative, total = histogram if histogram is not None else _energy_histogram(magnitude)
    if top == 0.0:
        return 0.0
    below = int((cumulative <= (epsilon ** 2) * total).sum().item())    # bins 0 .. below-1 may go
    return below * top / (cumulative.numel() - 1)


@register_codec
@dataclasses.dataclass(frozen=True)
class ThresholdCodec(VariableRate):
    """Keep the largest-magnitude entries; positions as a bitmap, values in the input dtype."""

    name: ClassVar[str] = "threshold"
    copies: ClassVar[float] = 40   # time, see Codec.copies
    fixed_rate: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True   # each value kept or dropped alone: calibrated on any values of a tensor
    keep: float | None = None      # fraction of entries kept, when no epsilon is given (default ε 0.1)

    def __post_init__(self):
        self._validate()
        if self.keep is not None and not (0.0 <= self.keep <= 1.0):
            raise CodecError(f"threshold: keep={self.keep} must be in [0, 1]")

    def supports(self, spec: TensorSpec) -> bool:
        return is_float(spec)

    def _size_option(self):
        return self.keep

    def _max_kept(self, spec: TensorSpec) -> int:
        n = spec.numel
        if self.target_epsilon is None:
            limit = math.ceil(self.keep * n)
        else:
            limit = n
        if self.max_bytes is not None:
            limit = min(limit, max(0, (self.max_bytes - (n + 7) // 8) // spec.dtype.itemsize))
        return limit

    def packed_nbytes(self, spec: TensorSpec) -> int:
        return (spec.numel + 7) // 8 + self._max_kept(spec) * spec.dtype.itemsize

    def pack(self, x: torch.Tensor) -> tuple:
        flat = x.detach().reshape(-1)
        n = flat.numel()
        limit = self._max_kept(TensorSpec.of(x))
        magnitude = flat.float().abs().nan_to_num(nan=math.inf)   # NaN is kept, never hidden
        keep = None
        if self.target_epsilon is not None and n:
            keep = magnitude >= _cut_threshold(magnitude, self.target_epsilon)
            if int(keep.sum()) > limit:
                keep = None
        if keep is None:
            keep = torch.zeros(n, dtype=torch.bool, device=x.device)
            if limit:
                keep[torch.topk(magnitude, limit, sorted=False).indices] = True
        return (pack_bits(keep, 1), flat[keep].clone(), tuple(x.shape))

    def ladder(self, x: torch.Tensor, epsilons) -> list[tuple[float, int]] | None:
        """``(relative error, packed bytes)`` of :meth:`pack` at each of ``epsilons``, without
        packing: the magnitudes' histogram is built once, and each ε's cut, count kept and dropped
        energy read from it and one comparison (the kept values are stored exactly, so the
        dropped energy is the error). ``None`` where pack would not cut by ε alone (a cap, a
        NaN/Inf, an empty tensor).

        >>> from actcompile.codecs import get_codec
        >>> x = torch.randn(64, 1024)
        >>> codec = get_codec("threshold")
        >>> ladder = codec.ladder(x, (0.1, 0.3))
        >>> alone = [codec_at.pack(x) for codec_at in (get_codec("threshold", epsilon=e) for e in (0.1, 0.3))]
        >>> [b for _, b in ladder] == [packed_bytes(p) for p in alone]
        True
        """
        if self.max_bytes is not None or x.numel() == 0:
            return None
        magnitude = x.detach().reshape(-1).float().abs()
        if not bool(torch.isfinite(magnitude).all()):   # pack keeps every NaN/Inf: measured there
            return None
        histogram = _energy_histogram(magnitude)
        total = histogram[2]
        energy = magnitude.double().square()
        measured = []
        for epsilon in epsilons:
            keep = magnitude >= _cut_threshold(magnitude, epsilon, histogram)
            dropped = energy[~keep].sum().item()
            error = math.sqrt(dropped / total) if total > 0 else 0.0
            kept = int(keep.sum().item())
            measured.append((error, (magnitude.numel() + 7) // 8 + kept * x.dtype.itemsize))
        return measured

    def unpack(self, packed: tuple) -> torch.Tensor:
        bits, values, shape = packed
        keep = unpack_bits(bits, 1, math.prod(shape), torch.int32, shape=shape) != 0
        out = torch.zeros(shape, dtype=values.dtype, device=values.device)
        return out.masked_scatter(keep, values)
