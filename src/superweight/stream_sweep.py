"""The quantization sweep of a checkpoint larger than memory (``superweight sweep --stream``).

The weight-only grid points (RTN at every bit width, block and group size, with and without the
super weights kept or the outliers clipped; ternary) are data-free: a layer's fake-quantized weights
depend on that layer alone. So every point runs through each layer while that layer is read: the
layer is quantized under the point (the same ``quantize`` call as in memory, restricted to the layer:
``within``), every perplexity window runs through it, and its weights are put back bit for bit before
the next point (``StreamedModel.run_heads``; a point's layer is quantized once per pass). Perplexities
are the in-memory sweep's bit for bit. W8A8 points calibrate activations across the model
(SmoothQuant's scales, the hold-out's channels): they need the model in memory and are left out.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .edits import edited_weights
from .errors import SuperweightError
from .eval.perplexity import perplexity_result, perplexity_windows
from .eval.text import load_text
from .export import predicted_bytes
from .quant.api import quantize
from .quant.config import W8A8
from .quant.sweep import DEFAULT_MAX_TOKENS, GridPoint, PointResult, SweepResult, default_grid, kept_list, point_result
from .stream import StreamedModel, _tokenizer

W8A8_NEEDS_MEMORY = "W8A8 points calibrate activations across the model and need it in memory"


class _PointEdit:
    """A grid point as a streamed edit: layer ``i`` fake-quantized under the point inside the block,
    its weights put back after; what each layer's quantization reported, by layer."""

    def __init__(self, sm: StreamedModel, point: GridPoint, keep: list) -> None:
        self.sm, self.point, self.keep = sm, point, keep
        self.layers: dict[int, tuple[int, int, float, int]] = {}  # layer -> (bytes, weights, min sqnr, sparse)

    @contextlib.contextmanager
    def __call__(self, i: int) -> Iterator[None]:
        if self.point.config is None:
            yield
            return
        with edited_weights(self.sm.layers[i].parameters()):
            q = quantize(self.sm.model, self.point.config, keep=self.keep if self.point.keep_super else None,
                         arch=self.sm.arch, within=f"{self.sm.arch.layers}.{i}.")
            s = q.summary()
            self.layers[i] = (sum(predicted_bytes(t) for t in q.tensors.values()), q.quantized_weights,
                              s["min_sqnr_db"], s["sparse_values"])
            yield

    def row(self, ppl, seconds: float) -> PointResult:
        bpw, extra = None, {}
        if self.point.config is not None:
            stats = list(self.layers.values())
            bpw = 8.0 * sum(b for b, _, _, _ in stats) / sum(n for _, n, _, _ in stats)
            extra = {"min_sqnr_db": min(s for _, _, s, _ in stats), "sparse_values": sum(k for _, _, _, k in stats)}
        return point_result(self.point, ppl, bpw, seconds, extra)


def stream_sweep(
    path: str | Path, keep, grid: Sequence[GridPoint] | None = None, text_name: str = "wikitext2", text: str | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS, seq_len: int | None = None, dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None, tokenizer=None, model_name: str = "",
) -> SweepResult:
    """``quant.sweep.run_sweep`` of a local safetensors checkpoint, streamed layer by layer: every
    weight-only grid point (default ``default_grid(w8a8=False)``); a W8A8 point is refused."""
    keep = list(getattr(keep, "super_weights", keep) or [])
    grid = default_grid(w8a8=False) if grid is None else list(grid)
    if any(isinstance(p.config, W8A8) for p in grid):
        raise SuperweightError(f"{W8A8_NEEDS_MEMORY}: drop them from the grid with --stream (or drop --stream)")
    text = load_text(text_name) if text is None else text
    start = time.perf_counter()
    sm = StreamedModel(path, dtype, device)
    try:
        tokenizer = tokenizer or _tokenizer(sm.ckpt.folder)
        ids, spans, seq_len, stride = perplexity_windows(sm.model, tokenizer, text, seq_len, max_tokens)
        edits = [_PointEdit(sm, p, keep) for p in grid]
        nlls = sm.edited_nlls([(ids[b:e], f - b) for b, e, f in spans], edits)  # [window][point]
        seconds = (time.perf_counter() - start) / len(grid)
        rows = [e.row(perplexity_result([n[k] for n in nlls], spans, seq_len, stride), seconds) for k, e in enumerate(edits)]
        passes = sm.passes
    finally:
        sm.close()
    note = (f"streamed: every grid point through each layer read, {passes} pass(es) over the checkpoint in "
            f"{time.perf_counter() - start:.0f} s (seconds per point: the pass's share); {W8A8_NEEDS_MEMORY}")
    return SweepResult(model=model_name or str(path), source=str(path), text=text_name, max_tokens=max_tokens,
                       seq_len=seq_len, super_weights=kept_list(keep), rows=rows, notes=[note])
