"""The quantization sweep of a checkpoint larger than memory (``superweight sweep --stream``).

The weight-only grid points (RTN at every bit width, block and group size, with and without the
super weights kept or the outliers clipped; ternary) are data-free: a layer's fake-quantized weights
depend on that layer alone. So every point runs through each layer while that layer is read: the
layer is quantized under the point (the same ``quantize`` call as in memory, restricted to the layer:
``within``), every perplexity window runs through it, and its weights are put back bit for bit before
the next point (``StreamedModel.run_heads``; a point's layer is quantized once per pass). W8A8 points
are layer-local too: the layer's weights are 8-bit and its linear inputs quantized per token while the
windows run through it (``simulate_w8a8(..., within=layer)``); SmoothQuant's input maxima come from
its calibration batches run through the unedited layer first, in the same pass (``RecordedInputs``).
Perplexities and the W8A8 counts are the in-memory sweep's bit for bit.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..model.edits import edited_weights
from ..eval.perplexity import perplexity_result, perplexity_windows
from ..eval.streamed import edited_nlls
from ..eval.text import load_text
from .api import DEFAULT_EXCLUDE, quantize, target_modules
from .config import W8A8
from .primitives import predicted_bytes
from .sweep import (
    DEFAULT_MAX_TOKENS,
    GridPoint,
    PointResult,
    SweepResult,
    default_grid,
    kept_list,
    point_result,
)
from .w8a8 import W8A8Stats, default_calibration, recording_inputs, simulate_w8a8
from ..model.streamed import StreamedModel, load_tokenizer, streamed


class RecordedInputs:
    """A streamed edit that changes nothing: while layer ``i`` is read, the inputs of its modules among
    ``modules`` are recorded (``quant.w8a8.recording_inputs``: max ``|x|`` per channel, by module name;
    each call's median ``|x|`` too with ``medians``). SmoothQuant's calibration, the W8A8 artifact's."""

    def __init__(self, sm: StreamedModel, modules: dict, medians: bool = False) -> None:
        self.sm, self.modules = sm, modules
        self.maxima: dict[str, torch.Tensor] = {}
        self.medians: dict[str, list[float]] | None = {} if medians else None

    def __call__(self, i: int) -> contextlib.AbstractContextManager:
        prefix = _prefix(self.sm, i)
        return recording_inputs({n: m for n, m in self.modules.items() if n.startswith(prefix)}, self.maxima, self.medians)


def _prefix(sm: StreamedModel, i: int) -> str:
    return f"{sm.arch.layers}.{i}."


class _PointEdit:
    """A grid point as a streamed edit: layer ``i`` fake-quantized (or run as W8A8) under the point inside
    the block, its weights put back after; what each layer's quantization reported, by layer."""

    def __init__(self, sm: StreamedModel, point: GridPoint, keep: list, calibration: RecordedInputs | None = None) -> None:
        self.sm, self.point, self.keep, self.calibration = sm, point, keep, calibration
        self.layers: dict[int, tuple[int, int, float, int]] = {}  # layer -> (bytes, weights, min sqnr, sparse)
        self.w8a8 = W8A8Stats(point.config) if isinstance(point.config, W8A8) else None
        self.w8a8_modules: dict[int, tuple[int, int]] = {}  # layer -> (modules, experts)

    def __call__(self, i: int) -> contextlib.AbstractContextManager:
        if self.point.config is None:
            return contextlib.nullcontext()
        return self._w8a8(i) if self.w8a8 is not None else self._quantized(i)

    @contextlib.contextmanager
    def _quantized(self, i: int) -> Iterator[None]:
        with edited_weights(self.sm.layers[i].parameters()):
            q = quantize(self.sm.model, self.point.config, keep=self.keep if self.point.keep_super else None,
                         arch=self.sm.arch, within=_prefix(self.sm, i))
            s = q.summary()
            self.layers[i] = (sum(predicted_bytes(t) for t in q.tensors.values()), q.quantized_weights,
                              s["min_sqnr_db"], s["sparse_values"])
            yield

    @contextlib.contextmanager
    def _w8a8(self, i: int) -> Iterator[None]:
        """The layer as W8A8; the counts of every entry added up (calls and held-out elements grow with
        the windows run, the modules are the layer's)."""
        act_max = self.calibration.maxima if self.calibration is not None else None
        with simulate_w8a8(self.sm.model, self.point.config, within=_prefix(self.sm, i), act_max=act_max) as stats:
            yield
        self.w8a8_modules[i] = (stats.modules, stats.experts)
        self.w8a8.calls += stats.calls
        for name, n in stats.held_out.items():
            self.w8a8.held_out[name] = self.w8a8.held_out.get(name, 0) + n

    def row(self, ppl, seconds: float) -> PointResult:
        bpw, extra = None, {}
        if self.w8a8 is not None:
            self.w8a8.modules = sum(m for m, _ in self.w8a8_modules.values())
            self.w8a8.experts = sum(e for _, e in self.w8a8_modules.values())
            bpw, extra = 8.0, {"w8a8": self.w8a8.to_dict()}
        elif self.point.config is not None:
            stats = list(self.layers.values())
            bpw = 8.0 * sum(b for b, _, _, _ in stats) / sum(n for _, n, _, _ in stats)
            extra = {"min_sqnr_db": min(s for _, _, s, _ in stats), "sparse_values": sum(k for _, _, _, k in stats)}
        return point_result(self.point, ppl, bpw, seconds, extra)


def stream_sweep(
    path: str | Path, keep, grid: Sequence[GridPoint] | None = None, text_name: str = "wikitext2", text: str | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS, seq_len: int | None = None, dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None, tokenizer=None, model_name: str = "",
    calib: Sequence[torch.Tensor] | None = None,
) -> SweepResult:
    """``quant.sweep.run_sweep`` of a local safetensors checkpoint, streamed layer by layer: every grid point
    (default ``default_grid()``) in one pass while the windows' residual streams fit ``stream.HELD_BYTES``.
    ``calib``: SmoothQuant's token batches (default, as in memory: 4 x 256 tokens of ``wiki-intros``)."""
    keep = list(getattr(keep, "super_weights", keep) or [])
    grid = default_grid() if grid is None else list(grid)
    text = load_text(text_name) if text is None else text
    start = time.perf_counter()
    with streamed(path, dtype, device) as sm:
        tokenizer = tokenizer or load_tokenizer(sm.ckpt.folder)
        ids, spans, seq_len, stride = perplexity_windows(sm.model, tokenizer, text, seq_len, max_tokens)
        smooths = any(isinstance(p.config, W8A8) and p.config.method == "smoothquant" for p in grid)
        targets = target_modules(sm.model, None, DEFAULT_EXCLUDE, sm.arch, required=False)
        calibration = RecordedInputs(sm, targets) if smooths else None
        if smooths and calib is None:
            calib = default_calibration(tokenizer)
        edits = [_PointEdit(sm, p, keep, calibration) for p in grid]
        first = [(c.reshape(-1), calibration) for c in calib or ()] if calibration else []
        nlls = edited_nlls(sm, [(ids[b:e], f - b) for b, e, f in spans], edits, first)  # [window][point]
        seconds = (time.perf_counter() - start) / len(grid)
        rows = [e.row(perplexity_result([n[k] for n in nlls], spans, seq_len, stride), seconds) for k, e in enumerate(edits)]
        passes, ref = sm.passes, sm.source.ref
    note = (f"streamed: every grid point through each layer read, {passes} pass(es) over the checkpoint in "
            f"{time.perf_counter() - start:.0f} s (seconds per point: the pass's share)")
    return SweepResult(model=model_name or ref, source=ref, text=text_name, max_tokens=max_tokens,
                       seq_len=seq_len, super_weights=kept_list(keep), rows=rows, notes=[note])
