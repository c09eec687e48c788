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

Each set is scored in rounds and stops as soon as a confidence bound decides every question its label
asks (``Question``): is its mean NLL above the base's by ``log(collapse)``, and above each null draw's?
The label is read from the whole text's mean, so the bound is on that mean: the standard error of the
16-token block means of the tokens scored so far, times the finite population correction
``sqrt((total - n) / (total - 16))`` (what the unscored rest of the text can still move), +- ``Z`` = 4
of them. At the end of the text it is the point estimate, as the whole-text verdict always decided.
In memory a set continues from its cache (its keys and values, built with the same weights zeroed), so
a round costs only its new tokens, and each undecided set goes on by ``CHUNK`` (128) tokens; streamed,
a round scores each set's prefix again in one pass over the layers, so the prefixes double (128, 256,
512, the whole text). A collapse (x7, x62,000) or a survivor (x1.00-1.03) is decided on its first
chunk. A null draw is scored only once its set's collapse is established (on its own first chunk,
then beside its set); the draws are shared by every set of the same matrices, a set found twice (a
weight alone that is its activation's only creating weight) is scored once, and a late / cancelling
weight, whose label asks nothing, is not zeroed (``full``: every set and null on the whole text).
``Verdict.scored`` says how many tokens each set was scored on.
"""
from __future__ import annotations

import logging
import random
from typing import Sequence

import torch
from torch import nn

from ..model.arch import ArchSpec
from ..core import progress
from ..eval.perplexity import perplexity_windows
from .runner import InMemoryRunner, encode_prompt
from ..model.edits import zeroed
from .verdict_labels import CHUNK, COLLAPSE, weight_key
from .verdict_rounds import Scoring, plan_verdicts, verdicts_of

log = logging.getLogger(__name__)

class JudgeBase:
    """What every judge shares (``judge_with`` asks it ``token_nlls`` and ``activations_after``): the
    verdict text's windows (``eval.perplexity.perplexity_windows``, one window up to the model's length),
    the null draws' generator, the prefixes a round scores and the tokens scored so far."""

    def __init__(self, model: nn.Module, arch: ArchSpec, tokenizer, text: str, tokens: int = 1024, seed: int = 0):
        self.model, self.arch, self.tokenizer = model, arch, tokenizer
        self.ids, self.spans, _, _ = perplexity_windows(model, tokenizer, text, max_tokens=tokens)
        self.tokens, self.rng = len(self.ids), random.Random(seed)
        self.scored = 0  # tokens scored so far, summed over every pass (the base, each set, each null draw)
        self.upto = self.per_pass  # the scored tokens the current round measures

    @property
    def per_pass(self) -> int:
        """Tokens one full pass over the windows scores."""
        return sum(e - f for _, e, f in self.spans)

    def ends(self, scored: Sequence[int], full: bool = False) -> list[int]:
        """How far the next round takes each set, from the tokens each has: all to one prefix (a round
        scores each set's prefix again, in one pass): ``CHUNK``, then doubling the furthest (twice the
        longest prefix bounds what the rescored prefixes cost), the whole text when ``full``."""
        end = self.per_pass if full else min(max(CHUNK, 2 * max(scored)), self.per_pass)
        return [end] * len(scored)

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

    def token_nlls(self, sets: Sequence[Sequence], upto: int, starts: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The NLL of scored tokens ``starts[i]`` (default 0) to ``upto`` with ``sets[i]`` zeroed: a judge
        that cannot continue a set where it stopped scores the prefix again and counts it."""
        raise NotImplementedError

    def release(self, keep: Sequence[Sequence]) -> None:
        """Forget what continuing any set but those in ``keep`` would need (a judge that keeps state)."""


class Judge(JudgeBase):
    """Measures verdicts for one model in memory, one zeroed set after another. A set scored again in a
    later round continues where it stopped: its keys and values (the model's cache, built with the same
    weights zeroed) are kept between rounds, so only the new tokens run through the model. A model whose
    cache cannot continue a window scores the prefix again. (A streamed model has
    ``find.streamed.StreamedJudge``: the same questions, every set of a round in one pass.)"""

    def __init__(self, model: nn.Module, arch: ArchSpec, tokenizer, text: str, tokens: int = 1024, seed: int = 0):
        import inspect


        super().__init__(model, arch, tokenizer, text, tokens, seed)
        self.ids = self.ids.to(next(model.parameters()).device)
        self.forwards = 0
        self.runner = InMemoryRunner(model, arch)
        self.caches: dict[frozenset, tuple] = {}  # set key -> ((window, scored), cache, next token's NLL)
        self.incremental = True  # False once a model's cache failed to continue a window
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def ends(self, scored: Sequence[int], full: bool = False) -> list[int]:
        """A set continued from its cache costs only its new tokens, so each set goes on by ``CHUNK``
        from where it is: a borderline set stops at the first ``CHUNK`` where the bound decides it, and
        a null draw asked about late starts on its own first ``CHUNK`` (``JudgeBase.ends`` while the
        cache cannot continue)."""
        if full or not self.incremental:
            return super().ends(scored, full)
        return [min(n + CHUNK, self.per_pass) for n in scored]

    @staticmethod
    def key(weights: Sequence) -> frozenset:
        return frozenset(tuple(weight_key(w)) for w in weights)

    def _window(self, w: int, start: int, stop: int, key: frozenset, keep: bool) -> torch.Tensor:
        """The NLL of scored tokens ``start:stop`` of window ``w``. From 0, the window's first ``stop``
        scored tokens in one pass, as the whole-text verdict ran them; from the cache the set's last
        round left (with the NLL of the next token, which that round's last logits gave), only the
        tokens after it. The cache is kept when ``keep`` (more of the window may be asked for)."""
        import torch.nn.functional as F

        b, e, f = self.spans[w]
        held = self.caches.pop(key, None)
        if start > 0 and (held is None or held[0] != (w, start) or held[1] is None):  # nothing to continue: the prefix again, counted
            return self._window(w, 0, stop, key, keep)[start:]
        self.forwards += 1
        self.scored += stop - start
        ids = self.ids[b : f + stop] if start == 0 else self.ids[f + start : f + stop]
        cache = None if start == 0 else held[1]
        keep = keep and self.incremental and f + stop < e
        if not keep and cache is None:
            logits = self.model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0]
        else:
            try:
                out = self.model(input_ids=ids.unsqueeze(0), use_cache=True, **{self._cache_kw: cache})
            except Exception as exc:  # noqa: BLE001 - a cache this model cannot continue: rescore from now on
                if cache is None:
                    raise
                log.info("verdict: the model's cache cannot continue a window (%s): prefixes are scored again", exc)
                self.incremental, self.scored, self.forwards = False, self.scored - (stop - start), self.forwards - 1
                return self._window(w, 0, stop, key, False)[start:]
            logits = out.logits[0]
        targets = self.ids[f + start + (start > 0) : min(f + stop + 1, e)]
        nlls = F.cross_entropy(logits[f - b - 1 if start == 0 else 0 :][: len(targets)].float(), targets,
                               reduction="none").double().cpu()
        if start > 0:
            nlls = torch.cat([held[2], nlls])
        if keep:
            self.caches[key] = ((w, stop), out.get("cache", None) or out.get("past_key_values", None), nlls[-1:])
        return nlls[: stop - start]

    def nll(self, key: frozenset = frozenset(), start: int = 0) -> torch.Tensor:
        """The NLL of each scored token from ``start`` to ``upto``, the model as it is now (``key``: the
        zeroed set's, whose cache continues it)."""
        out, off = [], 0
        for w, (b, e, f) in enumerate(self.spans):
            n = e - f
            lo, hi = max(start - off, 0), min(self.upto - off, n)
            off += n
            if lo < hi:
                out.append(self._window(w, lo, hi, key, keep=hi < n and self.upto < self.per_pass))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def token_nlls(self, sets: Sequence[Sequence], upto: int, starts: Sequence[int] | None = None) -> list[torch.Tensor]:
        """``nll`` with each set zeroed in turn (restored after each), from ``starts[i]`` (default 0)."""
        self.upto, out = upto, []
        for weights, start in zip(sets, starts or [0] * len(sets)):
            with torch.no_grad(), zeroed(self.model, self.arch, weights):
                out.append(self.nll(self.key(weights), start))
        return out

    def release(self, keep: Sequence[Sequence]) -> None:
        """Drop the caches of every set but those in ``keep`` (decided sets: their memory back)."""
        wanted = {self.key(ws) for ws in keep}
        self.caches = {k: v for k, v in self.caches.items() if k in wanted}

    def activations_after(self, requests: Sequence[tuple]) -> list[float]:
        """``h[token, channel]`` after the peak layer for each ``(prompt, activation, weights zeroed)``."""
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
    plan = plan_verdicts(j, result, draws, collapse)
    score_plan(j, plan, full)
    activation = {a.channel: a for a in result.activations}
    requests = [(result.prompts[activation[e.channel].prompt], activation[e.channel], e.track.weights)
                for e in plan.entries if e.channel in activation]
    result.verdicts = verdicts_of(plan, activation, j.activations_after(requests), j.tokens)


def score_plan(j, plan, full: bool = False) -> None:
    """Score the plan's tracks round by round until every question is answered (``full``: every track
    on the whole text in one round), each round as far as the judge's ``ends`` says."""
    scoring = Scoring(plan.tracks, plan.questions, j.per_pass, every=full)
    while todo := scoring.todo():
        ends = j.ends([t.scored for t in todo], full)
        if scoring.base.scored < max(ends):  # the base as far as the furthest set
            todo, ends = [scoring.base, *todo], [max(ends), *ends]
        for end in sorted(set(ends)):
            group = [t for t, e in zip(todo, ends) if e == end]
            progress.note(f"{len(group)} zeroed set(s) to {end} tokens")
            log.info("verdict: %d zeroed set(s) (the base may be one) to %d of %d tokens", len(group), end, j.per_pass)
            scoring.record(group, j.token_nlls([t.weights for t in group], end, [t.scored for t in group]))
        scoring.ask()
        wanted = scoring.wanted()
        j.release([scoring.base.weights, *[t.weights for t in wanted]] if wanted else [])
