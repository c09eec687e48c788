"""One page that shows what the tool found: ``report.html`` (self-contained) and ``report.md`` + PNGs.

``build_report`` runs detection on a loaded model, traces the super activation with and without
the super weights, reads (or runs) the ablation and the quantization sweep, draws the paper's
figures (``superweight.report.plots``) and ``write_report`` writes them into a temporary folder that is
renamed into place only when complete.
"""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import plots
from ..model.device import input_device
from ..core.version import __version__
from ..prove.ablate import zeroed_weights
from ..model.arch import ArchSpec
from ..model.capture import first_tensor
from ..find.loop import DetectionResult, SpikeRule
from ..find.runner import encode_prompt
from ..model.edits import HookSet
from ..core.errors import SuperweightError
from ..prove import experiments
from ..prove.experiments import AblationResult, ConditionResult
from ..core.files import staged_dir
from ..quant import sweep as quant_sweep
from ..quant.sweep import SweepResult
from ..core.results import Table
from ..eval.streamed import zeroing
from ..model.streamed import load_tokenizer, streamed
from ..quant import llama_cpp
from ..find.catalog import verify, model_names
from ..core.progress import counter, step

log = logging.getLogger(__name__)

TASK_NAMES = {"lambada": "LAMBADA", "piqa": "PIQA", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge",
              "hellaswag": "HellaSwag", "winogrande": "WinoGrande", "sciq": "SciQ"}


@dataclass
class Figure:
    name: str  # file stem of the PNG
    title: str
    caption: str  # one sentence: what to see
    png: bytes
    labels: list[str] = field(default_factory=list)


@dataclass
class ResidualTrace:
    """|residual[token, channel]| and max |residual| after every layer, with and without the SWs."""

    channel: int
    token: int
    sa_with: list[float]
    sa_without: list[float]
    max_with: list[float]
    max_without: list[float]

    @property
    def first(self) -> int:
        """The first layer where the channel holds most of its peak (the super activation appears)."""
        peak = max(self.sa_with)
        return next(i for i, v in enumerate(self.sa_with) if v >= 0.5 * peak)

    @property
    def drop(self) -> float:
        """Median relative drop of the channel from ``first`` on when the super weights are zeroed."""
        ratios = sorted(1 - b / a for a, b in zip(self.sa_with[self.first:], self.sa_without[self.first:]) if a > 0)
        return ratios[len(ratios) // 2] if ratios else 0.0


@dataclass
class ReportInputs:
    model: str
    architecture: str
    detection: DetectionResult
    trace: ResidualTrace | None = None
    ablation: AblationResult | None = None
    ablation_source: str = ""
    sweep: SweepResult | None = None
    sweep_source: str = ""
    notes: list[str] = field(default_factory=list)  # caveats (e.g. GGUF-derived baselines)
    missing: list[str] = field(default_factory=list)  # parts not shown, and why
    command: str = ""
    findings: list[str] = field(default_factory=list)  # catalog verdict, llama.cpp arguments


# ---------------------------------------------------------------- measuring


def _residual_hook(i: int, channel: int, token: int, out: dict):
    def hook(module, args, output):
        _record(i, output, channel, token, out)

    return hook


def _record(i: int, output, channel: int, token: int, out: dict) -> None:
    """|residual[token, channel]| and max |residual| of a layer's output into ``out`` ("sa", "max")."""
    h = first_tensor(output).detach()
    h = h.reshape(-1, h.shape[-2], h.shape[-1])[0].float()
    out.setdefault("sa", {})[i] = abs(float(h[token, channel]))
    out.setdefault("max", {})[i] = float(h.abs().max())


def _trace_once(model: nn.Module, arch: ArchSpec, inputs: dict, channel: int, token: int) -> tuple[list, list]:
    seen: dict = {}
    with HookSet() as hooks, torch.no_grad():
        for i, layer in enumerate(arch.layer_modules(model)):
            hooks.forward(layer, _residual_hook(i, channel, token, seen))
        model(**inputs, use_cache=False)
    return _series(seen, arch.num_layers(model))


def _series(seen: dict, n: int) -> tuple[list[float], list[float]]:
    """``_record``'s values as two per-layer lists (|super activation|, max |residual|)."""
    return [seen["sa"][i] for i in range(n)], [seen["max"][i] for i in range(n)]


def super_activation_site(detection: DetectionResult) -> tuple[int, int]:
    """(channel, token) of the largest residual activation of the unmodified model."""
    peak = max(detection.layers, key=lambda s: s.residual.magnitude)
    return peak.residual.channel, peak.residual.token


def residual_trace(model: nn.Module, tokenizer, arch: ArchSpec, detection: DetectionResult) -> ResidualTrace:
    """Trace the super activation's channel through the layers, then again with the SWs zeroed."""
    channel, token = super_activation_site(detection)
    device = input_device(model)
    inputs = encode_prompt(tokenizer, detection.prompts[0], device)
    sa_with, max_with = _trace_once(model, arch, inputs, channel, token)
    with zeroed_weights(model, arch, detection.super_weights):
        sa_without, max_without = _trace_once(model, arch, inputs, channel, token)
    return ResidualTrace(channel, token, sa_with, sa_without, max_with, max_without)


def streamed_residual_trace(path: str | Path, detection: DetectionResult, dtype: str | torch.dtype = "float32",
                            device: str | torch.device | None = None, tokenizer=None) -> ResidualTrace:
    """``residual_trace`` of a checkpoint read layer by layer: both runs (with and without the super
    weights) through each layer while it is read once; the same numbers as in memory."""
    channel, token = super_activation_site(detection)
    with streamed(path, dtype, device) as sm:
        tokenizer = tokenizer or load_tokenizer(sm.ckpt.folder)
        ids = encode_prompt(tokenizer, detection.prompts[0])["input_ids"][0]
        seen: list[dict] = [{}, {}]
        edits = [lambda i: contextlib.nullcontext(), zeroing(sm, detection.super_weights)]
        sm.last_outputs([ids], [(0, e) for e in edits], lambda i, r, out: _record(i, out, channel, token, seen[r]))
    (sa_with, max_with), (sa_without, max_without) = (_series(s, sm.num_layers) for s in seen)
    return ResidualTrace(channel, token, sa_with, sa_without, max_with, max_without)


# ---------------------------------------------------------------- figures


def figure_down_proj(detection: DetectionResult) -> Figure:
    rule: SpikeRule = detection.rule
    ins = [s.input.magnitude for s in detection.layers]
    outs = [s.output.magnitude for s in detection.layers]
    spikes_in = [i for i in range(len(ins)) if rule.spikes(ins, i)]
    spikes_out = [i for i in range(len(outs)) if rule.spikes(outs, i)]
    median_thr = (min(rule.threshold(ins, i) for i in range(len(ins))), min(rule.threshold(outs, i) for i in range(len(outs))))
    p = plots.down_proj_maxima(
        ins, [s.input.channel for s in detection.layers], outs, [s.output.channel for s in detection.layers],
        spikes_in, spikes_out, median_thr,
    )
    both = ", ".join(str(i) for i in sorted(set(spikes_in) & set(spikes_out))) or "none"
    confirmed = ", ".join(str(i) for i in sorted({s.layer for s in detection.super_weights})) or "none"
    caption = (
        f"Input and output of the down-projection spike together in layers {both}; the labelled channels "
        f"[row = output channel, col = input channel] locate the super weights that detection confirmed "
        f"in layers {confirmed} (paper Fig. 3)."
    )
    return Figure("fig3_down_proj_maxima", "Down-projection activations per layer", caption, p.png(), p.labels)


def figure_super_activation(trace: ResidualTrace) -> Figure:
    p = plots.super_activation(
        trace.sa_with, trace.sa_without, trace.max_with, trace.max_without, trace.channel, trace.token,
        trace.first, trace.drop,
    )
    caption = (
        f"The super activation on hidden channel {trace.channel} (token {trace.token}) appears at layer "
        f"{trace.first} and rides the residual stream; zeroing the super weights lowers it by a median "
        f"{trace.drop:.0%} over the following layers (the paper reports about 75%, Fig. 4)."
    )
    return Figure("fig4_super_activation", "Super activation with and without the super weights", caption, p.png(), p.labels)


def _task_accs(cond: ConditionResult) -> dict[str, float]:
    return {t: r.acc for t, r in cond.tasks.items()}


def _acc_label(tasks: Sequence[str]) -> str:
    """What an accuracy axis shows: one task's accuracy, or the mean over the named tasks."""
    names = [TASK_NAMES.get(t, t) for t in tasks]
    if len(names) == 1:
        return f"{names[0]} accuracy"
    return f"mean accuracy of {len(names)} tasks ({', '.join(names)})" if names else "accuracy"


def scale_tasks(ablation: AblationResult) -> list[str]:
    """The tasks the scale conditions scored (often fewer than the other conditions: ``--scale-tasks``)."""
    return list(dict.fromkeys(t for _, n in ablation.scales for t in ablation.conditions[n].tasks))


def figures_ablation(ablation: AblationResult) -> list[Figure]:
    conds = ablation.conditions
    names = ablation.edits
    task_names = sorted({t for n in names for t in conds[n].tasks})
    task_acc = {t: [_task_accs(conds[n]).get(t) for n in names] for t in task_names}
    p = plots.ablation_bars(names, [conds[n].ppl for n in names], [conds[n].avg_acc for n in names], task_acc)
    figs = [Figure("fig6_ablation", "Ablation: what each weight edit costs", ablation_caption(ablation), p.png(), p.labels)]
    if ablation.scales:
        label = _acc_label(scale_tasks(ablation))
        q = plots.scaling_curve(
            [s for s, _ in ablation.scales], [conds[n].ppl for _, n in ablation.scales],
            [conds[n].avg_acc for _, n in ablation.scales], acc_label=label,
        )
        figs.append(Figure("fig6_scaling", "Scaling the super weights", scaling_caption(ablation, label), q.png(), q.labels))
    return figs


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def ablation_caption(ablation: AblationResult) -> str:
    o, z = ablation.conditions.get("original"), ablation.conditions.get("zero_super_weights")
    if o is None or z is None or o.ppl is None or z.ppl is None:
        return "Perplexity and accuracy under each weight edit (paper Table 1)."
    text = (f"Zeroing the super weights takes perplexity from {o.ppl:.4g} to {z.ppl:.4g} and mean accuracy "
            f"from {_pct(o.avg_acc)} to {_pct(z.avg_acc)}")
    others = [(n, ablation.conditions[n].ppl) for n in ("zero_top_non_super", "restore_super_activation", "zero_random")
              if n in ablation.conditions and ablation.conditions[n].ppl is not None]
    if others:
        text += "; " + ", ".join(f"{n.replace('_', ' ')} {v:.4g}" for n, v in others)
    return text + " (paper Table 1: the super weights alone carry the damage)."


def scaling_caption(ablation: AblationResult, acc_label: str) -> str:
    conds = ablation.conditions
    ppl = [(s, conds[n].ppl) for s, n in ablation.scales if conds[n].ppl is not None]
    acc = [(s, conds[n].avg_acc) for s, n in ablation.scales if conds[n].avg_acc is not None]
    parts = []
    if ppl:
        s_min, p_min = min(ppl, key=lambda t: t[1])
        parts.append(f"perplexity is {ppl[0][1]:.4g} at s = {ppl[0][0]:g} and lowest ({p_min:.4g}) at s = {s_min:g}")
    if acc:
        s_max, a_max = max(acc, key=lambda t: t[1])
        parts.append(f"{acc_label} peaks at s = {s_max:g} ({_pct(a_max)})")
    return ("As the super weights are scaled, " + " and ".join(parts) if parts else "Quality vs scale") + (
        " (paper Fig. 6: collapse towards 0, small gains above 1).")


def stopword_data(ablation: AblationResult, n_tokens: int = 8) -> tuple[dict, dict | None] | None:
    """(groups, tokens) as {name: (original, zeroed)} from the ablation's stopword block.

    Groups: mean next-token probability of a stopword, of any other token, and of the true next
    word; tokens: the ``n_tokens`` stopwords most likely in either run.
    """
    if not ablation.stopwords:
        return None
    before, after = ablation.stopwords["original"], ablation.stopwords["zero_super_weights"]
    names = (("stopwords", "stopword_prob"), ("other tokens", "other_prob"), ("true next word", "target_prob"))
    groups = {g: (before[k], after[k]) for g, k in names}
    tb, ta = before.get("per_token", {}), after.get("per_token", {})
    common = sorted((t for t in tb if t in ta), key=lambda t: -max(tb[t], ta[t]))[:n_tokens]
    return groups, {t: (tb[t], ta[t]) for t in common} or None


def figure_stopwords(ablation: AblationResult) -> Figure | None:
    data = stopword_data(ablation)
    if data is None:
        return None
    p = plots.stopword_bars(*data)
    stop = ablation.stopwords
    where = f"over {stop['prompts']} {stop.get('source', '')} contexts, "
    ratios = ", ".join(f"{g} x{a / b:.2g}" for g, (b, a) in data[0].items() if b > 0)
    return Figure(
        "fig5_stopwords", "Stopword probabilities",
        f"Zeroing the super weights multiplies the mean next-token probability ({where}zeroed / original) of: "
        f"{ratios}; the paper reports stopwords rising (Llama-7B: 'the' x2, '.' x5, ',' x10) (Fig. 5).",
        p.png(), p.labels,
    )


def sweep_series(sweep: SweepResult) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    """{method: [(block size, ppl)]} for the round-to-nearest block rows of a sweep, and the
    reference levels: the unquantized perplexity and the non-block RTN rows (groups)."""
    series: dict[str, list[tuple[float, float]]] = {}
    refs: dict[str, float] = {}
    if sweep.baseline_ppl is not None:
        refs["unquantized"] = sweep.baseline_ppl
    for row in sweep.rows:
        if row.family != "rtn":
            continue
        name = f"INT{row.bits} {row.variant}"
        if row.block:
            series.setdefault(name, []).append((float(row.block), row.ppl))
        elif row.group:
            refs[f"{name} group={row.group}"] = row.ppl
    return series, refs


def figure_sweep(sweep: dict) -> Figure | None:
    series, refs = sweep_series(sweep)
    if not series:
        return None
    p = plots.block_size_curves(series, refs)
    return Figure("fig7_block_size", "Quantization: perplexity vs block size", sweep_caption(series), p.png(), p.labels)


def sweep_caption(series: dict[str, list[tuple[float, float]]]) -> str:
    """Where super-weight-aware clipping beats naive round-to-nearest, block size by block size."""
    text = ("Lower is better; the paper finds naive round-to-nearest degrades as blocks grow and clipping with the "
            "super weights held out keeps large blocks usable (Fig. 7)")
    for bits in sorted({k.split()[0] for k in series}):
        naive, aware = dict(series.get(f"{bits} naive", [])), dict(series.get(f"{bits} clip+SW", []))
        both = sorted(set(naive) & set(aware))
        if both:
            wins = [plots._block_label(b) for b in both if aware[b] < naive[b]]
            text += (f"; here {bits} clip+SW beats naive at {len(wins)} of {len(both)} block sizes"
                     + (f" ({', '.join(wins)})" if wins else ""))
    return text + "."


def build_figures(inputs: ReportInputs) -> list[Figure]:
    figs = [figure_down_proj(inputs.detection)]
    if inputs.trace is not None:
        figs.append(figure_super_activation(inputs.trace))
    if inputs.ablation is not None:
        stop = figure_stopwords(inputs.ablation)
        if stop is None:
            inputs.missing.append("Stopword probabilities: the ablation JSON has no 'stopwords' block.")
        else:
            figs.append(stop)
        figs.extend(figures_ablation(inputs.ablation))
    if inputs.sweep is not None:
        fig7 = figure_sweep(inputs.sweep)
        if fig7 is None:
            inputs.missing.append("Block-size sweep: the sweep JSON has no block-size rows.")
        else:
            figs.append(fig7)
    return figs


# ---------------------------------------------------------------- text


def _describe_ablation(a: AblationResult, src: str) -> list[str]:
    cfg, original = a.config, a.conditions.get("original")
    bits = [f"perplexity text: {cfg.ppl}"] if cfg.ppl else []
    if original is not None and original.ppl_tokens:
        bits.append(f"{original.ppl_tokens:,} tokens scored")
    if cfg.tasks:
        bits.append(f"tasks: {', '.join(cfg.tasks)}")
    if a.scales:
        bits.append(f"scale conditions: {_acc_label(scale_tasks(a))}")
    if cfg.limit:
        bits.append(f"first {cfg.limit} items per task")
    if a.stopwords:
        bits.append(f"stopwords: {a.stopwords['prompts']} {a.stopwords.get('source', '')} contexts")
    return bits


def _describe_run(data: AblationResult | SweepResult, src: str) -> str:
    """Where a result's numbers come from: file, perplexity text and tokens, tasks, limit."""
    bits = [f"from {src}"] if src else []
    if isinstance(data, AblationResult):
        bits += _describe_ablation(data, src)
    else:
        bits.append(f"perplexity text: {data.text}")
        bits.append(f"up to {data.max_tokens:,} tokens" if data.max_tokens else "the whole text")
    return "; ".join(bits)


def text_sources(inputs: ReportInputs) -> list[str]:
    out = [f"Detection prompt(s): {', '.join(repr(p) for p in inputs.detection.prompts)}"]
    for label, data, src in (("Ablation", inputs.ablation, inputs.ablation_source), ("Sweep", inputs.sweep, inputs.sweep_source)):
        if data is not None:
            out.append(f"{label}: {_describe_run(data, src)}")
    return out


def findings(names: Sequence[str], detection: DetectionResult) -> list[str]:
    """One line each: the catalog verdict and the llama-quantize arguments that keep the super weights."""
    v = verify(names, detection.super_weights)
    lines = [f"Catalog: {v.status}" + (f" (entry {v.entry}, source: {v.source.get('kind')})" if v.entry else "")]
    if v.missing or v.extra:
        lines[0] += f"; catalog only: {v.missing or 'none'}; detected only: {v.extra or 'none'}"
    if detection.super_weights and detection.architecture in llama_cpp.GGUF_ARCH:
        ov = llama_cpp.overrides_for(detection.architecture, detection.num_layers, detection.super_weights)
        lines.append(f"llama.cpp: llama-quantize {llama_cpp.shell_args(ov)} IN.gguf OUT.gguf TYPE")
    return lines


def tables(inputs: ReportInputs) -> list[Table]:
    """The numbers behind the figures: each result's own tables (the same the CLI prints)."""
    return [*(inputs.ablation.tables() if inputs.ablation else []), *(inputs.sweep.tables() if inputs.sweep else [])]


def _md_table(t: Table) -> list[str]:
    title, header, rows = t.title, t.header, t.rows
    return [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ] + [""]


def _html_table(t: Table) -> list[str]:
    e = html.escape
    title, header, rows = t.title, t.header, t.rows
    return [f"<h3>{e(title)}</h3>", "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"] + [
        "<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows
    ] + ["</table>"]


def render_markdown(inputs: ReportInputs, figs: Sequence[Figure]) -> str:
    d = inputs.detection
    lines = [f"# Super weights of {inputs.model}", ""]
    lines += [f"- Model: `{inputs.model}` ({inputs.architecture}, {d.num_layers} layers)"]
    lines += [f"- {s}" for s in text_sources(inputs)]
    lines += [f"- {s}" for s in inputs.findings]
    lines += [f"- **Note:** {n}" for n in inputs.notes]
    lines += [f"- Generated by superweight {__version__}" + (f": `{inputs.command}`" if inputs.command else ""), ""]
    lines += ["## Super weights found", ""]
    if not d.super_weights:
        lines += ["No super weight found.", ""]
    for t in d.tables() if d.super_weights else d.finding_tables():
        lines += _md_table(t)
    for f in figs:
        lines += [f"## {f.title}", "", f"![{f.title}]({f.name}.png)", "", f"*{f.caption}*", ""]
    if tables(inputs):
        lines += ["## Numbers", ""]
        for t in tables(inputs):
            lines += _md_table(t)
    if inputs.missing:
        lines += ["## Not shown", ""] + [f"- {m}" for m in inputs.missing] + [""]
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.note{background:#fff6e0;border-left:4px solid #edae49;padding:.5em .8em;margin:.6em 0}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em;display:block;overflow-x:auto}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f3f5f8}td:first-child{text-align:left}h3{font-size:1em;margin-top:1.2em}figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-style:italic;color:#444;margin-top:.3em}ul.meta{padding-left:1.2em}.missing{color:#7a4b00}
"""


def render_html(inputs: ReportInputs, figs: Sequence[Figure]) -> str:
    e = html.escape
    d = inputs.detection
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Super weights of {e(inputs.model)}</title><style>{CSS}</style></head><body>",
        f"<h1>Super weights of {e(inputs.model)}</h1>", '<ul class="meta">',
        f"<li>Model: <code>{e(inputs.model)}</code> ({e(inputs.architecture)}, {d.num_layers} layers)</li>",
    ]
    parts += [f"<li>{e(s)}</li>" for s in text_sources(inputs)]
    parts += [f"<li>{e(s)}</li>" for s in inputs.findings]
    parts += [f"<li>Generated by superweight {e(__version__)}" + (f": <code>{e(inputs.command)}</code>" if inputs.command else "") + "</li>", "</ul>"]
    parts += [f'<div class="note"><b>Note:</b> {e(n)}</div>' for n in inputs.notes]
    parts.append("<h2>Super weights found</h2>")
    if not d.super_weights:
        parts.append("<p>No super weight found.</p>")
    for t in d.tables() if d.super_weights else d.finding_tables():
        parts += _html_table(t)
    for f in figs:
        data = base64.b64encode(f.png).decode("ascii")
        parts += [
            f"<h2>{e(f.title)}</h2>", "<figure>",
            f'<img id="{e(f.name)}" alt="{e(f.title)}" src="data:image/png;base64,{data}">',
            f"<figcaption>{e(f.caption)}</figcaption>", "</figure>",
        ]
    if tables(inputs):
        parts.append("<h2>Numbers</h2>")
        for t in tables(inputs):
            parts += _html_table(t)
    if inputs.missing:
        parts += ["<h2>Not shown</h2>", "<ul>"] + [f'<li class="missing">{e(m)}</li>' for m in inputs.missing] + ["</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------- writing


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing non-empty folder unless ``force`` (call before the expensive work)."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise SuperweightError(f"{out} already exists: pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise SuperweightError(f"{out} is a file: choose a folder for --out")


def write_report(inputs: ReportInputs, figs: Sequence[Figure], out: str | Path, force: bool = False) -> Path:
    """Write report.html, report.md, the PNGs, report.json (and the ablation / sweep JSON used)
    into ``out``, all or nothing."""
    out = Path(out)
    check_out_dir(out, force)
    with staged_dir(out) as tmp:
        for f in figs:
            (tmp / f"{f.name}.png").write_bytes(f.png)
        (tmp / "report.md").write_text(render_markdown(inputs, figs))
        (tmp / "report.html").write_text(render_html(inputs, figs))
        (tmp / "report.json").write_text(json.dumps(report_summary(inputs, figs), indent=2) + "\n")
        for name, data in (("ablation.json", inputs.ablation), ("sweep.json", inputs.sweep)):
            if data is not None:  # the numbers behind Fig. 5-7, kept with the report
                data.save(tmp / name)
    return out


def report_summary(inputs: ReportInputs, figs: Sequence[Figure]) -> dict:
    return {
        "version": 1, "tool_version": __version__, "model": inputs.model, "architecture": inputs.architecture,
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "super_weights": [list(c) for c in inputs.detection.coords], "notes": inputs.notes,
        "text_sources": text_sources(inputs), "findings": inputs.findings, "missing": inputs.missing,
        "figures": [{"file": f"{f.name}.png", "title": f.title, "caption": f.caption, "labels": f.labels} for f in figs],
        "detection": inputs.detection.to_dict(),
    }


# ---------------------------------------------------------------- orchestration


def measure_ablation(loaded, detection: DetectionResult, limit: int) -> AblationResult:
    """The ablation of ``superweight ablate``, run now with ``limit`` items per task."""
    return experiments.run_ablation(loaded, detection, limit=limit)


def measure_sweep(loaded, detection: DetectionResult) -> SweepResult:
    """The quantization sweep of ``superweight sweep`` on its default grid."""
    grid = quant_sweep.default_grid()
    with counter(len(grid), "quantization sweep", "point") as tick:
        return quant_sweep.run_sweep(loaded, detection, grid=grid, progress=tick)


def _optional(label: str, fn, missing: list[str]):
    try:
        return fn()
    except ModuleNotFoundError as exc:
        missing.append(f"{label}: not run: {exc}.")
        log.warning("%s not run: %s", label, exc)
        return None


def _trace(loaded, detection: DetectionResult, missing: list[str]) -> ResidualTrace | None:
    if loaded is None:
        missing.append("Super activation with and without the super weights (Fig. 4): needs a forward pass of the "
                       "model, which a report built from JSON files alone does not load (drop --super-weights to draw it).")
        return None

    with step("tracing the super activation"):
        return residual_trace(loaded.model, loaded.tokenizer, loaded.arch, detection)


def _ablation_part(inputs: ReportInputs, loaded, ablation, do: bool, limit: int) -> None:
    if ablation is not None:
        data = ablation if isinstance(ablation, AblationResult) else AblationResult.load(ablation)
        inputs.ablation, inputs.ablation_source = data, "" if isinstance(ablation, AblationResult) else Path(ablation).name
    elif do and loaded is not None:
        inputs.ablation = _optional("Ablation", lambda: measure_ablation(loaded, inputs.detection, limit), inputs.missing)
        inputs.ablation_source = f"run by this report (--limit {limit})" if inputs.ablation else ""
    else:
        inputs.missing.append("Ablation, stopwords, scaling (Fig. 5-6): pass --ablation JSON or --run-ablation.")


def _sweep_part(inputs: ReportInputs, loaded, sweep, do: bool) -> None:
    if sweep is not None:
        data = sweep if isinstance(sweep, SweepResult) else SweepResult.load(sweep)
        inputs.sweep, inputs.sweep_source = data, "" if isinstance(sweep, SweepResult) else Path(sweep).name
    elif do and loaded is not None:
        inputs.sweep = _optional("Quantization sweep", lambda: measure_sweep(loaded, inputs.detection), inputs.missing)
        inputs.sweep_source = "run by this report" if inputs.sweep else ""
    else:
        inputs.missing.append("Perplexity vs block size (Fig. 7): pass --sweep JSON or --run-sweep.")


def gather(
    loaded, detection: DetectionResult, ablation: str | Path | AblationResult | None = None,
    sweep: str | Path | SweepResult | None = None, do_ablation: bool = False, do_sweep: bool = False,
    limit: int = 20, command: str = "", trace: ResidualTrace | None = None, notes: Sequence[str] = (),
) -> ReportInputs:
    """Everything the report shows: read from result files (or objects), or measured on ``loaded``
    (a ``LoadedModel``; ``None`` builds the report from the results alone, without Fig. 4 unless
    ``trace`` is given: a streamed model's, ``streamed_residual_trace``)."""
    name = loaded.name if loaded is not None else detection.model
    inputs = ReportInputs(
        model=name, architecture=detection.architecture, detection=detection, command=command,
        notes=list(dict.fromkeys([*(loaded.notes if loaded is not None else []), *detection.notes, *notes])),
    )
    inputs.trace = trace or _trace(loaded, detection, inputs.missing)
    names = model_names(loaded.name, loaded.model, loaded.source) if loaded is not None else model_names(name)
    inputs.findings = findings(names, detection)
    _ablation_part(inputs, loaded, ablation, do_ablation, limit)
    _sweep_part(inputs, loaded, sweep, do_sweep)
    return inputs
