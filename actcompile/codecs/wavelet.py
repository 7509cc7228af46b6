"""``wavelet``: multi-level 2-D DWT (pytorch_wavelets), keeping the largest coefficients.

Defaults follow the paper this comes from: Daubechies-3, 3 levels, zero padding (``wave``,
``levels`` and ``mode`` are options). The last two dims are the image; a small map's DWT has
*more* coefficients than the map has elements (zero padding adds ``filter − 1`` per level), and
they are counted. Coefficients of all bands are kept largest-first down to ``epsilon`` (or a
``keep`` fraction, or ``max_bytes``), stored as a bitmap plus values (see ``threshold``). With
``mode="zero"`` the transform keeps energy, so the dropped coefficients' energy bounds the error (see
:data:`ISOMETRIC_MODES`); with the other extensions the error is measured after reconstruction
and the cut is tightened until it meets ``epsilon``.

pytorch_wavelets 1.3.0 imports ``pkg_resources`` (gone from setuptools ≥ 81) for one function
and does not declare PyWavelets: :func:`_wavelets` supplies that function for the import, then
takes the shim away again, so no setuptools downgrade is needed.

>>> import torch
>>> from actcompile.codecs import get_codec
>>> wave = torch.cos(torch.arange(64) * 2 * torch.pi / 64 * 3)
>>> smooth = (wave.outer(wave) + 0.01 * torch.randn(64, 64)).expand(8, 4, 64, 64).contiguous()
>>> codec = get_codec("wavelet", epsilon=0.05)
>>> packed = codec.pack(smooth)
>>> relative_error(smooth, codec.unpack(packed)) <= 0.05, packed_bytes(packed) * 4 < smooth.nbytes
(True, True)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import sys
import types
from typing import ClassVar

import torch

from actcompile.codecs import register_codec
from actcompile.codecs.base import TensorSpec, VariableRate, is_float, packed_bytes, relative_error  # noqa: F401
from actcompile.codecs.sparse import ThresholdCodec
from actcompile.errors import CodecError


@functools.lru_cache(maxsize=None)
def _wavelets():
    """``(pytorch_wavelets, pywt)``, importable on any setuptools; a clear error if missing."""
    try:
        import pywt
    except ImportError as err:
        raise CodecError("the wavelet codec needs PyWavelets: pip install PyWavelets") from err
    shimmed = False
    try:
        import pkg_resources  # noqa: F401
    except ImportError:   # setuptools >= 81: provide the one function pytorch_wavelets imports
        shim = types.ModuleType("pkg_resources")
        shim.resource_stream = lambda package, name: importlib.resources.files(package).joinpath(name).open("rb")
        sys.modules["pkg_resources"] = shim
        shimmed = True
    try:
        import pytorch_wavelets
    except ImportError as err:
        raise CodecError("the wavelet codec needs pytorch_wavelets: pip install pytorch-wavelets") from err
    finally:
        if shimmed:
            del sys.modules["pkg_resources"]
    return pytorch_wavelets, pywt


# Modes whose DWT keeps energy (an orthogonal wavelet with zero padding is a tight frame:
# ‖coefficients‖ = ‖x‖ to 1e-7 on 56², 28², 7² and 13×17 maps; fp32, bf16 and fp16 alike): the
# inverse of the kept coefficients is then at most as far from x as they are from all of them,
# so a cut at ε meets ε without reconstructing (measured: the real error 0.5-0.93× the
# coefficients' at ε 0.01-0.45). pytorch_wavelets' periodization does not keep energy at every
# size (16×24: 0.9995; 8×8: 0.976, 27% error with every coefficient kept), nor do the other
# extensions: pack checks and tightens there.
ISOMETRIC_MODES = ("zero",)


@functools.lru_cache(maxsize=32)
def _transform_pair(wave: str, levels: int, mode: str, device: str):
    """Forward and inverse DWT modules (their filter banks are built once per configuration)."""
    pytorch_wavelets = _wavelets()[0]
    forward = pytorch_wavelets.DWTForward(J=levels, wave=wave, mode=mode).to(device)
    inverse = pytorch_wavelets.DWTInverse(wave=wave, mode=mode).to(device)
    return forward, inverse


@register_codec
@dataclasses.dataclass(frozen=True)
class WaveletCodec(VariableRate):
    """Multi-level 2-D DWT of the last two dims; the largest coefficients of every band kept."""

    name: ClassVar[str] = "wavelet"
    copies: ClassVar[float] = 90   # time, see Codec.copies
    fixed_rate: ClassVar[bool] = False
    wave: str = "db3"
    levels: int = 3
    mode: str = "zero"
    keep: float | None = None      # fraction of coefficients kept, when no epsilon is given

    def __post_init__(self):
        self._validate()
        if self.levels < 1:
            raise CodecError(f"wavelet: levels={self.levels} must be >= 1")
        if self.mode not in ("zero", "symmetric", "periodization", "reflect", "periodic"):
            raise CodecError(f"wavelet: mode={self.mode!r}; accepted are zero, symmetric, periodization, "
                             "reflect, periodic")
        if self.keep is not None and not (0.0 <= self.keep <= 1.0):
            raise CodecError(f"wavelet: keep={self.keep} must be in [0, 1]")

    def _size_option(self):
        return self.keep

    def supports(self, spec: TensorSpec) -> bool:
        """Images only: both of the last two dims at least 2^levels (pack itself takes any shape)."""
        side = 2 ** self.levels
        return is_float(spec) and len(spec.shape) >= 2 and min(spec.shape[-2:]) >= side

    @staticmethod
    def _image(shape) -> tuple[int, int, int]:
        """``(lead, height, width)``: the last two dims as the image, everything before as batch."""
        shape = tuple(shape) or (1,)
        h, w = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[-1])
        return math.prod(shape) // max(1, h * w), h, w

    def _padded(self, h: int, w: int) -> tuple[int, int]:
        """pytorch_wavelets' periodization inverts exactly only for sizes divisible by 2^levels."""
        if self.mode != "periodization":
            return h, w
        step = 2 ** self.levels
        return -(-h // step) * step, -(-w // step) * step

    def _coefficients(self, h: int, w: int) -> int:
        pywt = _wavelets()[1]
        h, w = self._padded(h, w)
        length = pywt.Wavelet(self.wave).dec_len
        total = 0
        for _ in range(self.levels):
            h, w = pywt.dwt_coeff_len(h, length, self.mode), pywt.dwt_coeff_len(w, length, self.mode)
            total += 3 * h * w
        return total + h * w

    def _inner(self, count: int, epsilon) -> ThresholdCodec:
        keep = None if epsilon is not None else self.keep
        return ThresholdCodec(epsilon=epsilon, max_bytes=self.max_bytes, keep=keep)

    def packed_nbytes(self, spec: TensorSpec) -> int:
        lead, h, w = self._image(spec.shape)
        count = lead * self._coefficients(h, w) if spec.numel else 0
        return self._inner(count, self.target_epsilon).packed_nbytes(TensorSpec((count,), spec.dtype))

    def _transforms(self, device):
        return _transform_pair(self.wave, self.levels, self.mode, str(device))

    def _transform(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """``(every band's coefficients, flat, in x's dtype; the bands' shapes)``."""
        lead, h, w = self._image(x.shape)
        forward, _ = self._transforms(x.device)
        ph, pw = self._padded(h, w)
        image = torch.nn.functional.pad(x.detach().float().reshape(lead, 1, h, w), (0, pw - w, 0, ph - h))
        low, highs = forward(image)
        shapes = (tuple(low.shape), *(tuple(band.shape) for band in highs))
        return torch.cat([low.reshape(-1)] + [band.reshape(-1) for band in highs]).to(x.dtype), shapes

    def _cut(self, x: torch.Tensor, flat: torch.Tensor, shapes: tuple) -> tuple[tuple, float | None]:
        """``(packed, its relative error on x if measured)``: the coefficients ``flat`` of ``x``
        kept down to ``epsilon`` (or ``keep``, ``max_bytes``)."""
        epsilon = self.target_epsilon
        packed = (self._inner(flat.numel(), epsilon).pack(flat), shapes, tuple(x.shape))
        if epsilon is None or self.max_bytes is not None or self.mode in ISOMETRIC_MODES:
            return packed, None
        for _ in range(6):   # the extension adds energy: tighten the cut until the real error meets ε
            error = relative_error(x, self.unpack(packed))
            if error <= self.target_epsilon:
                return packed, error
            if not math.isfinite(error):   # NaN/Inf in the input: keep every coefficient, NaN shows
                break
            epsilon *= 0.8 * self.target_epsilon / error
            packed = (self._inner(flat.numel(), epsilon).pack(flat), shapes, tuple(x.shape))
        return (ThresholdCodec(keep=1.0).pack(flat), shapes, tuple(x.shape)), None

    def pack(self, x: torch.Tensor) -> tuple:
        if x.numel() == 0:
            return (ThresholdCodec(keep=0.0).pack(x.reshape(-1)), (), tuple(x.shape))
        return self._cut(x, *self._transform(x))[0]

    def ladder(self, x: torch.Tensor, epsilons) -> list[tuple[float, int]] | None:
        """``(relative error, packed bytes)`` on ``x`` at each of ``epsilons``, from one transform
        (calibration tries every ε of the ladder: four transforms and eight inverses became one
        and none, the cuts read from one histogram of the coefficients). ``None`` where :meth:`pack` would not cut by ε alone (a cap, an empty tensor).

        >>> import torch
        >>> from actcompile.codecs import get_codec
        >>> x = torch.randn(2, 3, 32, 32)
        >>> loose, tight = get_codec("wavelet").ladder(x, (0.3, 0.05))
        >>> loose[0] <= 0.3 and tight[0] <= 0.05 and loose[1] < tight[1]
        True
        """
        if self.max_bytes is not None or x.numel() == 0:
            return None
        flat, shapes = self._transform(x)
        if self.mode in ISOMETRIC_MODES:   # the coefficients' error bounds it: no cut, no inverse
            shared = ThresholdCodec().ladder(flat, epsilons)
            if shared is not None:
                return shared
        measured = []
        for epsilon in epsilons:
            packed, error = dataclasses.replace(self, epsilon=epsilon)._cut(x, flat, shapes)
            if error is None and self.mode in ISOMETRIC_MODES:   # the coefficients' error bounds it: no inverse
                error = relative_error(flat, ThresholdCodec().unpack(packed[0]))
            elif error is None:
                error = relative_error(x, self.unpack(packed))
            measured.append((error, packed_bytes(packed)))
        return measured

    def unpack(self, packed: tuple) -> torch.Tensor:
        coefficients, shapes, shape = packed
        flat = ThresholdCodec().unpack(coefficients)
        if not shapes:
            return flat.reshape(shape)
        lead, h, w = self._image(shape)
        _, inverse = self._transforms(flat.device)
        pieces, start = [], 0
        for s in shapes:
            n = math.prod(s)
            pieces.append(flat[start:start + n].float().reshape(s))
            start += n
        image = inverse((pieces[0], pieces[1:]))[..., :h, :w]
        return image.reshape(shape).to(flat.dtype)
