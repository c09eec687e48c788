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

from ..model.arch import ArchSpec
from ..core.results import Versioned

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


class JudgeBase:
    """What every judge shares (``judge_with`` asks it ``zeroed_nlls`` and ``activations_after``): the
    verdict text's windows (``eval.perplexity.perplexity_windows``, one window up to the model's length),
    the null draws' generator, the mean NLL over the scored tokens and the perplexity ratio to the base."""

    def __init__(self, model: nn.Module, arch: ArchSpec, tokenizer, text: str, tokens: int = 1024, seed: int = 0):
        from ..eval.perplexity import perplexity_windows

        self.model, self.arch, self.tokenizer = model, arch, tokenizer
        self.ids, self.spans, _, _ = perplexity_windows(model, tokenizer, text, max_tokens=tokens)
        self.tokens, self.rng, self.base = len(self.ids), random.Random(seed), 0.0
        self.scored = 0  # tokens scored so far, summed over every pass (the base, each set, each null draw)

    def windows(self) -> list[tuple[torch.Tensor, int]]:
        """``(ids, first_scored)`` of each window."""
        return [(self.ids[b:e], f - b) for b, e, f in self.spans]

    @property
    def per_pass(self) -> int:
        """Tokens one full pass over the windows scores."""
        return sum(e - f for _, e, f in self.spans)

    def mean(self, window_nlls: Sequence[float]) -> float:
        """Mean NLL per scored token from the windows' summed NLLs (added in window order)."""
        return sum(window_nlls) / max(sum(e - f for _, e, f in self.spans), 1)

    def ratio(self, nll: float) -> float:
        return math.exp(min(nll - self.base, 700.0))


class Judge(JudgeBase):
    """Measures verdicts for one model in memory: a base NLL once, then one NLL per zeroed set. (A
    streamed model has ``stream_detect.StreamedJudge``: the same questions, every set in one pass.)"""

    def __init__(self, model: nn.Module, arch: ArchSpec, tokenizer, text: str, tokens: int = 1024, seed: int = 0):
        from .runner import InMemoryRunner

        super().__init__(model, arch, tokenizer, text, tokens, seed)
        self.ids = self.ids.to(next(model.parameters()).device)
        self.forwards = 0
        self.base = self.nll()
        self.runner = InMemoryRunner(model, arch)

    def nll(self) -> float:
        from ..eval.perplexity import window_nll

        self.forwards += len(self.spans)
        self.scored += self.per_pass
        return self.mean([float(window_nll(self.model, ids, first)) for ids, first in self.windows()])

    def zeroed_nlls(self, sets: Sequence[Sequence]) -> list[float]:
        from .runner import zeroed

        out = []
        for weights in sets:
            with zeroed(self.model, self.arch, weights):
                out.append(self.nll())
        return out

    def activations_after(self, requests: Sequence[tuple]) -> list[float]:
        """``h[token, channel]`` after the peak layer for each ``(prompt, activation, weights zeroed)``."""
        from .runner import encode_prompt

        out = []
        for prompt, sa, weights in requests:
            enc = encode_prompt(self.tokenizer, prompt, next(self.model.parameters()).device)
            traces = self.runner.run([enc], [list(weights)])[0]
            out.append(float(traces[sa.peak_layer].h_out[sa.token, sa.channel]))
        return out


def judge(model: nn.Module, arch: ArchSpec, tokenizer, result, text: str, tokens: int = 1024, draws: int = 2,
          seed: int = 0) -> int:
    """Fill ``result.verdicts`` and each weight's ``verdict`` label; returns the forward passes it ran."""
    j = Judge(model, arch, tokenizer, text, tokens, seed)
    judge_with(j, result, draws)
    return j.forwards


def judge_with(j, result, draws: int = 2) -> None:
    """``judge`` with any judge (in memory, streamed): every zeroed set and null draw is planned first, in
    one order (so the draws are the same however the NLLs are measured), then measured in one call."""
    groups: dict[int, list] = {}
    for sw in result.super_weights:
        if sw.role == "creates":
            groups.setdefault(sw.row, []).append(sw)
    plan: list[tuple] = []  # (kind, channel, weights, null sets) in the order the verdicts are listed
    for ch, ws in groups.items():
        plan.append(("activation", ch, ws, [null_draw(j.model, j.arch, ws, j.rng) for _ in range(draws)]))
    for sw in result.super_weights:
        plan.append(("weight", sw.row, [sw], [] if sw.row in groups else [null_draw(j.model, j.arch, [sw], j.rng)]))
    sets = [s for _, _, ws, nulls in plan for s in (*nulls, ws)]
    nlls = iter(j.zeroed_nlls(sets))
    activation = {a.channel: a for a in result.activations}
    requests = [(result.prompts[activation[ch].prompt], activation[ch], ws) for _, ch, ws, _ in plan if ch in activation]
    after = iter(j.activations_after(requests))
    verdicts, groups_done = [], {}
    for kind, ch, ws, nulls in plan:
        null = [j.ratio(next(nlls)) for _ in nulls] or groups_done[ch].null_ppl_ratios
        nll = next(nlls)
        v = Verdict(kind, [_key(w) for w in ws], ch, "", j.base, nll, j.ratio(nll), null, tokens=j.tokens)
        if ch in activation:
            v.activation_before, v.activation_after = activation[ch].peak, next(after)
        if kind == "activation":
            collapses = v.ppl_ratio >= COLLAPSE and v.ppl_ratio > max(null, default=1.0)
            v.label = "super activation: the model collapses without its creating weights" if collapses else (
                "super activation: the model survives without its creating weights")
            groups_done[ch] = v
        else:
            group = groups_done.get(ch)
            v.label = ws[0].verdict = _label_weight(ws[0], v.ppl_ratio, null, group.ppl_ratio if group else 1.0)
        verdicts.append(v)
    result.verdicts = verdicts
