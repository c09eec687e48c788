"""Trace super activations through the residual stream: where each one rises and where it falls.

A *super activation* is a (token, hidden channel) whose |h| after some decoder layer is at least
``TraceRule.ratio`` times the median |h| of that layer's whole hidden state (all tokens and
channels), and at least ``floor`` in absolute value. Measured on the dev set (docs/detect.md):
SmolLM2-135M's channel 507 reaches 12,600x its layer's median, Gemma-3-270M's channels 163 and
400 8,500x and 6,900x; the largest other channels reach 920x (SmolLM2's 247, fed by the same
super weight's column) and 540x (Gemma); tiny random models stay under 15x. ``ratio = 2000``
sits between the two groups with a factor of 2 to 3.4 on each side. The rule keeps one
(token, channel) per channel: the token where the ratio is largest.

Other families run smaller: measured across open models, Qwen3.5 and MoE checkpoints peak at
10^2-10^3 in absolute value, MoE ones 14-23x lower than dense ones of their size (Chen et al. 2026,
"Measuring Maximum Activations in Open LLMs"), and Sun et al. (2024) call an activation massive
from 1000x its median. So when no (token, channel) of a pass reaches ``ratio``, a *fallback*
takes the largest channels if they stand out: at least ``fallback_ratio = 100`` and
``fallback_gap = 5`` times the next channel. Measured (largest ratio of each channel, two
prompts, docs/results/detect_fallback.json): the real models' super activations stand
12.8-13.8x above the next channel (SmolLM2 12,600 over 917; Gemma 6,935 over 538); with their
creating weights zeroed, both models' largest channels form a crowd, no step among the top nine
larger than 1.7x (SmolLM2) and 2.4x (Gemma); unplanted tiny random models of all 51 architectures
peak at 10.7x. The threshold a prompt's first pass sets is kept for its later passes, so what is
left of an activation once its weights are zeroed is judged as before. Such activations are
marked ``fallback``; the verdict measures whether their weights matter.

Along that (token, channel) the value after every layer is recorded; a layer whose change
``h_out - h_in`` moves the value towards its peak by at least ``rise`` times |peak| is a
*creation* layer, one that moves it back by as much is a *cancellation* layer. Each change is
split into what the attention and the MLP added (``ArchSpec.attn_out`` / ``mlp_out``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..model.capture import LayerTrace
from ..core.results import Versioned


@dataclass
class TraceRule:
    """What counts as a super activation, a rise, and a source (defaults calibrated on the dev set)."""

    ratio: float = 2000.0  # |h[t, c]| / median |h| of the layer
    floor: float = 20.0  # and |h[t, c]| at least this
    fallback_ratio: float = 100.0  # when nothing reaches ``ratio``: channels of at least this (0: no fallback)
    fallback_gap: float = 5.0  # ... that stand this far above every other channel
    rise: float = 0.1  # a layer's change counts when it is at least this share of |peak|
    max_activations: int = 8  # the largest ones, per iteration
    min_share: float = 0.5  # the reported weights' terms must carry this share of the MLP's output
    min_term: float = 0.1  # and each one at least this share
    norm_spike: float = 5.0  # post-norm models: a down-projection output >= this x its token's RMS is a spike
    # (the FFN norm divides by that RMS; Gemma-3-270M's channel 163: 13-23x at layers 3-9, one weight 54-99% of it)


@dataclass
class Change(Versioned):
    """How one layer moved a super activation: its total change and each sublayer's part."""

    KIND: ClassVar[str] = "change"
    layer: int
    delta: float  # h_out - h_in at (token, channel)
    attention: float  # what the attention output added there
    mlp: float  # what the MLP output added there
    other: float  # the rest (biases, dropouts, in-place additions)
    sublayer: str  # the part that carries the change: "mlp", "attention" or "other"


@dataclass
class SuperActivation(Versioned):
    """One super activation of one prompt: where it sits, how large it gets, where it rises and falls."""

    KIND: ClassVar[str] = "super activation"
    token: int
    channel: int
    peak: float  # signed value where it is largest against its layer's median
    peak_layer: int  # after which layer that is
    ratio: float  # |peak| / median |h| of that layer
    first_layer: int  # the first layer after which it passes the rule
    last_layer: int  # the last layer after which it passes the rule
    values: list[float]  # h[token, channel] after every layer (values[0]: after layer 0)
    rises: list[Change] = field(default_factory=list)
    falls: list[Change] = field(default_factory=list)
    iteration: int = 0  # the detection iteration that first saw it
    prompt: int = 0
    tokens: list[int] = field(default_factory=list)  # every token where this channel passes the rule
    fallback: bool = False  # found below ``TraceRule.ratio``, by the fallback (module doc)

    @classmethod
    def _decode(cls, d: dict) -> dict[str, Any]:
        out = super()._decode(d)
        for key in ("rises", "falls"):
            out[key] = [Change.from_dict(c) for c in out.get(key, [])]
        return out


def hidden_stack(traces: list[LayerTrace]) -> torch.Tensor:
    """``[layers, tokens, hidden]`` residual stream after every layer (float32)."""
    return torch.stack([tr.h_out.float() for tr in traces])


@dataclass
class Largest:
    """A pass's largest (token, channel) against its layer's median |h|, passing the rule or not, and
    the largest ratio of each channel, largest first (``channels``: ``[channel, ratio]``)."""

    token: int
    channel: int
    layer: int
    value: float
    ratio: float
    channels: list[list]

    @property
    def steps(self) -> list[float]:
        """Each top channel's ratio over the next one's (where the fallback looks for a gap)."""
        ratios = [r for _, r in self.channels]
        return [a / max(b, 1e-12) for a, b in zip(ratios, ratios[1:])]


def _ratios(traces: list[LayerTrace]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h`` ``[layers, tokens, hidden]``, ``|h|`` and ``|h|`` over its layer's median |h|."""
    h = hidden_stack(traces)
    mag = h.abs()
    scale = mag.flatten(1).median(dim=1).values.clamp_min(1e-12)  # [layers]
    return h, mag, mag / scale[:, None, None]


def largest(traces: list[LayerTrace], rule: TraceRule) -> Largest:
    """The pass's largest ratio among the values at least ``rule.floor`` (else among all)."""
    h, mag, ratio = _ratios(traces)
    above = mag >= rule.floor
    r = torch.where(above, ratio, torch.zeros_like(ratio)) if bool(above.any()) else ratio
    layer, t, c = (int(i) for i in torch.unravel_index(r.argmax(), r.shape))
    per_channel = r.amax(dim=(0, 1))
    top = per_channel.topk(min(rule.max_activations + 1, per_channel.numel()))
    channels = [[int(ch), float(v)] for v, ch in zip(top.values, top.indices)]
    return Largest(token=t, channel=c, layer=layer, value=float(h[layer, t, c]), ratio=float(r[layer, t, c]), channels=channels)


def threshold(top: Largest, rule: TraceRule) -> float | None:
    """The ratio a super activation of this prompt must reach: ``rule.ratio``; else the fallback's,
    the ratio of the last of the largest channels that stand ``fallback_gap`` above the next one (at
    least ``fallback_ratio``); else None (module doc)."""
    if abs(top.value) < rule.floor:
        return None
    if top.ratio >= rule.ratio:
        return rule.ratio
    if rule.fallback_ratio <= 0:
        return None
    ratios = [r for _, r in top.channels]
    for k, r in enumerate(ratios[: rule.max_activations]):
        if r < rule.fallback_ratio:
            return None
        if r >= rule.fallback_gap * (ratios[k + 1] if k + 1 < len(ratios) else 0.0):
            return r
    return None


def find_activations(traces: list[LayerTrace], rule: TraceRule, iteration: int = 0, prompt: int = 0,
                     ratio_at_least: float | None = None) -> list[SuperActivation]:
    """The super activations of one forward pass, largest ratio first (at most ``max_activations``).

    ``ratio_at_least``: the threshold (``threshold``), by default ``rule.ratio``."""
    h, mag, ratio = _ratios(traces)
    bar = rule.ratio if ratio_at_least is None else ratio_at_least
    passing = (ratio >= bar) & (mag >= rule.floor)
    if not bool(passing.any()):
        return []
    best = torch.where(passing, ratio, torch.zeros_like(ratio)).amax(dim=0)  # [tokens, hidden]
    per_channel, token_of = best.max(dim=0)
    channels = [int(c) for c in torch.nonzero(per_channel > 0).flatten()]
    channels.sort(key=lambda c: -float(per_channel[c]))
    found = [_activation(traces, h, ratio, passing, int(token_of[c]), c, rule, iteration, prompt)
             for c in channels[: rule.max_activations]]
    for sa in found:
        sa.fallback = bar < rule.ratio
    return found


def _activation(traces, h, ratio, passing, t: int, c: int, rule: TraceRule, iteration: int, prompt: int) -> SuperActivation:
    values = h[:, t, c]
    peak_layer = int(ratio[:, t, c].argmax())  # largest against its layer (later layers run larger)
    peak = float(values[peak_layer])
    layers = torch.nonzero(passing[:, t, c]).flatten()
    tokens = torch.nonzero(passing[:, :, c].any(dim=0)).flatten().tolist()
    sa = SuperActivation(
        token=t, channel=c, peak=peak, peak_layer=peak_layer, ratio=float(ratio[peak_layer, t, c]),
        first_layer=int(layers[0]), last_layer=int(layers[-1]), values=[float(v) for v in values],
        iteration=iteration, prompt=prompt, tokens=tokens,
    )
    sign = 1.0 if peak >= 0 else -1.0
    for tr in traces:
        ch = layer_change(tr, t, c)
        if sign * ch.delta >= rule.rise * abs(peak):
            sa.rises.append(ch)
        elif -sign * ch.delta >= rule.rise * abs(peak):
            sa.falls.append(ch)
    return sa


def layer_change(tr: LayerTrace, t: int, c: int) -> Change:
    """Split the change of ``h[t, c]`` over one layer into attention, MLP and the rest."""
    delta = float(tr.h_out[t, c].float() - tr.h_in[t, c].float())
    attn = tr.scale * float(tr.attn[t, c]) if tr.attn is not None else 0.0
    mlp = tr.scale * float(tr.mlp[t, c]) if tr.mlp is not None else 0.0
    other = delta - attn - mlp
    parts = {"mlp": mlp, "attention": attn, "other": other}
    sign = 1.0 if delta >= 0 else -1.0
    sublayer = max(parts, key=lambda k: sign * parts[k])
    return Change(tr.layer, delta, attn, mlp, other, sublayer)
