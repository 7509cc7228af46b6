"""Measure, on the real example inputs, the error each candidate codec makes on each saved tensor.

The policy's error model is measured, not guessed from a codec's nominal ε: the graph runs
forward once on the real inputs (buffers and RNG restored afterwards), and each candidate
saved tensor is packed and unpacked by every codec the policy may choose for it, right when
autograd saves it; the tensor is then dropped, so calibration holds no activations either.
It also checks that the real forward saves what the (fake) profile predicted.

Codecs that code every slice of a tensor's leading dims alike (the group quantizers, DCT blocks,
per-image wavelet and FFT, thresholding; ``calibrates_on_slices``) are measured on evenly spaced
slices (:func:`representative_sample`, about :data:`SAMPLE_VALUES` values; tiles of a matrix
with too few leading slices; runs of the values for ``threshold``): a fixed-rate codec's
bytes are then exact from its arithmetic, a variable-rate codec's scaled to the whole tensor.
The low-rank codecs, whose rank across the batch a sample of slices would not show, predict
their error and bytes from Gram matrices of sampled fibres (``estimate``) on large tensors, and
from exact eigenvalues elsewhere.
On ResNet-50 (batch 32, 224²) the eager quantizers on whole tensors took 25 s each, and the
transforms cost 10-100× a copy per ε on the ladder. The plan caps each variable-rate codec at
the bytes it planned (``max_bytes``), so an estimate that is off costs error, never memory; the
drift checks measure that error in training.

>>> import torch
>>> from actcompile.codecs import get_codec
>>> from actcompile.passes.capture import capture_graphs
>>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))
>>> (graph,) = capture_graphs(model, torch.randn(64, 256))
>>> result = calibrate(graph, {("input_2", 0): [get_codec("int8")]})
>>> err, nbytes = result[("input_2", 0)][0][1:]
>>> err < 0.01, nbytes
(True, 16896)
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.fx

from actcompile.codecs.base import TensorSpec, packed_bytes, relative_error, strided_sample
from actcompile.errors import ActCompileError, PlanDriftWarning
from actcompile.runtime import packable_view
from actcompile.passes.capture import CapturedGraph
from actcompile.passes.memory import record_saves

Key = tuple[str, int]
SAMPLE_VALUES = 1 << 16   # about this many values of a tensor calibrate a codec that codes its slices alike


def representative_sample(x: torch.Tensor) -> torch.Tensor:
    """Evenly spaced slices of ``x``'s leading dims (all but the last two, three for 5-D tensors:
    the dims a codec may transform), about :data:`SAMPLE_VALUES` values; where those are too few
    (a ``(tokens, features)`` matrix, a long vector), evenly spaced tiles of the last two dims
    (:func:`tiles`); ``x`` itself if it is small.

    >>> representative_sample(torch.zeros(32, 64, 16, 16)).shape    # every 3rd image and channel
    torch.Size([11, 22, 16, 16])
    >>> representative_sample(torch.zeros(32, 16, 64, 64)).shape    # every 6th image, every 5th channel
    torch.Size([6, 4, 64, 64])
    >>> representative_sample(torch.zeros(1040, 1536)).shape        # four 64 × 256 tiles
    torch.Size([4, 64, 256])
    """
    sample = strided_sample(x, SAMPLE_VALUES, kept_dims=3 if x.dim() >= 5 else 2)   # DCT: D, H, W
    if sample.numel() >= 2 * SAMPLE_VALUES and x.dim() < 5:
        sample = tiles(sample, SAMPLE_VALUES)
    return sample.contiguous()


TILE = (64, 256)   # rows × columns of one tile of a matrix (DCT blocks and wavelet levels fit whole)
VECTOR_TILE = 4096   # values of one tile of a vector (or a one-row map)


def tiles(x: torch.Tensor, values: int) -> torch.Tensor:
    """``(count, th, tw)``: about ``values`` values of ``x`` as evenly spaced, aligned tiles of its
    last two dims (one row for a vector), every leading dim flattened into the images tiled.
    Codecs that code slices alike then see crops of the same maps: their error per value, and a
    variable-rate codec's bytes per value, close to the whole's (a crop's borders cost a wavelet
    a few more coefficients; an FFT sees coarser frequencies: both estimates, as for slices).

    >>> tiles(torch.zeros(3, 200, 1000), 1 << 16).shape
    torch.Size([4, 64, 256])
    """
    height, width = (x.shape[-2], x.shape[-1]) if x.dim() >= 2 else (1, x.shape[-1])
    images = x.reshape(-1, height, width)
    th, tw = (min(height, TILE[0]), min(width, TILE[1])) if height > 1 else (1, min(width, VECTOR_TILE))
    rows, columns = height // th, width // tw
    count = min(len(images) * rows * columns, max(1, round(values / (th * tw))))
    picks = torch.linspace(0, len(images) * rows * columns - 1, count).round().long().tolist()
    crops = []
    for pick in picks:
        image, position = divmod(pick, rows * columns)
        row, column = divmod(position, columns)
        crops.append(images[image, row * th:(row + 1) * th, column * tw:(column + 1) * tw])
    return torch.stack(crops)


def elementwise_sample(x: torch.Tensor, values: int = SAMPLE_VALUES, chunks: int = 64) -> torch.Tensor:
    """About ``values`` of ``x``'s values as ``chunks`` evenly spaced contiguous runs, flat; ``x``
    itself if it is under twice that. For codecs that code each value alone (``elementwise``:
    ``threshold``), which any of a tensor's values represent, whatever its layout; runs, not a
    stride, so no column of a matrix is over-represented.

    >>> elementwise_sample(torch.randn(1024, 1024)).shape
    torch.Size([65536])
    """
    flat = x.reshape(-1)
    if flat.numel() < 2 * values:
        return x
    size = values // chunks
    starts = torch.linspace(0, flat.numel() - size, chunks).long().tolist()
    return torch.cat([flat[start:start + size] for start in starts])


def measure(codec, x: torch.Tensor, sample: torch.Tensor | None = None) -> tuple[float, int]:
    """``(relative error, packed bytes)`` of ``codec`` on ``x``: on ``sample`` (slices of ``x``)
    where the codec codes slices alike, its bytes then those of ``x`` (fixed rate: exact) or
    scaled by the share of values (variable rate); else on all of ``x``. Codecs that are exact
    only on some values (``mask`` on a two-valued tensor, the integer codecs) never declare it:
    a sample cannot prove a whole tensor exact (a mask found inexact on it is not measured further)."""
    if getattr(codec, "predicate_only", False) or getattr(codec, "exact", False):
        # a mask exact by the use it was made for (exact_for), or a codec lossless by construction (offload)
        return 0.0, codec.packed_nbytes(TensorSpec.of(x))
    predicted = codec.estimate(x) if hasattr(codec, "estimate") else None   # low rank: from sampled Grams
    if predicted is not None:
        return predicted
    if hasattr(codec, "exact_for") and sample is not None and sample is not x:
        # kept only where measured exact (a two-valued tensor): a sample can disprove that, never prove it
        packed = codec.pack(sample)
        error = relative_error(sample, codec.unpack(packed))
        if error != 0.0:
            return error, codec.packed_nbytes(TensorSpec.of(x))
    capped = getattr(codec, "max_bytes", None) is not None   # a cap would not bind on a sample
    if sample is not None and sample is not x and getattr(codec, "calibrates_on_slices", False) and not capped:
        packed = codec.pack(sample)
        if codec.fixed_rate:
            nbytes = codec.packed_nbytes(TensorSpec.of(x))
        else:
            nbytes = math.ceil(packed_bytes(packed) * x.numel() / sample.numel())
        return relative_error(sample, codec.unpack(packed)), nbytes
    return measure_whole(codec, x)


def measure_all(codecs, x: torch.Tensor, sample: torch.Tensor | None = None) -> list[tuple[float, int]]:
    """:func:`measure` of each of ``codecs`` on ``x``. A run of one codec at several ε (the
    ladder :func:`~actcompile.passes.rules.codec_choices` offers) shares what does not depend on
    ε where its codec can: the low-rank codecs' sampled spectra (``estimate_ladder``), the
    wavelet's transform (``ladder``). The bytes are those of one :func:`measure` per codec; so
    is the error, except the wavelet's, which is its coefficients' error, an upper bound of it.

    >>> from actcompile.codecs import get_codec
    >>> x = torch.randn(8, 4, 32, 32)
    >>> ladder = [get_codec("wavelet", epsilon=e) for e in (0.05, 0.2)]
    >>> shared, alone = measure_all(ladder, x), [measure(c, x) for c in ladder]
    >>> [b for _, b in shared] == [b for _, b in alone]
    True
    >>> all(a <= s <= c.epsilon for (s, _), (a, _), c in zip(shared, alone, ladder))
    True
    """
    measured, flat_sample = [], None
    for run in _epsilon_runs(codecs):
        if sample is not None and getattr(run[0], "elementwise", False):   # any values will do: few
            flat_sample = elementwise_sample(x) if flat_sample is None else flat_sample
            run_sample = flat_sample
        else:
            run_sample = sample
        shared = _measure_ladder(run, x, run_sample) if run[0] is not None and getattr(run[0], "epsilon", None) else None
        measured += shared if shared is not None else [measure(codec, x, run_sample) for codec in run]
    return measured


def _epsilon_runs(codecs) -> list[list]:
    """``codecs`` in runs of consecutive ones equal but for their ε (each set)."""
    runs: list[list] = []
    for codec in codecs:
        last = runs[-1][0] if runs else None
        if (last is not None and type(last) is type(codec) and getattr(codec, "epsilon", None) is not None
                and last.epsilon is not None and dataclasses.replace(last, epsilon=codec.epsilon) == codec):
            runs[-1].append(codec)
        else:
            runs.append([codec])
    return runs


def _measure_ladder(run: list, x: torch.Tensor, sample: torch.Tensor | None) -> list[tuple[float, int]] | None:
    """What :func:`measure` gives each codec of ``run``, computed once for all its ε; ``None``
    where the codec shares nothing (then each is measured alone)."""
    codec, epsilons = run[0], [c.epsilon for c in run]
    if hasattr(codec, "estimate_ladder"):
        predicted = codec.estimate_ladder(x, epsilons)
        if predicted is not None:
            return predicted
    if not hasattr(codec, "ladder") or getattr(codec, "max_bytes", None) is not None:
        return None
    if sample is not None and sample is not x and codec.calibrates_on_slices:
        measured = codec.ladder(sample, epsilons)
        if measured is None:
            return None
        if codec.fixed_rate:
            return [(error, codec.packed_nbytes(TensorSpec.of(x))) for error, _ in measured]
        return [(error, math.ceil(nbytes * x.numel() / sample.numel())) for error, nbytes in measured]
    return codec.ladder(x, epsilons)


def measure_whole(codec, x: torch.Tensor) -> tuple[float, int]:
    """``(relative error, packed bytes)`` of ``codec`` packing all of ``x``."""
    packed = codec.pack(x)
    return relative_error(x, codec.unpack(packed)), packed_bytes(packed)


class Calibrator:
    """Measures each candidate codec on each save as a forward makes it: an ``on_save`` callback
    for :func:`~actcompile.passes.memory.record_saves` (or a capture forward, which then also
    calibrates: one real forward instead of two).

    ``choices``, ``expected`` and ``whole`` are as in :func:`calibrate`; after the forward,
    ``results`` holds ``{key: [(codec, relative error, packed bytes), ...]}`` for every key it saw.
    """

    def __init__(self, choices: dict[Key, list], expected: dict[Key, tuple] | None = None,
                 whole: frozenset = frozenset(), on_measured=None):
        self.choices, self.expected, self.whole = choices, expected, whole
        self.results: dict[Key, list] = {}
        self.on_measured = on_measured   # called with (keys measured, keys to measure) after each

    def __call__(self, node, ordinal, t, kind) -> None:
        key = (node, ordinal)
        codecs = self.choices.get(key)
        if codecs is None:
            return
        if self.expected is not None and self.expected[key] != (tuple(t.shape), str(t.dtype).removeprefix("torch.")):
            raise ActCompileError(
                f"calibration: node {node} save #{ordinal} is {tuple(t.shape)} {t.dtype} on the real "
                f"inputs but {self.expected[key]} in the profile; the graph does not run the same way twice"
            )
        x = packable_view(t.detach())
        with torch.no_grad(), warnings.catch_warnings():
            # a narrow dtype the values do not fit is expected here: measured as no saving, not warned
            warnings.simplefilter("ignore", PlanDriftWarning)
            if key in self.whole:
                self.results[key] = [(codec, *measure_whole(codec, x)) for codec in codecs]
            else:
                sample = representative_sample(x)
                self.results[key] = [(codec, *m) for codec, m in zip(codecs, measure_all(codecs, x, sample))]
        if self.on_measured is not None:
            self.on_measured(len(self.results), len(self.choices))


def calibrate(graph: CapturedGraph, choices: dict[Key, list],
              expected: dict[Key, tuple] | None = None,
              whole: frozenset = frozenset()) -> dict[Key, list[tuple[object, float, int]]]:
    """For each ``(node, ordinal)`` in ``choices``: ``[(codec, relative error, packed bytes), ...]``.

    Runs ``graph`` on the real inputs it was captured with. ``expected`` maps keys to the
    ``(shape, dtype)`` the profile predicted; a mismatch raises. Keys in ``whole`` are measured
    on the whole tensor, never a sample or an estimate (a tensor whose plan drifted).
    """
    calibrator = Calibrator(choices, expected, whole)
    record_saves(graph.gm, graph.flat_inputs, calibrator, fake=False, input_kinds=graph.input_kinds)
    missing = set(choices) - set(calibrator.results)
    if missing:
        raise ActCompileError(f"calibration: the real forward never saved {sorted(missing)[:5]} (predicted by the profile)")
    return calibrator.results
