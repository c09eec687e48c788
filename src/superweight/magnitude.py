"""The seed notes' weight-magnitude z-score scan (../shared/SEED-NOTES.md).

A weight is flagged when ``|w| > mean(|W|) + threshold * std(|W|)`` within its matrix. The scan
reports how many weights that flags and where the activation method's super weights rank among
them: magnitude alone flags thousands of weights, and the super weights are not always on top.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn

from .arch import ArchSpec
from .results import Versioned


@dataclass
class MatrixScan:
    module: str
    shape: list[int]
    flagged: int
    max_z: float
    mean_abs: float
    std_abs: float


@dataclass
class RankedWeight:
    layer: int
    row: int
    col: int
    value: float
    z: float
    flagged: bool
    rank_in_flagged: int  # 1 = highest z among all flagged weights of the scan; 0 when not flagged
    rank_in_matrix: int  # 1 = largest |w| of its own matrix


@dataclass
class MagnitudeResult(Versioned):
    """The z-score scan: how many weights it flags, its top weights, and where the super weights rank."""

    KIND: ClassVar[str] = "magnitude scan"
    HINT: ClassVar[str] = ": write it with `superweight detect --method magnitude --json PATH`"
    threshold: float
    scope: str  # "down_proj" or "all_linear"
    total_weights: int
    total_flagged: int
    matrices: list[MatrixScan]
    top: list[dict]  # the highest-z weights of the whole scan
    super_weights: list[RankedWeight] = field(default_factory=list)

    @classmethod
    def _decode(cls, d: dict) -> dict[str, Any]:
        out = super()._decode(d)
        out["matrices"] = [MatrixScan(**m) for m in d["matrices"]]
        return {**out, "super_weights": [RankedWeight(**r) for r in d.get("super_weights", [])]}


def _zscores(weight: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    a = weight.detach().float().abs()
    mean, std = float(a.mean()), float(a.std())
    return (a - mean) / (std if std > 0 else 1.0), mean, std


def iter_matrices(model: nn.Module, arch: ArchSpec, scope: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, [out, in] weight) for every down-projection, or every 2-D linear weight."""
    if scope == "down_proj":
        for i in range(arch.num_layers(model)):
            yield arch.down_proj_name(i), arch.weight_matrix(model, i)
        return
    skip = {arch.embed}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if name in skip or w is None or w.dim() != 2 or isinstance(module, nn.Embedding):
            continue
        yield name, w.t() if type(module).__name__ == "Conv1D" else w


def scan_matrices(
    matrices: Iterable[tuple[str, torch.Tensor]], threshold: float = 3.0, top_k: int = 10,
    scope: str = "down_proj",
) -> tuple[MagnitudeResult, dict[str, torch.Tensor]]:
    """Z-score every matrix; returns the summary and a per-matrix sorted tensor of flagged z."""
    scans, heap, flagged_z = [], [], {}
    total = flagged_total = 0
    for name, w in matrices:
        w = w.detach()
        z, mean, std = _zscores(w)
        mask = z > threshold
        n = int(mask.sum())
        total += z.numel()
        flagged_total += n
        flagged_z[name] = z[mask]
        scans.append(MatrixScan(name, list(w.shape), n, float(z.max()), mean, std))
        vals, idx = z.flatten().topk(min(top_k, z.numel()))
        for v, i in zip(vals.tolist(), idx.tolist()):
            item = (v, name, divmod(i, w.shape[1]), float(w.flatten()[i]))
            heapq.heappush(heap, item) if len(heap) < top_k else heapq.heappushpop(heap, item)
    top = [
        {"module": n, "row": rc[0], "col": rc[1], "value": val, "z": z}
        for z, n, rc, val in sorted(heap, reverse=True)
    ]
    return MagnitudeResult(threshold, scope, total, flagged_total, scans, top), flagged_z


def magnitude_scan(
    model: nn.Module, arch: ArchSpec, threshold: float = 3.0, scope: str = "down_proj",
    super_weights: Iterable = (), top_k: int = 10,
) -> MagnitudeResult:
    """Run the z-score scan and rank the given super weights (layer, row, col) among its flags."""
    result, flagged_z = scan_matrices(iter_matrices(model, arch, scope), threshold, top_k, scope)
    rank_super_weights(result, flagged_z, super_weights, lambda layer: arch.weight_matrix(model, layer).detach())
    return result


def rank_super_weights(
    result: MagnitudeResult, flagged_z: dict[str, torch.Tensor], super_weights: Iterable,
    matrix_of: Callable[[int], torch.Tensor],
) -> None:
    """Append where each (layer, row, col) ranks among the scan's flags; ``matrix_of(layer)`` is [out, in]."""
    from .ablate import as_coords

    threshold = result.threshold
    for layer, row, col in as_coords(super_weights):
        w = matrix_of(layer)
        z, _, _ = _zscores(w)
        zv = float(z[row, col])
        flagged = zv > threshold
        rank = 1 + sum(int((fz > zv).sum()) for fz in flagged_z.values()) if flagged else 0
        in_matrix = int((w.abs() > w[row, col].abs()).sum()) + 1
        result.super_weights.append(RankedWeight(layer, row, col, float(w[row, col]), zv, flagged, rank, in_matrix))
