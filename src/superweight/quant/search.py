"""Per-group range search: the scale and zero point that minimise each group's reconstruction error.

Plain RTN takes a group's ``[min, max]`` as its range, so one large weight stretches the step for
the whole group. Here each group's parameters are chosen to minimise the (weighted) squared error
``sum m * (x - x_hat)^2`` over the group, in two data-free steps:

1. a grid search over ranges shrunk about the group's centre (``SHRINK``: 100%, 90% .. 50% of
   the min/max range), the best per group kept;
2. ``LS_ROUNDS`` rounds of alternating least squares (Lloyd's algorithm on a uniform grid): with the
   codes fixed, the best ``(scale, zero)`` is a closed-form weighted linear regression of ``x`` on the
   codes; then the codes are re-rounded to the new grid.

Every candidate is stored in the artifact's own format (float16 scale, float16 or int8 zero point)
and its error measured with the dequantization the artifact uses; a candidate replaces a group's
current parameters only if its error is lower. The first candidate is plain min/max RTN, so the
result is never worse than RTN on any group (a tested property), whatever the float rounding.

Two searches, two objectives (``search="mse"`` and ``search="hqq"``): the range search above
minimises the squared error, moving scale and zero together, and its accept-if-better loop is what
makes the "never worse than min/max" guarantee hold. ``hqq_zero_search`` is HQQ's solver as hqq runs
it (the min/max step kept, an integer zero point to start at 4 bits, proximal l_0.7 steps on the
zero point, stopped by the tensor's mean absolute error): its squared error is *higher*, yet at 4 bits
and group 64 it gives the lower perplexity on both real models measured (docs/quantize.md), so it is
kept as it is, with our hold-outs and fit weights added, not "improved".

``m`` (the fit weights, ``[rows, runs, size]`` like ``x``) is 0 for held-out values (they leave the
range entirely), 1 for ordinary weights and more for weights that deserve care (the channels that
read the super activation).
"""
from __future__ import annotations

import torch

from ..core.errors import SuperweightError
from .codes import NF4_LEVELS, to_dtype

SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # fractions of the min/max range
LS_ROUNDS = 4
HQQ = (0.7, 20, 10.0)  # hqq's defaults (optimize_weights_proximal_legacy): l_p norm, iterations, beta
_INF = float("inf")

Params = tuple[torch.Tensor, ...]  # each [rows, runs, 1]


def _positive(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


class UniformGrid:
    """``x_hat = q * scale + zero``, float16 (``dtype``) scale and zero."""

    def __init__(self, bits: int, dtype: torch.dtype):
        self.qmax, self.dtype = 2**bits - 1, dtype

    def minmax(self, lo: torch.Tensor, hi: torch.Tensor) -> Params:
        """Plain RTN: zero rounded down, scale up (the range still covers every value). ``lo + 0``
        turns a -0 minimum into +0, so the stored zero never depends on which zero a reduction kept."""
        zero = to_dtype(lo + 0.0, self.dtype, -_INF)
        return _positive(to_dtype((hi - zero.float()) / self.qmax, self.dtype, _INF)), zero

    def from_affine(self, s: torch.Tensor, z: torch.Tensor) -> Params:
        return _positive(to_dtype(s, self.dtype, _INF)), to_dtype(z, self.dtype, -_INF)

    def from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> Params:
        return self.from_affine((hi - lo) / self.qmax, lo)

    def codes(self, x3: torch.Tensor, p: Params, out: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest level's code (float), written into ``out`` when given (no allocation)."""
        return torch.sub(x3, p[1].float(), out=out).div_(p[0].float()).round_().clamp_(0, self.qmax)

    def levels_(self, q: torch.Tensor, p: Params) -> torch.Tensor:
        """Codes to values, in place (the artifact's dequantization: ``q * scale + zero``)."""
        return q.mul_(p[0].float()).add_(p[1].float())

    def affine(self, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        return p[0].float(), p[1].float()


class UniformInt8Zero(UniformGrid):
    """``x_hat = (q - zq) * scale``: float16 scale, integer zero point ``zq`` stored as int8."""

    def from_affine(self, s: torch.Tensor, z: torch.Tensor) -> Params:
        scale = _positive(to_dtype(s, self.dtype, _INF))
        return scale, (-z / scale.float()).round().clamp(-128, 127).to(torch.int8)

    def minmax(self, lo: torch.Tensor, hi: torch.Tensor) -> Params:
        s = (hi - lo) / self.qmax
        return self.from_affine(torch.where(s > 0, s, lo.abs()), lo)  # one value: a step of |value| holds it

    def from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> Params:
        return self.minmax(lo, hi)

    def codes(self, x3: torch.Tensor, p: Params, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.div(x3, p[0].float(), out=out).add_(p[1].float()).round_().clamp_(0, self.qmax)

    def levels_(self, q: torch.Tensor, p: Params) -> torch.Tensor:
        return q.sub_(p[1].float()).mul_(p[0].float())

    def affine(self, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        return p[0].float(), -p[1].float() * p[0].float()


class UniformFix8Zero(UniformInt8Zero):
    """``x_hat = (q - zq / 2^f) * scale``: the zero point as an 8-bit fixed-point number of steps with
    ``f = 7 - bits`` fraction bits (4-bit codes: 1/8 of a step, zero points from -16 to +15.875 steps),
    fine enough for HQQ-style zero moves, still 8 bits a group."""

    def __init__(self, bits: int, dtype: torch.dtype):
        super().__init__(bits, dtype)
        self.unit = 2.0 ** -max(0, 7 - bits)

    def from_affine(self, s: torch.Tensor, z: torch.Tensor) -> Params:
        scale = _positive(to_dtype(s, self.dtype, _INF))
        return scale, (-z / scale.float() / self.unit).round().clamp(-128, 127).to(torch.int8)

    def codes(self, x3: torch.Tensor, p: Params, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.div(x3, p[0].float(), out=out).add_(p[1].float() * self.unit).round_().clamp_(0, self.qmax)

    def levels_(self, q: torch.Tensor, p: Params) -> torch.Tensor:
        return q.sub_(p[1].float() * self.unit).mul_(p[0].float())

    def affine(self, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        return p[0].float(), -p[1].float() * self.unit * p[0].float()


class NF4Grid:
    """``x_hat = NF4[q] * scale`` (QLoRA NormalFloat4), float16 absmax scale."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def minmax(self, lo: torch.Tensor, hi: torch.Tensor) -> Params:
        return (_positive(to_dtype(torch.maximum(lo.abs(), hi.abs()), self.dtype, _INF)),)

    def from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> Params:
        return self.minmax(lo, hi)

    def codes(self, x3: torch.Tensor, p: Params, out: torch.Tensor | None = None) -> torch.Tensor:
        levels = NF4_LEVELS.to(x3.device)
        q = torch.bucketize(x3 / p[0].float(), (levels[1:] + levels[:-1]) / 2)
        return q.float() if out is None else out.copy_(q)

    def levels_(self, q: torch.Tensor, p: Params) -> torch.Tensor:
        return q.copy_(NF4_LEVELS.to(q.device)[q.long()]).mul_(p[0].float())

    def refit(self, x3: torch.Tensor, m3: torch.Tensor, q: torch.Tensor, p: Params) -> Params:
        lv = NF4_LEVELS.to(x3.device)[q.long()].double()
        num, den = (m3 * x3 * lv).sum(-1, keepdim=True), (m3 * lv * lv).sum(-1, keepdim=True)
        s = num / den.clamp_min(1e-300)
        ok = (den > 0) & (s > 0)
        return (_positive(to_dtype(torch.where(ok, s, p[0].double()).float(), self.dtype, _INF)),)


def _nearest(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to the nearest ``dtype`` value; an overflow is refused as ``to_dtype`` refuses it."""
    h = x.to(dtype)
    if not torch.isfinite(h).all():
        raise SuperweightError(f"quantization parameters overflow {dtype}: the tensor holds values too large for it")
    return h


class SymmetricGrid:
    """``x_hat = (q - half) * scale`` with a signed float16 scale, ``q`` in ``[0, 2 half)``: llama.cpp's
    Q4_0/Q5_0 blocks (``half`` 8, 16) and Q6_K sub-blocks (32). The extra negative level is used the way
    llama.cpp uses it: the group's value of largest magnitude maps to ``-half`` (``minmax``, its
    reference quantizer's choice)."""

    def __init__(self, bits: int, dtype: torch.dtype):
        self.half, self.qmax, self.dtype = 2 ** (bits - 1), 2**bits - 1, dtype

    def minmax(self, lo: torch.Tensor, hi: torch.Tensor) -> Params:
        extreme = torch.where(hi.abs() >= lo.abs(), hi, lo)  # llama.cpp: the signed value of largest |x|
        s = _nearest(extreme / -self.half, self.dtype)
        return (torch.where(s != 0, s, torch.ones_like(s)),)

    def from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> Params:
        return self.minmax(lo, hi)

    def codes(self, x3: torch.Tensor, p: Params, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.div(x3, p[0].float(), out=out).round_().add_(self.half).clamp_(0, self.qmax)

    def levels_(self, q: torch.Tensor, p: Params) -> torch.Tensor:
        return q.sub_(self.half).mul_(p[0].float())

    def refit(self, x3: torch.Tensor, m3: torch.Tensor, q: torch.Tensor, p: Params) -> Params:
        """The least-squares scale for fixed codes: ``sum m x l / sum m l^2`` with ``l = q - half``."""
        lv = (q - self.half).double()
        num, den = (m3 * x3 * lv).sum(-1, keepdim=True), (m3 * lv * lv).sum(-1, keepdim=True)
        s = torch.where(den > 0, num / den.clamp_min(1e-300), p[0].double()).float()
        s = _nearest(s, self.dtype)
        return (torch.where(s != 0, s, p[0]),)


Grid = UniformGrid | NF4Grid | SymmetricGrid


def weighted_range(x3: torch.Tensor, m3: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each group over the elements with a positive weight (0, 0 for none)."""
    if m3 is None:  # amin + amax: two passes, yet ~4x faster than torch.aminmax over short rows on CPU
        return x3.amin(-1, keepdim=True), x3.amax(-1, keepdim=True)
    live = m3 > 0
    lo = torch.where(live, x3, _INF).amin(-1, keepdim=True)
    hi = torch.where(live, x3, -_INF).amax(-1, keepdim=True)
    empty = ~torch.isfinite(lo)
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def group_error(grid: Grid, x3: torch.Tensor, m3: torch.Tensor, p: Params, buf: torch.Tensor | None = None) -> torch.Tensor:
    """``sum m * (x_hat - x)^2`` per group (float64 result), ``x_hat`` exactly as the artifact
    dequantizes; ``buf`` (like ``x3``) is scratch space, so a search allocates once."""
    d = grid.levels_(grid.codes(x3, p, out=buf), p).sub_(x3)
    return d.square_().mul_(m3).sum(-1, keepdim=True, dtype=torch.float64)


def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-group ``sum(a * b)`` over the last dimension, float64, without an element-wise temporary."""
    r, g, n = a.shape
    return torch.bmm(a.reshape(r * g, 1, n), b.reshape(r * g, n, 1)).reshape(r, g, 1).double()


def _affine_refit(grid: UniformGrid, x3: torch.Tensor, m3: torch.Tensor, q: torch.Tensor, p: Params,
                  sums: tuple[torch.Tensor, torch.Tensor], buf: torch.Tensor) -> Params:
    """Weighted least squares of ``x`` on the codes ``q``: the best ``(scale, zero)`` for them
    (``sums``: the group's ``sum m`` and ``sum m x``; ``buf``: scratch space like ``x3``)."""
    w, sx = sums
    mq = torch.mul(q, m3, out=buf)
    sq = mq.sum(-1, keepdim=True, dtype=torch.float64)
    sqq, sqx = _bdot(mq, q), _bdot(mq, x3)
    den = w * sqq - sq * sq
    s = (w * sqx - sq * sx) / torch.where(den > 0, den, torch.ones_like(den))
    ok = (den > 1e-12 * w * w) & (s > 0)
    s_old, z_old = grid.affine(p)
    s = torch.where(ok, s, s_old.double())
    z = torch.where(ok, (sx - s * sq) / w.clamp_min(1e-300), z_old.double())
    return grid.from_affine(s.float(), z.float())


def _refit(grid: Grid, x3, m3, q, p: Params, sums, buf) -> Params:
    if hasattr(grid, "refit"):  # NF4 and the symmetric grids: a scale only
        return grid.refit(x3, m3, q, p)
    return _affine_refit(grid, x3, m3, q, p, sums, buf)


def _keep_better(grid: Grid, x3, m3, cand: Params, best: Params, best_e: torch.Tensor, buf: torch.Tensor):
    e = group_error(grid, x3, m3, cand, buf)
    take = e < best_e
    return tuple(torch.where(take, c, b) for c, b in zip(cand, best)), torch.where(take, e, best_e)


def search_params(grid: Grid, x3: torch.Tensor, m3: torch.Tensor, rounds: int = LS_ROUNDS,
                  shrink: tuple[float, ...] = SHRINK) -> Params:
    """Per-group parameters minimising ``group_error``, never worse than ``grid.minmax`` (see module doc).
    Two scratch buffers the size of ``x3``; every candidate is evaluated in place."""
    buf, buf2 = torch.empty_like(x3), torch.empty_like(x3)
    lo, hi = weighted_range(x3, m3)
    best = grid.minmax(lo, hi)
    best_e = group_error(grid, x3, m3, best, buf)
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    for r in shrink:
        if r < 1.0:
            cand = grid.from_range(centre - r * half, centre + r * half)
            best, best_e = _keep_better(grid, x3, m3, cand, best, best_e, buf)
    sums = (m3.sum(-1, keepdim=True, dtype=torch.float64), _bdot(m3, x3))
    for _ in range(rounds):
        cand = _refit(grid, x3, m3, grid.codes(x3, best, out=buf), best, sums, buf2)
        best, best_e = _keep_better(grid, x3, m3, cand, best, best_e, buf)
    return best


def _shrink_lp(r: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """HQQ's generalised soft-thresholding: ``sign(r) * relu(|r| - |r|^(p-1) / beta)``."""
    mag = r.abs()
    return mag.sub(mag.clamp_min(1e-12).pow(p - 1) / beta).clamp_min_(0).mul_(r.sign())


def hqq_zero_search(grid: UniformGrid, x3: torch.Tensor, m3: torch.Tensor) -> Params:
    """HQQ's solver as hqq 0.2.8 runs it by default (``Quantizer.quantize`` with ``optimize=True``:
    ``optimize_weights_proximal_legacy``, Badri & Shaji 2023): the step is the group's min/max step and
    stays; the zero point (in steps) starts at ``-min / step``, rounded to an integer for 4-bit
    codes (hqq's ``round_zero``, its default for 4 bits only), then moves by proximal steps on an l_p (p = 0.7)
    norm of the error at a fixed ``beta``; the loop stops at the first step that does not lower the
    *tensor's* mean absolute error (the zero point of that step is kept, as in hqq). Held-out values
    (fit weight 0) take no part in the range, the error or the zero point; fit weights > 1 weigh the
    zero point's mean. The result is stored in the artifact's format (``grid.from_affine``)."""
    p, iters, beta = HQQ
    lo, hi = weighted_range(x3, m3)
    denom = hi - lo
    inv = torch.where(denom > 0, grid.qmax / _positive(denom), 1.0)  # hqq: scale 1 for a flat group
    z = -lo * inv
    if grid.qmax == 15:
        z = z.round()
    w = m3.sum(-1, keepdim=True).clamp_min(1e-30)
    total, best = float(m3.sum()), _INF
    for _ in range(iters):
        q = torch.addcmul(z, x3, inv).round_().clamp_(0, grid.qmax)
        r = x3 - (q - z) / inv
        err = float((r.abs() * m3).sum()) / max(total, 1e-30)
        z = ((q - (x3 - _shrink_lp(r, beta, p)) * inv) * m3).sum(-1, keepdim=True) / w
        if not err < best:
            break
        best = err
    step = 1.0 / inv
    return grid.from_affine(step, -z * step)


def fit_groups(grid: Grid, x3: torch.Tensor, m3: torch.Tensor | None, search: str | bool) -> tuple[torch.Tensor, Params]:
    """Codes (float, ``[rows, runs, size]``) and per-group parameters (each ``[rows, runs]``);
    ``search``: "minmax" (or False), "mse" (or True) or "hqq"."""
    search = {True: "mse", False: "minmax"}.get(search, search)
    if search == "hqq":
        p = hqq_zero_search(grid, x3, m3 if m3 is not None else torch.ones_like(x3))
    elif search == "mse":
        p = search_params(grid, x3, m3 if m3 is not None else torch.ones_like(x3))
    else:
        p = grid.minmax(*weighted_range(x3, m3))
    return grid.codes(x3, p), tuple(t.squeeze(-1) for t in p)
