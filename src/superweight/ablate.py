"""Temporary edits of super weights; the exact original values are always written back."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from .arch import ArchSpec, check_index

Coord = tuple[int, int, int]  # (layer, row, col) in the paper's convention


def as_coords(items: Iterable) -> list[Coord]:
    """Accept SuperWeight objects, dicts or (layer, row, col) tuples."""
    out = []
    for it in items:
        if isinstance(it, dict):
            out.append((int(it["layer"]), int(it["row"]), int(it["col"])))
        elif hasattr(it, "layer"):
            out.append((int(it.layer), int(it.row), int(it.col)))
        else:
            layer, row, col = it
            out.append((int(layer), int(row), int(col)))
    return out


@contextlib.contextmanager
def scaled_weights(model: nn.Module, arch: ArchSpec, coords: Iterable, scale: float) -> Iterator[None]:
    """Multiply the given super weights by ``scale`` inside the block (0 zeroes them)."""
    coords = as_coords(coords)
    saved: list[tuple[torch.Tensor, tuple[int, int], torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer, row, col in coords:
                check_index(arch, model, layer, row, col)
                weight = arch.down_proj_module(model, layer).weight
                idx = arch.index(row, col)
                saved.append((weight, idx, weight[idx].clone()))
                weight[idx] = weight[idx] * scale
        yield
    finally:
        with torch.no_grad():
            for weight, idx, original in reversed(saved):
                weight[idx] = original


def zeroed_weights(model: nn.Module, arch: ArchSpec, coords: Iterable) -> contextlib.AbstractContextManager:
    """Zero the given super weights inside the block."""
    return scaled_weights(model, arch, coords, 0.0)
