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

Each set is scored in chunks (128 tokens, then doubling up to the whole text) and stops as soon as a
confidence bound decides every question its label asks (``Question``): is its mean NLL above the
base's by ``log(collapse)``, and above each null draw's? A collapse (x7, x62,000) or a survivor
(x1.00-1.03) is decided on its first chunk; only a borderline set is scored to the end, where the
point estimate decides as before. The null draws are shared by every set of the same matrices, and a
set found twice (a weight alone that is its activation's only creating weight) is scored once.
``Verdict.scored`` says how many tokens each set was scored on.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from torch import nn

from ..model.arch import ArchSpec
from ..core.results import Versioned

log = logging.getLogger(__name__)

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


def _key(w) -> list:
    return [w.layer, w.row, w.col, getattr(w, "expert", None)]


def null_draw(model: nn.Module, arch: ArchSpec, weights: Sequence, rng: random.Random, avoid: Sequence = ()) -> list:
    """As many random entries as ``weights``, each in the same matrix (never one of them nor of ``avoid``)."""
    from types import SimpleNamespace

    taken = {tuple(_key(w)) for w in (*weights, *avoid)}
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


class JudgeBase:
    """What every judge shares (``judge_with`` asks it ``token_nlls`` and ``activations_after``): the
    verdict text's windows (``eval.perplexity.perplexity_windows``, one window up to the model's length),
    the null draws' generator, the prefixes a round scores and the tokens scored so far."""

    def __init__(self, model: nn.Module, arch: ArchSpec, tokenizer, text: str, tokens: int = 1024, seed: int = 0):
        from ..eval.perplexity import perplexity_windows

        self.model, self.arch, self.tokenizer = model, arch, tokenizer
        self.ids, self.spans, _, _ = perplexity_windows(model, tokenizer, text, max_tokens=tokens)
        self.tokens, self.rng = len(self.ids), random.Random(seed)
        self.scored = 0  # tokens scored so far, summed over every pass (the base, each set, each null draw)
        self.upto = self.per_pass  # the scored tokens the current round measures

    @property
    def per_pass(self) -> int:
        """Tokens one full pass over the windows scores."""
        return sum(e - f for _, e, f in self.spans)

    def rounds(self, full: bool = False) -> list[int]:
        """The scored tokens of each round: ``CHUNK``, doubling, then the whole text (only it when ``full``)."""
        out, n = [], CHUNK
        while n < self.per_pass and not full:
            out.append(n)
            n *= 2
        return [*out, self.per_pass]

    def windows(self, upto: int | None = None) -> list[tuple[torch.Tensor, int]]:
        """``(ids, first_scored)`` of each window, cut after the first ``upto`` scored tokens (all by default)."""
        left, out = self.per_pass if upto is None else upto, []
        for b, e, f in self.spans:
            if left <= 0:
                break
            end = min(e, f + left)
            out.append((self.ids[b:end], f - b))
            left -= end - f
        return out


class Judge(JudgeBase):
    """Measures verdicts for one model in memory, one zeroed set after another. (A streamed model has
    ``find.streamed.StreamedJudge``: the same questions, every set of a round in one pass.)"""

    def __init__(self, model: nn.Module, arch: ArchSpec, tokenizer, text: str, tokens: int = 1024, seed: int = 0):
        from .runner import InMemoryRunner

        super().__init__(model, arch, tokenizer, text, tokens, seed)
        self.ids = self.ids.to(next(model.parameters()).device)
        self.forwards = 0
        self.runner = InMemoryRunner(model, arch)

    def nll(self) -> torch.Tensor:
        """The NLL of each of the first ``upto`` scored tokens, the model as it is now."""
        from ..eval.perplexity import token_nlls

        windows = self.windows(self.upto)
        self.forwards += len(windows)
        self.scored += self.upto
        return torch.cat([token_nlls(self.model, ids, first) for ids, first in windows])

    def token_nlls(self, sets: Sequence[Sequence], upto: int) -> list[torch.Tensor]:
        """``nll`` with each set zeroed in turn (restored after each)."""
        from .runner import zeroed

        self.upto, out = upto, []
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
          seed: int = 0, full: bool = False, collapse: float = COLLAPSE) -> int:
    """Fill ``result.verdicts`` and each weight's ``verdict`` label; returns the forward passes it ran.
    ``full``: score every set on the whole text (no early stop); ``collapse``: the perplexity ratio that
    counts as the model collapsing."""
    j = Judge(model, arch, tokenizer, text, tokens, seed)
    judge_with(j, result, draws, full, collapse)
    return j.forwards


def judge_with(j, result, draws: int = 2, full: bool = False, collapse: float = COLLAPSE) -> None:
    """``judge`` with any judge (in memory, streamed): every zeroed set and null draw is planned first, in
    one order (so the draws are the same however the NLLs are measured), then scored round by round
    (``verdict_rounds.Scoring``, the base beside them) until each label is decided."""
    from ..core.progress import note
    from .verdict_rounds import Scoring, plan_verdicts, verdicts_of

    plan = plan_verdicts(j, result, draws, collapse)
    scoring = Scoring(plan.tracks, plan.questions)
    for upto in j.rounds(full):
        todo = scoring.todo()
        if not todo:
            break
        note(f"{len(todo)} zeroed set(s) on {upto} tokens")
        log.info("verdict: %d zeroed set(s) and the base on %d of %d tokens", len(todo), upto, j.per_pass)
        base, *nlls = j.token_nlls([[], *[t.weights for t in todo]], upto)
        scoring.record(base, todo, nlls, final=upto == j.per_pass)
    activation = {a.channel: a for a in result.activations}
    requests = [(result.prompts[activation[e.channel].prompt], activation[e.channel], e.track.weights)
                for e in plan.entries if e.channel in activation]
    result.verdicts = verdicts_of(plan, activation, j.activations_after(requests), j.tokens)
