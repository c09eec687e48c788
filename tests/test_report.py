"""The report: figure content, the self-contained HTML, all-or-nothing writing, and a real browser."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from typer.testing import CliRunner

import superweight as sw
from superweight import plots, report
from superweight.cli import app
from superweight.errors import SuperweightError
from superweight.synthetic import byte_tokenizer, plant_super_weight, tiny_model

PLANT = (1, 5, 17)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ABLATION = {
    "version": 1, "ppl_source": "wikitext2", "tasks": ["piqa", "lambada"], "limit": 20,
    "conditions": {
        "original": {"ppl": 21.5, "tasks": {"piqa": {"acc": 0.65, "ci": [0.6, 0.7], "n": 20}, "lambada": {"acc": 0.4, "n": 20}}},
        "zero_super_weights": {"ppl": 1830.0, "tasks": {"piqa": {"acc": 0.5, "n": 20}, "lambada": {"acc": 0.0, "n": 20}}},
        "zero_top_non_super": {"ppl": 23.0, "tasks": {"piqa": {"acc": 0.64, "n": 20}, "lambada": {"acc": 0.38, "n": 20}}},
        "scale_0": {"ppl": 1830.0, "tasks": {"piqa": {"acc": 0.5, "n": 20}}},
        "scale_1": {"ppl": 21.5, "tasks": {"piqa": {"acc": 0.65, "n": 20}}},
        "scale_2": {"ppl": 22.0, "tasks": {"piqa": {"acc": 0.66, "n": 20}}},
    },
    "stopwords": {
        "original": {"stopword_prob": 0.1, "other_prob": 0.02, "per_token": {"the": 0.05, ",": 0.01}},
        "zero_super_weights": {"stopword_prob": 0.3, "other_prob": 0.01, "per_token": {"the": 0.1, ",": 0.1}},
    },
    "top5": {"prompt": "Summer is hot. Winter is", "original": [[" cold", 0.814], [" a", 0.05]],
             "zero_super_weights": [[" the", 0.09], [" a", 0.08]]},
}
SWEEP = {
    "version": 1, "text": "wikitext2", "max_tokens": 2048, "baseline_ppl": 20.0,
    "rows": [{"family": "fp", "variant": "fp", "bits": None, "block": None, "ppl": 20.0}]
    + [{"family": "rtn", "variant": v, "bits": 4, "block": b, "ppl": p}
       for v, pts in (("naive", ((4096, 25.0), (16384, 60.0))), ("clip+SW", ((4096, 23.0), (16384, 30.0))))
       for b, p in pts]
    + [{"family": "rtn", "variant": "naive", "bits": 4, "block": None, "group": 128, "granularity": "group=128", "ppl": 22.0},
       {"family": "w8a8", "variant": "naive", "bits": 8, "block": None, "ppl": 21.0}],
}


@pytest.fixture(scope="module")
def planted():
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    tok = byte_tokenizer()
    return model, tok, sw.detect(model, tok)


@pytest.fixture(scope="module")
def inputs(planted) -> report.ReportInputs:
    model, tok, det = planted
    arch = sw.get_arch(model)
    return report.ReportInputs(
        model="tiny-planted", architecture=arch.name, detection=det, trace=report.residual_trace(model, tok, arch, det),
        ablation=ABLATION, ablation_source="ablation.json", sweep=SWEEP, sweep_source="sweep.json",
        notes=["baselines come from a test model"],
    )


def _png_ok(data: bytes) -> np.ndarray:
    assert data.startswith(PNG_MAGIC)
    return mpimg.imread(io.BytesIO(data), format="png")


# ---------------------------------------------------------------- figure content


def test_spike_labels_name_the_detected_channels(planted):
    _, _, det = planted
    fig = report.figure_down_proj(det)
    layer, row, col = PLANT
    assert fig.labels == [f"L{layer}: ch {col}", f"L{layer}: ch {row}"]  # input panel: col; output panel: row
    assert f"layers {layer}" in fig.caption
    assert _png_ok(fig.png).shape[1] > 800


def test_down_proj_panels_are_log_scale_and_plot_the_maxima():
    ins, outs = [1.0, 500.0, 2.0, 1.5], [3.0, 4000.0, 2.5, 3.5]
    p = plots.down_proj_maxima(ins, [0, 17, 3, 4], outs, [1, 5, 2, 2], [1], [1])
    assert [ax.get_yscale() for ax in p.figure.axes] == ["log", "log"]
    assert list(p.figure.axes[0].lines[0].get_ydata()) == ins
    assert [t.get_text() for t in p.figure.axes[1].texts] == ["L1: ch 5"]


def test_super_activation_trace_follows_the_planted_row(planted, inputs):
    model, _, _ = planted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = inputs.trace
    assert t.channel == PLANT[1] and t.first == PLANT[0] + 0
    assert all(a > 10 * b for a, b in zip(t.sa_with[t.first:], t.sa_without[t.first:]))
    assert t.drop > 0.9
    fig = report.figure_super_activation(t)
    assert f"SA channel {PLANT[1]}: {t.sa_with[t.first]:,.0f}" in fig.labels
    assert f"{t.drop:.0%}" in fig.caption
    assert all((before[k] == v).all() for k, v in model.state_dict().items())  # trace restored the weights


def test_ablation_figures_show_the_numbers():
    bars, scaling = report.figures_ablation(ABLATION)
    assert {"1.83e+03", "21.5", "23"} <= set(bars.labels)  # ppl bar labels
    assert "52.5" in bars.labels  # mean accuracy of the original model, in %
    assert "original (s = 1)" in scaling.labels
    assert bars.caption.startswith("Zeroing the super weights takes perplexity from 21.5 to 1830 and mean accuracy from 52.5% to 25.0%")
    assert "lowest (21.5) at s = 1" in scaling.caption and "peaks at s = 2 (66.0%)" in scaling.caption
    p = plots.ablation_bars(["a", "b"], [10.0, 1000.0], [0.5, 0.25])
    assert [round(b.get_height(), 6) for b in p.figure.axes[0].patches] == [10.0, 1000.0]
    assert [round(b.get_height(), 6) for b in p.figure.axes[1].patches] == [50.0, 25.0]


def test_stopword_figure_gives_the_ratios():
    fig = report.figure_stopwords(ABLATION)
    assert fig.labels == ["x3", "x0.5", "x2", "x10"]
    assert "of: stopwords x3, other tokens x0.5;" in fig.caption
    assert report.figure_stopwords({"conditions": {}}) is None


def test_sweep_figure_has_one_line_per_method():
    series, refs = report.sweep_series(SWEEP)
    assert refs == {"unquantized": 20.0, "INT4 naive group=128": 22.0}
    assert series == {"INT4 naive": [(4096.0, 25.0), (16384.0, 60.0)], "INT4 clip+SW": [(4096.0, 23.0), (16384.0, 30.0)]}
    p = plots.block_size_curves(series, refs)
    ax = p.figure.axes[0]
    assert [line.get_label() for line in ax.lines[:2]] == ["INT4 naive", "INT4 clip+SW"]
    assert list(ax.lines[1].get_ydata()) == [23.0, 30.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64x64", "128x128"]
    assert p.labels == ["unquantized: 20", "INT4 naive group=128: 22"]
    assert "INT4 clip+SW beats naive at 2 of 2 block sizes (64x64, 128x128)" in report.sweep_caption(series)


# ---------------------------------------------------------------- writing


def test_report_html_embeds_every_figure(inputs, tmp_path):
    figs = report.build_figures(inputs)
    assert [f.name for f in figs] == [
        "fig3_down_proj_maxima", "fig4_super_activation", "fig5_stopwords", "fig6_ablation", "fig6_scaling", "fig7_block_size",
    ]
    out = report.write_report(inputs, figs, tmp_path / "rep")
    page = (out / "report.html").read_text()
    embedded = re.findall(r'<img id="([^"]+)" alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert [name for name, _ in embedded] == [f.name for f in figs]
    for name, data in embedded:
        assert base64.b64decode(data) == (out / f"{name}.png").read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: opens offline
    for text in ("tiny-planted", "baselines come from a test model", "wikitext2", "Apple Inc."):
        assert text in page
    assert "<td>zero_super_weights</td><td>1830</td><td>0.250</td>" in page  # the ablation's numbers
    assert "<td>16384</td><td>60</td><td>30</td>" in page  # the sweep's INT4 table
    assert "<td>1</td><td>&#x27; cold&#x27; 81.4%</td><td>&#x27; the&#x27; 9.0%</td>" in page  # top-5 table
    assert json.loads((out / "sweep.json").read_text()) == SWEEP and json.loads((out / "ablation.json").read_text()) == ABLATION
    md = (out / "report.md").read_text()
    assert all(f"]({f.name}.png)" in md and f.caption in md for f in figs)


def test_existing_output_needs_force_and_failure_leaves_nothing(inputs, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    figs = report.build_figures(inputs)[:1]
    report.write_report(inputs, figs, out)
    with pytest.raises(SuperweightError, match="--force"):
        report.write_report(inputs, figs, out)
    first = (out / "report.html").read_text()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "render_html", boom)
    with pytest.raises(RuntimeError):
        report.write_report(inputs, figs, out, force=True)
    assert (out / "report.html").read_text() == first  # the old report is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temporary folder left
    monkeypatch.undo()
    report.write_report(inputs, figs, out, force=True)


def test_missing_parts_are_said_on_the_page(planted, tmp_path):
    model, tok, det = planted
    lm = sw.LoadedModel(model, tok, sw.get_arch(model), "tiny", "tiny", [])
    got = report.gather(lm, det)
    assert any("--ablation" in m for m in got.missing) and any("--sweep" in m for m in got.missing)
    assert got.findings[0] == "Catalog: not in catalog"
    assert "--tensor-type ^blk\\.1\\.ffn_down\\.weight$=f16" in got.findings[1]
    out = report.write_report(got, report.build_figures(got), tmp_path / "r")
    assert "Not shown" in (out / "report.html").read_text()


def test_run_ablation_passes_the_limit_and_degrades_when_absent(planted, monkeypatch):
    import sys

    import superweight.experiments as experiments

    model, tok, det = planted
    lm = sw.LoadedModel(model, tok, sw.get_arch(model), "tiny", "tiny", [])
    seen = {}

    class Result:
        def to_dict(self):
            return ABLATION

    monkeypatch.setattr(experiments, "run_ablation", lambda loaded, sws, **kw: seen.update(kw, sws=sws) or Result())
    got = report.gather(lm, det, do_ablation=True, limit=7)
    assert seen == {"limit": 7, "sws": det} and got.ablation == ABLATION
    assert "--limit 7" in got.ablation_source
    monkeypatch.setitem(sys.modules, "superweight.experiments", None)  # as if the module were not installed
    got = report.gather(lm, det, do_ablation=True)
    assert got.ablation is None and any(m.startswith("Ablation: not run") for m in got.missing)


def test_report_cli_on_a_model_folder(tmp_path):
    folder = tmp_path / "tiny"
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    (tmp_path / "abl.json").write_text(json.dumps(ABLATION))
    res = CliRunner().invoke(app, ["report", str(folder), "--out", str(tmp_path / "rep"), "--ablation", str(tmp_path / "abl.json")])
    assert res.exit_code == 0, res.output
    assert "\r" not in res.output  # no progress bar when stdout is not a terminal
    page = (tmp_path / "rep" / "report.html").read_text()
    assert f"superweight report {folder} --out {tmp_path / 'rep'} --ablation {tmp_path / 'abl.json'}</code>" in page
    assert sorted(p.name for p in (tmp_path / "rep").glob("*.png")) == [
        "fig3_down_proj_maxima.png", "fig4_super_activation.png", "fig5_stopwords.png", "fig6_ablation.png", "fig6_scaling.png",
    ]
    res = CliRunner().invoke(app, ["report", str(folder), "--out", str(tmp_path / "rep")])
    assert res.exit_code != 0 and "--force" in str(res.exception)


# ---------------------------------------------------------------- a real browser


def chromium() -> str:
    """The chromium binary; the test skips (with the command to install it) when it is absent: a
    test suite never installs system packages (`.ci/run` installs chromium before the tests)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (Debian: `apt-get install -y chromium`; .ci/run installs it)")
    return found


def _browser(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_smollm2_report_renders_in_headless_chromium(smollm2, tmp_path):
    binary = chromium()
    det = sw.detect(smollm2.model, smollm2.tokenizer, model_name=smollm2.name, arch=smollm2.arch)
    got = report.gather(smollm2, det)
    figs = report.build_figures(got)
    out = report.write_report(got, figs, tmp_path / "smollm2")
    page = (out / "report.html").read_text()
    assert "4-bit" in page  # the GGUF-baseline note
    # A copy with a probe script: the title becomes the number of decoded images.
    probe = out / "probe.html"
    probe.write_text(page.replace(
        "</body>",
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.title='decoded '+i.filter(x=>x.complete&&x.naturalWidth>0).length+' of '+i.length;});</script></body>",
    ))
    dom = _browser(binary, tmp_path / "profile", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', dom.stdout)) == len(figs)
    assert f"<title>decoded {len(figs)} of {len(figs)}</title>" in dom.stdout
    shot = tmp_path / "shot.png"
    res = _browser(binary, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,1800", (out / "report.html").as_uri())
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1800, 1200)
    assert pixels.std() > 0.05 and (pixels < 0.5).mean() > 0.005  # not blank: text and plot lines drawn


def test_run_sweep_uses_the_default_grid_with_progress(planted, monkeypatch):
    import superweight.quant.sweep as sweep_mod

    model, tok, det = planted
    lm = sw.LoadedModel(model, tok, sw.get_arch(model), "tiny", "tiny", [])
    seen = {}

    class Result:
        def to_dict(self):
            return SWEEP

    def fake(loaded, keep, grid=None, progress=None, **kw):
        seen.update(keep=keep, points=len(grid))
        for _ in grid:
            progress(None)
        return Result()

    monkeypatch.setattr(sweep_mod, "run_sweep", fake)
    got = report.gather(lm, det, do_sweep=True)
    assert got.sweep == SWEEP and seen == {"keep": det, "points": len(sweep_mod.default_grid())}
    assert [f.name for f in report.build_figures(got)][-1] == "fig7_block_size"
