"""Find super weights: trace the super activation, attribute every rise, iterate; or the paper's exact rule.

Two methods share one loop (``run_detection``), written against the ``Runner`` interface
(``superweight.find.runner``) so that the in-memory model and the layer-streamed checkpoint
(``superweight.find.streamed``) run the very same code:

* ``trace`` (the default): ``superweight.find.trace`` finds each super activation in the residual
  stream (a (token, channel) far above its layer's median |h|) and the layers where it rises and
  falls; ``superweight.find.attribute`` names, for every rise and fall, the sublayer that carries it and,
  for the MLP, the down-projection weights whose terms ``X[t, k] * W[j, k]`` make it. The
  creating weights are zeroed and the prompt runs again, until no new creating weight appears.
* ``paper`` (Yu et al. 2024, Sec. 3.1, kept for reproduction): a layer *spikes* when its
  down-projection's max |input| and max |output| both pass ``SpikeRule`` (``floor`` and ``ratio``
  times the median of the other layers); in the earliest spiking layer the output peak gives the
  row, the largest term the column; accepted when the term carries ``min_share`` of the spike, its
  input spikes and ``|W| >= min_weight_z`` standard deviations; zero, rerun, repeat.

The model's weights are bitwise unchanged afterwards (``edits.edited_entries``). A verdict by
impact (``superweight.find.verdict``) can then say which findings the model depends on.
"""
from __future__ import annotations

import statistics
from enum import StrEnum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..model.arch import ArchSpec
from ..model.arch_infer import get_arch
from .attribute import CANCELS, CREATES, Source, Term, attribute
from ..model.capture import LayerStats, LayerTrace, stats_of
from ..core.errors import SuperweightError
from ..core.results import Table, Versioned
from .runner import InMemoryRunner, Runner, encode_prompt
from .trace import Largest, SuperActivation, TraceRule, find_activations, largest, threshold
from .verdict_labels import Verdict

SCHEMA_VERSION = 2
DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
class Method(StrEnum):
    """How detection finds a super activation: trace it (the default) or the paper's spike rule."""

    TRACE = "trace"  # trace the super activation through the residual stream, attribute every rise
    PAPER = "paper"  # the paper's exact rule: a down-projection's input and output both spike


DEFAULT_METHOD = Method.TRACE


@dataclass
class SpikeRule:
    """The paper method's spike test: both conditions must hold."""

    floor: float = 50.0  # absolute |activation| floor (the authors' plots printed |x| > 50)
    ratio: float = 50.0  # times the median of the other layers' maxima
    min_share: float = 0.5  # the weight's term must carry this share of the output spike
    min_weight_z: float = 5.0  # |w| must be this many standard deviations of its matrix

    def threshold(self, maxima: Sequence[float], layer: int) -> float:
        others = [m for i, m in enumerate(maxima) if i != layer]
        median = statistics.median(others) if others else 0.0
        return max(self.floor, self.ratio * median)

    def spikes(self, maxima: Sequence[float], layer: int) -> bool:
        return maxima[layer] >= self.threshold(maxima, layer)


@dataclass
class SuperWeight:
    """One weight found: coordinates in the paper's convention (row = hidden channel), and why."""

    layer: int
    row: int  # output (hidden) channel
    col: int  # input (intermediate) channel
    module: str
    value: float  # the weight's original value
    magnitude_rank: int  # 1 = largest |w| in its matrix
    input_value: float  # X[t, col] that revealed it
    output_value: float  # Y[t, row] that revealed it
    share: float  # X[t, col] * W[row, col] / Y[t, row]
    token: int  # token position of the spike
    iteration: int
    late_layer: bool = False  # in the last quarter of the model: see the paper's Llama-2-7B layer 30
    prompts: list[int] = field(default_factory=list)  # indices of the prompts that found it
    expert: int | None = None  # MoE: the expert whose down-projection holds it
    role: str = CREATES  # "creates" (a rise of its super activation) or "cancels" (a fall)
    verdict: str = ""  # the verdict's label, when one was measured

    @property
    def coord(self) -> tuple[int, int, int]:
        return (self.layer, self.row, self.col)

    @property
    def key(self) -> tuple:
        """``coord``, with the expert appended for an MoE weight."""
        return self.coord if self.expert is None else (*self.coord, self.expert)

    def where(self) -> str:
        return f"{self.layer}{'' if self.expert is None else f' e{self.expert}'}: [{self.row}, {self.col}]"


@dataclass
class DetectionResult(Versioned):
    KIND: ClassVar[str] = "detection"
    VERSION: ClassVar[int] = SCHEMA_VERSION
    WRITER: ClassVar[str] = "`superweight detect --json PATH`"

    model: str
    architecture: str
    num_layers: int
    prompts: list[str]
    rule: SpikeRule
    super_weights: list[SuperWeight]
    layers: list[LayerStats]  # per-layer down-projection maxima of the unmodified model, first prompt
    per_prompt: list[list[tuple]]  # weight keys found by each prompt
    iterations: int = 0
    notes: list[str] = field(default_factory=list)
    magnitude: dict | None = None  # the z-score scan (see magnitude_scan), when run
    method: str = DEFAULT_METHOD
    trace_rule: TraceRule = field(default_factory=TraceRule)
    activations: list[SuperActivation] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    largest: list[Largest] = field(default_factory=list)  # per prompt, the first pass's largest activation (trace)

    @property
    def agree(self) -> bool:
        return all(sorted(p) == sorted(self.per_prompt[0]) for p in self.per_prompt)

    @property
    def coords(self) -> list[tuple[int, int, int]]:
        return [sw.coord for sw in self.super_weights]

    @property
    def keys(self) -> list[tuple]:
        return [sw.key for sw in self.super_weights]

    def tables(self) -> list[Table]:
        """What was found, as text tables: printed by ``superweight detect`` and written by the report."""
        return [self.weight_table(), *self.finding_tables()]

    def weight_table(self) -> Table:
        return Table(
            f"Super weights of {self.model} ({self.architecture}, {self.num_layers} layers; method {self.method})",
            ["layer", "[row, col]", "value", "|w| rank", "input", "output", "share", "token", "iter", "prompts", "role", "verdict"],
            [_weight_row(sw, len(self.prompts)) for sw in self.super_weights],
        )

    def finding_tables(self) -> list[Table]:
        """The super activations (where each rises and falls) and the verdicts, when there are any."""
        out = []
        if self.activations:
            out.append(Table("Super activations (residual stream)",
                             ["token", "channel", "peak", "after layer", "x layer median", "rises at", "falls at"],
                             [_activation_row(a) for a in self.activations]))
        if self.verdicts:
            out.append(Table(
                f"Verdict: zero it, score up to {self.verdicts[0].tokens} tokens, each set until its label is decided "
                "(null: as many random weights of the same matrices)",
                ["zeroed", "what", "PPL x", "tokens", "null PPL x", "activation after", "label"],
                [_verdict_row(v) for v in self.verdicts]))
        return out

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["layers"] = [s.to_dict() for s in self.layers]
        d["agree_across_prompts"] = self.agree
        return d

    @classmethod
    def _decode(cls, d: dict) -> dict[str, Any]:
        out = super()._decode(d)
        out["rule"] = SpikeRule(**d["rule"])
        out["trace_rule"] = TraceRule(**d["trace_rule"])
        out["super_weights"] = [SuperWeight(**s) for s in d["super_weights"]]
        out["layers"] = [LayerStats.from_dict(x) for x in d["layers"]]
        out["per_prompt"] = [[tuple(c) for c in p] for p in d["per_prompt"]]
        out["activations"] = [SuperActivation.from_dict(a) for a in d["activations"]]
        out["sources"] = [Source.from_dict(s) for s in d["sources"]]
        out["verdicts"] = [Verdict.from_dict(v) for v in d["verdicts"]]
        out["largest"] = [Largest(**x) for x in d.get("largest", [])]
        return out


def _weight_row(sw: SuperWeight, n_prompts: int) -> list[str]:
    return [
        f"{sw.layer}{'' if sw.expert is None else f' e{sw.expert}'}{' (late)' if sw.late_layer else ''}",
        f"[{sw.row}, {sw.col}]", f"{sw.value:+.4g}", str(sw.magnitude_rank), f"{sw.input_value:+.4g}",
        f"{sw.output_value:+.4g}", f"{sw.share:.0%}", str(sw.token), str(sw.iteration), f"{len(sw.prompts)}/{n_prompts}",
        sw.role, sw.verdict or "-",
    ]


def _activation_row(a: SuperActivation) -> list[str]:
    changes = lambda cs: ", ".join(f"{c.layer} ({c.sublayer} {c.delta:+.4g})" for c in cs) or "-"  # noqa: E731
    return [str(a.token), str(a.channel), f"{a.peak:+.5g}", str(a.peak_layer), f"{a.ratio:,.0f}{' (fallback)' if a.fallback else ''}", changes(a.rises), changes(a.falls)]


def _verdict_row(v: Verdict) -> list[str]:
    where = "; ".join(f"{w[0]}{'' if w[3] is None else f' e{w[3]}'}: [{w[1]}, {w[2]}]" for w in v.weights)
    null = ", ".join(f"{x:.3g}" for x in v.null_ppl_ratios) or "-"
    after = f"{v.activation_before:+.4g} -> {v.activation_after:+.4g}" if v.activation_before else "-"
    return [where, v.target, f"{v.ppl_ratio:.3g}", str(v.scored or v.tokens), null, after, v.label]


# ---------------------------------------------------------------- shared pieces


def magnitude_rank(matrix: torch.Tensor, row: int, col: int) -> int:
    return int((matrix.abs() > matrix[row, col].abs()).sum()) + 1


def _finish(runner: Runner, sw: SuperWeight) -> SuperWeight:
    """Fill in the weight's original value (its layer read with nothing zeroed); the |w| rank is
    ranked once per weight when the result is assembled (``_rank``)."""
    with runner.layer(sw.layer):
        sw.value = float(runner.arch.expert_matrix(runner.model, sw.layer, sw.expert)[sw.row, sw.col])
    sw.module = runner.arch.down_proj_name(sw.layer, runner.model) if sw.expert is None else f"{runner.arch.experts_name(sw.layer)}.down_proj[{sw.expert}]"
    return sw


# ---------------------------------------------------------------- the paper's rule


def _rank(runner: Runner, weights: Sequence[SuperWeight]) -> None:
    """Each weight's |w| rank in its matrix (1 = largest), one read of each layer."""
    for layer in sorted({w.layer for w in weights}):
        with runner.layer(layer):
            for w in weights:
                if w.layer == layer:
                    matrix = runner.arch.expert_matrix(runner.model, layer, w.expert).detach()
                    w.magnitude_rank = magnitude_rank(matrix, w.row, w.col)


def find_candidate(runner: Runner, stats: list[LayerStats], rule: SpikeRule, found: Sequence[SuperWeight],
                   layers: Sequence[int] | None = None) -> SuperWeight | None:
    """The super weight behind the earliest spiking layer (of ``layers``, default all), or None (the
    paper's rule, module doc)."""
    ins = [s.input.magnitude for s in stats]
    outs = [s.output.magnitude for s in stats]
    skip = {s.coord for s in found}
    for i in range(len(stats)) if layers is None else layers:
        st = stats[i]
        if not (rule.spikes(ins, i) and rule.spikes(outs, i)) or st.input_at_output_peak is None:
            continue
        with runner.layer(i, found):
            matrix = runner.arch.weight_matrix(runner.model, i).detach().float()
            row = st.output.channel
            x = st.input_at_output_peak.to(matrix.device)
            terms = x * matrix[row]
            col = int(terms.abs().argmax())
            share = float(terms[col]) / st.output.value if st.output.value else 0.0
            outlier = abs(float(matrix[row, col])) >= rule.min_weight_z * float(matrix.std())
        if share < rule.min_share or abs(float(x[col])) < rule.threshold(ins, i) or (i, row, col) in skip or not outlier:
            continue
        return SuperWeight(
            layer=i, row=row, col=col, module="", value=0.0, magnitude_rank=0, input_value=float(x[col]),
            output_value=st.output.value, share=share, token=st.output.token, iteration=0,
        )
    return None


# ---------------------------------------------------------------- one iteration of each method


@dataclass
class PromptState:
    """Where the loop stands for one prompt."""

    index: int
    zeroing: list[SuperWeight] = field(default_factory=list)  # creating weights found, zeroed from now on
    found: list[SuperWeight] = field(default_factory=list)  # every weight found, in order
    activations: list[SuperActivation] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    layers: list[LayerStats] = field(default_factory=list)
    iterations: int = 0
    done: bool = False
    largest: Largest | None = None  # the first pass's largest activation against its layer's median
    threshold: float | None = None  # the ratio its super activations must reach (trace.threshold), set by that pass

    def known(self) -> set:
        return {s.key for s in self.found}


def _weight(term: Term, layer: int, row: int, token: int, role: str, it: int, n_layers: int) -> SuperWeight:
    return SuperWeight(
        layer=layer, row=row, col=term.col, module="", value=term.w, magnitude_rank=0, input_value=term.x,
        output_value=term.output, share=term.share, token=token, iteration=it,
        late_layer=layer >= 0.75 * n_layers, expert=term.expert, role=role,
    )


def paper_step(runner: Runner, traces: list[LayerTrace], state: PromptState, rule: SpikeRule, it: int) -> list[SuperWeight]:
    if runner.arch.is_moe:
        raise SuperweightError("--method paper hooks dense down-projections: use the default method for MoE models")
    sw = find_candidate(runner, stats_of(traces), rule, state.zeroing)
    if sw is None:
        return []
    sw.iteration, sw.late_layer = it, sw.layer >= 0.75 * runner.num_layers
    return [_finish(runner, sw)]


def trace_step(runner: Runner, traces: list[LayerTrace], state: PromptState, rule: TraceRule, it: int) -> list[SuperWeight]:
    """Trace, attribute every rise and fall; returns the new creating weights."""
    if state.largest is None:  # the first pass sets the bar for the prompt's later ones
        state.largest = largest(traces, rule)
        state.threshold = threshold(state.largest, rule)
    if state.threshold is None:
        return []
    seen_channels = {a.channel for a in state.activations}
    new: list[SuperWeight] = []
    for sa in find_activations(traces, rule, it, state.index, state.threshold):
        fresh = sa.channel not in seen_channels
        if fresh:
            state.activations.append(sa)
        # After the first pass only rises matter (what is left of a super activation once its
        # first sources are zeroed); falls are read on the pass that first sees the activation.
        for role, changes in ((CREATES, sa.rises), (CANCELS, sa.falls if fresh else [])):
            for ch in changes:
                new += _attribute_change(runner, traces[ch.layer], sa, ch, role, state, rule, it, fresh)
    return [s for s in new if s.role == CREATES]


def _attribute_change(runner, tr, sa, ch, role, state: PromptState, rule, it: int, fresh: bool) -> list[SuperWeight]:
    with runner.layer(tr.layer, state.zeroing):
        src, terms = attribute(runner.model, runner.arch, tr, sa.token, sa.channel, ch, role, rule)
    known = state.known()
    sws = [_weight(t, tr.layer, sa.channel, sa.token, role, it, runner.num_layers) for t in terms]
    sws = [s for s in sws if s.key not in known]
    if sws or (fresh and not src.weights):
        src.iteration, src.prompt = it, state.index
        state.sources.append(src)
    for s in sws:
        state.found.append(_finish(runner, s))
    return sws


# ---------------------------------------------------------------- a guess at a step, one layer at a time


def propose(method: str, runner: Runner, traces: list[LayerTrace], zeroing: Sequence[SuperWeight],
            proposed: Sequence[SuperWeight], rule: SpikeRule | None = None, trace_rule: TraceRule | None = None,
            ) -> list[SuperWeight]:
    """A guess, from the traces of layers ``0..i`` only (``i = len(traces) - 1``, its weights in
    ``runner.model``), at the weights of layer ``i`` that this iteration's step will zero next to
    ``zeroing``. A streamed pass runs them as a speculative branch, so the next iteration needs no
    second read of the checkpoint; the branch is used only if the step then asks for exactly its
    weights (``stream_detect.StreamedRunner``), never trusted. The paper's step zeroes one weight,
    the earliest spiking layer's; the trace step every creating weight of every rise. The trace
    rule's fallback (``trace.threshold``) needs the whole pass and is not guessed at: a streamed
    model detected through it reads its checkpoint once more per iteration."""
    i = len(traces) - 1
    if method == "paper":
        if proposed or runner.arch.is_moe:  # the paper's step refuses experts
            return []
        sw = find_candidate(runner, stats_of(traces), rule or SpikeRule(), zeroing, layers=[i])
        return [] if sw is None else [sw]
    trace_rule = trace_rule or TraceRule()
    mag = traces[i].h_out.float().abs()
    peak = float(mag.max())
    if peak < trace_rule.floor or peak < trace_rule.ratio * float(mag.median()):
        return []  # nothing passes the rule after this layer: no rise here to guess at (one median, not a pass's)
    known = {w.key for w in (*zeroing, *proposed)}
    out: list[SuperWeight] = []
    for sa in find_activations(traces, trace_rule):
        for ch in sa.rises:
            if ch.layer == i:
                with runner.layer(i, zeroing):  # as the step will see the layer
                    _, terms = attribute(runner.model, runner.arch, traces[i], sa.token, sa.channel, ch, CREATES, trace_rule)
                out += [w for w in (_weight(t, i, sa.channel, sa.token, CREATES, 0, runner.num_layers) for t in terms)
                        if w.key not in known]
    return out


# ---------------------------------------------------------------- the loop, once for every runner


def _check_finite(traces: list[LayerTrace]) -> None:
    """A forward pass that overflowed (inf/NaN in the residual stream, e.g. Gemma in float16) has no
    super activation to read: a one-line error instead of an empty or wrong result."""
    for tr in traces:
        if tr.h_out is not None and not bool(torch.isfinite(tr.h_out).all()):
            raise SuperweightError(
                f"the forward pass overflowed: layer {tr.layer}'s output holds inf/NaN in {str(tr.h_out.dtype).removeprefix('torch.')}; "
                "super activations reach values float16 cannot hold: run with --dtype bfloat16 or float32"
            )


def run_detection(
    runner: Runner, encoded: Sequence[dict], method: str = DEFAULT_METHOD, rule: SpikeRule | None = None,
    trace_rule: TraceRule | None = None, max_iter: int = 10,
) -> list[PromptState]:
    """Iterate find -> zero -> rerun for every prompt (in lockstep: one ``runner.run`` per iteration)."""
    if method not in tuple(Method):
        raise SuperweightError(f"unknown detection method {method!r}: use one of {', '.join(Method)}")
    method = Method(method)
    rule, trace_rule = rule or SpikeRule(), trace_rule or TraceRule()
    states = [PromptState(p) for p in range(len(encoded))]
    for it in range(max_iter):
        active = [s for s in states if not s.done]
        if not active:
            break
        runs = runner.run([encoded[s.index] for s in active], [list(s.zeroing) for s in active])
        for state, traces in zip(active, runs):
            _check_finite(traces)
            state.iterations += 1
            state.layers = state.layers or stats_of(traces)
            if method == "paper":
                new = paper_step(runner, traces, state, rule, it)
                state.found += new
            else:
                new = trace_step(runner, traces, state, trace_rule, it)
            state.zeroing += new
            state.done = not new
    return states


def assemble(
    states: list[PromptState], runner: Runner, prompts: list[str], model_name: str, method: str,
    rule: SpikeRule | None, trace_rule: TraceRule | None,
) -> DetectionResult:
    """One ``DetectionResult`` from the prompts' states (weights merged by coordinates)."""
    merged: dict[tuple, SuperWeight] = {}
    for st in states:
        for sw in st.found:
            merged.setdefault(sw.key, sw).prompts.append(st.index)
    _rank(runner, list(merged.values()))
    return DetectionResult(
        model=model_name, architecture=runner.arch.name, num_layers=runner.num_layers, prompts=prompts,
        rule=rule or SpikeRule(), super_weights=sorted(merged.values(), key=lambda s: (s.iteration, s.layer, s.row, s.col)),
        layers=states[0].layers,
        per_prompt=[[sw.key for sw in st.found] for st in states], iterations=sum(s.iterations for s in states),
        method=method, trace_rule=trace_rule or TraceRule(),
        activations=[a for st in states for a in st.activations], sources=[s for st in states for s in st.sources],
        notes=threshold_notes(states, trace_rule or TraceRule(), len(prompts)) if method == "trace" else [],
        largest=[st.largest for st in states if st.largest is not None],
    )


def threshold_notes(states: Sequence[PromptState], rule: TraceRule, n_prompts: int) -> list[str]:
    """What the trace rule saw where no activation reached ``rule.ratio``: what the fallback traced,
    or the largest activation and why it is not one (so a miss is a number, not a silence)."""
    out = []
    for st in states:
        top, bar = st.largest, st.threshold
        if top is None or bar == rule.ratio:
            continue
        head = f"prompt {st.index}: " if n_prompts > 1 else ""
        where = (f"token {top.token}, channel {top.channel}, after layer {top.layer}: {top.value:+.4g}, "
                 f"{top.ratio:,.0f}x its layer's median |h|")
        if bar is not None:
            traced = [f"{c} ({r:,.0f}x)" for c, r in top.channels if r >= bar]
            out.append(f"{head}no activation reached the {rule.ratio:,.0f}x rule (calibrated on SmolLM2-135M and "
                       f"Gemma-3-270M); the largest is at {where}. The fallback traced channel(s) {', '.join(traced)}, "
                       f"which stand {rule.fallback_gap:g}x or more above the next (`detect --sa-fallback 0` turns it off): other "
                       "families (Qwen3.5, MoE models) run smaller activations than the paper's; the verdict measures "
                       "whether these weights matter")
        elif rule.fallback_ratio > 0 and top.ratio >= rule.fallback_ratio:
            out.append(f"{head}no super activation: the largest is at {where}, but no channel stands out: the "
                       f"largest step among the top {len(top.channels)} channels is {max(top.steps):.2g}x, and a super activation "
                       f"stands {rule.fallback_gap:g}x above the next (or reaches {rule.ratio:,.0f}x)")
        else:
            fallback = f" (or {rule.fallback_ratio:,.0f}x when nothing reaches that)" if rule.fallback_ratio > 0 else ""
            out.append(f"{head}no super activation: the largest is at {where}; a super activation is at least "
                       f"{rule.ratio:,.0f}x{fallback} and |h| >= {rule.floor:g} (`detect --sa-ratio`, `--sa-fallback`)")
    return out


def detect(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str] | str = (DEFAULT_PROMPT,),
    rule: SpikeRule | None = None,
    max_iter: int = 10,
    model_name: str = "",
    arch: ArchSpec | None = None,
    method: str = DEFAULT_METHOD,
    trace_rule: TraceRule | None = None,
) -> DetectionResult:
    """Find the super weights of an in-memory model (``method``: "trace", the default, or "paper").

    The model's weights are bitwise unchanged afterwards. ``superweight.find.verdict.judge`` adds the
    verdict by impact.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SuperweightError("no prompt given: pass at least one --prompt")
    arch = arch or get_arch(model)
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p, device) for p in prompts]
    runner = InMemoryRunner(model, arch)
    states = run_detection(runner, encoded, method, rule, trace_rule, max_iter)
    name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return assemble(states, runner, prompts, name, method, rule, trace_rule)
