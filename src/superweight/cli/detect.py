"""Commands that find and check super weights: detect, catalog, verify, llama-cpp-overrides."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..core.errors import SuperweightError
from .inputs import check_prompts, read_super_weights
from .app import check_json_out, write_json_out, app, console, detect_default, err_console, load_lm, setup_logging
from .options import ModelArg, ModelOptions, QuietOpt, grouped
from .console import print_layers, print_magnitude, print_super_weights, print_tables, print_verdict
from ..find.loop import DEFAULT_PROMPT, SpikeRule
from ..find.api import FindConfig, find_super_weights
from ..find.trace import TraceRule
from ..eval.text import load_text
from ..find.catalog import Catalog, model_names, verify as run_verify
from ..quant import llama_cpp


@app.command()
@grouped
def detect(
    model: str = ModelArg,
    prompt: List[str] = typer.Option(None, "--prompt", "-p", help="Prompt(s); repeat to compare. Default: the paper's."),
    method: str = typer.Option(
        "default", "--method",
        help="default (trace the super activation, attribute every rise), paper (the paper's exact spike rule), "
        "magnitude (z-score scan) or both (default + magnitude).",
    ),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned result here."),
    max_iter: int = typer.Option(10, "--max-iter", min=1, help="Most detect-zero-rerun iterations per prompt."),
    floor: float = typer.Option(50.0, "--floor", help="Paper method: absolute |activation| floor."),
    ratio: float = typer.Option(50.0, "--ratio", help="Paper method: times the median of the other layers' maxima."),
    sa_ratio: float = typer.Option(2000.0, "--sa-ratio", help="Default method: |h| / its layer's median |h| of a super activation."),
    sa_fallback: float = typer.Option(
        100.0, "--sa-fallback", min=0.0,
        help="Default method: when nothing reaches --sa-ratio, trace the channels that reach this and stand 5x above the rest (0: off).",
    ),
    verdict: bool = typer.Option(True, "--verdict/--no-verdict", help="Zero each finding and measure the damage (streamed too: every finding in one pass per read)."),
    verdict_tokens: int = typer.Option(1024, "--verdict-tokens", min=16, help="Tokens of text the verdict scores (at most)."),
    verdict_full: bool = typer.Option(
        False, "--verdict-full", help="Score every zeroed set and null draw on the whole text, late / cancelling weights too (default: each set stops once its label is decided)."
    ),
    verdict_text: str = typer.Option("wiki-intros", "--verdict-text", help="wiki-intros, wikitext2 or a text file."),
    z_threshold: float = typer.Option(3.0, "--z-threshold", help="Magnitude method: mean + z * std of |W|."),
    all_linear: bool = typer.Option(False, "--all-linear", help="Magnitude method: scan every linear layer."),
    stream: bool = typer.Option(
        False, "--stream", help="Read a local safetensors model one layer at a time (automatic when it does not fit in memory)."
    ),
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Find the super weights of MODEL (default: the built-in SmolLM2-135M), and what zeroing each costs."""
    setup_logging(opts.verbose, opts.quiet)
    check_prompts(prompt)
    config = FindConfig(
        method=method, prompts=tuple(prompt or [DEFAULT_PROMPT]), rule=SpikeRule(floor=floor, ratio=ratio),
        trace_rule=TraceRule(ratio=sa_ratio, fallback_ratio=sa_fallback), max_iter=max_iter, verdict_text=_verdict_text(verdict_text) if verdict else None,
        verdict_tokens=verdict_tokens, verdict_full=verdict_full, z_threshold=z_threshold, scope="all_linear" if all_linear else "down_proj",
    )
    check_json_out(json_path)
    result, mag = find_super_weights(model, config, stream or "auto", opts.dtype, opts.cache_dir, opts.device, opts.device_map,
                                     opts.held_bytes)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    if method != "magnitude":
        print_super_weights(result)
        print_activations(result)
    if mag is not None:
        print_magnitude(mag)
    if opts.verbose:
        print_layers(result)
    write_json_out(json_path, result.to_dict())


def _verdict_text(source: str) -> str:
    try:
        return load_text(source)
    except SuperweightError as exc:
        raise SuperweightError(f"{exc} (or pass --no-verdict)") from None


def print_activations(result) -> None:
    """The super activations (where each rises and falls), what made each sublayer-only change, the verdicts."""
    print_tables(result.finding_tables())
    for s in result.sources:
        if not s.weights:
            console.print(f"  layer {s.layer} {s.role} channel {s.channel}: {s.note}", highlight=False)


@app.command("catalog")
def catalog_cmd(
    catalog_path: Optional[Path] = typer.Option(None, "--catalog", help="A catalog JSON file (default: the shipped one)."),
    json_out: bool = typer.Option(False, "--json", help="Print the catalog as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print each entry's notes and provenance."),
    quiet: bool = QuietOpt,
) -> None:
    """List the published super weight coordinates and where each comes from."""
    import json

    setup_logging(verbose, quiet)
    cat = Catalog.load(catalog_path)
    if json_out:
        print(json.dumps(cat.to_dict(), indent=2))
        return
    table = Table(title=f"Super weight catalog ({cat.path}): layer: \\[row, col] of the down-projection", highlight=False)
    for col in ("id", "matches", "super weights (layer: \\[row, col])", "source"):
        table.add_column(col)
    for e in cat.entries:
        coords = "; ".join(f"{c.layer}: \\[{c.row}, {c.col}]{' late' if c.late_layer else ''}" for c in e.super_weights)
        table.add_row(e.id, "\n".join(e.match), coords, e.source["kind"])
    console.print(table)
    for e in cat.entries:
        for note in e.notes if verbose or e.source["kind"] != "measured" else []:
            console.print(f"{e.id}: {note}", highlight=False)
        if verbose and e.source["kind"] == "measured":
            console.print(f"{e.id}: {e.source}", highlight=False)
    for kind, ref in cat.sources.items():
        console.print(f"[bold]{kind}[/]: {ref}", highlight=False)


@app.command()
@grouped
def verify(
    model: str = ModelArg,
    catalog_path: Optional[Path] = typer.Option(None, "--catalog", help="A catalog JSON file (default: the shipped one)."),
    prompt: List[str] = typer.Option(None, "--prompt", "-p", help="Detection prompt(s). Default: the paper's."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the verdict here."),
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Detect MODEL's super weights and compare them with its catalog entry.

    Prints agree / differ / not in catalog. Exit code: 0 agree, 1 differ, 0 not in catalog.
    """
    setup_logging(opts.verbose, opts.quiet)
    check_prompts(prompt)
    check_json_out(json_path)
    cat = Catalog.load(catalog_path)
    lm = load_lm(model, opts, dequantize=True)
    result = detect_default(lm, prompt)
    verdict = run_verify(model_names(model, lm.model, lm.source), result.super_weights, cat)
    print_verdict(verdict)
    write_json_out(json_path, verdict.to_dict())
    raise typer.Exit(verdict.exit_code)


@app.command("llama-cpp-overrides")
@grouped
def llama_cpp_overrides(
    source: str = typer.Argument(
        "smollm2-135m", help="A model (detection runs), a detect.json file, or with --from-catalog a catalog id or hub id."
    ),
    type_name: str = typer.Option("f16", "--type", help="ggml type for tensors holding super weights (f16, bf16, q8_0, ...)."),
    fmt: str = typer.Option("args", "--format", help="args (--tensor-type ..., no quotes), file (for --tensor-type-file) or json."),
    from_catalog: bool = typer.Option(False, "--from-catalog", help="Use the published coordinates: no model needed."),
    for_model: Optional[str] = typer.Option(
        None, "--model", help="The model (.gguf, folder, built-in name) the overrides are for: refuse coordinates of another architecture."
    ),
    catalog_path: Optional[Path] = typer.Option(None, "--catalog", help="A catalog JSON file (default: the shipped one)."),
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Print llama-quantize --tensor-type arguments that keep super-weight tensors at --type.

    Example: llama-quantize $(superweight llama-cpp-overrides sw.json --model in.gguf) in.gguf out.gguf Q4_K_M
    (the args carry no quote characters, so they survive $(...)), or
    llama-quantize --tensor-type-file <(superweight llama-cpp-overrides sw.json --format file) in.gguf out.gguf Q4_K_M
    """
    import json

    setup_logging(opts.verbose, opts.quiet)
    if fmt not in ("args", "file", "json"):
        raise SuperweightError(f"unknown --format {fmt!r}: use args, file or json")
    if from_catalog:
        cat = Catalog.load(catalog_path)
        entry = cat.get(source) or cat.find([source])[0]
        if entry is None:
            raise SuperweightError(f"{source!r} is not in the catalog: see `superweight catalog` for ids")
        arch, n_layers, coords = entry.architecture, None, entry.coords
        origin = f"catalog entry {entry.id} ({entry.source['kind']})"
    elif source.endswith(".json") and Path(source).is_file():
        det = read_super_weights(source)
        arch, n_layers, coords, origin = det.architecture, det.num_layers, det.super_weights, source
    else:
        det = detect_default(load_lm(source, opts, dequantize=True))
        arch, n_layers, coords, origin = det.architecture, det.num_layers, det.super_weights, f"detection on {source}"
    if not coords:
        raise SuperweightError(f"{origin}: no super weight, so nothing to keep: llama-quantize needs no override")
    if for_model is not None:
        llama_cpp.check_model_matches(arch, n_layers, for_model, origin)
    overrides = llama_cpp.overrides_for(arch, n_layers, coords, type_name)
    if for_model is None and not opts.quiet:
        err_console.print(f"note: these overrides are for a {arch}: pass --model in.gguf to check that the model you quantize is one",
                          highlight=False)
    if not opts.quiet:
        for o in overrides:
            err_console.print(f"{o.tensor} <- {o.hf_module}: super weights {o.super_weights} ({origin})", highlight=False)
    if fmt == "json":
        print(json.dumps({"version": 1, "source": origin, "architecture": arch, "overrides": [o.to_dict() for o in overrides]}, indent=2))
    else:
        print(llama_cpp.shell_args(overrides) if fmt == "args" else llama_cpp.tensor_type_file(overrides), end="\n" if fmt == "args" else "")
