"""Verdict by impact: zero what detection found and measure the damage against a random-weight null.

For each weight found, and for all the creating weights of one super activation together, the
weights are zeroed (restored bit for bit afterwards, ``edits.edited_entries``) and the mean
next-token NLL is measured on ``tokens`` tokens of a text (default: the offline Wikipedia
introductions, else WikiText-2). The null zeroes as many random weights of the same matrices
(``draws`` times). The perplexity ratio ``exp(NLL_zeroed - NLL_base)`` decides the label:

* ``super weight``: zeroing it alone multiplies perplexity by at least ``collapse`` (2) and by more
  than every null draw;
* ``super weight (jointly)``: it does not alone, but zeroing its super activation's creating
  weights together does;
* ``super activation source, model survives``: it creates a super activation, but the model does
  not depend on it (redundant, or rebuilt by later layers);
* ``late / cancelling``: it cancels a super activation (a fall), whatever zeroing it costs.

The super activation's size after zeroing (``activation_after``, on the detection prompt) says how
much of it the weights made.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from torch import nn

from .arch import ArchSpec
from .results import Versioned

SUPER_WEIGHT = "super weight"
JOINT = "super weight (jointly)"
SURVIVES = "super activation source, model survives"
CANCELLING = "late / cancelling"
COLLAPSE = 2.0  # perplexity ratio that counts as the model collapsing


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
    tokens: int = 0


class NLL:
    """Mean next-token NLL of a model on fixed token windows; ``forwards`` counts the passes run."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, seq_len: int):
        from .eval.perplexity import window_spans

        self.model, self.ids = model, ids.to(next(model.parameters()).device)
        self.spans = window_spans(len(ids), seq_len, seq_len)
        self.forwards = 0

    def __call__(self) -> float:
        from .eval.perplexity import window_nll

        total, count = 0.0, 0
        for begin, end, first in self.spans:
            total += float(window_nll(self.model, self.ids[begin:end], first - begin))
            count += end - first
            self.forwards += 1
        return total / max(count, 1)


def _key(w) -> list:
    return [w.layer, w.row, w.col, getattr(w, "expert", None)]


def null_draw(model: nn.Module, arch: ArchSpec, weights: Sequence, rng: random.Random) -> list:
    """As many random entries as ``weights``, each in the same matrix (never one of them)."""
    from types import SimpleNamespace

    taken = {tuple(_key(w)) for w in weights}
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


def _label_weight(sw, ratio: float, null: list[float], group_ratio: float) -> str:
    if sw.role != "creates":
        return CANCELLING
    beyond = ratio > max(null, default=1.0)
    if ratio >= COLLAPSE and beyond:
        return SUPER_WEIGHT
    return JOINT if group_ratio >= COLLAPSE else SURVIVES


class Judge:
    """Measures verdicts for one model: a base NLL once, then one NLL per zeroed set."""

    def __init__(self, model: nn.Module, arch: ArchSpec, tokenizer, text: str, tokens: int = 1024, seed: int = 0):
        from .eval.perplexity import default_seq_len, tokenize_stream
        from .runner import InMemoryRunner

        ids = tokenize_stream(tokenizer, text, tokens)
        self.model, self.arch, self.tokenizer = model, arch, tokenizer
        self.nll = NLL(model, ids, min(len(ids), default_seq_len(model, tokenizer)))
        self.tokens = len(ids)
        self.base = self.nll()
        self.runner = InMemoryRunner(model, arch)
        self.rng = random.Random(seed)

    def zeroed_nll(self, weights: Sequence) -> float:
        from .runner import zeroed

        with zeroed(self.model, self.arch, weights):
            return self.nll()

    def activation_after(self, prompt: str, sa, weights: Sequence) -> float:
        from .runner import encode_prompt

        enc = encode_prompt(self.tokenizer, prompt, next(self.model.parameters()).device)
        traces = self.runner.run([enc], [list(weights)])[0]
        return float(traces[sa.peak_layer].h_out[sa.token, sa.channel])

    def ratio(self, nll: float) -> float:
        return math.exp(min(nll - self.base, 700.0))


def judge(model: nn.Module, arch: ArchSpec, tokenizer, result, text: str, tokens: int = 1024, draws: int = 2,
          seed: int = 0) -> int:
    """Fill ``result.verdicts`` and each weight's ``verdict`` label; returns the forward passes it ran."""
    j = Judge(model, arch, tokenizer, text, tokens, seed)
    groups: dict[int, list] = {}
    for sw in result.super_weights:
        if sw.role == "creates":
            groups.setdefault(sw.row, []).append(sw)
    activation_verdicts = {ch: _judge_group(j, result, ch, ws, draws) for ch, ws in groups.items()}
    result.verdicts = list(activation_verdicts.values())
    for sw in result.super_weights:
        group = activation_verdicts.get(sw.row)
        null = group.null_ppl_ratios if group else [j.ratio(j.zeroed_nll(null_draw(model, arch, [sw], j.rng)))]
        v = _verdict(j, result, "weight", [sw], sw.row, null)
        v.label = sw.verdict = _label_weight(sw, v.ppl_ratio, null, group.ppl_ratio if group else 1.0)
        result.verdicts.append(v)
    return j.nll.forwards


def _judge_group(j: Judge, result, channel: int, weights: list, draws: int) -> Verdict:
    null = [j.ratio(j.zeroed_nll(null_draw(j.model, j.arch, weights, j.rng))) for _ in range(draws)]
    v = _verdict(j, result, "activation", weights, channel, null)
    collapses = v.ppl_ratio >= COLLAPSE and v.ppl_ratio > max(null, default=1.0)
    v.label = "super activation: the model collapses without its creating weights" if collapses else (
        "super activation: the model survives without its creating weights")
    return v


def _verdict(j: Judge, result, target: str, weights: list, channel: int, null: list[float]) -> Verdict:
    nll = j.zeroed_nll(weights)
    v = Verdict(target, [_key(w) for w in weights], channel, "", j.base, nll, j.ratio(nll), null, tokens=j.tokens)
    sa = next((a for a in result.activations if a.channel == channel), None)
    if sa is not None:
        v.activation_before = sa.peak
        v.activation_after = j.activation_after(result.prompts[sa.prompt], sa, weights)
    return v
