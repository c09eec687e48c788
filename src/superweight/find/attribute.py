"""Attribute each rise (and fall) of a super activation to the weights whose terms carry it.

At a layer where the MLP carries the change of ``h[t, j]``, the down-projection output is
``Y[t, j] = sum_k X[t, k] * W[j, k]`` (for an MoE layer, summed over the experts the token is
routed to, each term times its routing weight: ``X_e`` is recomputed from the experts' own
``gate_up_proj``). The terms are ranked by their share of the MLP's output; the largest ones,
each at least ``min_term`` of it, are reported as weights once together they carry ``min_share``.
When they do not, the change is *diffuse* (no single weight makes it) and is reported as such;
in a post-norm model whose down-projection output at ``[t, j]`` stays under ``floor`` (no spike:
Gemma-3-270M's channel 163 rises by 10,000-17,000 per layer from outputs of 0.07-1.8) the source
is the post-FFN norm itself (its gain), and no weight is reported;
when the attention (or something else) carries the change, the source names that sublayer and
no weight. Post-norm models (Gemma-2/3, OLMo-2): the MLP's contribution is its post-FFN norm's
output, which is proportional to ``Y[t, j]``, so the same terms decide.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..model.arch import ArchSpec
from ..model.capture import LayerTrace
from ..core.results import Versioned
from .trace import Change, TraceRule

CREATES, CANCELS = "creates", "cancels"


@dataclass
class Source(Versioned):
    """What made one layer's change of one super activation: a sublayer and, for the MLP, its weights."""

    KIND: ClassVar[str] = "source"
    channel: int  # the super activation's hidden channel (= the weights' row)
    token: int
    layer: int
    role: str  # "creates" (a rise) or "cancels" (a fall)
    sublayer: str  # "mlp", "attention", "other" or "post-FFN norm"
    delta: float  # the layer's change of h[token, channel]
    sublayer_value: float  # what that sublayer added there
    weights: list[list] = field(default_factory=list)  # [layer, row, col, expert] of each weight found
    weight_share: float = 0.0  # share of the MLP output that those weights' terms carry
    note: str = ""
    iteration: int = 0
    prompt: int = 0


@dataclass
class Term:
    expert: int | None
    col: int
    x: float  # X[t, col] (times the routing weight for an expert)
    w: float
    share: float  # x * w / (the MLP's output at [t, row])
    output: float  # that output


def mlp_terms(model: nn.Module, arch: ArchSpec, tr: LayerTrace, t: int, j: int) -> tuple[list, torch.Tensor, float]:
    """(keys (expert, col), terms X*W, the output they add up to) at ``[t, j]`` of ``tr.layer``."""
    if tr.moe is None:
        w_row = arch.weight_matrix(model, tr.layer)[j].detach().float()
        x = tr.x[t].float().to(w_row.device)
        out = float(tr.y[t, j])
        return [(None, k) for k in range(x.numel())], x * w_row, out
    experts = arch.experts_module(model, tr.layer)
    hs, idx, weights = tr.moe
    keys, terms = [], []
    for slot, e in enumerate(idx[t].tolist()):
        gate, up = nn.functional.linear(hs[t], experts.gate_up_proj[e]).chunk(2, dim=-1)
        x = (experts.act_fn(gate) * up).float() * float(weights[t, slot])
        terms.append(x * experts.down_proj[e][j].detach().float())
        keys += [(e, k) for k in range(x.numel())]
    if tr.x is not None:  # the shared expert: its down-projection's terms (Qwen2-MoE's times sigmoid(gate))
        w_row = arch.weight_matrix(model, tr.layer)[j].detach().float()
        x = tr.x[t].float().to(w_row.device)
        if tr.gate is not None:
            x = x * torch.sigmoid(tr.gate[t].float()).to(w_row.device)
        terms.append(x * w_row)
        keys += [(None, k) for k in range(x.numel())]
    return keys, torch.cat(terms), float(tr.mlp[t, j]) if tr.mlp is not None else float(sum(x.sum() for x in terms))


def top_terms(model, arch, tr: LayerTrace, t: int, j: int, rule: TraceRule) -> tuple[list[Term], float, float]:
    """The fewest largest terms carrying ``min_share`` of the MLP output (each >= ``min_term``).

    Returns (terms, their total share, the largest share); no terms when none qualifies."""
    keys, terms, out = mlp_terms(model, arch, tr, t, j)
    if out == 0.0 or terms.numel() == 0:
        return [], 0.0, 0.0
    shares = terms / out
    order = shares.argsort(descending=True)[:8].tolist()
    picked, total = [], 0.0
    for i in order:
        s = float(shares[i])
        if s < rule.min_term:
            break
        picked.append(i)
        total += s
        if total >= rule.min_share:
            break
    largest = float(shares[order[0]])
    if total < rule.min_share:
        return [], total, largest
    out_terms = []
    for i in picked:
        expert, col = keys[i]
        w = float(arch.expert_matrix(model, tr.layer, expert)[j, col])
        x = float(terms[i]) / w if w else 0.0
        out_terms.append(Term(expert, col, x, w, float(shares[i]), out))
    return out_terms, total, largest


def attribute(
    model: nn.Module, arch: ArchSpec, tr: LayerTrace, t: int, j: int, change: Change, role: str, rule: TraceRule,
) -> tuple[Source, list[Term]]:
    """The source of one layer's change of ``h[t, j]``; the weights' terms when the MLP carries it."""
    value = {"mlp": change.mlp, "attention": change.attention, "other": change.other}[change.sublayer]
    src = Source(j, t, tr.layer, role, change.sublayer, change.delta, value)
    if change.sublayer != "mlp":
        src.note = f"the {change.sublayer} output carries it: no down-projection weight"
        return src, []
    relative = _relative_spike(tr, t, j) if arch.post_norm and tr.y is not None else None
    if relative is not None and abs(float(tr.y[t, j])) < rule.floor and relative < rule.norm_spike:
        y = float(tr.y[t, j])
        src.sublayer = "post-FFN norm"
        src.note = (f"no down-projection spike (its output is {y:+.3g}, {relative:.2g}x its token's RMS): the post-FFN "
                    f"norm ({arch.mlp_out}) scales it x{change.mlp / y if y else float('inf'):.3g}, its gain on channel {j} makes the rise")
        return src, []
    terms, total, largest = top_terms(model, arch, tr, t, j, rule)
    src.weight_share = total
    if not terms:
        src.note = f"diffuse: the largest down-projection term is {largest:.0%} of the MLP output"
        return src, []
    src.weights = [[tr.layer, j, term.col, term.expert] for term in terms]
    if arch.post_norm:
        y = terms[0].output
        src.note = (f"through the post-FFN norm ({arch.mlp_out}): down-projection output {y:+.4g} "
                    f"({relative:.3g}x its token's RMS), scaled x{change.mlp / y if y else float('inf'):.3g}")
    return src, terms


def _relative_spike(tr: LayerTrace, t: int, j: int) -> float:
    """|y[t, j]| over the RMS of y[t, :]: what a post-norm model's FFN norm sees of the down-projection
    output (it divides by that RMS): ~1-3 for an ordinary channel, up to sqrt(hidden) for a lone spike."""
    y = tr.y[t].float()
    rms = float(y.square().mean().sqrt())
    return abs(float(y[j])) / rms if rms > 0 else 0.0
