"""Pure tensor primitives: RTN INT-N, NF4, absmean ternary, clipping, hold-out, SQNR.

Asymmetric RTN (the paper's Sec. 4): per run, ``zero = min`` and ``scale = (max - min) / (2^N - 1)``,
``q = round((x - zero) / scale)`` in ``[0, 2^N - 1]``, ``x_hat = q * scale + zero`` (the zero point
is kept in the float domain, as HQQ does). Scales and zero points are stored in ``param_dtype``
(float16 by default); the zero point is rounded down and the scale up to that dtype *before* the
codes are computed, so the stored parameters are the ones used, the range still covers every
value, and the dequantized error stays within half a step. ``QuantizedTensor.dequantize`` is the
only dequantization there is: the in-memory fake quantization and the packed artifact both call it,
which is why a reloaded artifact is bitwise equal to the fake-quantized model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..core.errors import SuperweightError
from .config import RTN, Percentile, Ternary, ZScore
from . import native
from .layout import Layout, make_layout
from .schemes import handler



@dataclass
class QuantizedTensor:
    """Codes (one uint8 per element, tensor order), per-run parameters and a sparse exact part.

    ``kind`` names the scheme handler (``quant/schemes.py``) that dequantizes, packs and sizes it.
    The codes may be held packed only (``packed``: the stream the artifact stores, as
    ``quantize(..., write_back=False)`` makes them in one pass); ``codes`` unpacks them on first use."""

    kind: str  # "rtn", "rtn_z8", "nf4" or "ternary"
    bits: int  # code width before packing (ternary: 2 levels-bits, packed at 1.6)
    shape: tuple[int, ...]
    layout: Layout
    _codes: torch.Tensor | None  # uint8 [numel]; None while only ``packed`` is held
    scale: torch.Tensor  # [rows, runs]
    zero: torch.Tensor | None  # [rows, runs] for "rtn" (float) and "rtn_z8" (int8), else None
    sparse_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64, device="cpu"))
    sparse_val: torch.Tensor = field(default_factory=lambda: torch.zeros(0, device="cpu"))
    packed: torch.Tensor | None = None  # the handler's packed codes (``handler.pack_codes``), when made

    def __post_init__(self):
        if self._codes is None and self.packed is None:
            raise ValueError("a QuantizedTensor needs its codes, packed or not")

    @property
    def codes(self) -> torch.Tensor:
        """uint8 ``[numel]``, one code per element (unpacked from ``packed`` when only that is held)."""
        if self._codes is None:
            self._codes = self.handler.unpack_codes(self.packed, self.bits, self.numel).to(self.scale.device)
        return self._codes

    def packed_codes(self) -> torch.Tensor:
        """The codes as the artifact stores them (``handler.pack_codes``), packed once."""
        if self.packed is None:
            self.packed = self.handler.pack_codes(self._codes, self.bits)
        return self.packed

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def handler(self):
        return handler(self.kind)

    def dense(self) -> torch.Tensor:
        """The dequantized codes in float32, ``[rows, row_len]``, before the sparse part."""
        return self.handler.dense(self.codes, self.scale, self.zero, self.bits, self.layout)

    def write_into(self, w: torch.Tensor) -> float:
        """Overwrite ``w`` (the quantized weight, any shape with ``numel`` elements) with
        ``dequantize(w.dtype)`` and return the SQNR (dB) of the new values against the old. One native
        pass where the handler has one (RTN: ``native.rtn_write_back``, float32 and bfloat16 on the CPU), else
        dequantize + ``sqnr`` + copy."""
        sums, keep = None, None
        if w.is_contiguous():
            keep = w.detach().reshape(-1)[self.sparse_idx.to(w.device)].clone() if self.sparse_idx.numel() else None
            sums = self.handler.write_back(self.layout.view(w.detach()), self.codes, self.layout, self.scale, self.zero)
        if sums is None:
            w_hat = self.dequantize(w.dtype)
            db = sqnr(w, w_hat)
            w.detach().copy_(w_hat)
            return db
        signal, noise = sums
        if keep is not None:  # the sparse part's exact values back; their error leaves the noise
            flat, idx = w.detach().reshape(-1), self.sparse_idx.to(w.device)
            noise -= float((flat[idx].double() - keep.double()).square().sum())
            flat[idx] = self.sparse_val.to(device=w.device, dtype=w.dtype)
        return _db(signal, max(0.0, noise))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = self.dense().to(dtype).contiguous().reshape(self.shape)
        if self.sparse_idx.numel():
            out.view(-1)[self.sparse_idx.to(out.device)] = self.sparse_val.to(device=out.device, dtype=dtype)
        return out


# ---------------------------------------------------------------- helpers


def sqnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (``inf`` for an exact copy): float64 sums, one
    native pass (``native.sqnr_sums``) or float32 products and one temporary."""
    x, x_hat = x.detach().reshape(-1), x_hat.detach().reshape(-1)
    sums = native.sqnr_sums(x, x_hat) if x.dtype == x_hat.dtype == torch.float32 else None
    if sums is None:
        x, diff = x.float(), (x_hat.float() - x.float())
        sums = float(torch.dot(x, x)), float(diff.square_().sum(dtype=torch.float64))
    return _db(*sums)


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    return 10.0 * math.log10(signal / noise) if signal > 0 else float("-inf")


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and sample standard deviation of ``x`` from its sum and sum of squares in float64 (the
    one-pass formula loses nothing at the mean/std ratios of weights): one native pass
    (``native.sum_squares``, the same for any thread count) or, without it, one float64 copy, its
    sum and its dot with itself (6x faster than ``torch.std_mean`` on CPU)."""
    sums = native.sum_squares(x.reshape(-1)) if x.is_contiguous() else None
    if sums is None:
        d = x.reshape(-1).double()
        sums = float(d.sum()), float(torch.dot(d, d))
    total, squares = sums
    n = x.numel()
    mean = total / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(max(0.0, (squares - total * mean) / (n - 1)))


def clip_bounds(w: torch.Tensor, clip: ZScore | Percentile | None) -> torch.Tensor | None:
    """The clip range of ``w`` as a float32 ``[2]`` tensor (low, high) on its device, or None:
    mean +- z std for a z-score, +- the percentile of ``|w|`` for a percentile."""
    if clip is None:
        return None
    x = w.detach().float()
    if isinstance(clip, ZScore):
        mean, std = _mean_std(x)
        lo, hi = mean - clip.z * std, mean + clip.z * std
    else:
        flat = x.abs().reshape(-1)
        k = max(1, min(flat.numel(), int(round(clip.p / 100.0 * flat.numel()))))
        hi = float(flat.kthvalue(k).values)
        lo = -hi
    return torch.tensor([lo, hi], dtype=torch.float32, device=x.device)  # as clamp(x, lo, hi) rounds them


def clip_tensor(w: torch.Tensor, clip: ZScore | Percentile | None) -> torch.Tensor:
    """``w`` in float32, clamped by a z-score (mean +- z std) or a percentile of ``|w|``."""
    x, bounds = w.detach().float(), clip_bounds(w, clip)
    return x if bounds is None else x.clamp(bounds[0], bounds[1])


# ---------------------------------------------------------------- quantizers


def rtn_codes(
    x: torch.Tensor, bits: int, layout: Layout, param_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max RTN of float32 ``x``: ``(codes uint8 [numel], scale, zero)`` per run."""
    return handler("rtn").quantize(x, layout, RTN(bits=bits), None, param_dtype)


def nf4_codes(x: torch.Tensor, layout: Layout, param_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4: absmax per run (rounded up), nearest NormalFloat level: ``(codes, scale)``."""
    return handler("nf4").quantize(x, layout, RTN(levels="nf4"), None, param_dtype)[:2]


def topk_outliers(w: torch.Tensor, k: int, exclude: torch.Tensor) -> torch.Tensor:
    """Flat indices of the ``k`` largest ``|w|`` not in ``exclude``."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=w.device)
    mag = w.detach().float().abs().reshape(-1).clone()
    mag[exclude.to(mag.device)] = -1.0
    return mag.topk(min(k, mag.numel() - exclude.numel())).indices


def outlier_count(numel: int, budget_bits: float, value_bytes: int) -> int:
    """Sparse values a budget of ``budget_bits`` per weight pays for (int32 index + value each)."""
    return int(budget_bits * numel // (8 * (4 + value_bytes)))


def _kept(w: torch.Tensor, keep) -> torch.Tensor:
    if keep is None or (not isinstance(keep, torch.Tensor) and len(keep) == 0):
        return torch.zeros(0, dtype=torch.int64, device=w.device)
    keep_idx = torch.as_tensor(keep, dtype=torch.int64, device=w.device).reshape(-1)
    if keep_idx.numel() and (int(keep_idx.min()) < 0 or int(keep_idx.max()) >= w.numel()):
        raise SuperweightError(f"a kept index is outside the tensor of shape {tuple(w.shape)}")
    return keep_idx


def _fit_weights(x: torch.Tensor, held: torch.Tensor, fit_weights: torch.Tensor | None) -> torch.Tensor:
    """Per-element fit weights (``fit_weights`` or ones), 0 at the held-out indices."""
    m = torch.ones(x.shape, dtype=torch.float32, device=x.device) if fit_weights is None else \
        fit_weights.to(device=x.device, dtype=torch.float32).reshape(x.shape).clone()  # contiguous: ``held`` is [out, in] flat
    m.view(-1)[held] = 0.0
    return m


def quantize_tensor(
    w: torch.Tensor, config: RTN | Ternary, keep: torch.Tensor | list[int] | None = None,
    param_dtype: torch.dtype = torch.float16, fit_weights: torch.Tensor | None = None, packed: bool = False,
) -> QuantizedTensor:
    """Quantize ``w`` (``[out, in]`` or any shape) under ``config``.

    ``keep`` are flat indices (e.g. super weights) that get their exact original value back through
    the sparse part. Under plain RTN and the paper's recipe they take part in clipping and
    quantization like the rest; under the outlier-aware options (``config.holds_out_of_range``) they
    and the ``config.outliers`` budget's largest other weights leave their group's range.
    ``fit_weights`` (same shape as ``w``) weight the range search's error (``search="mse"``).
    ``packed=True``: the codes may come packed only (one native pass for min/max RTN, what an
    artifact needs); ``QuantizedTensor.codes`` unpacks them when asked.
    """
    keep_idx = _kept(w, keep)
    per_channel = getattr(config, "per_channel", False)
    layout = make_layout(tuple(w.shape), config.group, config.block, per_channel, config.oversize)
    extra = getattr(config, "topk", 0)
    if isinstance(config, RTN) and config.outliers:
        extra = outlier_count(w.numel(), config.outliers, w.element_size())
    if extra > 0:
        keep_idx = torch.cat([keep_idx, topk_outliers(w, extra, keep_idx)])
    if keep_idx.numel():
        keep_idx = torch.unique(keep_idx)  # sorted
    x = w.detach().float()
    bounds = clip_bounds(w, config.clip) if isinstance(config, RTN) else None  # clamped inside the quantizer
    m = None
    if isinstance(config, RTN) and config.holds_out_of_range:
        m = _fit_weights(x, keep_idx, fit_weights)
    bits = 2 if isinstance(config, Ternary) else config.bits
    val = w.detach().reshape(-1)[keep_idx].clone() if keep_idx.numel() else w.new_empty(0)
    done = handler(config.kind).quantize_packed(x, layout, config, m, param_dtype, bounds) if packed else None
    if done is not None:
        return QuantizedTensor(config.kind, bits, tuple(w.shape), layout, None, done[1], done[2], keep_idx, val, done[0])
    codes, scale, zero = handler(config.kind).quantize(x, layout, config, m, param_dtype, bounds)
    return QuantizedTensor(config.kind, bits, tuple(w.shape), layout, codes, scale, zero, keep_idx, val)


def fake_quantize(w: torch.Tensor, config: RTN | Ternary, keep=None, param_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``w`` quantized and dequantized (same dtype and shape); kept indices exact."""
    return quantize_tensor(w, config, keep, param_dtype).dequantize(w.dtype)


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Asymmetric per-token (last dimension) RTN, quantized and dequantized, float32 parameters."""
    flat = x.reshape(-1, x.shape[-1]).float()
    layout = Layout(flat.shape[0], flat.shape[1], flat.shape[1])
    codes, scale, zero = rtn_codes(flat, bits, layout, torch.float32)
    qt = QuantizedTensor("rtn", bits, tuple(flat.shape), layout, codes, scale, zero)
    return qt.dense().reshape(x.shape).to(x.dtype)


def holdout_quantize(x: torch.Tensor, mask: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The paper's super-activation hold-out: masked elements are replaced by the tensor's median,
    everything is quantized per token and dequantized, then the masked elements are restored."""
    if not bool(mask.any()):
        return quantize_per_token(x, bits)
    filled = torch.where(mask, x.detach().float().median().to(x.dtype), x)
    return torch.where(mask, x, quantize_per_token(filled, bits))


# ---------------------------------------------------------------- sizes in the file


def sparse_dtype(values: torch.Tensor) -> torch.dtype:
    """float16 when every value survives the round trip exactly, else the values' own dtype."""
    return torch.float16 if torch.equal(values.half().to(values.dtype), values) else values.dtype


def predicted_bytes(qt: QuantizedTensor, param_bytes: int = 2) -> int:
    """Bytes a quantized tensor takes in the file, from the scheme alone (codes, params, sparse)."""
    h = qt.handler
    codes = h.code_bytes(qt.numel, qt.bits)
    return codes + h.param_bytes(qt.layout, param_bytes) + sparse_bytes(qt)


def sparse_bytes(qt: QuantizedTensor) -> int:
    """Bytes of a quantized tensor's sparse part: an int32 index and a value per kept element."""
    k = int(qt.sparse_idx.numel())
    return k * (4 + torch.empty(0, dtype=sparse_dtype(qt.sparse_val), device="cpu").element_size()) if k else 0
