"""Options of a compilation, validated once at construction.

The budget a user writes (``"2GB"``, ``"1.5 GiB"``, ``2_000_000_000``, ``0.25``) is parsed
here and nowhere else; the rest of the package sees only :class:`Budget` and ints named
``*_bytes``.

>>> parse_budget("2GB").resolve(baseline_bytes=10**12)
2000000000
>>> parse_budget("2 gib").resolve(baseline_bytes=10**12)
2147483648
>>> parse_budget(0.25).resolve(baseline_bytes=1000)
250
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*([a-zA-Z]*)\s*$")
_ACCEPTED = (
    "accepted: a size string such as '2GB', '2 GB', '512MiB' (units B, KB, MB, GB, TB = powers "
    "of 1000; KiB, MiB, GiB, TiB = powers of 1024), a positive int of bytes, or a float in "
    "(0, 1] meaning that fraction of the uncompressed activation bytes"
)


@dataclasses.dataclass(frozen=True)
class Budget:
    """A parsed budget: either absolute ``bytes`` or a ``fraction`` of the baseline."""

    bytes: int | None = None
    fraction: float | None = None

    def __post_init__(self):
        if (self.bytes is None) == (self.fraction is None):
            raise ValueError("Budget: give exactly one of bytes= or fraction=")
        if self.bytes is not None and self.bytes <= 0:
            raise ValueError(f"Budget.bytes={self.bytes}: must be > 0")
        if self.fraction is not None and not (0.0 < self.fraction <= 1.0):
            raise ValueError(f"Budget.fraction={self.fraction}: must be in (0, 1]")

    def resolve(self, baseline_bytes: int) -> int:
        """Bytes this budget allows for a model whose uncompressed activations take ``baseline_bytes``."""
        if self.bytes is not None:
            return self.bytes
        return int(math.floor(self.fraction * baseline_bytes))

    def __str__(self) -> str:
        return f"{self.bytes} B" if self.bytes is not None else f"{self.fraction:g} of baseline"


def parse_budget(budget) -> Budget:
    """Parse what a user wrote as a budget; raise ``ValueError`` naming it and what is accepted."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, bool) or budget is None:
        raise ValueError(f"budget={budget!r} is not a budget; {_ACCEPTED}")
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(f"budget={budget!r} must be positive; {_ACCEPTED}")
        return Budget(bytes=budget)
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise ValueError(
                f"budget={budget!r}: a float budget is a fraction of the baseline and must be "
                f"in (0, 1]; {_ACCEPTED}"
            )
        return Budget(fraction=budget)
    if isinstance(budget, str):
        match = _BUDGET_RE.match(budget)
        unit = match.group(2).lower() if match else None
        if not match or unit not in _UNITS:
            raise ValueError(f"budget={budget!r} is not a size; {_ACCEPTED}")
        value = float(match.group(1)) * _UNITS[unit]
        if value <= 0:
            raise ValueError(f"budget={budget!r} must be positive; {_ACCEPTED}")
        if value < 1:
            raise ValueError(f"budget={budget!r} must be at least one byte; {_ACCEPTED}")
        return Budget(bytes=int(value))
    raise ValueError(f"budget of type {type(budget).__name__} is not a budget; {_ACCEPTED}")


DEFAULT_EPSILONS = (0.01, 0.05, 0.2, 0.45)
def default_codecs(everything: bool = False) -> tuple:
    """The registered codecs the policy tries when none are named: those whose class says
    ``default_enabled = True`` (the quantizers, ``mask`` and the transforms: DCT, wavelet, FFT
    low-pass, SVD/HOSVD, thresholding), or all but ``none`` and ``random`` with
    ``everything=True`` (``codecs="all"``: codecs registered without ``default_enabled`` too).
    The transforms joined the default set once their calibration was cheap and their plans
    checked: calibrated on samples with every ε from one pass, every codec costs 1.0-2.4× the
    quantizers' planning (benchmarks/results/planning.md run 5, ResNet-50 7.2-7.7 s against
    6.6-6.7 s), and a plan that takes a transform is kept only where one probe backward shows it
    moves the gradient no more than the quantizers' plan (``gradient_checked``; at 1/8 without
    recompute a DCT plan had cost ResNet-18 0.011 of gradient cosine while HOSVD gained
    MobileNetV2 as much). :func:`quantizer_codecs` is the set before them (``codecs="quantizers"``:
    the fastest planning). The lossless integer codecs (:mod:`actcompile.codecs.integer`) are
    in no set: ``narrow_integers`` offers them; nor is ``offload``: the ``offload`` option does,
    where the saves are on an accelerator."""
    from actcompile.codecs import available_codecs, get_codec

    codecs = [get_codec(name) for name in available_codecs() if name not in ("none", "random")]
    codecs = [c for c in codecs if not getattr(c, "lossless_integer", False)]   # always offered, see narrow_integers
    codecs = [c for c in codecs if not getattr(c, "host_resident", False)]      # offered by the offload option
    return tuple(c for c in codecs if everything or getattr(c, "default_enabled", False))


def quantizer_codecs() -> tuple:
    """The default set without the transforms (``codecs="quantizers"``): int8, int4, int2, fp8
    and ``mask``, which calibrate fastest and need no probe backward.

    >>> sorted(c.name for c in quantizer_codecs())
    ['fp8', 'int2', 'int4', 'int8', 'mask']
    """
    return tuple(c for c in default_codecs() if not getattr(c, "gradient_checked", False))


ERROR_WEIGHTINGS = ("tensor", "bytes", "gradient")
BUDGET_SCOPES = ("activations", "peak")
OFFLOAD_CHOICES = ("auto", True, False)   # compared by identity: 1 is not True here
# Absolute slack of a drift check: errors under the smallest ε of the default ladder are noise
# (int8's error moves by a few 1e-3 between batches), not a plan gone wrong.
DRIFT_SLACK = 0.01


def _compile_codecs_default() -> bool:
    """Codec kernels are compiled unless ``ACTCOMPILE_COMPILE_CODECS=0`` (the test suite sets it:
    Inductor takes seconds per new kernel, and the kernels have tests of their own)."""
    return os.environ.get("ACTCOMPILE_COMPILE_CODECS", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """Everything :func:`actcompile.passes.policy.choose_plan` needs besides the profile.

    ``codecs`` are codec instances (see :func:`actcompile.codecs.get_codec`); ``epsilons`` is the ladder tried for variable-rate codecs;
    tensors below ``min_tensor_bytes`` are never compressed (the packing overhead would eat
    the saving); what the heap holds beyond the saved storages is kept free under the budget,
    so that *measured* bytes stay under it: ``reserve_bytes_per_node`` per autograd node
    (measured 500-900 B on torch 2.14, CPU, over 10 models) and ``reserve_bytes_per_packed`` per
    tensor the plan may pack (the holder and the payload's tensor objects: measured 730–920 B per
    packed tensor on MobileNetV2, ResNet-18 and a small CNN), ``reserve_bytes_per_segment`` per
    run of nodes it recomputes as one autograd node (:mod:`actcompile.recompute_node`: its node,
    context and saved arguments, measured 1.6–1.7 KB per run on a chain of small runs; a run that
    draws random numbers also keeps the CPU generator's 5,056 B state), and
    ``reserve_bytes_per_checkpoint`` per run recomputed through ``torch.utils.checkpoint`` instead
    (a run handing on a view of what it reads: the RNG state and its frame, measured 7.3–8.3 KB per call). ``compile_codecs`` runs codec
    pack/unpack as Inductor kernels compiled per shape (:mod:`actcompile.codecs.kernels`; the
    first step with a new shape compiles them), else as eager torch ops. ``narrow_integers``
    offers the lossless integer codecs (:mod:`actcompile.codecs.integer`: bool as bits, max-pool
    indices as window offsets, integers in a narrower dtype) to integer and bool saves, whatever
    ``codecs`` names: they lose nothing, and are kept only where measured exact.
    ``check_every``: at compressed training forwards 1, 2, 4, … below it and then every
    ``check_every``-th (0: never), each packed tensor's codec error is measured on the real
    tensor (one extra unpack); an error over
    ``drift_tolerance`` × its planned error (+ :data:`DRIFT_SLACK`) warns and re-plans
    (:mod:`actcompile.api`: a tensor constant at planning, such as a zero-initialised gate, can
    look exactly compressible).
    ``tolerance`` (instead of a budget; ``budget`` is then the whole baseline): the plan takes
    the least bytes whose predicted gradient error, ``√(Σ w·ε²)`` with ``w`` each tensor's
    gradient share (:mod:`actcompile.passes.sensitivity`, at least ``gradient_floor`` / the
    number of shares), stays ≤ ``tolerance``.
    ``recompute``: runs of nodes may be recomputed in backward instead of keeping what they save
    (:mod:`actcompile.passes.segments`; not with ``tolerance``). The knapsack's cost is error +
    λ·time with λ = ``time_weight``: recomputing the whole forward once costs as much as a mean
    squared relative error of ``time_weight`` on every compressible tensor (1e-3: ε ≈ 0.03, so
    int8's ~0.005 beats recomputing, and recomputing beats int4's ~0.05). A recomputation's time is
    predicted from FLOPs (``torch.utils.flop_counter``) at ``flops_per_second`` plus the bytes each
    op writes and reads back at ``bytes_per_second``; a codec's pack + unpack as copies of its
    tensor at ``bytes_per_second`` (each codec's measured ``copies``: the quantizers ~2 compiled and
    ~12 eager, DCT ~3 up to the wavelet's ~90; ``benchmarks/results/codecs.md``);
    only the ratio of the two rates matters (a CPU's ~10 FLOPs per byte).
    ``budget_scope``: ``"activations"`` (default) bounds what the forward leaves alive (DESIGN.md's
    activation bytes); ``"peak"`` bounds the whole step's high-water mark over forward and
    backward: parameters and buffers, ``optimizer_state_bytes`` (``actcompile(...,
    optimizer=opt)`` fills it in), gradients, activations and the transient decoded or
    recomputed tensors, predicted from liveness over the graph (:mod:`actcompile.passes.peak`);
    a fraction is then of the uncompressed step's predicted peak.
    ``offload``: a saved tensor may instead move to pinned host memory in forward and be
    prefetched back in backward (:mod:`actcompile.codecs.offload`), lossless, priced as
    ``transfer_copies`` copies of it at ``bytes_per_second`` (measured on the device when the
    plan is made: PCIe against HBM, ~30-60). ``"auto"`` offers it where the saves are on an
    accelerator; ``True`` also, and refuses a model on the CPU, where host and device are one
    memory; ``False`` never.
    """

    budget: Budget
    codecs: tuple = ()
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS
    min_tensor_bytes: int = 16 * 1024
    reserve_bytes_per_node: int = 1024
    reserve_bytes_per_packed: int = 1024
    reserve_bytes_per_segment: int = 2048
    reserve_bytes_per_checkpoint: int = 8192
    error_weighting: str = "tensor"
    gradient_floor: float = 0.25
    recompute: bool = True
    narrow_integers: bool = True
    compile_codecs: bool = dataclasses.field(default_factory=_compile_codecs_default)
    check_every: int = 50
    drift_tolerance: float = 2.0
    tolerance: float | None = None
    time_weight: float = 1e-3
    flops_per_second: float = 1e11
    bytes_per_second: float = 1e10
    budget_scope: str = "activations"
    optimizer_state_bytes: int = 0
    offload: bool | str = "auto"
    transfer_copies: float = 60.0
    progress: bool = False   # show what planning does on stderr (actcompile/progress.py)

    def __post_init__(self):
        if not isinstance(self.budget, Budget):
            raise ValueError(f"CompileConfig.budget={self.budget!r}: must be a Budget (use parse_budget)")
        if not self.codecs:
            object.__setattr__(self, "codecs", default_codecs())
        if isinstance(self.codecs, (str, bytes)) or not all(hasattr(c, "pack") for c in self.codecs):
            raise ValueError(f"CompileConfig.codecs={self.codecs!r}: must be a tuple of codec instances")
        for eps in self.epsilons:
            if not (0.0 < eps < 1.0):
                raise ValueError(f"CompileConfig.epsilons contains {eps!r}: each epsilon must be in (0, 1)")
        if self.min_tensor_bytes < 0:
            raise ValueError(f"CompileConfig.min_tensor_bytes={self.min_tensor_bytes}: must be >= 0")
        if self.error_weighting not in ERROR_WEIGHTINGS:
            raise ValueError(f"CompileConfig.error_weighting={self.error_weighting!r}: accepted are "
                             f"{', '.join(map(repr, ERROR_WEIGHTINGS))}")
        if not 0.0 <= self.gradient_floor <= 1.0:
            raise ValueError(f"CompileConfig.gradient_floor={self.gradient_floor!r}: must be in [0, 1]")
        for name in ("reserve_bytes_per_node", "reserve_bytes_per_packed", "reserve_bytes_per_segment",
                     "reserve_bytes_per_checkpoint"):
            if getattr(self, name) < 0:
                raise ValueError(f"CompileConfig.{name}={getattr(self, name)}: must be >= 0")
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 0:
            raise ValueError(f"CompileConfig.check_every={self.check_every!r}: must be an int >= 0 "
                             "(training forwards between error checks; 0 turns them off)")
        if self.tolerance is not None and (isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float))
                                           or not 0.0 < self.tolerance < 1.0):
            raise ValueError(f"CompileConfig.tolerance={self.tolerance!r}: must be a number in (0, 1) (the "
                             "parameter gradient's predicted relative error the plan may reach), or None for a budget")
        for name in ("time_weight", "flops_per_second", "bytes_per_second"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise ValueError(f"CompileConfig.{name}={value!r}: must be a finite number >= 0")
        if not (self.flops_per_second > 0 and self.bytes_per_second > 0):
            raise ValueError(f"CompileConfig.flops_per_second={self.flops_per_second!r}, bytes_per_second="
                             f"{self.bytes_per_second!r}: the time model's machine must have both > 0")
        if not any(self.offload is c for c in OFFLOAD_CHOICES):
            raise ValueError(f"CompileConfig.offload={self.offload!r}: accepted are "
                             f"{', '.join(map(repr, OFFLOAD_CHOICES))} ('auto': where the saves are on an accelerator)")
        if isinstance(self.transfer_copies, bool) or not isinstance(self.transfer_copies, (int, float)) \
                or not 0 < self.transfer_copies < float("inf"):
            raise ValueError(f"CompileConfig.transfer_copies={self.transfer_copies!r}: must be a finite number > 0 "
                             "(a host round trip's time in copies of the tensor on the device)")
        if self.budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"CompileConfig.budget_scope={self.budget_scope!r}: accepted are "
                             f"{', '.join(map(repr, BUDGET_SCOPES))}")
        if self.budget_scope == "peak" and self.tolerance is not None:
            raise ValueError("CompileConfig.budget_scope='peak' bounds memory: it needs budget=, not tolerance=")
        if isinstance(self.optimizer_state_bytes, bool) or not isinstance(self.optimizer_state_bytes, int) \
                or self.optimizer_state_bytes < 0:
            raise ValueError(f"CompileConfig.optimizer_state_bytes={self.optimizer_state_bytes!r}: must be an int >= 0")
        if self.optimizer_state_bytes and self.budget_scope != "peak":
            raise ValueError("CompileConfig.optimizer_state_bytes (optimizer=) counts only with budget_scope='peak'")
        if not self.drift_tolerance >= 1.0:
            raise ValueError(f"CompileConfig.drift_tolerance={self.drift_tolerance!r}: must be >= 1 "
                             "(how many times its planned error a codec may reach before re-planning)")
