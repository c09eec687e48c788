"""Console tables of every command: one printer per result, shared by the commands."""
from __future__ import annotations

from rich.table import Table

from ..core.results import Table as ResultTable

from .app import console


def print_super_weights(result) -> None:
    print_tables([result.weight_table()])
    n_prompts = len(result.prompts)
    if not result.super_weights:
        console.print("No super weight found: no super activation in the residual stream, or none made by a down-projection weight.")
    if n_prompts > 1:
        verdict = "agree" if result.agree else "DIFFER"
        console.print(f"Coordinates across {n_prompts} prompts: {verdict}.")
        if not result.agree:
            for p, coords in zip(result.prompts, result.per_prompt):
                console.print(f"  {p[:40]!r}: {coords}")
    if any(sw.late_layer for sw in result.super_weights):
        console.print(
            "(late) marks a spike in the last quarter of the model; the paper reports one for "
            "Llama-2-7B layer 30. `superweight ablate` measures whether it matters."
        )


def print_layers(result) -> None:
    header = ["layer", "max|in|", "in ch", "max|out|", "out ch", "token", "max|resid|", "resid ch"]
    rows = [[str(s.layer), f"{s.input.magnitude:.4g}", str(s.input.channel), f"{s.output.magnitude:.4g}",
             str(s.output.channel), str(s.output.token), f"{s.residual.magnitude:.4g}", str(s.residual.channel)]
            for s in result.layers]
    print_tables([ResultTable("Per-layer maxima (unmodified model, first prompt)", header, rows)])


def print_magnitude(mag) -> None:
    pct = 100.0 * mag.total_flagged / max(mag.total_weights, 1)
    console.print(
        f"Magnitude z-score scan ({mag.scope}, z > {mag.threshold:g}): {mag.total_flagged:,} of "
        f"{mag.total_weights:,} weights flagged ({pct:.2f}%)."
    )
    for r in mag.super_weights:
        where = f"rank {r.rank_in_flagged:,} of {mag.total_flagged:,} flagged" if r.flagged else "NOT flagged"
        expert = "" if r.expert is None else f" expert {r.expert}"
        console.print(f"  super weight {r.layer}:[{r.row}, {r.col}]{expert} z={r.z:.1f}: {where}")
    if mag.top:
        t = mag.top[0]
        console.print(f"  highest z: {t['module']}[{t['row']}, {t['col']}] z={t['z']:.1f} value={t['value']:+.4g}")


def print_verdict(v) -> None:
    colour = {"agree": "green", "differ": "red"}.get(v.status, "yellow")
    fmt = lambda cs: ", ".join(f"{c[0]}: [{c[1]}, {c[2]}]" for c in cs) or "none"  # noqa: E731
    console.print(f"[bold {colour}]{v.status}[/]: {v.model}", highlight=False)
    if v.entry is None:
        console.print(f"  detected: {fmt(v.detected)}", highlight=False)
        console.print("  No catalog entry matches this model's names; see `superweight catalog`.")
        return
    console.print(f"  catalog entry {v.entry} (matched {v.matched_name!r}; source: {v.source.get('kind')})", highlight=False)
    console.print(f"  catalog:  {fmt(v.catalog)}", highlight=False)
    console.print(f"  detected: {fmt(v.detected)}", highlight=False)
    if v.missing:
        console.print(f"  [red]in the catalog, not detected:[/] {fmt(v.missing)}", highlight=False)
    if v.extra:
        console.print(f"  [red]detected, not in the catalog:[/] {fmt(v.extra)}", highlight=False)
    if v.extra_late:
        console.print(f"  late-layer spikes not in the catalog (do not count): {fmt(v.extra_late)}", highlight=False)
    for note in v.notes:
        console.print(f"  note: {note}", highlight=False)


def print_sweep_tables(result) -> None:
    print_tables(result.tables())


def plain_table(t) -> str:
    """A ``results.Table`` as plain text for a pipe or a file: the title, then one line per row, columns
    two spaces apart (the first left-aligned, the rest right-aligned), no border, no cell cut or wrapped."""
    rows = [[" ".join(str(c).split("\n")) for c in r] for r in [t.header, *t.rows]]
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(t.header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([t.title, *(line(r) for r in rows)])


def print_tables(tables) -> None:
    """Print ``results.Table`` objects (every result's ``tables()``): rich tables on a terminal, the
    compact ``plain_table`` layout elsewhere (a pipe or a file has no width to fit, so nothing is cut)."""
    for t in tables:
        if not console.is_terminal:
            console.print(plain_table(t) + "\n", markup=False, highlight=False, soft_wrap=True)
            continue
        table = Table(title=t.title)
        for h in t.header:
            table.add_column(h.replace("[", "\\["), justify="right")
        for r in t.rows:
            table.add_row(*r)
        console.print(table)


def print_ablation_table(result) -> None:
    print_tables(result.tables()[:1])
    ns = {t: r.n for c in result.conditions.values() for t, r in c.tasks.items()}
    if ns:
        console.print("n: " + ", ".join(f"{t} {n}" for t, n in ns.items()), highlight=False)
    tokens = next((c.ppl_tokens for c in result.conditions.values() if c.ppl_tokens), None)
    if tokens:
        console.print(f"PPL over {tokens:,} tokens ({result.config.ppl}).", highlight=False)


def print_stopwords(result) -> None:
    if result.stopwords:
        b, a = result.stopwords["original"], result.stopwords["zero_super_weights"]
        console.print(
            f"Stopwords over {result.stopwords['prompts']} LAMBADA contexts (original -> super weights zeroed): "
            f"mean stopword prob {b['stopword_prob']:.3g} -> {a['stopword_prob']:.3g}, other tokens "
            f"{b['other_prob']:.3g} -> {a['other_prob']:.3g}, next-word prob {b['target_prob']:.3g} -> {a['target_prob']:.3g}",
            highlight=False,
        )
    if result.top5:
        for key in ("original", "zero_super_weights"):
            toks = ", ".join(f"{t!r} {100 * p:.1f}%" for t, p in result.top5[key])
            console.print(f"{result.top5['prompt']!r} ({key}): {toks}", highlight=False, markup=False)
