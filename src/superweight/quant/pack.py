"""Dense bit packing of quantization codes into bytes.

``pack_bits``: an N-bit code stream, least significant bit first, so two 4-bit codes share a byte
(the first in the low nibble), eight 3-bit codes fill three bytes, four 2-bit codes one byte.
``pack_ternary``: five base-3 digits per byte (3^5 = 243 <= 256), i.e. 1.6 bits per weight.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from ..errors import SuperweightError

if sys.byteorder != "little":  # pack_bits reads codes as machine words
    raise ImportError("superweight's bit packing needs a little-endian machine")


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes take: ``ceil(n * bits / 8)``, or ``ceil(n / 5)`` for ternary (bits=0)."""
    return math.ceil(n / 5) if bits == 0 else math.ceil(n * bits / 8)


def _word_dtype(bits: int) -> torch.dtype:
    return torch.int32 if 8 * bits <= 31 else torch.int64


_BYTE_WORDS = {1: torch.int64, 2: torch.int32, 4: torch.int16}  # 8 // bits codes fill one byte


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes below ``2**bits`` into ``ceil(n * bits / 8)`` bytes.

    Every 8 codes form one little-endian word of ``bits`` bytes (code k at bit ``k * bits``), which
    is the LSB-first bit stream; the last word is cut to the bytes the stream needs. The codes are
    read as machine words (a word of ``8 // bits`` codes for one output byte when ``bits`` divides
    8, else 8 codes in an int64 whose low ``bits`` bytes are the output) and each code is shifted
    into place with one shift-and-mask: a single expression, which ``torch.compile`` fuses into one
    pass but runs faster eagerly (see ``quant/kernels.py``). Needs a little-endian host.
    """
    if not 1 <= bits <= 8:
        raise SuperweightError(f"cannot pack {bits}-bit codes: bits must be 1..8")
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    n, mask = codes.numel(), 2**bits - 1
    per = 8 // bits if bits in _BYTE_WORDS else 8  # codes per word
    c = F.pad(codes, (0, (-n) % per)) if n % per else codes  # F.pad copies even when it adds nothing
    v = (c if c.storage_offset() % per == 0 else c.clone()).view(_BYTE_WORDS.get(bits, torch.int64))
    word = v & mask  # code 0 at bit 0; code k sits at bit 8k and moves to bit k * bits
    for k in range(1, per):
        word = word | ((v >> (k * (8 - bits))) & (mask << (k * bits)))
    if bits in _BYTE_WORDS:
        return word.to(torch.uint8)
    out = word.view(torch.uint8).reshape(-1, 8)[:, :bits].reshape(-1)  # a copy unless one word
    if n % 8 == 0 and out.data_ptr() != word.data_ptr():
        return out
    return out[: packed_bytes(n, bits)].clone()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``n`` codes."""
    if packed.numel() != packed_bytes(n, bits):
        raise SuperweightError(f"packed codes hold {packed.numel()} bytes, expected {packed_bytes(n, bits)} for {n} codes")
    packed = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        return packed.clone()
    mask = 2**bits - 1
    if 8 % bits == 0:
        per = 8 // bits
        out = torch.empty((packed.numel(), per), dtype=torch.uint8, device=packed.device)
        for k in range(per):
            out[:, k] = (packed >> (k * bits)) & mask
        return out.reshape(-1)[:n].clone()
    full = F.pad(packed, (0, (-packed.numel()) % bits)).view(-1, bits).to(_word_dtype(bits))
    word = full[:, 0].clone()
    for b in range(1, bits):
        word |= full[:, b] << (8 * b)
    out = torch.empty((word.numel(), 8), dtype=torch.uint8, device=packed.device)
    for k in range(8):
        out[:, k] = (word >> (k * bits)) & mask
    return out.reshape(-1)[:n].clone()


_POW3 = (1, 3, 9, 27, 81)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Five codes in {0, 1, 2} per byte, first code in the lowest base-3 digit."""
    codes = codes.reshape(-1).to(torch.uint8)
    c = F.pad(codes, (0, (-codes.numel()) % 5)).view(-1, 5)
    out = c[:, 0].clone()
    for k in range(1, 5):
        out += c[:, k] * _POW3[k]
    return out


def unpack_ternary(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_ternary``: the first ``n`` codes."""
    if packed.numel() != packed_bytes(n, 0):
        raise SuperweightError(f"packed ternary codes hold {packed.numel()} bytes, expected {packed_bytes(n, 0)}")
    if packed.numel() and int(packed.max()) > 242:
        raise SuperweightError("packed ternary codes hold a byte above 242: the file is corrupted")
    packed = packed.reshape(-1).to(torch.uint8)
    out = torch.empty((packed.numel(), 5), dtype=torch.uint8, device=packed.device)
    for k in range(5):
        out[:, k] = (packed // _POW3[k]) % 3
    return out.reshape(-1)[:n].clone()
