"""Figures of ``superweight emergence``: one per run, and one comparing runs (seeds)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..train.emergence import EmergenceResult
from .plots import ACCENT, PALETTE, WITH, WITHOUT, Plot, plt


def _steps(result: EmergenceResult) -> list[int]:
    return [p.step if p.step is not None else i for i, p in enumerate(result.points)]


def run_figure(result: EmergenceResult, train_losses: Sequence[Sequence[float]] = ()) -> Plot:
    """Four panels against the training step: losses, the largest residual |h| (labelled with its
    layer and channel), every layer's max |h|, and the top creator's place and share."""
    steps, pts = _steps(result), result.points
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    labels: list[str] = []
    a = ax[0][0]
    if train_losses:
        a.plot([s for s, _ in train_losses], [v for _, v in train_losses], color="#bbbbbb", lw=0.8, label="training loss")
    a.plot(steps, [p.loss for p in pts], "o-", color=WITH, ms=3, label="held-out loss")
    a.plot(steps, [p.loss_zero_top for p in pts], "s--", color=WITHOUT, ms=3, label="held-out, top creator zeroed")
    det = [(s, p.loss_zero_detected) for s, p in zip(steps, pts) if p.loss_zero_detected is not None]
    if det:
        a.plot(*zip(*det), "^", color=ACCENT, ms=5, label="held-out, detected SWs zeroed")
    a.set(xlabel="step", ylabel="loss (nats)", title="loss, with and without the creating weight")
    a.legend()
    a = ax[0][1]
    a.semilogy(steps, [p.residual_max for p in pts], "o-", color=WITH, ms=3, label="max |h| over layers")
    a.semilogy(steps, [p.residual_median_layer_max for p in pts], "-", color="#8c8c8c", label="median layer's max |h|")
    a.semilogy(steps, [p.residual_typical for p in pts], ":", color="#8c8c8c", label="median |h| of the peak's layer")
    last = pts[-1]
    text = (f"layer {last.residual_layer}, channel {last.residual_channel}, token {last.residual_token}: "
            f"{last.massive:.0f}x the median |h|")
    a.annotate(text, (steps[-1], last.residual_max), textcoords="offset points", xytext=(-170, -14), fontsize=8)
    labels.append(text)
    a.set(xlabel="step", ylabel="|h|", title="largest residual-stream activation")
    a.legend()
    a = ax[1][0]
    n_layers = len(pts[0].residual_per_layer)
    for layer in range(n_layers):
        a.semilogy(steps, [p.residual_per_layer[layer] for p in pts], color=PALETTE[layer % len(PALETTE)], label=f"after layer {layer}")
    a.set(xlabel="step", ylabel="max |h|", title="residual stream per layer")
    a.legend(fontsize=7, ncol=2)
    a = ax[1][1]
    a.plot(steps, [p.residual_channel for p in pts], "o", color=WITH, ms=4, label="channel of max |h|")
    a.plot(steps, [p.top[1] for p in pts], "x", color=WITHOUT, ms=5, label="top creator row")
    a.set(xlabel="step", ylabel="hidden channel", title="where: max-|h| channel and creator row")
    b = a.twinx()
    b.plot(steps, [p.top_share for p in pts], "-", color=ACCENT, lw=1, label="creator's share of its output peak")
    b.set_ylim(-0.05, 1.05)
    b.set_ylabel("share")
    a.legend(loc="upper left", fontsize=8)
    b.legend(loc="lower right", fontsize=8)
    fig.suptitle(result.label)
    fig.tight_layout()
    return Plot(fig, labels)


def seeds_figure(results: Sequence[EmergenceResult]) -> Plot:
    """Max residual |h| and the channel it sits on, one line per run."""
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = []
    for i, r in enumerate(results):
        color = PALETTE[i % len(PALETTE)]
        steps = _steps(r)
        ax[0].semilogy(steps, [p.residual_max for p in r.points], "o-", ms=3, color=color, label=r.label)
        ax[1].plot(steps, [p.residual_channel for p in r.points], "o-", ms=3, lw=0.6, color=color, label=r.label)
        last = r.points[-1]
        labels.append(f"{r.label}: layer {last.residual_layer} channel {last.residual_channel}")
    ax[0].set(xlabel="step", ylabel="max |h|", title="largest residual activation")
    ax[1].set(xlabel="step", ylabel="hidden channel", title="its channel")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    return Plot(fig, labels)


def write_png(plot: Plot, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(plot.png())
    tmp.replace(path)
