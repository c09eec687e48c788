"""The seed notes' weight-magnitude z-score scan (../shared/SEED-NOTES.md).

A weight is flagged when ``|w| > mean(|W|) + threshold * std(|W|)`` within its matrix. The scan
reports how many weights that flags and where the activation method's super weights rank among
them: magnitude alone flags thousands of weights, and the super weights are not always on top.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn

from ..model.source import ModelSource
from ..model.streamed import StreamedModel, streamed
from ..model.arch import ArchSpec, expert_params
from ..core.results import Versioned
from ..core.coords import as_keys


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
    expert: int | None = None  # a mixture of experts: the expert whose down-projection holds it


@dataclass
class MagnitudeResult(Versioned):
    """The z-score scan: how many weights it flags, its top weights, and where the super weights rank."""

    KIND: ClassVar[str] = "magnitude scan"
    WRITER: ClassVar[str] = "`superweight detect --method magnitude --json PATH`"
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


Source = tuple[str, str, Callable[[nn.Module], torch.Tensor]]  # (name, parameter, its [out, in] view)


def matrix_sources(model: nn.Module, arch: ArchSpec, scope: str) -> Iterator[Source]:
    """Every matrix of the scan: its name, the parameter that holds it and how to view it as
    ``[out, in]``; an MoE layer's experts are one parameter holding a matrix per expert
    (``...experts.down_proj[e]``, the name detection gives their weights)."""
    if scope == "down_proj":
        for i in range(arch.num_layers(model)):
            if arch.has_dense(model, i):  # a dense model's; an MoE's dense layer or shared expert
                name = arch.down_proj_name(i, model)
                yield name, f"{name}.weight", lambda m, i=i: arch.weight_matrix(m, i)
            if arch.is_moe and arch.experts_module(model, i) is not None:  # else a dense layer of an MoE (mlp_only_layers)
                yield from _experts(arch.experts_name(i), "down_proj", arch.experts_module(model, i))
        return
    skip = {arch.embed}
    for name, module in model.named_modules():
        if arch.is_moe and (params := expert_params(module)):
            for param, _ in params:
                yield from _experts(name, param, module)
            continue
        w = getattr(module, "weight", None)
        if name in skip or w is None or w.dim() != 2 or isinstance(module, nn.Embedding):
            continue
        conv1d = type(module).__name__ == "Conv1D"
        yield name, f"{name}.weight", lambda m, name=name, conv1d=conv1d: _weight_view(m, name, conv1d)


def _experts(module_name: str, param: str, module: nn.Module) -> Iterator[Source]:
    """One ``[out, in]`` matrix per expert of a 3-D experts parameter ``[experts, out, in]``."""
    for e in range(getattr(module, param).shape[0]):
        yield f"{module_name}.{param}[{e}]", f"{module_name}.{param}", \
            lambda m, e=e: getattr(m.get_submodule(module_name), param)[e]


def _weight_view(model: nn.Module, name: str, conv1d: bool) -> torch.Tensor:
    w = model.get_submodule(name).weight
    return w.t() if conv1d else w


def iter_matrices(model: nn.Module, arch: ArchSpec, scope: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, [out, in] weight) for every down-projection (each expert's), or every linear weight."""
    for name, _, view in matrix_sources(model, arch, scope):
        yield name, view(model)


def by_parameter(sources: Iterable[Source]) -> Iterator[tuple[str, list[Source]]]:
    """The sources grouped by the parameter that holds them (consecutive, as ``matrix_sources`` gives them)."""
    for param, group in groupby(sources, key=lambda s: s[1]):
        yield param, list(group)


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
    rank_super_weights(result, flagged_z, super_weights,
                       lambda layer, expert: arch.expert_matrix(model, layer, expert).detach())
    return result


def rank_super_weights(
    result: MagnitudeResult, flagged_z: dict[str, torch.Tensor], super_weights: Iterable,
    matrix_of: Callable[[int, int | None], torch.Tensor],
) -> None:
    """Append where each weight (layer, row, col[, expert]) ranks among the scan's flags;
    ``matrix_of(layer, expert)`` is its ``[out, in]`` down-projection."""
    threshold = result.threshold
    for (layer, row, col), expert in as_keys(super_weights):
        w = matrix_of(layer, expert)
        z, _, _ = _zscores(w)
        zv = float(z[row, col])
        flagged = zv > threshold
        rank = 1 + sum(int((fz > zv).sum()) for fz in flagged_z.values()) if flagged else 0
        in_matrix = int((w.abs() > w[row, col].abs()).sum()) + 1
        result.super_weights.append(RankedWeight(layer, row, col, float(w[row, col]), zv, flagged, rank, in_matrix, expert))


# ---------------------------------------------------------------- streaming magnitude scan


def iter_streamed_matrices(sm: StreamedModel, scope: str = "down_proj") -> Iterator[tuple[str, torch.Tensor]]:
    """``magnitude.iter_matrices`` over a ``StreamedModel``: each parameter read alone (an MoE
    layer's experts once for all of them), its matrices yielded, then freed."""
    canonical = {id(p): n for n, p in sm.model.named_parameters()}  # tied lm_head -> the embedding
    for param, sources in list(by_parameter(matrix_sources(sm.model, sm.arch, scope))):
        with sm.materialised([canonical[id(sm.model.get_parameter(param))]]):
            for name, _, view in sources:
                yield name, view(sm.model).detach()


def stream_magnitude_scan(
    path: str | Path | ModelSource | StreamedModel, threshold: float = 3.0, scope: str = "down_proj", super_weights=(), top_k: int = 10,
    dtype: str | torch.dtype = "float32", device: str | torch.device | None = None,
):
    """``magnitude.magnitude_scan`` for a checkpoint on disk (or a ``StreamedModel`` already built), one
    tensor in memory at a time."""
    with streamed(path, dtype, device, prefetch=False) as sm:
        result, flagged_z = scan_matrices(iter_streamed_matrices(sm, scope), threshold, top_k, scope)

        def matrix_of(layer: int, expert: int | None) -> torch.Tensor:
            names = sm.down_proj_names(layer) if expert is None else [f"{sm.arch.experts_name(layer)}.down_proj"]
            with sm.materialised(names):
                return sm.arch.expert_matrix(sm.model, layer, expert).detach().clone()

        rank_super_weights(result, flagged_z, super_weights, matrix_of)
        return result
