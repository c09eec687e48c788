"""Dense bit packing of quantization codes into bytes.

``pack_bits``: an N-bit code stream, least significant bit first, so two 4-bit codes share a byte
(the first in the low nibble), eight 3-bit codes fill three bytes, four 2-bit codes one byte.
``pack_ternary``: five base-3 digits per byte (3^5 = 243 <= 256), i.e. 1.6 bits per weight.
"""
from __future__ import annotations

import math

import torch

from ..errors import SuperweightError


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes take: ``ceil(n * bits / 8)``, or ``ceil(n / 5)`` for ternary (bits=0)."""
    return math.ceil(n / 5) if bits == 0 else math.ceil(n * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes below ``2**bits`` into ``ceil(n * bits / 8)`` bytes.

    Every 8 codes form one little-endian word of ``bits`` bytes (code k at bit ``k * bits``), which
    is the LSB-first bit stream; the last word is cut to the bytes the stream needs.
    """
    if not 1 <= bits <= 8:
        raise SuperweightError(f"cannot pack {bits}-bit codes: bits must be 1..8")
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    n = codes.numel()
    words = torch.nn.functional.pad(codes, (0, (-n) % 8)).view(-1, 8).long() << (torch.arange(8) * bits)
    word = words.sum(1, keepdim=True)
    out = ((word >> (torch.arange(bits) * 8)) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_bytes(n, bits)].clone()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``n`` codes."""
    if packed.numel() != packed_bytes(n, bits):
        raise SuperweightError(f"packed codes hold {packed.numel()} bytes, expected {packed_bytes(n, bits)} for {n} codes")
    packed = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        return packed.clone()
    full = torch.nn.functional.pad(packed, (0, (-packed.numel()) % bits)).view(-1, bits).long()
    word = (full << (torch.arange(bits) * 8)).sum(1, keepdim=True)
    codes = (word >> (torch.arange(8) * bits)) & (2**bits - 1)
    return codes.to(torch.uint8).reshape(-1)[:n].clone()


_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Five codes in {0, 1, 2} per byte, first code in the lowest base-3 digit."""
    codes = codes.reshape(-1).to(torch.int16)
    pad = (-codes.numel()) % 5
    if pad:
        codes = torch.cat([codes, torch.zeros(pad, dtype=torch.int16)])
    return (codes.view(-1, 5) * _POW3).sum(1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_ternary``: the first ``n`` codes."""
    if packed.numel() != packed_bytes(n, 0):
        raise SuperweightError(f"packed ternary codes hold {packed.numel()} bytes, expected {packed_bytes(n, 0)}")
    if packed.numel() and int(packed.max()) > 242:
        raise SuperweightError("packed ternary codes hold a byte above 242: the file is corrupted")
    digits = (packed.reshape(-1, 1).to(torch.int16) // _POW3) % 3
    return digits.reshape(-1)[:n].to(torch.uint8)
