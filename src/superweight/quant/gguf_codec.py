"""llama.cpp's block types, with the block parameters chosen by our range search (``search.py``).

``encode(weight, type, search)`` returns the bytes llama.cpp reads for one ``[rows, cols]`` tensor
(rows are GGUF's ne1, blocks run along each row) and the values those bytes dequantize to.

- ``search=False``: gguf-py's reference quantizers (``gguf.quants.quantize``), the same arithmetic
  as llama.cpp's ``quantize_row_*_ref``, for the types gguf-py quantizes (F32, F16, BF16, Q8_0,
  Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, TQ2_0).
- ``search=True``: Q4_0/Q5_0 (one signed float16 scale per 32 weights: ``SymmetricGrid``),
  Q4_1/Q5_1 (float16 scale and minimum: ``UniformGrid``) take ``search_params``' parameters for the
  objective ``sum m (x - x_hat)^2`` with ``m = sqrt(rms^2 + x^2)``, ``rms`` the block's
  (``OBJECTIVE = "sigma"``, ``fit_weights``: the weighting llama.cpp's ``quantize_row_q4_0_impl`` gives
  each weight with an importance matrix, there with the row's rms, here without the matrix). The
  reference's choice is the search's first candidate, so no block's objective is higher than with the
  reference's scale.
  Why not the flat squared error (``m = 1``)? It lowers every block's squared error against the
  reference's absmax scale by clipping each block's largest weights, and measured higher perplexity
  than llama.cpp's reference Q4_0 on SmolLM2 (WikiText-2 and LAMBADA). ``sigma`` and ``abs``
  (``rms + |x|``, llama.cpp's ``quantize_row_q4_K_ref`` weighting) measured lower than the reference
  on both texts on SmolLM2; on Gemma-3-270M both win WikiText-2 and lose LAMBADA, ``sigma`` by 0.7%,
  ``abs`` by 6%; pinning each block's largest weight (``max``) measured as the reference does
  (bench/gguf_torch.py, bench/results/gguf_torch_objectives*.json).
  The k-quants are written here, gguf-py only reads them: Q4_K/Q5_K (8 sub-blocks of 32 with a
  6-bit scale and minimum each, times the super-block's float16 ``d`` and ``dmin``) and Q6_K (16
  sub-blocks of 16 with an int8 scale times ``d``): each sub-block's range comes from
  ``search_params``, the 6/8-bit sub-block scales are rounded against ``d``, then each sub-block's
  scale codes move by one step where that lowers its error, and ``d``/``dmin`` are refitted by least
  squares (kept only where the super-block's objective drops). Their objective is the same weighted one,
  ``rms`` the super-block's (``quantize_row_q4_K_ref`` weighs each weight by the super-block's rms plus
  ``|x|``); it was the flat squared error before git 7371735 (measured against llama.cpp's
  k-quant quantizer in bench/gguf_export.py).

Rows whose length is not a multiple of a k-quant's 256 fall back the way llama.cpp's quantizer
falls back (``FALLBACK``), so a file matches ``llama-quantize``'s type for type.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.errors import SuperweightError
from .search import SymmetricGrid, UniformGrid, group_error, search_params

QK_K = 256
REFERENCE = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "tq1_0", "tq2_0")
SEARCHED = ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
TYPES = tuple(sorted(set(REFERENCE) | set(SEARCHED)))
# llama-quant.cpp: a row that is not a multiple of the type's block takes this type instead
OBJECTIVES = ("flat", "x2", "x4", "abs", "sigma", "max", "x2max")
OBJECTIVE = "sigma"
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "tq1_0": "q4_0", "tq2_0": "q4_0"}


def ggml_type(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def check_type(name: str) -> str:
    """A type this writer can write (lower case), or one line naming those it can."""
    if name.lower() not in TYPES:
        raise SuperweightError(f"GGUF type {name!r} cannot be written: use one of {', '.join(TYPES)}")
    return name.lower()


def block_size(name: str) -> int:
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[ggml_type(name)][0]


def fitting_type(name: str, cols: int) -> str:
    """``name``, or llama.cpp's fallback when a row of ``cols`` weights is not whole blocks of it (then F16)."""
    name = check_type(name)
    if cols % block_size(name) == 0:
        return name
    alt = FALLBACK.get(name)
    return alt if alt is not None and cols % block_size(alt) == 0 else "f16"


def encode(weight: torch.Tensor, name: str, search: bool, objective: str = OBJECTIVE) -> tuple[np.ndarray, torch.Tensor]:
    """``weight`` ([rows, cols]) as ``name``'s bytes ([rows, bytes per row], uint8; float types as their
    own dtype) and the float32 values they hold. ``name`` must fit the rows (``fitting_type``)."""
    w = weight.detach().float().cpu().contiguous()
    rows, cols = w.shape
    if cols % block_size(name) != 0:
        raise SuperweightError(f"a row of {cols} weights is not whole {name} blocks: use fitting_type first")
    if search and name in SEARCHED:
        kind = _legacy if name[-2:] in ("_0", "_1") else _kquant
        raw, values = kind(w.reshape(-1, block_size(name)), name, objective)
        return raw.reshape(rows, -1), values.reshape(rows, cols)
    return _reference(w, name)


def _reference(w: torch.Tensor, name: str) -> tuple[np.ndarray, torch.Tensor]:
    from gguf import quants

    t = ggml_type(name)
    x = w.numpy()
    if name == "f32":
        return x.copy(), w.clone()
    if name == "f16":
        raw = x.astype(np.float16)
        return raw, torch.from_numpy(raw.astype(np.float32))
    try:
        raw = quants.quantize(x, t)
    except (NotImplementedError, quants.QuantError) as exc:
        raise SuperweightError(f"gguf-py cannot write {name} ({exc}): pass --search mse for the k-quants") from None
    return raw, torch.from_numpy(quants.dequantize(raw, t).reshape(w.shape).astype(np.float32))


# ---------------------------------------------------------------- Q4_0, Q4_1, Q5_0, Q5_1 (32 weights)


def fit_weights(x: torch.Tensor, objective: str) -> torch.Tensor:
    """Each weight's share of its block's objective ``sum m (x - x_hat)^2`` (``x``: [blocks, size])."""
    if objective == "flat":
        return torch.ones_like(x)
    if objective == "x2":
        return x * x
    if objective == "x4":
        return x.square().square()
    if objective in ("max", "x2max"):  # the block's largest |x| weighs as much as 1000 others: kept as the reference keeps it
        m = torch.ones_like(x) if objective == "max" else x * x
        top = m.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) * 1000
        return m.scatter(-1, x.abs().argmax(-1, keepdim=True), top)
    rms = x.square().mean(-1, keepdim=True).sqrt()
    if objective == "abs":
        return rms + x.abs()
    if objective == "sigma":
        return (rms * rms + x * x).sqrt()
    raise SuperweightError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")


def _legacy(x: torch.Tensor, name: str, objective: str = OBJECTIVE) -> tuple[np.ndarray, torch.Tensor]:
    bits = 4 if name.startswith("q4") else 5
    symmetric = name.endswith("_0")
    grid = SymmetricGrid(bits, torch.float16) if symmetric else UniformGrid(bits, torch.float16)
    x3, m3 = x.unsqueeze(1), fit_weights(x, objective).unsqueeze(1)
    p = search_params(grid, x3, m3)
    if not symmetric:
        p = _at_least_reference(grid, x3, m3, p)
    q = grid.codes(x3, p)
    values = grid.levels_(q.clone(), p).reshape(x.shape)
    q = q.reshape(x.shape).to(torch.uint8).numpy()
    head = [_f16_bytes(t) for t in p]  # d (and m)
    qs = (q[:, :16] & 0x0F) | (q[:, 16:] << 4)
    parts = head + ([] if bits == 4 else [np.packbits(q >> 4, axis=-1, bitorder="little")]) + [qs]
    return np.concatenate(parts, axis=-1), values


def _at_least_reference(grid: UniformGrid, x3: torch.Tensor, m3: torch.Tensor, p):
    """Per block, the search's parameters or the reference's (``d = (max - min) / qmax``, ``m = min``, both
    rounded to nearest float16), whichever errs less (weighted by ``m3``): the search starts from a covering min/max
    (``UniformGrid.minmax`` rounds outward), which is not quite the reference's."""
    lo, hi = x3.amin(-1, keepdim=True), x3.amax(-1, keepdim=True)
    d = ((hi - lo) / grid.qmax).half()
    ref = (torch.where(d > 0, d, torch.ones_like(d)), lo.half())
    better = group_error(grid, x3, m3, ref) < group_error(grid, x3, m3, p)
    return tuple(torch.where(better, r, o) for r, o in zip(ref, p))


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1, 1).to(torch.float16).numpy().view(np.uint8)


# ---------------------------------------------------------------- Q4_K, Q5_K, Q6_K (256 weights)


class _KSpec:
    """A k-quant's sub-blocks: ``x_hat = S q - M`` per sub-block, ``S = d sc``, ``M = dmin mn`` (Q4_K,
    Q5_K: codes 0..qmax, 6-bit ``sc``/``mn``) or ``M = S half`` (Q6_K: signed 8-bit ``sc``, no min)."""

    def __init__(self, name: str):
        self.symmetric = name == "q6_k"
        self.bits = {"q4_k": 4, "q5_k": 5, "q6_k": 6}[name]
        self.sub = 16 if self.symmetric else 32
        self.qmax = 2**self.bits - 1
        self.half = 2 ** (self.bits - 1) if self.symmetric else 0
        self.sc_range = (-128, 127) if self.symmetric else (0, 63)

    def grid(self):
        return SymmetricGrid(self.bits, torch.float32) if self.symmetric else UniformGrid(self.bits, torch.float32)

    def scales(self, d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor, mn: torch.Tensor):
        s = d.float() * sc
        return s, (s * self.half if self.symmetric else dmin.float() * mn)

    def codes(self, x3: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        safe = torch.where(s != 0, s, torch.ones_like(s))
        return torch.where(s != 0, (x3 + m) / safe, torch.zeros_like(x3)).round_().clamp_(0, self.qmax)

    def error(self, x3, m3, d, sc, dmin, mn) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sub-block's objective ``sum m3 (x - x_hat)^2`` and codes, for these parameters."""
        s, m = self.scales(d, sc, dmin, mn)
        q = self.codes(x3, s, m)
        return (m3 * (s * q - m - x3).square()).sum(-1, keepdim=True, dtype=torch.float64), q


def _round_scales(values: torch.Tensor, top: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float16 super-block factor and integer sub-block codes with ``factor * code ~ values``: the
    value of largest magnitude maps to ``top`` (``-128`` for Q6_K's signed scales, as llama.cpp)."""
    idx = values.abs().argmax(1, keepdim=True)
    extreme = values.gather(1, idx)
    f = (extreme / top).to(torch.float16)
    f = torch.where(f != 0, f, torch.ones_like(f))
    return f, (values / f.float()).round().clamp(lo, hi)


def _kquant(x: torch.Tensor, name: str, objective: str = OBJECTIVE) -> tuple[np.ndarray, torch.Tensor]:
    spec = _KSpec(name)
    x3 = x.reshape(x.shape[0], QK_K // spec.sub, spec.sub)
    m3 = fit_weights(x, objective).reshape(x3.shape)  # the super-block's rms, as quantize_row_q4_K_ref weighs
    p = search_params(spec.grid(), x3, m3)
    lo, hi = spec.sc_range
    if spec.symmetric:
        d, sc = _round_scales(p[0], lo, lo, hi)
        dmin, mn = torch.zeros_like(d), torch.zeros_like(sc)
    else:
        d, sc = _round_scales(p[0], hi, lo, hi)
        dmin, mn = _round_scales((-p[1]).clamp_min(0), hi, lo, hi)
    for _ in range(2):
        sc, mn = _nudge(spec, x3, m3, d, sc, dmin, mn)
        d, dmin = _refit_factors(spec, x3, m3, d, sc, dmin, mn)
    _, q = spec.error(x3, m3, d, sc, dmin, mn)
    s, m = spec.scales(d, sc, dmin, mn)
    values = (s * q - m).reshape(x.shape)
    return _pack_k(name, d, dmin, sc, mn, q.reshape(x.shape[0], QK_K)), values


def _nudge(spec: _KSpec, x3, m3, d, sc, dmin, mn):
    """Each sub-block's scale (and min) code moved by -1, 0 or +1, whichever gives the lowest objective."""
    lo, hi = spec.sc_range
    best_e, _ = spec.error(x3, m3, d, sc, dmin, mn)
    best_sc, best_mn = sc, mn
    steps = (-1, 0, 1)
    for a in steps:
        for b in (steps if not spec.symmetric else (0,)):
            if a == 0 and b == 0:
                continue
            c_sc, c_mn = (sc + a).clamp(lo, hi), (mn + b).clamp(lo, hi)
            e, _ = spec.error(x3, m3, d, c_sc, dmin, c_mn)
            take = e < best_e
            best_e = torch.where(take, e, best_e)
            best_sc = torch.where(take.squeeze(-1), c_sc.squeeze(-1), best_sc.squeeze(-1)).unsqueeze(-1)
            best_mn = torch.where(take.squeeze(-1), c_mn.squeeze(-1), best_mn.squeeze(-1)).unsqueeze(-1)
    return best_sc, best_mn


def _refit_factors(spec: _KSpec, x3, m3, d, sc, dmin, mn):
    """Least squares of ``x`` on ``sc (q - half)`` and ``-mn`` per super-block, weighted by ``m3`` (codes
    fixed): new float16 ``d`` and ``dmin``, kept where the super-block's objective (codes re-rounded) is lower."""
    e0, q = spec.error(x3, m3, d, sc, dmin, mn)
    a = (sc * (q - spec.half)).double().flatten(1)
    x, w = x3.double().flatten(1), m3.double().flatten(1)
    if spec.symmetric:
        den = (w * a * a).sum(1, keepdim=True)
        nd = torch.where(den > 0, (w * a * x).sum(1, keepdim=True) / den.clamp_min(1e-300), d.double().squeeze(-1))
        nmin = dmin.double().squeeze(-1)
    else:
        b = (-mn).double().expand_as(q).flatten(1)
        aa, ab, bb = (w * a * a).sum(1), (w * a * b).sum(1), (w * b * b).sum(1)
        ax, bx = (w * a * x).sum(1), (w * b * x).sum(1)
        det = aa * bb - ab * ab
        ok = det > 1e-12 * (aa * bb).clamp_min(1e-300)
        safe = torch.where(ok, det, torch.ones_like(det))
        nd = torch.where(ok, (ax * bb - bx * ab) / safe, d.double().flatten()).unsqueeze(1)
        nmin = torch.where(ok, (aa * bx - ab * ax) / safe, dmin.double().flatten()).unsqueeze(1)
    nd, nmin = nd.unsqueeze(-1).to(torch.float16), nmin.unsqueeze(-1).to(torch.float16)
    nd = torch.where(torch.isfinite(nd) & (nd != 0), nd, d)
    nmin = torch.where(torch.isfinite(nmin), nmin, dmin)
    e1, _ = spec.error(x3, m3, nd, sc, nmin, mn)
    take = e1.sum(1, keepdim=True) < e0.sum(1, keepdim=True)
    return torch.where(take, nd, d), torch.where(take, nmin, dmin)


def _pack_k(name: str, d, dmin, sc, mn, q: torch.Tensor) -> np.ndarray:
    n = q.shape[0]
    q = q.to(torch.uint8).numpy()
    dd = _f16_bytes(d)
    if name == "q6_k":
        h = q.reshape(n, 2, 4, 32)  # halves of 128; in each, four runs of 32
        ql = np.concatenate([(h[:, :, 0] & 15) | ((h[:, :, 2] & 15) << 4), (h[:, :, 1] & 15) | ((h[:, :, 3] & 15) << 4)],
                            axis=-1).reshape(n, 128)
        qh = sum(((h[:, :, r] >> 4) & 3) << (2 * r) for r in range(4)).astype(np.uint8).reshape(n, 64)
        scales = sc.reshape(n, 16).to(torch.int8).numpy().view(np.uint8)
        return np.concatenate([ql, qh, scales, dd], axis=-1)
    s6, m6 = sc.reshape(n, 8).to(torch.uint8).numpy(), mn.reshape(n, 8).to(torch.uint8).numpy()
    scales = np.concatenate([s6[:, :4] | ((s6[:, 4:] >> 4) << 6), m6[:, :4] | ((m6[:, 4:] >> 4) << 6),
                             (s6[:, 4:] & 15) | ((m6[:, 4:] & 15) << 4)], axis=-1)
    sub = q.reshape(n, 4, 2, 32)  # four runs of 64: low nibbles one sub-block, high nibbles the next
    qs = ((sub[:, :, 0] & 15) | ((sub[:, :, 1] & 15) << 4)).reshape(n, 128)
    parts = [dd, _f16_bytes(dmin), scales]
    if name == "q5_k":
        bits = q.reshape(n, 8, 32) >> 4
        parts.append(sum((bits[:, j] & 1) << j for j in range(8)).astype(np.uint8))
    return np.concatenate(parts + [qs], axis=-1)
