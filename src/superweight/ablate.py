"""Temporary edits of super weights; the exact original values are always written back."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from .arch import ArchSpec, check_index
from .coords import Coord, as_coords  # noqa: F401  (re-exported: ablate.Coord, ablate.as_coords)
from .edits import HookSet, edited_entries


@contextlib.contextmanager
def scaled_weights(model: nn.Module, arch: ArchSpec, coords: Iterable, scale: float) -> Iterator[None]:
    """Multiply the given super weights by ``scale`` inside the block (0 zeroes them)."""
    entries = []
    for layer, row, col in as_coords(coords):
        check_index(arch, model, layer, row, col)
        entries.append((arch.down_proj_module(model, layer).weight, arch.index(row, col)))
    with edited_entries(entries):
        with torch.no_grad():
            for weight, idx in entries:
                weight[idx] = weight[idx] * scale
        yield


def zeroed_weights(model: nn.Module, arch: ArchSpec, coords: Iterable) -> contextlib.AbstractContextManager:
    """Zero the given super weights inside the block."""
    return scaled_weights(model, arch, coords, 0.0)


# ---------------------------------------------------------------- the paper's ablation conditions

DEFAULT_TOP_N = 7000
DEFAULT_SCALES: tuple[float, ...] = (0.0, 0.2, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0)
SPIKE_FLOOR = 50.0  # |input| on the super weight's column that marks a super activation (detection's floor)


def _by_layer(coords: Iterable[Coord]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (rows, cols)} index tensors."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for layer, row, col in coords:
        groups.setdefault(layer, []).append((row, col))
    return {layer: (torch.tensor([r for r, _ in rc]), torch.tensor([c for _, c in rc])) for layer, rc in groups.items()}


@contextlib.contextmanager
def zeroed_entries(model: nn.Module, arch: ArchSpec, coords: Iterable) -> Iterator[int]:
    """Zero many down-projection entries at once (vectorised per layer); yields how many were zeroed.

    The original values are saved before any write and copied back on exit, so duplicates and
    errors inside the block still leave the weights bitwise as they were.
    """
    coords = as_coords(coords)
    for layer, row, col in coords:
        check_index(arch, model, layer, row, col)
    entries = []
    for layer, (rows, cols) in _by_layer(coords).items():
        matrix = arch.weight_matrix(model, layer)
        entries.append((matrix, (rows.to(matrix.device), cols.to(matrix.device))))  # index where the weights are
    with edited_entries(entries):
        with torch.no_grad():
            for matrix, idx in entries:
                matrix[idx] = 0
        yield len(set(coords))


def sw_layers(coords: Iterable) -> list[int]:
    """The layers that hold super weights, in order."""
    return sorted({layer for layer, _, _ in as_coords(coords)})


def top_magnitude_coords(model: nn.Module, arch: ArchSpec, layers: Iterable[int], n: int, exclude: Iterable) -> list[Coord]:
    """The ``n`` largest-|w| entries over the down-projections of ``layers``, skipping ``exclude``."""
    layers, skip = list(layers), set(as_coords(exclude))
    values, keys = [], []
    for layer in layers:
        m = arch.weight_matrix(model, layer).detach().abs().float()
        k = min(n + len(skip), m.numel())
        v, idx = m.flatten().topk(k)
        values.append(v)
        keys += [(layer, int(i) // m.shape[1], int(i) % m.shape[1]) for i in idx.tolist()]
    order = torch.cat(values).argsort(descending=True, stable=True).tolist() if values else []
    ranked = (keys[i] for i in order)
    return [c for c in ranked if c not in skip][:n]


def random_coords(
    model: nn.Module, arch: ArchSpec, layers: Iterable[int], n: int, exclude: Iterable, seed: int = 0
) -> list[Coord]:
    """``n`` distinct random entries of the down-projections of ``layers`` (uniform), not in ``exclude``."""
    layers, skip = list(layers), set(as_coords(exclude))
    shapes = [tuple(arch.weight_matrix(model, layer).shape) for layer in layers]
    total = sum(r * c for r, c in shapes)
    if n > total - len(skip):
        raise ValueError(f"cannot draw {n} random weights from {total} entries")
    g = torch.Generator().manual_seed(seed)
    out: list[Coord] = []
    while len(out) < n:
        for flat in torch.randint(0, total, (2 * (n - len(out)) + 8,), generator=g).tolist():
            coord = _unflatten(flat, layers, shapes)
            if coord not in skip and coord not in out:
                out.append(coord)
            if len(out) == n:
                break
    return out


def _unflatten(flat: int, layers: list[int], shapes: list[tuple[int, int]]) -> Coord:
    for layer, (rows, cols) in zip(layers, shapes):
        if flat < rows * cols:
            return (layer, flat // cols, flat % cols)
        flat -= rows * cols
    raise IndexError(flat)


@contextlib.contextmanager
def restored_super_activation(
    model: nn.Module, arch: ArchSpec, coords: Iterable, floor: float = SPIKE_FLOOR
) -> Iterator[None]:
    """Zero the super weights but write the super activation back where it first appears.

    Exact choice: a forward hook on each super weight layer's down-projection adds back, at the
    output channel ``row``, the term the zeroed weight would have produced, ``x[t, col] * w``,
    only on the tokens ``t`` where the weight's input spikes (``|x[t, col]| >= floor``, the
    detection rule's floor): the super activation tokens (usually the first). Every other
    token keeps the ablated value. Since a layer's down-projection input does not depend on its
    own down-projection, at the first super weight layer this restores the clean run's value
    exactly (up to float rounding) for every input, without a second forward pass.
    """
    coords = as_coords(coords)
    originals = {c: float(arch.weight_matrix(model, c[0])[c[1], c[2]].detach()) for c in coords}
    with HookSet() as hooks:
        for layer in sw_layers(coords):
            mine = [(row, col, originals[(l, row, col)]) for l, row, col in coords if l == layer]
            hooks.forward(arch.down_proj_module(model, layer), _restore_hook(mine, floor))
        with zeroed_entries(model, arch, coords):
            yield


def _restore_hook(entries: list[tuple[int, int, float]], floor: float):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        output = output.clone()
        for row, col, w in entries:
            xc = x[..., col].float()
            term = torch.where(xc.abs() >= floor, xc * w, torch.zeros_like(xc))
            output[..., row] = (output[..., row].float() + term).to(output.dtype)
        return output

    return hook
