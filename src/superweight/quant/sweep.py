"""Perplexity over a grid of quantization schemes, shaped like the paper's Figure 7 and Tables 3-4.

Each grid point fake-quantizes the model in memory, measures perplexity, and writes the original
weights back (a copy of every targeted weight is kept and the restore is checked bitwise at the
end). Points: the unquantized model; RTN INT-N for each (bits, block or group size) as *naive*, *naive+SW* (the
super weights restored exactly), *clip* (z-score clipping) and *clip+SW* (clipping, then the super
weights restored);
W8A8 naive / SmoothQuant / super-activation hold-out; ternary without and with the FP16 sparse
part (super weights, then super weights + top-k outliers per matrix).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..model.edits import Snapshot
from ..core.results import Table, Versioned
from ..core.version import __version__
from .api import DEFAULT_EXCLUDE, quantize, target_weights
from .config import RTN, W8A8, Ternary, ZScore, describe, to_dict
from .w8a8 import default_calibration, simulate_w8a8
from .primitives import predicted_bytes
from ..core.coords import as_keys
from ..eval.perplexity import evaluate_perplexity
from ..eval.text import load_text

log = logging.getLogger(__name__)

SWEEP_VERSION = 1
DEFAULT_SIZES: tuple[int | None, ...] = (64 * 64, 128 * 128, 256 * 256, 512 * 512, None)  # None: per tensor
DEFAULT_BITS: tuple[int, ...] = (4, 3)
DEFAULT_GROUPS: tuple[int, ...] = (128,)
DEFAULT_CLIP_Z = 9.0
DEFAULT_MAX_TOKENS = 2048


@dataclass(frozen=True)
class GridPoint:
    family: str  # "fp", "rtn", "w8a8", "ternary"
    variant: str  # "fp", "naive", "clip", "clip+SW", "SmoothQuant", "SA hold-out", "+SW", "+SW+top-k"
    config: RTN | Ternary | W8A8 | None = None
    keep_super: bool = False

    @property
    def label(self) -> str:
        if self.config is None:
            return "unquantized"
        return f"{describe(self.config)}{' +SW' if self.keep_super else ''}"


@dataclass
class PointResult:
    family: str
    variant: str
    label: str
    config: dict | None
    keep_super: bool
    bits: int | None
    granularity: str  # "block=16384", "group=128", "per-tensor", ...
    block: int | None
    group: int | None
    ppl: float
    nll: float
    tokens: int
    bits_per_weight: float | None  # codes + scales + zero points + sparse part, per quantized weight
    seconds: float
    extra: dict = field(default_factory=dict)


@dataclass
class SweepResult(Versioned):
    """Perplexity of every grid point (``PointResult`` rows), with the text and settings they share."""

    KIND: ClassVar[str] = "sweep"
    VERSION: ClassVar[int] = SWEEP_VERSION
    WRITER: ClassVar[str] = "`superweight sweep --json PATH`"
    model: str
    source: str
    text: str
    max_tokens: int | None
    seq_len: int | None
    super_weights: list[list[int]]
    rows: list[PointResult]
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    tool_version: str = __version__

    @property
    def baseline_ppl(self) -> float | None:
        return next((p.ppl for p in self.rows if p.family == "fp"), None)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "baseline_ppl": self.baseline_ppl}

    @classmethod
    def _decode(cls, d: dict) -> dict[str, Any]:
        out = super()._decode(d)
        names = {f.name for f in fields(PointResult)}
        return {**out, "rows": [PointResult(**{k: v for k, v in r.items() if k in names}) for r in d["rows"]]}

    def tables(self) -> list[Table]:
        return [Table(title, headers, rows) for title, headers, rows in tables(self)]


def granularity(config) -> str:
    if isinstance(config, (RTN, Ternary)):
        if config.block:
            return f"block={config.block}"
        if config.group:
            return f"group={config.group}"
        if getattr(config, "per_channel", False):
            return "per-channel"
        return "per-tensor"
    return "per-tensor W, per-token A" if isinstance(config, W8A8) else "-"


def default_grid(
    bits: Sequence[int] = DEFAULT_BITS, sizes: Sequence[int | None] = DEFAULT_SIZES, clip_z: float = DEFAULT_CLIP_Z,
    groups: Sequence[int] = DEFAULT_GROUPS, w8a8: bool = True, ternary_topk: int = 64,
) -> list[GridPoint]:
    """The sweep's grid. Blocks larger than a tensor quantize it per tensor (``oversize="tensor"``)."""
    grid = [GridPoint("fp", "fp")]
    for b in bits:
        for size in sizes:
            base = RTN(bits=b, block=size, oversize="tensor")
            clipped = RTN(bits=b, block=size, clip=ZScore(clip_z), oversize="tensor")
            grid += [GridPoint("rtn", "naive", base), GridPoint("rtn", "naive+SW", base, keep_super=True),
                     GridPoint("rtn", "clip", clipped), GridPoint("rtn", "clip+SW", clipped, keep_super=True)]
        for g in groups:
            grid.append(GridPoint("rtn", "naive", RTN(bits=b, group=g)))
    if w8a8:
        grid += [GridPoint("w8a8", "naive", W8A8("naive")), GridPoint("w8a8", "SmoothQuant", W8A8("smoothquant")),
                 GridPoint("w8a8", "SA hold-out", W8A8("holdout"))]
    if ternary_topk >= 0:
        grid += [GridPoint("ternary", "naive", Ternary()), GridPoint("ternary", "+SW", Ternary(), keep_super=True)]
        if ternary_topk > 0:
            grid.append(GridPoint("ternary", f"+SW+top{ternary_topk}", Ternary(topk=ternary_topk), keep_super=True))
    return grid


class WeightSnapshot(Snapshot):
    """``edits.Snapshot`` of every targeted weight (a mixture of experts' 3-D expert weights too),
    written back after each grid point."""

    def __init__(self, model: nn.Module, exclude: str | None = DEFAULT_EXCLUDE):
        super().__init__(t.weight for t in target_weights(model, None, exclude))


def _bits_per_weight(result) -> float:
    return 8.0 * sum(predicted_bytes(t) for t in result.tensors.values()) / result.quantized_weights


def run_point(
    model: nn.Module, point: GridPoint, keep: Sequence, evaluate: Callable[[], object], calib: Sequence[torch.Tensor],
) -> tuple[object, float | None, dict]:
    """Apply one grid point, evaluate, return (perplexity result, bits/weight, extra); weights not restored here."""
    if point.config is None:
        return evaluate(), None, {}
    if isinstance(point.config, W8A8):
        with simulate_w8a8(model, point.config, calib) as stats:
            res = evaluate()
        return res, 8.0, {"w8a8": stats.to_dict()}
    q = quantize(model, point.config, keep=keep if point.keep_super else None)
    extra = {"min_sqnr_db": q.summary()["min_sqnr_db"], "sparse_values": q.summary()["sparse_values"]}
    return evaluate(), _bits_per_weight(q), extra


def point_result(point: GridPoint, ppl, bits_per_weight: float | None, seconds: float, extra: dict) -> PointResult:
    """The sweep file's row of ``point`` measured at perplexity ``ppl`` (a ``PerplexityResult``)."""
    c = point.config
    return PointResult(point.family, point.variant, point.label, to_dict(c) if c else None, point.keep_super,
                       getattr(c, "bits", 2 if isinstance(c, Ternary) else None), granularity(c), getattr(c, "block", None),
                       getattr(c, "group", None), ppl.ppl, ppl.nll, ppl.tokens, bits_per_weight, seconds, extra)


def kept_list(keep: Sequence) -> list[list[int]]:
    """The sweep file's super weights: ``[layer, row, col]``, an MoE weight's with its expert appended."""
    return [[*c, e] if e is not None else list(c) for c, e in as_keys(keep)]


def run_sweep(
    lm, keep, grid: Sequence[GridPoint] | None = None, text_name: str = "wikitext2", text: str | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS, seq_len: int | None = None, calib: Sequence[torch.Tensor] | None = None,
    progress: Callable[[PointResult], None] | None = None,
) -> SweepResult:
    """Evaluate every grid point (default ``default_grid()``) on ``text`` (default: ``load_text(text_name)``).

    ``keep``: the super weights (a ``DetectionResult`` or a list of them / coordinates); ``calib``:
    SmoothQuant's token batches (default: 4 x 256 tokens of ``wiki-intros``, not the test text).
    The model's weights are bitwise restored afterwards.
    """
    keep = list(getattr(keep, "super_weights", keep) or [])
    grid = default_grid() if grid is None else grid
    text = load_text(text_name) if text is None else text
    if calib is None and any(isinstance(p.config, W8A8) and p.config.method == "smoothquant" for p in grid):
        calib = default_calibration(lm.tokenizer)
    model = lm.model
    snapshot = WeightSnapshot(model)
    out = SweepResult(
        model=lm.name, source=lm.source, text=text_name, max_tokens=max_tokens, seq_len=seq_len,
        super_weights=kept_list(keep), rows=[], notes=list(lm.notes),
    )
    try:
        for point in grid:
            start = time.perf_counter()
            res, bpw, extra = run_point(
                model, point, keep, lambda: evaluate_perplexity(model, lm.tokenizer, text, seq_len, max_tokens), calib or ()
            )
            snapshot.restore()
            pr = point_result(point, res, bpw, time.perf_counter() - start, extra)
            out.rows.append(pr)
            out.seq_len = res.seq_len
            if progress:
                progress(pr)
    finally:
        snapshot.restore()
    assert snapshot.intact(), "the sweep failed to restore the original weights"
    return out


# ---------------------------------------------------------------- tables


RTN_VARIANTS = ("naive", "naive+SW", "clip", "clip+SW")


def _fmt(ppl: float | None) -> str:
    return "-" if ppl is None else f"{ppl:.4g}" if ppl < 1e4 else f"{ppl:.3g}"


def tables(result: SweepResult) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) for: RTN by size x variant (Fig. 7 shape), W8A8 (Table 3), ternary."""
    pts = result.rows
    fp = result.baseline_ppl
    out = []
    rtn = [p for p in pts if p.family == "rtn"]
    for bits in sorted({p.bits for p in rtn}, reverse=True):
        rows = []
        sizes = list(dict.fromkeys(p.granularity for p in rtn if p.bits == bits))
        for size in sizes:
            cell = {p.variant: p for p in rtn if p.bits == bits and p.granularity == size}
            bpw = next((c.bits_per_weight for c in cell.values() if c.bits_per_weight), None)
            rows.append([size, f"{bpw:.3f}" if bpw else "-"] + [_fmt(cell[v].ppl) if v in cell else "-" for v in RTN_VARIANTS])
        out.append((f"INT{bits} RTN perplexity (unquantized {_fmt(fp)})", ["granularity", "bits/w", *RTN_VARIANTS], rows))
    w8 = [p for p in pts if p.family == "w8a8"]
    if w8:
        rows = [["FP (unquantized)", _fmt(fp), "-"]] + [
            [p.variant, _fmt(p.ppl), str(p.extra.get("w8a8", {}).get("held_out_total", "-"))] for p in w8
        ]
        out.append(("W8A8 perplexity (paper's Table 3 shape)", ["method", "ppl", "held-out elements"], rows))
    ter = [p for p in pts if p.family == "ternary"]
    if ter:
        rows = [[p.variant, f"{p.bits_per_weight:.4f}" if p.bits_per_weight else "-", _fmt(p.ppl)] for p in ter]
        out.append((f"Ternary (BitNet b1.58 absmean) perplexity (unquantized {_fmt(fp)})", ["variant", "bits/w", "ppl"], rows))
    return out


def markdown(result: SweepResult) -> str:
    """The tables as Markdown (for docs)."""
    parts = []
    for title, headers, rows in tables(result):
        parts.append(f"**{title}**\n\n| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
        parts += ["| " + " | ".join(r) + " |" for r in rows]
        parts.append("")
    return "\n".join(parts)
