"""The verdict's plan and rounds: the sets to score, the questions their labels ask, when each is decided.

A ``Track`` is one zeroed set (a finding, a super activation's creating weights, a null draw, or the
base with nothing zeroed) and the NLL of each token scored so far; the others hold the base's NLL of
the same tokens beside theirs. A ``Question`` compares two tracks (or a track and the base), each on
its own tokens: is the mean difference above a line? It is answered as soon as a bound (mean +- ``Z``
standard errors of 16-token block means, with the finite population correction over the whole text,
whose mean the label is read from) is on one side of the line, which at the end of the text is the
point estimate, as the full verdict always decided. A track is scored in the next round while a
question it is in is open; a set's nulls are asked about, and scored, only once its collapse is
established; a set whose label asks nothing is not scored (``Scoring``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .verdict_labels import BLOCK, CANCELLING, COLLAPSE, JOINT, SUPER_WEIGHT, SURVIVES, Z, Verdict, null_draw, weight_key

_EMPTY = torch.zeros(0, dtype=torch.float64, device="cpu")  # a placeholder: record() replaces it whole


@dataclass(eq=False)
class Track:
    """One zeroed set: its weights, the NLL of each token scored so far and the base's of the same tokens."""

    weights: list
    nlls: torch.Tensor = _EMPTY
    base: torch.Tensor = _EMPTY

    @property
    def scored(self) -> int:
        return len(self.nlls)

    def mean(self, x: torch.Tensor) -> float:
        return float(x.sum()) / max(len(x), 1)

    def ratio(self) -> float:
        """The perplexity ratio to the base on the tokens scored."""
        return math.exp(min(self.mean(self.nlls) - self.mean(self.base), 700.0))


def estimate(x: torch.Tensor, total: int | None = None) -> tuple[float, float | None]:
    """The mean of ``x`` and its standard error from ``BLOCK``-token block means (None under two blocks).
    ``total``: the tokens of the whole text, whose mean the label is read from: ``x`` is its first
    ``len(x)``, and the error of their mean as an estimate of the whole text's shrinks by the finite
    population correction, to 0 when ``x`` is the whole text."""
    mean = float(x.sum()) / max(len(x), 1)
    k = len(x) // BLOCK
    if k < 2:
        return mean, None
    se = float(x[: k * BLOCK].view(k, BLOCK).mean(1).std()) / math.sqrt(k)
    if total:
        se *= math.sqrt(max(total - len(x), 0) / max(total - BLOCK, 1))
    return mean, se


def decide(x: torch.Tensor, line: float, at_least: bool, final: bool, y: torch.Tensor | None = None,
           total: int | None = None) -> bool | None:
    """Is the mean of ``x`` (minus the mean of ``y``, scored apart) above ``line``: True / False once the
    bound says so, the point estimate when ``final`` (``>=`` when ``at_least``), else None (score more).
    ``total``: the whole text's scored tokens (``estimate``), None for the bound of an unending text."""
    mean, se = estimate(x, total)
    if y is not None:
        other, se_y = estimate(y, total)
        mean, se = mean - other, None if se is None or se_y is None else math.hypot(se, se_y)
    if final:
        return mean >= line if at_least else mean > line
    if se is None:
        return None
    if mean - Z * se > line:
        return True
    if mean + Z * se < line:
        return False
    return None


@dataclass(eq=False)
class Question:
    """Is ``a``'s mean NLL above the base's by more than ``line`` (``b`` None), or is ``a``'s damage
    (its NLL over the base's on its tokens) above ``b``'s (a null draw, scored apart)? ``after``: a
    question this one is asked only once it is answered True (a null matters only for a collapse)."""

    a: Track
    b: Track | None
    line: float
    at_least: bool = False
    after: "Question | None" = None
    answer: bool | None = None

    @property
    def tracks(self) -> list[Track]:
        return [self.a] if self.b is None else [self.a, self.b]

    @property
    def open(self) -> bool:
        return self.answer is None and (self.after is None or self.after.answer is True)

    def ask(self, final: bool, total: int | None = None) -> None:
        damage = [t.nlls - t.base for t in self.tracks]
        self.answer = decide(damage[0], self.line, self.at_least, final, damage[1] if self.b is not None else None,
                             total)


class Scoring:
    """Which tracks the next round scores, and the answers once it is recorded. Each track (the base
    one too) continues from the tokens it has (``JudgeBase.ends``: how far a round takes it). A round
    scores the tracks of the open questions, and first every set whose label asks one (a late /
    cancelling weight's asks nothing: it is not zeroed). A null draw is scored only once a question
    about it is open, from the round after its set's collapse is established: a set whose collapse is
    refuted never has its nulls scored. ``every`` (the whole-text verdict): every track is scored,
    asked about or not. ``total``: the whole text's scored tokens; a question is final once its tracks
    have them all, and the bound's finite population correction is taken over them (``estimate``)."""

    def __init__(self, tracks: Sequence[Track], questions: Sequence[Question], total: int, every: bool = False):
        self.tracks, self.questions, self.total, self.every = list(tracks), list(questions), total, every
        self.base = Track([])
        self.asked = {id(q.a) for q in self.questions}  # the sets (never a null draw) whose labels ask a question

    def wanted(self) -> list[Track]:
        """The tracks of the open questions (only the unscored ones of a question that has some: a null
        draw opened late catches up before its set goes on)."""
        ids = set()
        for q in self.questions:
            if q.open:
                fresh = [t for t in q.tracks if not t.scored]
                ids.update(id(t) for t in fresh or q.tracks)
        return [t for t in self.tracks if id(t) in ids]

    def todo(self) -> list[Track]:
        """The tracks the next round extends."""
        ids = {id(t) for t in self.wanted()}
        return [t for t in self.tracks if t.scored < self.total and
                (id(t) in ids or (t.scored == 0 and (self.every or id(t) in self.asked)))]

    def record(self, todo: Sequence[Track], nlls: Sequence[torch.Tensor]) -> None:
        """Append each track's new NLLs (``todo`` may hold the base)."""
        for t, x in zip(todo, nlls):
            t.nlls = torch.cat([t.nlls, x]) if t.scored else x

    def ask(self) -> None:
        """Ask every open question whose tracks are scored, each on its own tokens beside the base's."""
        for t in self.tracks:
            t.base = self.base.nlls[: t.scored]
        for q in self.questions:
            if q.open and all(t.scored for t in q.tracks):
                q.ask(all(t.scored >= self.total for t in q.tracks), self.total)


@dataclass
class Entry:
    """One verdict to write: an activation's creating weights together, or one weight."""

    kind: str  # "activation" or "weight"
    channel: int
    track: Track
    nulls: list[Track]
    weight: object = None  # the SuperWeight (kind "weight")
    collapse: Question | None = None
    beyond: list[Question] = field(default_factory=list)


@dataclass
class Plan:
    entries: list[Entry]
    tracks: list[Track]
    questions: list[Question]


class _Planner:
    """Tracks shared by key: a set found twice is scored once, and the null draws of the same
    matrices (as many weights in each) are drawn once and shared by every set they serve."""

    def __init__(self, j, result, draws: int, collapse: float):
        self.j, self.avoid, self.draws, self.line = j, list(result.super_weights), draws, math.log(collapse)
        self.tracks: dict[frozenset, Track] = {}
        self.pools: dict[tuple, list[list]] = {}
        self.questions: dict[tuple, Question] = {}

    def track(self, weights: Sequence) -> Track:
        key = frozenset(tuple(weight_key(w)) for w in weights)
        return self.tracks.setdefault(key, Track(list(weights)))

    def nulls(self, weights: Sequence, n: int) -> list[Track]:
        key = tuple(sorted((w.layer, str(getattr(w, "expert", None))) for w in weights))
        if key not in self.pools:
            self.pools[key] = [null_draw(self.j.model, self.j.arch, weights, self.j.rng, self.avoid) for _ in range(self.draws)]
        return [self.track(ws) for ws in self.pools[key][:n]]

    def question(self, a: Track, b: Track | None, line: float, at_least: bool, after: Question | None) -> Question:
        key = (id(a), id(b), line)
        return self.questions.setdefault(key, Question(a, b, line, at_least, after))

    def entry(self, kind: str, channel: int, weights: Sequence, nulls: list[Track], weight=None, ask: bool = True) -> Entry:
        e = Entry(kind, channel, self.track(weights), nulls, weight)
        if ask:
            e.collapse = self.question(e.track, None, self.line, True, None)
            e.beyond = [self.question(e.track, n, 0.0, False, e.collapse) for n in nulls]
        return e


def plan_verdicts(j, result, draws: int = 2, collapse: float = COLLAPSE) -> Plan:
    """Every verdict's sets, nulls and questions, drawn in one order (the same however they are scored)."""
    groups: dict[int, list] = {}
    for sw in result.super_weights:
        if sw.role == "creates":
            groups.setdefault(sw.row, []).append(sw)
    p, entries, group_nulls = _Planner(j, result, draws, collapse), [], {}
    for ch, ws in groups.items():
        group_nulls[ch] = p.nulls(ws, draws)
        entries.append(p.entry("activation", ch, ws, group_nulls[ch]))
    for sw in result.super_weights:
        creates = sw.role == "creates"  # a cancelling weight's label asks nothing: no null drawn for it
        entries.append(p.entry("weight", sw.row, [sw], group_nulls[sw.row] if creates else [], sw, ask=creates))
    return Plan(entries, list(p.tracks.values()), list(p.questions.values()))


def verdicts_of(plan: Plan, activation: dict, after: Sequence[float], tokens: int) -> list[Verdict]:
    """The verdicts (and each weight's ``verdict`` label) from the scored plan."""
    after_it, collapsed, out = iter(after), {}, []
    for e in plan.entries:
        t, nulls = e.track, [n for n in e.nulls if n.scored]  # a null is scored once its set collapses
        if not t.scored:  # a label that asks nothing (late / cancelling): not zeroed, no verdict row
            e.weight.verdict = CANCELLING
            continue
        v = Verdict(e.kind, [weight_key(w) for w in t.weights], e.channel, "", t.mean(t.base), t.mean(t.nlls), t.ratio(),
                    [n.ratio() for n in nulls], tokens=tokens, scored=t.scored, null_scored=[n.scored for n in nulls])
        if e.channel in activation:
            v.activation_before, v.activation_after = activation[e.channel].peak, next(after_it)
        collapses = bool(e.collapse is not None and e.collapse.answer and all(q.answer for q in e.beyond))
        if e.kind == "activation":
            collapsed[e.channel] = bool(e.collapse.answer)
            v.label = "super activation: the model {} without its creating weights".format(
                "collapses" if collapses else "survives")
        else:
            v.label = e.weight.verdict = (CANCELLING if e.weight.role != "creates" else SUPER_WEIGHT if collapses
                                          else JOINT if collapsed.get(e.channel) else SURVIVES)
        out.append(v)
    return out
