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

from ..core.errors import SuperweightError
from . import native

if sys.byteorder != "little":  # pack_bits reads codes as machine words
    raise ImportError("superweight's bit packing needs a little-endian machine")


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes take: ``ceil(n * bits / 8)``, or ``ceil(n / 5)`` for ternary (bits=0)."""
    return math.ceil(n / 5) if bits == 0 else math.ceil(n * bits / 8)


def _word_dtype(bits: int) -> torch.dtype:
    return torch.int32 if 8 * bits <= 31 else torch.int64


_BYTE_WORDS = {1: torch.int64, 2: torch.int32, 4: torch.int16}  # 8 // bits codes fill one byte


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes below ``2**bits`` into ``ceil(n * bits / 8)`` bytes: the LSB-first bit stream.

    The codes are read as machine words (a little-endian host is needed). When ``bits`` divides 8, a
    word of ``8 // bits`` codes becomes one output byte, each code moved into place by one
    shift-and-mask. Otherwise every 8 codes (an int64) are squeezed into their low ``bits`` bytes
    by halving steps (pairs of codes, then pairs of pairs, then the two halves: three
    shift-or-mask steps instead of one per code), and every 8 such words are joined into ``bits``
    int64 words of the stream by shifts, so no strided byte copy is needed. Eager torch: inductor's
    code for these shifts ran 2-5x slower on this CPU (see ``quant/kernels.py``).
    """
    if not 1 <= bits <= 8:
        raise SuperweightError(f"cannot pack {bits}-bit codes: bits must be 1..8")
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    packed = native.pack_bits(codes, bits)
    if packed is not None:
        return packed
    n = codes.numel()
    per = 8 // bits if bits in _BYTE_WORDS else 8  # codes per word
    c = F.pad(codes, (0, (-n) % per)) if n % per else codes  # F.pad copies even when it adds nothing
    v = (c if c.storage_offset() % per == 0 else c.clone()).view(_BYTE_WORDS.get(bits, torch.int64))
    if bits not in _BYTE_WORDS:
        return _join_words(_squeeze_octets(v, bits, 64), bits)[: packed_bytes(n, bits)]
    return _squeeze_octets(v, bits, 64 // bits, last_mask=False).to(torch.uint8)  # the cast keeps the low byte


def _squeeze_octets(v: torch.Tensor, bits: int, word_bits: int, last_mask: bool = True) -> torch.Tensor:
    """Words of ``word_bits // 8`` codes (code k at bit 8k) to words holding code k at bit
    ``k * bits``: fields of ``have`` bits every ``width`` bits joined in pairs, width 8, 16, 32
    while it is below the word. ``last_mask=False`` leaves bits above the result in the last step."""
    widths = [w for w in (8, 16, 32) if w < word_bits]
    for step, width in enumerate(widths):
        have = bits * width // 8
        starts = range(0, word_bits, 2 * width)
        if 2 * have <= width:  # bits <= 4: the shifted field lands on zeros
            v = v | (v >> (width - have))
            if last_mask or step < len(widths) - 1:
                v = v & sum(((1 << (2 * have)) - 1) << s for s in starts)
        else:
            low = sum(((1 << have) - 1) << s for s in starts)
            v = (v & low) | ((v >> (width - have)) & (low << have))
    return v


def _join_words(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Words of ``8 * bits`` stream bits each (``_squeeze_octets``) as the stream's bytes, 8 words
    at a time written as ``bits`` int64 words (a bit shifted past bit 63 is dropped)."""
    width, m = 8 * bits, w.numel()
    W = (F.pad(w, (0, (-m) % 8)) if m % 8 else w).view(-1, 8)
    out = []
    for j in range(bits):
        acc = None
        for k in range(8):
            shift = width * k - 64 * j
            if -width < shift < 64:  # word k overlaps output word j
                term = W[:, k] << shift if shift >= 0 else W[:, k] >> -shift
                acc = term if acc is None else acc | term
        out.append(acc)
    return torch.stack(out, 1).view(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``n`` codes."""
    if packed.numel() != packed_bytes(n, bits):
        raise SuperweightError(f"packed codes hold {packed.numel()} bytes, expected {packed_bytes(n, bits)} for {n} codes")
    packed = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        return packed.clone()
    out = native.unpack_bits(packed, bits, n)
    if out is not None:
        return out
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
