"""Packing small unsigned integers into bytes, and back (the primitive next to its inverse).

>>> import torch
>>> q = torch.tensor([3, 0, 1, 2, 3, 3], dtype=torch.uint8)
>>> packed = pack_bits(q, 2)
>>> packed.numel()
2
>>> unpack_bits(packed, 2, 6).tolist()
[3, 0, 1, 2, 3, 3]
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (1, 2, 4, 8)


def pack_bits(values: torch.Tensor, bits: int, block: int | None = None) -> torch.Tensor:
    """Pack a flat integer (or bool) tensor of values < 2**bits into ``ceil(n·bits/8)`` fresh bytes.

    Planar layout, chosen for contiguous, vectorizable passes that Inductor fuses into the codec
    around them: each ``block`` of values (default: all of them; a quantizer passes its group
    size, which must then divide ``n`` and be a multiple of ``8 // bits``) is cut into
    ``8 // bits`` equal planes, and byte ``j`` of the block holds element ``j`` of every plane.
    Shifts run in int32: CPU vector units have no 8-bit shifts, so Inductor's uint8 shifts and
    mask conversions become scalar loops (measured on CPU, 1-bit pack of a 14 MB tensor, × a
    copy: uint8 13×, int32 0.65×; interleaving elements ``8j … 8j+7`` into byte ``j``: 2.4×).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: supported widths are {SUPPORTED_BITS}")
    if bits == 8:
        return values.to(torch.uint8).clone()
    per_byte = 8 // bits
    values = values.reshape(-1)
    if values.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=values.device)
    if block is None:
        pad = (-values.numel()) % per_byte
        if pad:
            values = torch.cat([values.to(torch.int32), values.new_zeros(pad, dtype=torch.int32)])
        block = values.numel()
    elif block % per_byte or values.numel() % block:
        raise ValueError(f"block={block} must be a multiple of {per_byte} dividing {values.numel()} values")
    planes = values.reshape(-1, per_byte, block // per_byte).to(torch.int32)
    packed = planes[:, 0]
    for plane in range(1, per_byte):
        packed = packed | (planes[:, plane] << (plane * bits))
    return packed.to(torch.uint8).reshape(-1)   # converted in (groups, width) form: a vector loop per group


def unpack_bits(packed: torch.Tensor, bits: int, numel: int, dtype: torch.dtype = torch.uint8,
                block: int | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_bits` (same ``block``): the first ``numel`` values, as ``dtype``
    (and in ``shape`` when given, which must hold ``numel`` values).

    One fused pass. Callers that go on computing ask for the dtype they compute in (int32 to
    compare, float32 to scale): a uint8 intermediate makes Inductor convert vector masks
    through 8-bit lanes, a scalar loop on CPU (measured: mask unpack 25× a copy, 0.9× from int32).

    With ``shape`` and whole-tensor planes, the planes are cut along ``shape``'s leading dims
    where that is exact (same bytes): a compiled kernel then indexes the bits as
    ``(n % (N/8))·rest + (linear in the other dims)`` instead of ``flat % (numel/8)``, which
    Inductor cannot prove contiguous along any dim. It then tiles the kernel reading them in
    its best loop order (MobileNetV2's BatchNorm backwards read a channels-last mask in an
    NCHW loop: 36 of 45 strided gathers in the compiled backward came from this).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: supported widths are {SUPPORTED_BITS}")
    if shape is not None and math.prod(shape) != numel:
        raise ValueError(f"shape={tuple(shape)} holds {math.prod(shape)} values, not numel={numel}")
    per_byte = 8 // bits
    split = _leading_split(shape, per_byte) if shape is not None and block is None and bits < 8 else None
    if split is not None:
        lead, inner = split
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device).reshape(per_byte, 1, 1)
        planes = (packed.reshape(1, lead // per_byte, inner).to(torch.int32) >> shifts) & ((1 << bits) - 1)
        return planes.reshape(shape).to(dtype)
    values = _unpack_flat(packed, bits, numel, dtype, block)
    return values if shape is None else values.reshape(shape)


def _unpack_flat(packed, bits, numel, dtype, block):
    if bits == 8:
        return packed[:numel].to(dtype)
    per_byte = 8 // bits
    if packed.numel() == 0:
        return torch.empty(0, dtype=dtype, device=packed.device)
    width = packed.numel() if block is None else block // per_byte
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device).reshape(1, per_byte, 1)
    planes = (packed.reshape(-1, 1, width).to(torch.int32) >> shifts) & ((1 << bits) - 1)
    return planes.reshape(-1)[:numel].to(dtype)


def _leading_split(shape: tuple[int, ...], per_byte: int) -> tuple[int, int] | None:
    """``(lead, inner)``: the product of the fewest leading dims of ``shape`` that is a multiple
    of ``per_byte``, and of the rest; ``None`` if there is none (or the tensor is empty)."""
    lead = 1
    for k, size in enumerate(shape):
        lead *= size
        if lead and lead % per_byte == 0:
            return lead, math.prod(shape[k + 1:])
    return None
