"""The report's figures (matplotlib, Agg), one function per figure of the paper.

Each function takes plain results (lists, dicts from the versioned JSON files) and returns a
``Plot``: the matplotlib figure plus the text of every label it drew, so tests can check what a
reader will see (e.g. that the spike label names the detected channel).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

WITH, WITHOUT, ACCENT = "#1f5fa8", "#d1495b", "#5c946e"
PALETTE = ["#1f5fa8", "#d1495b", "#edae49", "#5c946e", "#7d5ba6", "#8c8c8c", "#00798c", "#a05a2c"]
plt.rcParams.update({
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "figure.dpi": 110, "savefig.dpi": 110,
})


@dataclass
class Plot:
    figure: Figure
    labels: list[str] = field(default_factory=list)  # every annotation text drawn on the figure

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", bbox_inches="tight")
        plt.close(self.figure)
        return buf.getvalue()


def _annotate(ax, x: float, y: float, text: str, labels: list[str], color: str = "black",
              dy: float = 7, ha: str = "center") -> None:
    ax.annotate(text, (x, y), xytext=(0, dy), textcoords="offset points", ha=ha, fontsize=9,
                color=color, fontweight="bold")
    labels.append(text)


def _label_spikes(ax, xs: Sequence[int], ys: Sequence[float], texts: Sequence[str], n: int, labels: list[str]) -> None:
    """Label spikes, stacking labels of neighbouring layers so they do not overlap."""
    prev, level = -10, 0
    for x, text in zip(xs, texts):
        level = level + 1 if x - prev <= 3 else 0
        prev = x
        ha = "right" if x > 0.85 * n else "left" if x < 0.15 * n else "center"
        ax.plot([x], [ys[x]], "o", color=WITHOUT, ms=6)
        dy = -16 if level % 2 else 7 + 7 * level  # a neighbour's label goes below its point
        _annotate(ax, x, ys[x], text, labels, WITHOUT, dy=dy, ha=ha)


def _layers_axis(ax, n: int) -> None:
    ax.set_xlabel("layer")
    step = 1 if n <= 16 else 2 if n <= 40 else 4
    ax.set_xticks(range(0, n, step))
    ax.set_xlim(-0.7, n - 0.3)


# ---------------------------------------------------------------- Figure 3


def down_proj_maxima(
    inputs: Sequence[float], in_channels: Sequence[int], outputs: Sequence[float], out_channels: Sequence[int],
    spikes_in: Sequence[int], spikes_out: Sequence[int], thresholds: tuple[float, float] | None = None,
) -> Plot:
    """Per-layer max |input| and max |output| of the down-projection, log scale; spikes labelled."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    labels: list[str] = []
    panels = [
        (axes[0], inputs, in_channels, spikes_in, "max |input| of down_proj (label: intermediate channel = col)"),
        (axes[1], outputs, out_channels, spikes_out, "max |output| of down_proj (label: hidden channel = row)"),
    ]
    for k, (ax, ys, chans, spikes, title) in enumerate(panels):
        xs = range(len(ys))
        ax.plot(xs, ys, "-o", color=WITH, ms=3.5, lw=1.4)
        ax.set_yscale("log")
        ax.set_title(title)
        _layers_axis(ax, len(ys))
        if thresholds:
            ax.axhline(thresholds[k], color="gray", ls=":", lw=1)
            ax.text(0, thresholds[k], " spike threshold", va="bottom", fontsize=8, color="gray")
        _label_spikes(ax, list(spikes), ys, [f"L{i}: ch {chans[i]}" for i in spikes], len(ys), labels)
        ax.set_ylim(top=max(ys) * 12)
    axes[0].set_ylabel("|activation| (log)")
    fig.tight_layout()
    return Plot(fig, labels)


# ---------------------------------------------------------------- Figure 4


def super_activation(
    sa_with: Sequence[float], sa_without: Sequence[float], max_with: Sequence[float],
    max_without: Sequence[float], channel: int, token: int, first: int, drop: float,
) -> Plot:
    """|residual[token, channel]| per layer with and without the super weights, and the layer maxima.

    ``first`` is the layer where the super activation appears, ``drop`` the median relative drop
    from there on when the super weights are zeroed.
    """
    fig, ax = plt.subplots(figsize=(11, 4))
    n = len(sa_with)
    xs = range(n)
    ax.plot(xs, max_with, color=WITH, lw=1, ls=":", label="max |residual| over channels, original")
    ax.plot(xs, max_without, color=WITHOUT, lw=1, ls=":", label="max |residual| over channels, zeroed")
    ax.plot(xs, sa_with, "-o", color=WITH, ms=3.5, lw=1.8, label=f"|residual| at channel {channel}, original")
    ax.plot(xs, sa_without, "-o", color=WITHOUT, ms=3.5, lw=1.8,
            label=f"|residual| at channel {channel}, super weights zeroed")
    ax.set_yscale("log")
    _layers_axis(ax, n)
    ax.set_ylabel("|activation| (log)")
    ax.set_title(f"Super activation: hidden channel {channel}, token {token}")
    top = max(max(max_with), max(max_without))
    positive = [v for v in (*sa_with, *sa_without, *max_with, *max_without) if v > 0]
    bottom = max(min(positive), 1e-3 * top) / 6
    ax.set_ylim(bottom, top * 60)
    labels = [f"SA channel {channel}: {sa_with[first]:,.0f}", f"super weights zeroed: {drop:.0%} lower (median)"]
    mid = min(n - 1, first + max(1, (n - first) // 2))
    ax.annotate(labels[0], (first, sa_with[first]), xytext=(-12, 14), textcoords="offset points", ha="right",
                fontsize=9, fontweight="bold", color=WITH, arrowprops=dict(arrowstyle="->", color=WITH))
    ax.annotate(labels[1], (mid, max(sa_without[mid], bottom)), xytext=(0, -28) if sa_without[mid] > 3 * bottom
                else (0, 28), textcoords="offset points", ha="center", fontsize=9, fontweight="bold", color=WITHOUT,
                arrowprops=dict(arrowstyle="->", color=WITHOUT))
    ax.legend(loc="upper left", ncols=2, frameon=False)
    fig.tight_layout()
    return Plot(fig, labels)


# ---------------------------------------------------------------- Figure 6


def _bar_labels(ax, bars, fmt: str, labels: list[str]) -> None:
    for b in bars:
        h = b.get_height()
        if h is None or not math.isfinite(h):
            continue
        text = fmt.format(h)
        ax.annotate(text, (b.get_x() + b.get_width() / 2, h), xytext=(0, 3), textcoords="offset points",
                    ha="center", fontsize=8)
        labels.append(text)


def ablation_bars(
    names: Sequence[str], ppl: Sequence[float | None], acc: Sequence[float | None],
    task_acc: dict[str, Sequence[float | None]] | None = None, ppl_label: str = "perplexity",
) -> Plot:
    """Perplexity (log) and mean zero-shot accuracy per ablation condition."""
    has_acc = any(a is not None for a in acc)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6.5, 4.2), squeeze=False)
    labels: list[str] = []
    xs = list(range(len(names)))
    colors = [PALETTE[i % len(PALETTE)] for i in xs]
    ax = axes[0][0]
    vals = [p if p is not None else float("nan") for p in ppl]
    _bar_labels(ax, ax.bar(xs, vals, color=colors), "{:,.3g}", labels)
    ax.set_yscale("log")
    ax.set_ylabel(f"{ppl_label} (log)")
    ax.set_title("Perplexity per condition (lower is better)")
    if has_acc:
        ax2 = axes[0][1]
        vals = [100 * a if a is not None else float("nan") for a in acc]
        _bar_labels(ax2, ax2.bar(xs, vals, color=colors, alpha=0.85), "{:.1f}", labels)
        for t, (task, accs) in enumerate((task_acc or {}).items()):
            pts = [(x, 100 * a) for x, a in zip(xs, accs) if a is not None]
            ax2.plot([p[0] + 0.25 for p in pts], [p[1] for p in pts], ms=4, color="black", alpha=0.55,
                     marker="os^vD<>p"[t % 8], ls="none", label=task)
        ax2.set_ylabel("accuracy (%)")
        ax2.set_ylim(0, 100)
        ax2.set_title("Zero-shot accuracy (bar: mean of tasks; marks: each task)")
        if task_acc:
            ax2.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    for a in axes[0]:
        a.set_xticks(xs, [n.replace("_", " ") for n in names], rotation=25, ha="right")
    fig.tight_layout()
    return Plot(fig, labels)


def scaling_curve(
    scales: Sequence[float], ppl: Sequence[float | None], acc: Sequence[float | None], acc_label: str = "accuracy",
) -> Plot:
    """Perplexity and accuracy as the super weights are scaled by s (s = 1 is the original model).

    ``acc_label`` says what ``acc`` is (e.g. "LAMBADA accuracy" or "mean accuracy of 7 tasks (...)").
    """
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    labels: list[str] = []
    pts = [(s, p) for s, p in zip(scales, ppl) if p is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=WITHOUT, label="perplexity")
    ax.set_yscale("log")
    ax.set_xlabel("scale s applied to the super weights")
    ax.set_ylabel("perplexity (log)", color=WITHOUT)
    ax.axvline(1.0, color="gray", ls=":", lw=1)
    ax.text(1.0, ax.get_ylim()[1], " original (s = 1)", va="top", fontsize=8, color="gray")
    labels.append("original (s = 1)")
    if any(a is not None for a in acc):
        ax2 = ax.twinx()
        pts = [(s, 100 * a) for s, a in zip(scales, acc) if a is not None]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "-s", color=WITH, label=acc_label)
        ax2.set_ylabel(f"{acc_label} (%)", color=WITH)
        labels.append(f"{acc_label} (%)")
        ax2.grid(False)
        ax2.spines["right"].set_visible(True)
    ax.set_title("Scaling the super weights")
    fig.tight_layout()
    return Plot(fig, labels)


# ---------------------------------------------------------------- Figure 5


def stopword_bars(groups: dict[str, tuple[float, float]], tokens: dict[str, tuple[float, float]] | None = None) -> Plot:
    """Mean next-token probability (with / without the super weights) per group and per token."""
    panels = [("Mean next-token probability", groups)] + ([("Individual stopwords", tokens)] if tokens else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(11 if tokens else 6.5, 4), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2]} if tokens else None)
    labels: list[str] = []
    for ax, (title, data) in zip(axes[0], panels):
        names = list(data)
        xs = range(len(names))
        w = 0.38
        b1 = ax.bar([x - w / 2 for x in xs], [data[n][0] for n in names], w, color=WITH, label="original")
        b2 = ax.bar([x + w / 2 for x in xs], [data[n][1] for n in names], w, color=WITHOUT,
                    label="super weights zeroed")
        for x, n in zip(xs, names):
            before, after = data[n]
            if before > 0:
                text = f"x{after / before:.2g}"
                ax.annotate(text, (x, max(before, after)), xytext=(0, 4), textcoords="offset points",
                            ha="center", fontsize=8, fontweight="bold")
                labels.append(text)
        ax.set_xticks(list(xs), [repr(n) if title.startswith("Individual") else n for n in names])
        ax.set_title(title)
        ax.set_yscale("log")
        ax.set_ylabel("probability (log)")
        ax.set_ylim(top=max(max(v) for v in data.values()) * 8)
    fig.legend(handles=[b1, b2], loc="lower center", ncols=2, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return Plot(fig, labels)


# ---------------------------------------------------------------- Figure 7


def _block_label(x: float) -> str:
    side = round(math.sqrt(x))
    return f"{side}x{side}" if side * side == x else f"{int(x):,}"


def block_size_curves(series: dict[str, list[tuple[float, float]]], references: dict[str, float] | None = None,
                      xlabel: str = "block size (contiguous elements of the flattened tensor)") -> Plot:
    """Perplexity vs quantization block size, one line per method; ``references`` as dashed levels."""
    fig, ax = plt.subplots(figsize=(9, 4.2))
    labels: list[str] = []
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    xs = sorted({p[0] for pts in series.values() for p in pts})
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=PALETTE[i % len(PALETTE)], label=name)
    for j, (name, level) in enumerate((references or {}).items()):
        ax.axhline(level, color="gray", ls=["--", ":", "-."][j % 3], lw=1)
        text = f"{name}: {level:.4g}"
        ax.annotate(text, (xs[0], level), xytext=(2, -10 if j == 0 else 3), textcoords="offset points", fontsize=8,
                    color="dimgray")
        labels.append(text)
    ax.set_xticks(xs, [_block_label(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (log)")
    ax.set_title("Weight quantization: perplexity vs block size")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return Plot(fig, labels)
