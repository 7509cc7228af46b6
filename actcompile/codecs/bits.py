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

import torch

SUPPORTED_BITS = (1, 2, 4, 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat uint8 tensor of values < 2**bits into ``ceil(n·bits/8)`` fresh bytes."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: supported widths are {SUPPORTED_BITS}")
    if bits == 8:
        return values.to(torch.uint8).clone()
    per_byte = 8 // bits
    pad = (-values.numel()) % per_byte
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    lanes = values.to(torch.uint8).reshape(-1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=values.device)
    return (lanes << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` values, as uint8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: supported widths are {SUPPORTED_BITS}")
    if bits == 8:
        return packed[:numel]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    lanes = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return lanes.reshape(-1)[:numel]
