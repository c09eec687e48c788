"""What a verdict is: its labels, the line and bound that decide them, the record of one zeroed set,
and the null draws it is compared with. ``verdict`` measures (the judges); ``verdict_rounds`` plans
the rounds and reads the labels off the measurements.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import ClassVar, Sequence

from torch import nn

from ..core.results import Versioned
from ..model.arch import ArchSpec

SUPER_WEIGHT = "super weight"
JOINT = "super weight (jointly)"
SURVIVES = "super activation source, model survives"
CANCELLING = "late / cancelling"
COLLAPSE = 2.0  # perplexity ratio that counts as the model collapsing
CHUNK = 128  # tokens a set is first scored on; each later round doubles them up to the whole text
BLOCK = 16  # tokens per block: the bound's spread is the spread of block means (neighbouring tokens correlate)
Z = 4.0  # the bound: mean +- Z standard errors of the block means


@dataclass
class Verdict(Versioned):
    """What zeroing one weight, or one super activation's creating weights, costs."""

    KIND: ClassVar[str] = "verdict"
    target: str  # "weight" or "activation"
    weights: list[list]  # [layer, row, col, expert] of each weight zeroed
    channel: int  # the super activation's channel (= the weights' row)
    label: str
    nll_base: float
    nll_zeroed: float
    ppl_ratio: float  # exp(nll_zeroed - nll_base)
    null_ppl_ratios: list[float] = field(default_factory=list)  # as many random weights of the same matrices
    activation_before: float = 0.0  # the super activation's |peak| on the prompt, unmodified
    activation_after: float = 0.0  # the same (token, channel, layer) with the weights zeroed
    tokens: int = 0  # the verdict text's length in tokens
    scored: int = 0  # the tokens this set was scored on (it stops once its label is decided)
    null_scored: list[int] = field(default_factory=list)  # the same for each null draw


def weight_key(w) -> list:
    """``[layer, row, col, expert]`` of a weight (expert None for a dense matrix)."""
    return [w.layer, w.row, w.col, getattr(w, "expert", None)]


def null_draw(model: nn.Module, arch: ArchSpec, weights: Sequence, rng: random.Random, avoid: Sequence = ()) -> list:
    """As many random entries as ``weights``, each in the same matrix (never one of them nor of ``avoid``)."""
    taken = {tuple(weight_key(w)) for w in (*weights, *avoid)}
    out = []
    for w in weights:
        rows, cols = arch.expert_matrix(model, w.layer, getattr(w, "expert", None)).shape
        while True:
            cand = (w.layer, rng.randrange(rows), rng.randrange(cols), getattr(w, "expert", None))
            if cand not in taken:
                taken.add(cand)
                out.append(SimpleNamespace(layer=cand[0], row=cand[1], col=cand[2], expert=cand[3]))
                break
    return out
