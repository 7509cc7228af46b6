"""Transform codecs: blockwise ``dct`` (via torch-dct) and band-limited ``fft_lowpass``.

``dct`` transforms the spatial dims — the last 1, 2 or 3 dims after (N, C); the last dim of a
1-D or 2-D tensor — in ``block``-sized blocks (orthonormal DCT-II, the matrix taken from
torch-dct and applied as matmuls), and keeps per block either the lowest-frequency coefficients
in zigzag order (``select="lowfreq"``, no positions stored) or the largest ones (``"largest"``,
with a 1- or 2-byte position each). The paper this comes from describes 16×16 blocks while its
code transforms only the last axis; this transforms every spatial axis. The count kept per block
comes from ``epsilon`` (orthonormal: dropped energy is exactly the squared error), ``keep`` or
``max_bytes``. Blocks at a border are zero-padded: those coefficients are counted honestly.
An ``epsilon`` that a sample of blocks says needs over 1/2 of every block (3/4 with a 1.5×
margin for the sample's under-count) stores the tensor as it is: exact, at most 2× the DCT's
bytes, at a copy's cost instead of 10-30× (at ε 0.05 the photos of ``benchmarks/codecs.py``
need ~90%: 1.11× smaller at 19-34× a copy). Such an option is no smaller than the tensor, so the
policy never picks it: the policy loses DCTs that were 1.3-2× smaller there, not memory.

``fft_lowpass`` (band-limited storage) takes ``rfft`` over the last two dims at their exact size
(no power-of-2 padding), keeps the low-frequency block ``|f_h| < k_h, f_w < k_w`` chosen by
``epsilon`` or ``compress_rate`` (fraction cut), and stores it as real pairs. Only the saved
tensor is band-limited; the forward is untouched.

>>> import torch
>>> from actcompile.codecs import get_codec
>>> wave = torch.cos(torch.arange(64) * 2 * torch.pi / 64 * 3)
>>> smooth = (wave.outer(wave) + 0.01 * torch.randn(64, 64)).expand(8, 4, 64, 64).contiguous()
>>> for name in ("dct", "fft_lowpass"):
...     codec = get_codec(name, epsilon=0.05)
...     packed = codec.pack(smooth)
...     assert relative_error(smooth, codec.unpack(packed)) <= 0.05
...     assert packed_bytes(packed) * 4 < smooth.nbytes, name
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import ClassVar

import torch

from actcompile.codecs import register_codec
from actcompile.codecs.base import (TensorSpec, VariableRate, energy_cut, is_float, packed_bytes,  # noqa: F401
                                    relative_error, squared_norm)
from actcompile.errors import CodecError


def _spatial_rank(shape: tuple[int, ...]) -> int:
    """How many trailing dims are 'spatial': those after (N, C), at most 3; else the last one."""
    return min(3, len(shape) - 2) if len(shape) >= 3 else 1


@functools.lru_cache(maxsize=None)
def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``M`` with ``dct(x) = x @ M`` along the last dim (from torch-dct)."""
    import torch_dct

    return torch_dct.dct(torch.eye(n, dtype=torch.float64), norm="ortho").float()


@functools.lru_cache(maxsize=None)
def _zigzag_positions(block: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Positions of a block in order of rising total frequency (the zigzag generalised)."""
    return tuple(sorted(itertools.product(*(range(b) for b in block)), key=lambda p: (sum(p), p)))


@functools.lru_cache(maxsize=None)
def _zigzag(block: tuple[int, ...]) -> torch.Tensor:
    """The zigzag positions as flat indices into a block."""
    strides = [math.prod(block[i + 1:]) for i in range(len(block))]
    return torch.tensor([sum(i * s for i, s in zip(p, strides)) for p in _zigzag_positions(block)])


def _zigzag_index(block: tuple[int, ...], m: int, device) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """The first ``m`` zigzag positions as one index tensor per block dim, and the box of
    leading frequencies per dim they reach (at least 1)."""
    positions = _zigzag_positions(block)[:m]
    box = tuple(max([1] + [p[axis] + 1 for p in positions]) for axis in range(len(block)))
    index = tuple(torch.tensor([p[axis] for p in positions], dtype=torch.long, device=device)
                  for axis in range(len(block)))
    return index, box


class _Blocks:
    """Geometry of the block split of one tensor shape."""

    def __init__(self, shape: tuple[int, ...], block: int):
        self.shape = shape
        shape = shape or (1,)
        d = _spatial_rank(shape)
        self.spatial = shape[len(shape) - d:]
        self.lead = math.prod(shape[:len(shape) - d])
        self.block = tuple(max(1, min(block, s)) for s in self.spatial)
        self.grid = tuple(-(-s // b) for s, b in zip(self.spatial, self.block))
        self.count = self.lead * math.prod(self.grid)
        self.size = math.prod(self.block)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` → (blocks, *block), zero-padded at the borders."""
        d = len(self.spatial)
        x = x.reshape(self.lead, *self.spatial)
        pad = []
        for s, b, g in zip(reversed(self.spatial), reversed(self.block), reversed(self.grid)):
            pad += [0, g * b - s]
        x = torch.nn.functional.pad(x, pad)
        x = x.reshape(self.lead, *[v for g, b in zip(self.grid, self.block) for v in (g, b)])
        order = [0] + [1 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
        return x.permute(order).reshape(-1, *self.block)

    def join(self, blocks: torch.Tensor) -> torch.Tensor:
        d = len(self.spatial)
        x = blocks.reshape(self.lead, *self.grid, *self.block)
        order = [0] + [v for i in range(d) for v in (1 + i, 1 + d + i)]
        x = x.permute(order).reshape(self.lead, *[g * b for g, b in zip(self.grid, self.block)])
        x = x[(slice(None), *[slice(0, s) for s in self.spatial])]
        return x.reshape(self.shape)


def _transform(blocks: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Separable DCT of every block along each of its dims."""
    d = blocks.dim() - 1
    for axis in range(1, d + 1):
        m = _dct_matrix(blocks.shape[axis]).to(blocks.device)
        moved = blocks.movedim(axis, -1)
        moved = moved @ (m.T if inverse else m)
        blocks = moved.movedim(-1, axis)
    return blocks


def _grid(x: torch.Tensor, geometry: _Blocks) -> torch.Tensor:
    """``x`` zero-padded to whole blocks, viewed as (lead, g1, b1, …, gd, bd): block dims in place."""
    x = x.reshape(geometry.lead, *geometry.spatial)
    pad = []
    for s, b, g in zip(reversed(geometry.spatial), reversed(geometry.block), reversed(geometry.grid)):
        pad += [0, g * b - s]
    if any(pad):
        x = torch.nn.functional.pad(x, pad)
    return x.reshape(geometry.lead, *[v for g, b in zip(geometry.grid, geometry.block) for v in (g, b)])


def _transform_grid(z: torch.Tensor, block: tuple[int, ...], kept: tuple[int, ...], inverse: bool) -> torch.Tensor:
    """The separable DCT of every block of a grid view (:func:`_grid`), computed where the block
    dims lie: one matmul per axis over the whole grid, no permute to contiguous blocks and back.

    Forward, axis ``i`` of each block keeps its first ``kept[i]`` coefficients (``x @ M[:, :k]``);
    inverse, ``z`` holds only those and each axis is expanded back to ``block[i]`` (``M[:, :k] @ c``),
    so an unpack that keeps few coefficients costs few multiplies.
    """
    for axis in reversed(range(len(block))):
        position = 2 + 2 * axis
        basis = _dct_matrix(block[axis])[:, :kept[axis]].to(z.device)   # (block, kept)
        if position == z.dim() - 1:
            z = z @ (basis.T if inverse else basis)
        else:
            shape = list(z.shape)
            outer, inner = math.prod(shape[:position]), math.prod(shape[position + 1:])
            matrix = basis if inverse else basis.T
            shape[position] = matrix.shape[0]
            z = (matrix @ z.reshape(outer, matrix.shape[1], inner)).reshape(shape)
    return z


def _blocks_view(z: torch.Tensor) -> torch.Tensor:
    """A grid (lead, g1, k1, …, gd, kd) seen as (lead, g1, …, gd, k1, …, kd), without a copy."""
    d = (z.dim() - 1) // 2
    return z.permute(0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2))


RAW_ABOVE = 3 / 4   # an ε needing this share of every block's coefficients: the tensor is stored as it is
# A sample of 16 slices under-counts: conv1 of benchmarks/codecs.py at ε 0.05 needs 0.87 of each
# block where its sample says 0.6 (its channels differ more than the sampled ones).
SAMPLE_MARGIN = 1.5


@register_codec
@dataclasses.dataclass(frozen=True)
class DCTCodec(VariableRate):
    """Blockwise orthonormal DCT of the spatial dims, keeping low-frequency or largest coefficients."""

    name: ClassVar[str] = "dct"
    copies: ClassVar[float] = 3   # time, see Codec.copies
    fixed_rate: ClassVar[bool] = False
    block: int = 16
    select: str = "lowfreq"        # or "largest"
    keep: float | None = None      # fraction of each block kept, when no epsilon is given

    def __post_init__(self):
        self._validate()
        if self.select not in ("lowfreq", "largest"):
            raise CodecError(f"dct: select={self.select!r}; accepted are 'lowfreq', 'largest'")
        if self.block < 1:
            raise CodecError(f"dct: block={self.block} must be >= 1")
        if self.keep is not None and not (0.0 <= self.keep <= 1.0):
            raise CodecError(f"dct: keep={self.keep} must be in [0, 1]")

    def _size_option(self):
        return self.keep

    def supports(self, spec: TensorSpec) -> bool:
        return is_float(spec)

    def _per_value(self, geometry: _Blocks, dtype: torch.dtype) -> int:
        index = 0 if self.select == "lowfreq" else (1 if geometry.size <= 256 else 2)
        return dtype.itemsize + index

    def _limit(self, geometry: _Blocks, dtype: torch.dtype) -> int:
        limit = geometry.size if self.target_epsilon is not None else math.ceil(self.keep * geometry.size)
        if self.max_bytes is not None and geometry.count:
            limit = min(limit, self.max_bytes // (geometry.count * self._per_value(geometry, dtype)))
        return limit

    def packed_nbytes(self, spec: TensorSpec) -> int:
        geometry = _Blocks(spec.shape, self.block)
        return geometry.count * self._limit(geometry, spec.dtype) * self._per_value(geometry, spec.dtype)

    def pack(self, x: torch.Tensor) -> tuple:
        geometry = _Blocks(tuple(x.shape), self.block)
        if x.numel() == 0:
            return (x.new_zeros(0), tuple(x.shape), self.block, 0)
        limit = self._limit(geometry, x.dtype)
        if self.select == "lowfreq":
            return self._pack_lowfreq(x, geometry, limit)
        coef = _transform(geometry.split(x.detach().float()), inverse=False).reshape(geometry.count, -1)
        energy = coef.square()
        ranked = torch.sort(energy, dim=1, descending=True)
        m = limit
        if self.target_epsilon is not None:
            m = min(limit, energy_cut(ranked.values.sum(0), energy.sum().item(), self.target_epsilon))
        index = ranked.indices[:, :m]
        index_dtype = torch.uint8 if geometry.size <= 256 else torch.int16
        return (coef.gather(1, index).to(x.dtype).contiguous(), index.to(index_dtype), tuple(x.shape), self.block, m)

    def _pack_lowfreq(self, x: torch.Tensor, geometry: _Blocks, limit: int) -> tuple:
        """The first ``m`` zigzag coefficients of every block, (blocks, m); only the box of
        frequencies they span is computed (:func:`_transform_grid`)."""
        grid = _grid(x.detach().float(), geometry)
        m = limit if self.target_epsilon is None else None
        values = None
        if m is None:   # guess m from a sample of blocks, check it on all, double it until it holds
            estimate = SAMPLE_MARGIN * self._sampled_cut(grid, geometry)
            if estimate >= RAW_ABOVE * geometry.size and (self.max_bytes is None or x.nbytes <= self.max_bytes):
                # ε needs nearly every coefficient: at most 1/4 fewer bytes for 10-30× a copy's time
                return (x.detach().contiguous().clone(), tuple(x.shape), self.block, None)
            total = squared_norm(grid)
            allowed = self.target_epsilon ** 2 * total
            guess = min(limit, geometry.size, math.ceil(estimate) + 4)
            while True:
                values = self._lowfreq_values(grid, geometry, guess)
                # float64 accumulation down the blocks, for the drift squared_norm avoids
                kept = values.square().sum(0, dtype=torch.float64)
                cut = energy_cut(kept, total, self.target_epsilon)
                if total - float(kept[:cut].sum()) <= allowed or guess == limit:
                    m = min(cut, guess)   # the m every coefficient's energy gives
                    break
                guess = min(limit, 2 * guess)
        if values is None:
            values = self._lowfreq_values(grid, geometry, m)
        values = values[:, :m]
        return (values.to(x.dtype).contiguous(), tuple(x.shape), self.block, m)

    def _sampled_cut(self, grid: torch.Tensor, geometry: _Blocks, slices: int = 16) -> int:
        """ε's coefficient count on about ``slices`` (N, C) slices."""
        sample = grid[::max(1, geometry.lead // slices)]
        coef = _transform_grid(sample, geometry.block, geometry.block, inverse=False)
        d = len(geometry.block)
        energy = _blocks_view(coef).square().sum(dim=tuple(range(1 + d))).reshape(-1)[_zigzag(geometry.block)]
        return energy_cut(energy, energy.sum().item(), self.target_epsilon)

    @staticmethod
    def _lowfreq_values(grid: torch.Tensor, geometry: _Blocks, m: int) -> torch.Tensor:
        index, box = _zigzag_index(geometry.block, m, grid.device)
        coef = _transform_grid(grid, geometry.block, box, inverse=False)
        return _blocks_view(coef)[(Ellipsis, *index)].reshape(geometry.count, m)

    def unpack(self, packed: tuple) -> torch.Tensor:
        if self.select == "lowfreq" or len(packed) == 4:
            return self._unpack_lowfreq(*packed)
        values, index, shape, block, m = packed
        geometry = _Blocks(shape, block)
        if math.prod(shape) == 0:
            return values.reshape(shape)
        coef = torch.zeros(geometry.count, geometry.size, device=values.device)
        coef.scatter_(1, index.long(), values.float())
        blocks = _transform(coef.reshape(-1, *geometry.block), inverse=True)
        return geometry.join(blocks).to(values.dtype)

    @staticmethod
    def _unpack_lowfreq(values: torch.Tensor, shape: tuple, block: int, m: int | None) -> torch.Tensor:
        geometry = _Blocks(shape, block)
        if m is None:   # stored as it was (see RAW_ABOVE)
            return values
        if math.prod(shape) == 0:
            return values.reshape(shape)
        index, box = _zigzag_index(geometry.block, m, values.device)
        grid = torch.zeros(geometry.lead, *[v for g, k in zip(geometry.grid, box) for v in (g, k)],
                           device=values.device)
        _blocks_view(grid)[(Ellipsis, *index)] = values.float().reshape(geometry.lead, *geometry.grid, m)
        x = _transform_grid(grid, geometry.block, box, inverse=True)
        x = x.reshape(geometry.lead, *[g * b for g, b in zip(geometry.grid, geometry.block)])
        x = x[(slice(None), *[slice(0, s) for s in geometry.spatial])]
        return x.reshape(shape).to(values.dtype)


def _rfft_weights(width: int, device) -> torch.Tensor:
    """Parseval weights of rfft columns: interior frequencies stand for two (±f)."""
    half = width // 2 + 1
    w = torch.full((half,), 2.0, device=device)
    w[0] = 1.0
    if width % 2 == 0:
        w[-1] = 1.0
    return w


def _spectral_energy(spectrum: torch.Tensor, width: int) -> torch.Tensor:
    """``(h, width//2 + 1)``: the energy at each frequency of a ``(lead, h, width//2 + 1)``
    orthonormal ``rfft2``, summed over ``lead`` (its sum is ``‖x‖²``, Parseval)."""
    return (spectrum.abs().square() * _rfft_weights(width, spectrum.device)).sum(0)


def _kept_table(energy: torch.Tensor) -> torch.Tensor:
    """``table[kh - 1, kw - 1]``: the energy :class:`FFTLowpassCodec` keeps with the block
    ``kh, kw`` (rows ``|f_h| < kh``, columns ``f_w < kw``) of the ``(h, w//2 + 1)`` ``energy``,
    in float64: row ``r`` is frequency ``min(r, h − r)``, so the rows folded onto it and summed
    both ways make every block one lookup (the bisection over the block's scale read a sum of
    indexed rows 20 times per ε)."""
    h = energy.shape[0]
    rows = torch.arange(h, device=energy.device)
    folded = energy.new_zeros(h // 2 + 1, energy.shape[1], dtype=torch.float64)
    folded.index_add_(0, torch.minimum(rows, h - rows), energy.double())
    return folded.cumsum(0).cumsum(1)


@register_codec
@dataclasses.dataclass(frozen=True)
class FFTLowpassCodec(VariableRate):
    """Keep a low-frequency block of the exact-size ``rfft`` over the last two dims."""

    name: ClassVar[str] = "fft_lowpass"
    copies: ClassVar[float] = 15   # time, see Codec.copies
    fixed_rate: ClassVar[bool] = False
    compress_rate: float | None = None   # fraction of the spectrum cut, when no epsilon is given

    def __post_init__(self):
        self._validate()
        if self.compress_rate is not None and not (0.0 <= self.compress_rate < 1.0):
            raise CodecError(f"fft_lowpass: compress_rate={self.compress_rate} must be in [0, 1)")

    def _size_option(self):
        return self.compress_rate

    def supports(self, spec: TensorSpec) -> bool:
        return is_float(spec)

    @staticmethod
    def _dims(shape):
        shape = shape or (1,)
        return (shape[-2] if len(shape) >= 2 else 1), shape[-1], math.prod(shape) // max(1, shape[-1] * (shape[-2] if len(shape) >= 2 else 1))

    @staticmethod
    def _block(h: int, w: int, scale: float) -> tuple[int, int]:
        """Rows ``|f_h| < kh`` and columns ``f_w < kw`` kept at ``scale`` of the full band."""
        kh_max, kw_max = h // 2 + 1, w // 2 + 1
        return (max(1, min(kh_max, math.ceil(scale * kh_max))), max(1, min(kw_max, math.ceil(scale * kw_max))))

    @staticmethod
    def _rows(h: int, kh: int) -> list[int]:
        rows = list(range(kh)) + list(range(h - kh + 1, h))
        return sorted(set(r for r in rows if 0 <= r < h))

    def _bytes(self, lead: int, h: int, kh: int, kw: int, itemsize: int) -> int:
        return lead * len(self._rows(h, kh)) * kw * 2 * itemsize

    def packed_nbytes(self, spec: TensorSpec) -> int:
        h, w, lead = self._dims(spec.shape)
        scale = 1.0 if self.target_epsilon is not None else math.sqrt(1.0 - self.compress_rate)
        kh, kw = self._block(h, w, scale)
        return self._capped(self._bytes(lead, h, kh, kw, spec.dtype.itemsize))

    def pack(self, x: torch.Tensor) -> tuple:
        h, w, lead = self._dims(tuple(x.shape))
        if x.numel() == 0:
            return (x.new_zeros(0), tuple(x.shape), 0, 0)
        spectrum = torch.fft.rfft2(x.detach().float().reshape(lead, h, w), norm="ortho")
        itemsize = x.dtype.itemsize

        def fits(kh, kw):
            return self.max_bytes is None or self._bytes(lead, h, kh, kw, itemsize) <= self.max_bytes

        if self.target_epsilon is None:
            kh, kw = self._block(h, w, math.sqrt(1.0 - self.compress_rate))
        else:
            kh, kw = self._band(_spectral_energy(spectrum, w), w, self.target_epsilon)[:2]
        while not fits(kh, kw) and (kh > 1 or kw > 1):                     # honour the byte cap
            kh, kw = max(1, kh - (kh >= kw)), max(1, kw - (kw > kh))
        if not fits(kh, kw):
            return (x.new_zeros(0), tuple(x.shape), 0, 0)
        kept = torch.view_as_real(spectrum[:, self._rows(h, kh)][:, :, :kw]).to(x.dtype).contiguous()
        if kept.untyped_storage().nbytes() > kept.nbytes:   # a contiguous slice (one row) would hold the whole spectrum
            kept = kept.clone()
        return (kept, tuple(x.shape), kh, kw)

    def _band(self, energy: torch.Tensor, w: int, epsilon: float) -> tuple[int, int, float]:
        """``(kh, kw, energy dropped ÷ total)``: the smallest block of the ``(h, w//2 + 1)``
        spectral ``energy`` of a width-``w`` map (:func:`_spectral_energy`) that keeps all but
        ``ε²`` of it."""
        return self._band_of(_kept_table(energy), energy.shape[0], w, epsilon)

    def _band_of(self, table: torch.Tensor, h: int, w: int, epsilon: float) -> tuple[int, int, float]:
        """:meth:`_band` from the :func:`_kept_table` of the energy (the same at every ε): the
        bisection reads ~20 of its entries."""
        total = table[-1, -1].item()

        def kept(kh, kw):
            return table[kh - 1, kw - 1].item()

        allowed = (epsilon ** 2) * total
        lo, hi = 0.0, 1.0                                                  # bisect the scale
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if total - kept(*self._block(h, w, mid)) <= allowed else (mid, hi)
        kh, kw = self._block(h, w, hi)
        return kh, kw, (max(total - kept(kh, kw), 0.0) / total if total > 0 else 0.0)

    def ladder(self, x: torch.Tensor, epsilons) -> list[tuple[float, int]] | None:
        """``(relative error, packed bytes)`` of :meth:`pack` at each of ``epsilons`` from one
        transform and no inverse: the orthonormal ``rfft2`` keeps energy (Parseval), and the kept
        block is a whole Hermitian half-spectrum, so the dropped energy is the squared error.
        ``None`` where pack would not cut by ε alone (a cap, NaN/Inf, an empty tensor).

        >>> from actcompile.codecs import get_codec
        >>> x = torch.randn(4, 3, 32, 32).cumsum(-1)
        >>> codec = get_codec("fft_lowpass")
        >>> (err, nbytes), = codec.ladder(x, (0.2,))
        >>> packed = get_codec("fft_lowpass", epsilon=0.2).pack(x)
        >>> abs(err - relative_error(x, codec.unpack(packed))) < 1e-5, nbytes == packed_bytes(packed)
        (True, True)
        """
        if self.max_bytes is not None or x.numel() == 0:
            return None
        h, w, lead = self._dims(tuple(x.shape))
        spectrum = torch.fft.rfft2(x.detach().float().reshape(lead, h, w), norm="ortho")
        energy = _spectral_energy(spectrum, w)
        if not bool(torch.isfinite(energy).all()):
            return None
        table = _kept_table(energy)
        measured = []
        for epsilon in epsilons:
            kh, kw, dropped = self._band_of(table, h, w, epsilon)
            measured.append((math.sqrt(dropped), self._bytes(lead, h, kh, kw, x.dtype.itemsize)))
        return measured

    def unpack(self, packed: tuple) -> torch.Tensor:
        values, shape, kh, kw = packed
        shape = tuple(shape)
        h, w, lead = self._dims(shape)
        if math.prod(shape) == 0 or kh == 0:
            return torch.zeros(shape, dtype=values.dtype, device=values.device)
        spectrum = torch.zeros(lead, h, w // 2 + 1, dtype=torch.complex64, device=values.device)
        rows = torch.tensor(self._rows(h, kh), device=values.device)
        spectrum[:, rows, :kw] = torch.view_as_complex(values.float().contiguous())
        out = torch.fft.irfft2(spectrum, s=(h, w), norm="ortho")
        return out.reshape(shape).to(values.dtype)
