"""One registered handler per storage scheme: quantize, dequantize, pack, unpack, label, predicted bytes.

A ``QuantizedTensor.kind`` names its handler: ``rtn`` (asymmetric INT-N, float16 scale and zero),
``rtn_z8`` (INT-N with an int8 integer zero point), ``rtn_zf8`` (an 8-bit fixed-point zero point), ``nf4`` (NormalFloat4, absmax scale) and
``ternary`` (BitNet b1.58 absmean). The quantizer (``quantize_tensor``), the dequantizer
(``QuantizedTensor.dense``), the artifact writer and reader (``export.pack_tensor`` /
``unpack_tensor``) and the size prediction all go through ``handler(kind)``; adding a scheme is one
class and one ``register`` call.
"""
from __future__ import annotations

import difflib
from typing import Callable

import torch

from ..core.errors import SuperweightError
from . import kernels, native
from .codes import ternary_codes
from .layout import Layout
from .pack import pack_bits, pack_ternary, packed_bytes, unpack_bits, unpack_ternary
from .search import NF4Grid, UniformFix8Zero, UniformGrid, UniformInt8Zero, fit_groups

SEP = "::"


class Scheme:
    """Base handler: codes packed LSB-first at ``bits``, a float scale and optionally a zero point."""

    kind = ""
    has_zero = True
    zero_dtype: torch.dtype | None = None  # None: the artifact's param_dtype

    def grid(self, bits: int, param_dtype: torch.dtype):
        raise NotImplementedError

    def label(self, bits: int) -> str:
        return f"int{bits}"

    def write_back(self, w: torch.Tensor, codes: torch.Tensor, layout: Layout, scale: torch.Tensor,
                   zero: torch.Tensor | None) -> tuple[float, float] | None:
        """Overwrite ``w`` (``[rows, row_len]``, contiguous) with the dequantized ``codes`` in one native
        pass and return ``(signal, noise)`` sums; None where this kind has no such pass (the caller then
        dequantizes and copies)."""
        return None

    def quantize(self, x: torch.Tensor, layout: Layout, config, fit_weights: torch.Tensor | None,
                 param_dtype: torch.dtype, bounds: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(codes uint8 [numel], scale [rows, runs], zero [rows, runs] or None)`` of float32 ``x``,
        clamped to ``bounds`` (``[2]`` float32: the clip range) first when given."""
        grid = self.grid(config.bits, param_dtype)
        if fit_weights is None and config.search == "minmax" and isinstance(grid, UniformGrid):
            return self._minmax(grid, layout.view(x), layout, bounds)
        if bounds is not None:
            x = x.clamp(bounds[0], bounds[1])
        search, padded = config.search != "minmax", layout.runs * layout.size != layout.row_len
        if fit_weights is not None:
            x3, m3 = layout.padded(x, 0.0), layout.padded(fit_weights, 0.0)
        elif search and padded:
            x3, m3 = layout.padded(x, 0.0), layout.padded(torch.ones_like(x), 0.0)  # the padding takes no part
        else:
            x3, m3 = layout.padded_edge(x), None  # edge padding leaves each run's min/max unchanged
        q, params = fit_groups(grid, x3, m3, config.search)
        codes = layout.unpad(q).to(torch.uint8).reshape(-1)
        return codes, params[0], (params[1] if self.has_zero else None)

    def quantize_packed(self, x: torch.Tensor, layout: Layout, config, fit_weights: torch.Tensor | None,
                        param_dtype: torch.dtype, bounds: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """``(packed codes, scale, zero)`` in one pass, or None: then ``quantize`` + ``pack_codes``.
        Only plain min/max INT-N with float parameters has such a pass (``native.rtn_minmax``)."""
        return None

    def _minmax(self, grid: UniformGrid, x2: torch.Tensor, layout: Layout, bounds: torch.Tensor | None):
        """Plain min/max RTN through the native kernel (``quant/native.py``: one pass) where it
        applies, else the fused torch kernels (``quant/kernels.py``: two passes): the same codes and
        parameters as ``fit_groups(..., "minmax")`` either way."""
        if type(grid) is UniformGrid:
            done = native.rtn_minmax(x2, layout.size, grid.qmax, grid.dtype, bounds)
            if done is not None:
                return done[0].reshape(-1), done[1], done[2]
        lo, hi = kernels.run(kernels.run_range, layout.numel, x2, layout.size, bounds)
        scale, zero = grid.minmax(lo, hi)  # float16 rounding, eager: [rows, runs] is small
        codes = kernels.run(kernels.rtn_codes, layout.numel, x2, layout.size, grid, scale, zero, bounds)
        return codes.reshape(-1), scale, zero

    def dense(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
              layout: Layout) -> torch.Tensor:
        """Dequantized ``[rows, row_len]`` float32 (the only dequantization there is)."""
        grid = self.grid(bits, scale.dtype)
        params = (scale,) if zero is None else (scale, zero)
        if type(grid) is UniformGrid and zero is not None:
            out = native.rtn_dense(layout.view(codes), layout.size, scale, zero)
            if out is not None:
                return out
        if isinstance(grid, UniformGrid):  # fused when large; bitwise the eager result
            return kernels.run(kernels.dense, layout.numel, layout.view(codes), layout.size, grid, *params)
        return layout.per_element(lambda q, *p: grid.levels_(q, p), codes.float(), *params)

    def code_bytes(self, n: int, bits: int) -> int:
        return packed_bytes(n, bits)

    def packing(self, bits: int) -> str:
        return f"lsb{bits}"

    def pack_codes(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        return pack_bits(codes, bits)

    def unpack_codes(self, packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
        return unpack_bits(packed, bits, n)

    def param_bytes(self, layout: Layout, param_bytes: int) -> int:
        zero = 0 if not self.has_zero else (self.zero_dtype.itemsize if self.zero_dtype else param_bytes)
        return layout.rows * layout.runs * (param_bytes + zero)

    def pack(self, key: str, packed: torch.Tensor, scale, zero, param_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The artifact's tensors of one weight: its packed codes (``pack_codes``) and parameters."""
        out = {f"{key}{SEP}codes": packed.cpu(),
               f"{key}{SEP}scale": scale.to(param_dtype).contiguous().cpu()}
        if self.has_zero:
            out[f"{key}{SEP}zero"] = zero.to(self.zero_dtype or param_dtype).contiguous().cpu()
        return out

    def unpack(self, get: Callable[[str], torch.Tensor], key: str, bits: int, layout: Layout):
        """``(codes, scale, zero)`` read through ``get(name)``, every shape checked."""
        packed, scale, zero = self.read_packed(get, key, bits, layout)
        return self.unpack_codes(packed, bits, layout.numel), scale, zero

    def read_packed(self, get: Callable[[str], torch.Tensor], key: str, bits: int, layout: Layout):
        """``(packed codes, scale, zero)`` as stored, read through ``get(name)``, every size checked."""
        packed = get(f"{key}{SEP}codes").reshape(-1)
        if packed.dtype != torch.uint8 or packed.numel() != self.code_bytes(layout.numel, bits):
            raise ValueError(f"{key} codes hold {packed.numel()} {packed.dtype} values, expected {self.code_bytes(layout.numel, bits)} bytes")
        scale = _expect(get(f"{key}{SEP}scale"), (layout.rows, layout.runs), f"{key} scale")
        zero = _expect(get(f"{key}{SEP}zero"), (layout.rows, layout.runs), f"{key} zero") if self.has_zero else None
        if zero is not None and self.zero_dtype is not None and zero.dtype != self.zero_dtype:
            raise ValueError(f"{key} zero is {zero.dtype}, expected {self.zero_dtype}")
        return packed, scale, zero


def _expect(t: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {shape}")
    return t


class Uniform(Scheme):
    kind = "rtn"

    def grid(self, bits, param_dtype):
        return UniformGrid(bits, param_dtype)

    def quantize_packed(self, x, layout, config, fit_weights, param_dtype, bounds=None):
        if fit_weights is not None or config.search != "minmax" or not 1 <= config.bits <= 7:
            return None
        return native.rtn_minmax(layout.view(x), layout.size, 2**config.bits - 1, param_dtype, bounds, config.bits)

    def write_back(self, w, codes, layout, scale, zero):
        return native.rtn_write_back(w, layout.view(codes), layout.size, scale, zero)


class UniformZ8(Scheme):
    kind = "rtn_z8"
    zero_dtype = torch.int8

    def grid(self, bits, param_dtype):
        return UniformInt8Zero(bits, param_dtype)

    def label(self, bits: int) -> str:
        return f"int{bits} zero=int8"


class UniformZF8(UniformZ8):
    kind = "rtn_zf8"

    def grid(self, bits, param_dtype):
        return UniformFix8Zero(bits, param_dtype)

    def label(self, bits: int) -> str:
        return f"int{bits} zero=fix8"


class NF4(Scheme):
    kind = "nf4"
    has_zero = False

    def grid(self, bits, param_dtype):
        return NF4Grid(param_dtype)

    def label(self, bits: int) -> str:
        return "nf4"


class TernaryScheme(Scheme):
    """BitNet b1.58 absmean: codes {0, 1, 2} for {-1, 0, +1}, five per byte (1.6 bits)."""

    kind = "ternary"
    has_zero = False

    def label(self, bits: int) -> str:
        return "ternary"

    def quantize(self, x, layout, config, fit_weights, param_dtype, bounds=None):
        codes, gamma = ternary_codes(x, layout, config.eps, param_dtype)
        return codes, gamma, None

    def dense(self, codes, scale, zero, bits, layout):
        return layout.per_element(lambda q, g: (q - 1.0) * g, codes.float(), scale.float())

    def code_bytes(self, n: int, bits: int) -> int:
        return packed_bytes(n, 0)

    def packing(self, bits: int) -> str:
        return "base3x5"

    def pack_codes(self, codes, bits):
        return pack_ternary(codes)

    def unpack_codes(self, packed, bits, n):
        return unpack_ternary(packed, n)


_HANDLERS: dict[str, Scheme] = {}


def register(handler: Scheme) -> Scheme:
    """Add a handler under its ``kind`` (the name stored in the artifact's manifest)."""
    _HANDLERS[handler.kind] = handler
    return handler


for _h in (Uniform(), UniformZ8(), UniformZF8(), NF4(), TernaryScheme()):
    register(_h)


def handler(kind: str) -> Scheme:
    """The handler of ``kind``; a one-line error naming the known kinds otherwise."""
    if kind in _HANDLERS:
        return _HANDLERS[kind]
    guess = difflib.get_close_matches(str(kind), list(_HANDLERS), n=1)
    hint = f" (did you mean {guess[0]}?)" if guess else ""
    raise SuperweightError(f"unknown quantization kind {kind!r}{hint}: one of {', '.join(_HANDLERS)}")


def kinds() -> tuple[str, ...]:
    return tuple(_HANDLERS)
