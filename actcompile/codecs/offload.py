"""``offload``: a saved tensor moves to host memory in forward and comes back in backward.

Lossless, and it frees the accelerator's memory, not the host's: on a CUDA device the tensor
is copied into pinned host memory (asynchronously to the host, in the forward's stream order),
and backward copies it back on a transfer stream of its own. Backward unpacks saved tensors
roughly in the reverse order the forward packed them, so unpacking one also starts copying back
the :data:`PREFETCH` offloaded before it: their transfers overlap the backward ops in between.

The payload is one :class:`HostCopy` (no tensor on the device: ``packed_bytes`` of it is 0,
which is what the plan counts). The policy offers ``offload`` only where a model's saves are on
an accelerator (``CompileConfig.offload``; on a CPU host and device are one memory, and an
offload would free nothing) and prices it by the measured transfer rate
(:func:`transfer_copies`). It never goes into a compiled graph (``traceable = False``): its
copies run on streams the graph does not see.

On a CPU tensor (the tests; what ``pack`` does where no accelerator is) the copy is a plain
clone and nothing is prefetched:

>>> import torch
>>> from actcompile.codecs.base import TensorSpec, packed_bytes
>>> codec = Offload()
>>> x = torch.randn(64, 64)
>>> payload = codec.pack(x)
>>> packed_bytes(payload), codec.packed_nbytes(TensorSpec.of(x))
(0, 0)
>>> torch.equal(codec.unpack(payload), x)
True
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from typing import ClassVar

import torch

from actcompile.codecs import register_codec
from actcompile.codecs.base import TensorSpec

PREFETCH = 2   # offloaded tensors copied back ahead of the one backward asks for
_local = threading.local()   # the last HostCopy packed in this thread (backward prefetches along the chain)


def _transfer_stream(device: torch.device):
    """The stream copies back to the device run on, one per device (created on first use)."""
    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    if device not in streams:
        streams[device] = torch.cuda.Stream(device=device)
    return streams[device]


class HostCopy:
    """One offloaded tensor: its host copy, the copy's event, and the tensor packed before it.

    The copy out runs on the forward's own stream, asynchronously to the host: ordered after
    what made the tensor and before anything the forward does to it later (an in-place op on a
    saved tensor), as ``torch.autograd.graph.save_on_cpu`` does. The copy back runs on a transfer
    stream of its own, ahead of need. ``previous`` is weak: a copy backward has freed is not
    prefetched.
    """

    __slots__ = ("host", "device", "event", "previous", "incoming", "__weakref__")

    def __init__(self, x: torch.Tensor):
        self.device = x.device
        self.previous = getattr(_local, "last", None)
        self.incoming = None        # (device tensor, event) of a copy back under way
        if x.device.type == "cuda":
            self.host = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, pin_memory=True)
            self.host.copy_(x, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(x.device))
        else:
            self.host, self.event = x.detach().clone(), None
        _local.last = weakref.ref(self)

    def prefetch(self) -> None:
        """Start copying back to the device, on the transfer stream (nothing if under way)."""
        if self.incoming is not None or self.event is None:
            return
        stream = _transfer_stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self.event)   # the host copy is complete
            x = self.host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        self.incoming = (x, event)

    def device_tensor(self) -> torch.Tensor:
        """The tensor back on its device, ready for the current stream; prefetches the copies
        packed before it."""
        if self.event is None:
            x = self.host
        else:
            self.prefetch()
            x, event = self.incoming
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            x.record_stream(current)   # made on the transfer stream, read on this one
            self.incoming = None
        previous = self.previous
        for _ in range(PREFETCH):
            copy = previous() if previous is not None else None
            if copy is None:
                break
            copy.prefetch()
            previous = copy.previous
        return x


@register_codec
@dataclasses.dataclass(frozen=True)
class Offload:
    """Move the tensor to (pinned) host memory; bring it back in backward. See the module doc."""

    name: ClassVar[str] = "offload"
    fixed_rate: ClassVar[bool] = True
    sign_exact: ClassVar[bool] = True
    exact: ClassVar[bool] = True          # lossless by construction: calibration need not measure it
    traceable: ClassVar[bool] = False     # its copies run on streams a compiled graph does not see
    host_resident: ClassVar[bool] = True  # the payload lives in host memory (priced by transfer_copies)
    epsilon: float | None = None

    def supports(self, spec: TensorSpec) -> bool:
        return True

    def packed_nbytes(self, spec: TensorSpec) -> int:
        return 0   # bytes on the device: the plan's unit

    def pack(self, x: torch.Tensor) -> HostCopy:
        return HostCopy(x)

    def unpack(self, packed: HostCopy) -> torch.Tensor:
        return packed.device_tensor()


_RATIOS: dict = {}


def transfer_copies(device: torch.device, nbytes: int = 64 << 20) -> float:
    """How many device-memory copies one host round trip (out and back) of a tensor costs on
    ``device``, measured once per device: the time of ``nbytes`` to pinned host memory and back
    over the time of one copy of them on the device. The policy prices an offload as that many
    copies of its tensor at ``CompileConfig.bytes_per_second``, like a codec's ``copies``: all
    its time, though on the transfer stream much of it overlaps the forward (a conservative price)."""
    device = torch.device(device)
    if device not in _RATIOS:
        x = torch.empty(nbytes, dtype=torch.uint8, device=device)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

        def timed(fn) -> float:
            fn()
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(3):
                fn()
            torch.cuda.synchronize(device)
            return (time.perf_counter() - start) / 3

        round_trip = timed(lambda: (host.copy_(x, non_blocking=True), x.copy_(host, non_blocking=True)))
        on_device = timed(lambda: x.clone())
        _RATIOS[device] = round_trip / max(on_device, 1e-9)
    return _RATIOS[device]
