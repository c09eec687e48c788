"""The report command."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..core.files import check_output
from .inputs import check_prompts, check_super_weights, check_super_weights_early, read_results, read_super_weights

from .app import app, console, detect_default, load_lm, mode_of, open_streamed, setup_logging
from .options import ModelArg, ModelOptions, grouped
from ..report import page as rep
from ..find.loop import DEFAULT_PROMPT
from ..prove.experiments import AblationConfig
from ..core.progress import step
from ..quant import sweep as quant_sweep
from ..prove.streamed import stream_ablation
from ..find.streamed import stream_detect
from ..quant.streamed_sweep import stream_sweep
from ..model.mode import Mode
from ..model.source import ModelSource
from ..model.streamed import StreamedModel


def _streamed_inputs(sm: StreamedModel, detection, ablation, sweep, run_ablation: bool, run_sweep: bool, limit: int,
                     prompt, command: str):
    """The report's inputs for a model read layer by layer: detection (unless given), the Fig. 4 trace, the
    ablation (``--run-ablation``) and the sweep (``--run-sweep``) streamed."""
    if detection is None:
        with step("detecting super weights (streamed)"):
            detection = stream_detect(sm, list(prompt or [DEFAULT_PROMPT]), model_name=sm.source.ref)
    with step("tracing the super activation (streamed)"):
        trace = rep.streamed_residual_trace(sm, detection)
    note = []
    if run_ablation and ablation is None:
        with step("ablation (streamed: every condition through each layer read)"):
            ablation = stream_ablation(sm, detection, AblationConfig(limit=limit), model_name=sm.source.ref)
        note = ["streamed: the ablation ran every condition through each layer read"]
    swept = run_sweep and sweep is None
    if swept:
        grid = quant_sweep.default_grid()  # through the module: a test narrows the grid there
        with step(f"sweep (streamed: {len(grid)} points through each layer read)"):
            sweep = stream_sweep(sm, detection, grid, model_name=sm.source.ref)
    inputs = rep.gather(None, detection, ablation, sweep, False, False, command=command, trace=trace, notes=note)
    if note:
        inputs.ablation_source = "run by this report (streamed)"
    if swept:
        inputs.sweep_source = "run by this report (streamed)"
    return inputs


@app.command()
@grouped
def report(
    model: str = ModelArg,
    out: Path = typer.Option(..., "--out", help="Folder for report.html, report.md and the PNGs (written all or nothing)."),
    ablation: Optional[Path] = typer.Option(None, "--ablation", help="An ablation JSON (`superweight ablate --json`)."),
    sweep: Optional[Path] = typer.Option(None, "--sweep", help="A sweep JSON (`superweight sweep --json`)."),
    super_weights: Optional[Path] = typer.Option(
        None, "--super-weights", help="A detection JSON (`superweight detect --json`): no detection is run, and with "
        "--ablation and --sweep the model is not loaded at all (the Fig. 4 trace, which needs it, is then left out).",
    ),
    run_ablation: bool = typer.Option(False, "--run-ablation", help="Run the ablation now (slow; see --limit)."),
    run_sweep: bool = typer.Option(False, "--run-sweep", help="Run the quantization sweep now (slow)."),
    limit: int = typer.Option(20, "--limit", min=1, help="Items per task when --run-ablation evaluates accuracy."),
    prompt: List[str] = typer.Option(None, "--prompt", "-p", help="Detection prompt(s). Default: the paper's."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
    stream: bool = typer.Option(
        False, "--stream", help="Read a local safetensors model one layer at a time (automatic when it does not fit in "
        "memory): detection, the Fig. 4 trace, --run-ablation and --run-sweep stream."
    ),
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Write a one-page report (HTML with embedded figures, Markdown + PNGs) of MODEL's super weights."""
    setup_logging(opts.verbose, opts.quiet)
    rep.check_out_dir(out, force)
    check_output(out, "--out", folder=True)
    check_prompts(prompt)
    detection = read_super_weights(super_weights) if super_weights else None  # before the model loads:
    read_results(ablation, sweep)  # a wrong path or file costs nothing
    needs_model = detection is None or run_ablation or run_sweep
    source = ModelSource.of(model) if needs_model else None  # resolved once, and only when it is used
    if detection is not None and needs_model:
        check_super_weights_early(detection, source, super_weights, opts.cache_dir, to_ablate=run_ablation)
    flags = [f"--super-weights {super_weights}" if super_weights else "",
             f"--ablation {ablation}" if ablation else "", f"--sweep {sweep}" if sweep else "",
             f"--run-ablation --limit {limit}" if run_ablation else "", "--run-sweep" if run_sweep else ""]
    command = " ".join(x for x in ["superweight report", model, f"--out {out}", *flags, *(f"-p {p!r}" for p in prompt or [])] if x)
    if needs_model and mode_of(source, stream, opts) is Mode.STREAM:
        with open_streamed(source, opts) as sm:
            inputs = _streamed_inputs(sm, detection, ablation, sweep, run_ablation, run_sweep, limit, prompt, command)
    else:
        lm = load_lm(source, opts, dequantize=True) if needs_model else None
        if lm is not None and detection is not None:
            check_super_weights(detection, lm, super_weights)
        detection = detection or detect_default(lm, prompt)
        inputs = rep.gather(lm, detection, ablation, sweep, run_ablation, run_sweep, limit, command)
    figs = rep.build_figures(inputs)
    rep.write_report(inputs, figs, out, force)
    console.print(f"wrote {out}/report.html, report.md and {len(figs)} figures", highlight=False)
    for m in inputs.missing:
        console.print(f"  not shown: {m}", highlight=False)
