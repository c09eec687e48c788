"""Temporary edits of super weights; the exact original values are always written back.

A weight is ``(layer, row, col)`` (a ``Coord``) in a dense down-projection, ``(layer, row, col,
expert)`` in a mixture of experts' (``coords.as_key`` reads either, and ``SuperWeight`` objects).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from ..model.arch import ArchSpec, check_index
from ..core.coords import Coord, as_keys
from ..model.edits import HookSet, edited_entries

Key = tuple[Coord, "int | None"]


def weight_item(coord: Coord, expert: int | None) -> Coord | tuple[int, int, int, int]:
    """What the functions here return for a weight: the ``Coord``, or ``(layer, row, col, expert)``."""
    return coord if expert is None else (*coord, expert)


def checked_keys(model: nn.Module, arch: ArchSpec, coords: Iterable) -> list[Key]:
    """``as_keys(coords)``, each checked to lie inside the model (``arch.check_index``)."""
    keys = as_keys(coords)
    for (layer, row, col), expert in keys:
        check_index(arch, model, layer, row, col, expert)
    return keys


@contextlib.contextmanager
def scaled_weights(model: nn.Module, arch: ArchSpec, coords: Iterable, scale: float) -> Iterator[None]:
    """Multiply the given super weights by ``scale`` inside the block (0 zeroes them)."""
    entries = [arch.weight_entry(model, *c, e) for c, e in checked_keys(model, arch, coords)]
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


def _by_matrix(keys: Iterable[Key]) -> dict[tuple[int, int | None], tuple[list[int], list[int]]]:
    """{(layer, expert): (rows, cols)} index lists."""
    groups: dict[tuple[int, int | None], list[tuple[int, int]]] = {}
    for (layer, row, col), expert in keys:
        groups.setdefault((layer, expert), []).append((row, col))
    return {k: ([r for r, _ in rc], [c for _, c in rc]) for k, rc in groups.items()}


@contextlib.contextmanager
def zeroed_entries(model: nn.Module, arch: ArchSpec, coords: Iterable) -> Iterator[int]:
    """Zero many down-projection entries at once (vectorised per matrix); yields how many were zeroed.

    The original values are saved before any write and copied back on exit, so duplicates and
    errors inside the block still leave the weights bitwise as they were.
    """
    keys = checked_keys(model, arch, coords)
    entries = []
    for (layer, expert), (rows, cols) in _by_matrix(keys).items():
        matrix = arch.expert_matrix(model, layer, expert)  # an [out, in] view of the stored weight
        at = matrix.device  # index where the weights are
        entries.append((matrix, (torch.tensor(rows, device=at), torch.tensor(cols, device=at))))
    with edited_entries(entries):
        with torch.no_grad():
            for matrix, idx in entries:
                matrix[idx] = 0
        yield len(set(keys))


def sw_layers(coords: Iterable) -> list[int]:
    """The layers that hold super weights, in order."""
    return sorted({c.layer for c, _ in as_keys(coords)})


def _matrices(model: nn.Module, arch: ArchSpec, layers: Iterable[int]) -> list[tuple[int, int | None, torch.Tensor]]:
    """(layer, expert, [out, in] view) of the down-projections of ``layers``: every expert's in an MoE."""
    out = []
    for layer in layers:
        module = arch.experts_module(model, layer) if arch.is_moe else None
        experts = ([None] if arch.has_dense(model, layer) else []) + (list(range(module.down_proj.shape[0])) if module is not None else [])
        out += [(layer, e, arch.expert_matrix(model, layer, e)) for e in experts]
    return out


def top_magnitude_coords(model: nn.Module, arch: ArchSpec, layers: Iterable[int], n: int, exclude: Iterable) -> list:
    """The ``n`` largest-|w| entries over the down-projections of ``layers`` (each expert's, in an
    MoE), skipping ``exclude``."""
    skip = set(as_keys(exclude))
    values, keys = [], []
    for layer, expert, matrix in _matrices(model, arch, layers):
        m = matrix.detach().abs().float()
        k = min(n + len(skip), m.numel())
        v, idx = m.flatten().topk(k)
        values.append(v)
        keys += [(Coord(layer, int(i) // m.shape[1], int(i) % m.shape[1]), expert) for i in idx.tolist()]
    order = torch.cat(values).argsort(descending=True, stable=True).tolist() if values else []
    ranked = (keys[i] for i in order)
    return [weight_item(*k) for k in ranked if k not in skip][:n]


def random_coords(
    model: nn.Module, arch: ArchSpec, layers: Iterable[int], n: int, exclude: Iterable, seed: int = 0
) -> list:
    """``n`` distinct random entries of the down-projections of ``layers`` (uniform over every
    entry, every expert's in an MoE), not in ``exclude``."""
    skip = set(as_keys(exclude))
    mats = [(layer, expert, tuple(m.shape)) for layer, expert, m in _matrices(model, arch, layers)]
    total = sum(r * c for _, _, (r, c) in mats)
    if n > total - len(skip):
        raise ValueError(f"cannot draw {n} random weights from {total} entries")
    g = torch.Generator().manual_seed(seed)
    out: list[Key] = []
    while len(out) < n:
        for flat in torch.randint(0, total, (2 * (n - len(out)) + 8,), generator=g, device="cpu").tolist():
            key = _unflatten(flat, mats)
            if key not in skip and key not in out:
                out.append(key)
            if len(out) == n:
                break
    return [weight_item(*k) for k in out]


def _unflatten(flat: int, mats: list[tuple[int, int | None, tuple[int, int]]]) -> Key:
    for layer, expert, (rows, cols) in mats:
        if flat < rows * cols:
            return Coord(layer, flat // cols, flat % cols), expert
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
    keys = checked_keys(model, arch, coords)
    originals = {k: float(arch.expert_matrix(model, k[0].layer, k[1])[k[0].row, k[0].col].detach()) for k in keys}
    with HookSet() as hooks:
        for layer in sw_layers(coords):
            mine = [(c.row, c.col, e, originals[(c, e)]) for c, e in keys if c.layer == layer]
            dense = [(r, c, w) for r, c, e, w in mine if e is None]
            if dense:
                hooks.forward(arch.down_proj_module(model, layer), _restore_hook(dense, floor))
            if len(dense) < len(mine):
                hooks.forward(arch.experts_module(model, layer), _restore_experts_hook(
                    [(r, c, e, w) for r, c, e, w in mine if e is not None], floor), with_kwargs=True)
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


def _restore_experts_hook(entries: list[tuple[int, int, int, float]], floor: float):
    """The MoE form of ``_restore_hook``, on the experts module ``(hidden_states, top_k_index,
    top_k_weights) -> [tokens, hidden]``: for each token routed to a weight's expert, the expert's
    down-projection input ``x = act(gate) * up`` is recomputed from the expert's ``gate_up_proj``
    (as ``attribute.mlp_terms`` does) and ``routing weight * x[col] * w`` added back at ``row``
    where ``|x[col]| >= floor``."""
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        hs, idx, routing = (list(args) + [kwargs[n] for n in names[len(args):]])[:3]
        output = output.clone()
        for row, col, expert, w in entries:
            tokens, slots = (idx == expert).nonzero(as_tuple=True)
            if not len(tokens):
                continue
            gate, up = nn.functional.linear(hs[tokens], module.gate_up_proj[expert]).chunk(2, dim=-1)
            xc = (module.act_fn(gate) * up)[:, col].float()
            term = torch.where(xc.abs() >= floor, xc * w * routing[tokens, slots].float(), torch.zeros_like(xc))
            output[tokens, row] = (output[tokens, row].float() + term).to(output.dtype)
        return output

    return hook
