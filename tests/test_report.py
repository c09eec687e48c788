"""The report: figure content, the self-contained HTML, all-or-nothing writing, and a real browser."""
from __future__ import annotations

import base64
import html
import io
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from typer.testing import CliRunner

import superweight as sw
from superweight.report import plots
from superweight.report import page as report
from superweight.cli import app
from superweight.core.errors import SuperweightError
from superweight.prove.experiments import AblationConfig, AblationResult, run_ablation
from superweight.quant.sweep import SweepResult, default_grid, run_sweep
from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model

PLANT = (1, 5, 17)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TEXT = "The quick brown fox jumps over the lazy dog. " * 12


def _lm(model, tok):
    return sw.LoadedModel(model, tok, sw.get_arch(model), "tiny", "tiny", [])


@pytest.fixture(scope="module")
def results(planted, tmp_path_factory) -> tuple[AblationResult, SweepResult]:
    """An ablation and a sweep made by the real functions on the planted model, read back from the
    JSON they write: the report is tested on the files the commands produce."""
    model, tok, det = planted
    config = AblationConfig(ppl="wiki-intros", tasks=["piqa", "lambada"], limit=3, max_tokens=96, seq_len=48,
                            top_n=20, scales=(0.0, 1.0, 2.0), scale_tasks=["lambada"], stopword_prompts=3)
    folder = tmp_path_factory.mktemp("results")
    run_ablation(_lm(model, tok), det, config).save(folder / "ablation.json")
    grid = default_grid(bits=(4,), sizes=(1024, 4096), clip_z=3.0, groups=(16,), w8a8=False, ternary_topk=-1)
    run_sweep(_lm(model, tok), det, grid, text=TEXT, max_tokens=96, seq_len=48).save(folder / "sweep.json")
    return AblationResult.load(folder / "ablation.json"), SweepResult.load(folder / "sweep.json")


@pytest.fixture(scope="module")
def planted():
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT, spread=30.0)  # by input spread: input and output both spike (paper Fig. 3 shape)
    tok = byte_tokenizer()
    return model, tok, sw.detect(model, tok)


@pytest.fixture(scope="module")
def inputs(planted, results) -> report.ReportInputs:
    model, tok, det = planted
    arch = sw.get_arch(model)
    return report.ReportInputs(
        model="tiny-planted", architecture=arch.name, detection=det, trace=report.residual_trace(model, tok, arch, det),
        ablation=results[0], ablation_source="ablation.json", sweep=results[1], sweep_source="sweep.json",
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


def test_ablation_figures_show_the_numbers(results):
    abl = results[0]
    o, z = abl.conditions["original"], abl.conditions["zero_super_weights"]
    bars, scaling = report.figures_ablation(abl)
    assert {f"{o.ppl:,.3g}", f"{z.ppl:,.3g}", f"{100 * o.avg_acc:.1f}"} <= set(bars.labels)
    assert bars.caption.startswith(
        f"Zeroing the super weights takes perplexity from {o.ppl:.4g} to {z.ppl:.4g} and mean accuracy from "
        f"{100 * o.avg_acc:.1f}% to {100 * z.avg_acc:.1f}%")
    assert "original (s = 1)" in scaling.labels
    # the scale conditions scored LAMBADA only (--scale-tasks): the figure says so, not "mean zero-shot accuracy"
    assert "LAMBADA accuracy (%)" in scaling.labels and "LAMBADA accuracy peaks at s = " in scaling.caption
    q = plots.scaling_curve([0.0, 1.0], [30.0, 20.0], [0.1, 0.4], acc_label="LAMBADA accuracy")
    assert q.figure.axes[1].get_ylabel() == "LAMBADA accuracy (%)"
    assert list(q.figure.axes[0].lines[0].get_ydata()) == [30.0, 20.0]
    p = plots.ablation_bars(["a", "b"], [10.0, 1000.0], [0.5, 0.25])
    assert [round(b.get_height(), 6) for b in p.figure.axes[0].patches] == [10.0, 1000.0]
    assert [round(b.get_height(), 6) for b in p.figure.axes[1].patches] == [50.0, 25.0]


def test_stopword_figure_gives_the_ratios(results):
    abl = results[0]
    fig = report.figure_stopwords(abl)
    before, after = abl.stopwords["original"], abl.stopwords["zero_super_weights"]
    ratio = f"x{after['stopword_prob'] / before['stopword_prob']:.2g}"
    assert fig.labels[0] == ratio and f"of: stopwords {ratio}, other tokens" in fig.caption
    assert report.figure_stopwords(AblationResult.from_dict({**abl.to_dict(), "stopwords": None})) is None


def test_sweep_figure_has_one_line_per_method(results):
    swp = results[1]
    series, refs = report.sweep_series(swp)
    group = next(r for r in swp.rows if r.group)
    assert refs == {"unquantized": swp.baseline_ppl, "INT4 naive group=16": group.ppl}
    assert list(series) == ["INT4 naive", "INT4 naive+SW", "INT4 clip", "INT4 clip+SW"]
    naive = [(float(r.block), r.ppl) for r in swp.rows if r.variant == "naive" and r.block]
    assert series["INT4 naive"] == naive
    p = plots.block_size_curves(series, refs)
    ax = p.figure.axes[0]
    assert [line.get_label() for line in ax.lines[:4]] == list(series)
    assert list(ax.lines[0].get_ydata()) == [ppl for _, ppl in naive]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32x32", "64x64"]
    assert p.labels == [f"unquantized: {swp.baseline_ppl:.4g}", f"INT4 naive group=16: {group.ppl:.4g}"]
    assert "INT4 clip+SW beats naive at" in report.sweep_caption(series)


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
    for text in ("tiny-planted", "baselines come from a test model", "wiki-intros", "Apple Inc.", "scale conditions: LAMBADA accuracy"):
        assert text in page
    assert inputs.detection.activations  # the planted weight makes a super activation: its table is on the page
    for table in [*inputs.detection.tables(), *inputs.ablation.tables(), *inputs.sweep.tables()]:  # the CLI's tables
        assert "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in table.rows[0]) + "</tr>" in page
    assert AblationResult.load(out / "ablation.json") == inputs.ablation
    assert SweepResult.load(out / "sweep.json") == inputs.sweep
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
    got = report.gather(_lm(model, tok), det)
    assert any("--ablation" in m for m in got.missing) and any("--sweep" in m for m in got.missing)
    assert got.findings[0] == "Catalog: not in catalog"
    assert "--tensor-type ^blk\\.1\\.ffn_down\\.weight$=f16" in got.findings[1]
    out = report.write_report(got, report.build_figures(got), tmp_path / "r")
    assert "Not shown" in (out / "report.html").read_text()


def test_run_ablation_passes_the_limit(planted, results, monkeypatch):
    import superweight.prove.experiments as experiments

    model, tok, det = planted
    seen = {}
    monkeypatch.setattr(experiments, "run_ablation", lambda loaded, sws, **kw: seen.update(kw, sws=sws) or results[0])
    got = report.gather(_lm(model, tok), det, do_ablation=True, limit=7)
    assert seen == {"limit": 7, "sws": det} and got.ablation is results[0]
    assert "--limit 7" in got.ablation_source


def test_report_cli_on_a_model_folder(tmp_path, results):
    folder = tmp_path / "tiny"
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    results[0].save(tmp_path / "abl.json")
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


def test_report_from_files_alone_does_not_load_the_model(planted, results, tmp_path, monkeypatch):
    import superweight.cli.report as cli_report

    _, _, det = planted
    det.save(tmp_path / "sw.json")
    results[0].save(tmp_path / "abl.json")
    results[1].save(tmp_path / "sweep.json")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_report, "load_lm", no_load)
    args = ["report", "--out", str(tmp_path / "rep"), "--super-weights", str(tmp_path / "sw.json"),
            "--ablation", str(tmp_path / "abl.json"), "--sweep", str(tmp_path / "sweep.json")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert sorted(p.stem for p in (tmp_path / "rep").glob("*.png")) == [
        "fig3_down_proj_maxima", "fig5_stopwords", "fig6_ablation", "fig6_scaling", "fig7_block_size"]
    assert "Fig. 4" in (tmp_path / "rep" / "report.md").read_text()  # said to be left out, and why


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
    assert "bit-quantized model, not of the original release" in page  # the GGUF-baseline note
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


def test_run_sweep_uses_the_default_grid_with_progress(planted, results, monkeypatch):
    import superweight.quant.sweep as sweep_mod

    model, tok, det = planted
    seen = {}

    def fake(loaded, keep, grid=None, progress=None, **kw):
        seen.update(keep=keep, points=len(grid))
        for _ in grid:
            progress(None)
        return results[1]

    monkeypatch.setattr(sweep_mod, "run_sweep", fake)
    got = report.gather(_lm(model, tok), det, do_sweep=True)
    assert got.sweep is results[1] and seen == {"keep": det, "points": len(sweep_mod.default_grid())}
    assert [f.name for f in report.build_figures(got)][-1] == "fig7_block_size"


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma2ForCausalLM", "MixtralForCausalLM"])
def test_streamed_residual_trace_is_the_in_memory_one(arch, tmp_path):
    """Fig. 4's two runs (with and without the super weights) through each layer read once: the same numbers."""
    model = tiny_model(arch)
    plant_super_weight(model, *PLANT)  # Mixtral: in expert 0
    model.save_pretrained(tmp_path / "m", max_shard_size="60KB")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    lm = sw.load_model(str(tmp_path / "m"))
    det = sw.detect(lm.model, lm.tokenizer)
    assert det.super_weights
    mem = report.residual_trace(lm.model, lm.tokenizer, lm.arch, det)
    assert report.streamed_residual_trace(tmp_path / "m", det) == mem
    assert mem.sa_with != mem.sa_without


def test_report_cli_streams_a_model_folder(tmp_path, results, monkeypatch):
    """``report --stream --run-ablation``: detection, the Fig. 4 trace and the ablation's perplexity and
    stopwords streamed, every figure but the sweep's; ``--run-sweep`` streams the sweep, W8A8 points included."""
    folder = tmp_path / "tiny"
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    model.save_pretrained(folder, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(folder)
    res = CliRunner().invoke(app, ["report", str(folder), "--stream", "--run-ablation", "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "rep").glob("*.png")) == [
        "fig3_down_proj_maxima.png", "fig4_super_activation.png", "fig5_stopwords.png", "fig6_ablation.png", "fig6_scaling.png",
    ]
    page = (tmp_path / "rep" / "report.md").read_text()
    assert "run by this report (streamed)" in page and "every condition through each layer read" in page
    results[0].save(tmp_path / "abl.json")
    import superweight.quant.sweep as sweep_module

    small = sweep_module.default_grid(bits=(4,), sizes=(1024,), groups=(32,), ternary_topk=-1)  # the tiny model's 64 inputs
    assert any(p.family == "w8a8" for p in small)
    monkeypatch.setattr(sweep_module, "default_grid", lambda **kw: small)
    res = CliRunner().invoke(app, ["report", str(folder), "--stream", "--run-sweep", "--ablation", str(tmp_path / "abl.json"),
                                   "--out", str(tmp_path / "rep2")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep2" / "fig7_block_size.png").is_file()
    assert "run by this report (streamed)" in (tmp_path / "rep2" / "report.md").read_text()
