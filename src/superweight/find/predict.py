"""Predict where the super weights are from the weights alone (no forward pass, no data), and score
the prediction against detection's findings.

Every down-projection entry ``(layer, row, col)`` of a dense MLP gets a score from one statistic:

- ``magnitude_z``: the seed notes' z-score of ``|W[row, col]|`` within its matrix (``find.magnitude``);
- ``abs``: ``|W[row, col]|`` itself, comparable across layers;
- ``column_norm``: the L2 norm of the column ``W[:, col]`` (intermediate neuron ``col``'s write
  vector), given in full to the column's largest entry and scaled by ``|W[row, col]| / max |W[:, col]|``
  for the others;
- ``up_gate_down``: ``||up[col, :]|| * ||gate[col, :]|| * |W[row, col]|``: how large neuron ``col``
  can get for a unit input, times what it writes to channel ``row`` (ungated MLPs: ``up`` alone);
- ``gain_up_gate_down``: the same with the rows of up/gate multiplied by the gain of the norm
  before the MLP (Gemma's norms scale by ``1 + weight``);

and each of them again restricted to the first half of the layers (``+early``: the early-layer
position prior). Precision and recall at k are measured on exact coordinates, and the rank of each
target (1 = the top score) is reported, so a miss says how far off it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Sequence

import torch
from torch import nn

from ..core.errors import SuperweightError
from ..core.results import Versioned
from ..model.arch import ArchSpec, submodule

STATISTICS = ("magnitude_z", "abs", "column_norm", "up_gate_down", "gain_up_gate_down")
KS = (1, 3, 10, 30, 100, 1000)

Coord = tuple[int, int, int]


def _mlp_inputs(model: nn.Module, arch: ArchSpec, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(up [inter, hidden], gate or None, gain [hidden])`` of a dense, unfused MLP."""
    if arch.is_moe or arch.fused_gate_up or arch.transposed:
        raise SuperweightError(f"weight-only prediction supports dense unfused nn.Linear MLPs; {arch.name} is not one")
    block = arch.layer_modules(model)[layer]
    up = submodule(block, arch.up_proj).weight.detach().float()
    gate = submodule(block, arch.gate_proj).weight.detach().float() if arch.gate_proj else None
    norm = submodule(block, "pre_feedforward_layernorm") if arch.post_norm else None
    norm = norm or submodule(block, "post_attention_layernorm")
    gain = torch.ones(up.shape[1]) if norm is None or getattr(norm, "weight", None) is None else norm.weight.detach().float()
    if norm is not None and "Gemma" in type(norm).__name__:
        gain = 1.0 + gain
    return up, gate, gain


def layer_scores(model: nn.Module, arch: ArchSpec, layer: int, statistic: str) -> torch.Tensor:
    """``[rows, cols]`` scores of one down-projection (see the module docstring)."""
    w = arch.weight_matrix(model, layer).detach().float().abs()
    if statistic == "abs":
        return w
    if statistic == "magnitude_z":
        std = float(w.std())
        return (w - w.mean()) / (std if std > 0 else 1.0)
    if statistic == "column_norm":
        return w.norm(dim=0) * w / w.amax(dim=0).clamp(min=1e-30)
    if statistic in ("up_gate_down", "gain_up_gate_down"):
        up, gate, gain = _mlp_inputs(model, arch, layer)
        if statistic == "up_gate_down":
            gain = torch.ones_like(gain)
        neuron = (up * gain).norm(dim=1) * ((gate * gain).norm(dim=1) if gate is not None else 1.0)
        return w * neuron
    raise SuperweightError(f"unknown statistic {statistic!r}: use one of {', '.join(STATISTICS)}")


@dataclass
class Ranking:
    """One predictor's top candidates and the rank of every target."""

    predictor: str
    top: list[list[float]]  # [layer, row, col, score], best first
    target_ranks: list[int]  # 1 = the top score; ties count against the target
    precision: dict[str, float] = field(default_factory=dict)  # "k" -> share of the top k that are targets
    recall: dict[str, float] = field(default_factory=dict)  # "k" -> share of the targets in the top k


def rank(score_of: Callable[[int], torch.Tensor], layers: Sequence[int], targets: Sequence[Coord], top_k: int = 1000,
         name: str = "") -> Ranking:
    """Merge the per-layer scores into one ranking of ``layers``' entries; targets outside them rank last."""
    best: list[tuple[float, int, int, int]] = []
    target_scores = {t: None for t in targets}
    mats = {}
    for layer in layers:
        s = score_of(layer)
        mats[layer] = s
        vals, idx = s.flatten().topk(min(top_k, s.numel()))
        best += [(float(v), layer, *divmod(int(i), s.shape[1])) for v, i in zip(vals, idx)]
        for t in targets:
            if t[0] == layer:
                target_scores[t] = float(s[t[1], t[2]])
    best.sort(key=lambda b: -b[0])
    total = sum(m.numel() for m in mats.values())
    ranks = [total + 1 if v is None else sum(int((m >= v).sum()) for m in mats.values()) for v in target_scores.values()]
    top = [[layer, row, col, v] for v, layer, row, col in best[:top_k]]
    return Ranking(name, top, ranks, *precision_recall(top, targets))


def precision_recall(top: Sequence[Sequence], targets: Iterable[Coord], ks: Sequence[int] = KS) -> tuple[dict, dict]:
    """Precision and recall at each k of a best-first list of ``[layer, row, col, ...]``."""
    wanted = {tuple(t) for t in targets}
    precision, recall = {}, {}
    for k in ks:
        hits = sum(tuple(int(x) for x in c[:3]) in wanted for c in top[:k])
        precision[str(k)] = hits / k
        recall[str(k)] = hits / len(wanted) if wanted else 0.0
    return precision, recall


@dataclass
class Prediction(Versioned):
    """Every predictor's ranking of one model's down-projection entries against one target set."""

    KIND: ClassVar[str] = "weight-only prediction"
    model: str
    targets: list[list[int]]
    entries: int
    rankings: list[Ranking]

    @classmethod
    def _decode(cls, d: dict) -> dict:
        return {**super()._decode(d), "rankings": [Ranking(**r) for r in d["rankings"]]}


def predict(model: nn.Module, arch: ArchSpec, targets: Iterable[Sequence[int]], name: str = "",
            statistics: Sequence[str] = STATISTICS, top_k: int = 1000) -> Prediction:
    """Rank every down-projection entry by each statistic, alone and ``+early``, against ``targets``."""
    targets = [tuple(int(x) for x in t[:3]) for t in targets]
    n = arch.num_layers(model)
    layers = [i for i in range(n) if arch.has_dense(model, i)]
    early = [i for i in layers if i < (n + 1) // 2]
    cache: dict[tuple[str, int], torch.Tensor] = {}

    def scores(stat: str) -> Callable[[int], torch.Tensor]:
        def of(layer: int) -> torch.Tensor:
            if (stat, layer) not in cache:
                cache[(stat, layer)] = layer_scores(model, arch, layer, stat)
            return cache[(stat, layer)]
        return of

    rankings = []
    for stat in statistics:
        rankings.append(rank(scores(stat), layers, targets, top_k, stat))
        rankings.append(rank(scores(stat), early, targets, top_k, stat + "+early"))
        cache.clear()
    entries = sum(arch.weight_matrix(model, i).numel() for i in layers)
    return Prediction(name, [list(t) for t in targets], entries, rankings)
