"""The ``superweight`` command: thin subcommands over the typed functions of the package.

Quick start::

    superweight detect                      # the built-in SmolLM2-135M, the paper's prompt
    superweight detect MODEL --json sw.json # any hub id, model folder or .gguf file
    superweight detect --method both        # compare with the weight-magnitude z-score scan
    superweight detect DIR --stream         # a checkpoint larger than memory, one layer at a time
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SuperweightError

app = typer.Typer(
    help="Find, prove and use the super weights of causal language models (Yu et al., 2024).\n\n"
    "Quick start: `superweight detect` finds the super weights of the built-in SmolLM2-135M offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)

ModelArg = typer.Argument("smollm2-135m", help="Hub id, local model folder, .gguf file or built-in name.")
CacheOpt = typer.Option(None, "--cache-dir", help="Where converted GGUF models are cached (env SUPERWEIGHT_CACHE).")
DtypeOpt = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16.")
VerboseOpt = typer.Option(False, "--verbose", "-v")
QuietOpt = typer.Option(False, "--quiet", "-q")
PplOpt = typer.Option("wikitext2", "--ppl", help="Perplexity text: wikitext2, wiki-intros, a file, or none.")
TasksOpt = typer.Option(
    "all", "--tasks", help="Comma-separated: piqa,arc_easy,arc_challenge,hellaswag,winogrande,sciq,lambada; all; none."
)
LimitOpt = typer.Option(100, "--limit", min=1, help="First N documents per task (lm-eval's --limit).")
MaxTokensOpt = typer.Option(20000, "--max-tokens", min=2, help="Tokens of the perplexity text to score.")
SeqLenOpt = typer.Option(None, "--seq-len", help="Perplexity window (default min(2048, model max)).")


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    from .progress import configure

    configure(quiet=quiet)  # progress bars: terminal only, never with --quiet
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load(model: str, dtype: str, cache_dir: Optional[Path], device_map: Optional[str] = None):
    from .load import load_model

    lm = load_model(model, dtype=dtype, cache_dir=cache_dir, device_map=device_map)
    for note in lm.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    return lm


def print_super_weights(result) -> None:
    table = Table(title=f"Super weights of {result.model} ({result.architecture}, {result.num_layers} layers)")
    for col in ("layer", "\\[row, col]", "value", "|w| rank", "input", "output", "share", "token", "iter", "prompts"):
        table.add_column(col, justify="right")
    n_prompts = len(result.prompts)
    for sw in result.super_weights:
        table.add_row(
            f"{sw.layer}{' (late)' if sw.late_layer else ''}", f"[{sw.row}, {sw.col}]", f"{sw.value:+.4g}",
            str(sw.magnitude_rank), f"{sw.input_value:+.4g}", f"{sw.output_value:+.4g}", f"{sw.share:.0%}",
            str(sw.token), str(sw.iteration), f"{len(sw.prompts)}/{n_prompts}",
        )
    console.print(table)
    if not result.super_weights:
        console.print("No super weight found: no layer's down-projection spikes (see --verbose for the maxima).")
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
    table = Table(title="Per-layer maxima (unmodified model, first prompt)")
    for col in ("layer", "max|in|", "in ch", "max|out|", "out ch", "token", "max|resid|", "resid ch"):
        table.add_column(col, justify="right")
    for s in result.layers:
        table.add_row(
            str(s.layer), f"{s.input.magnitude:.4g}", str(s.input.channel), f"{s.output.magnitude:.4g}",
            str(s.output.channel), str(s.output.token), f"{s.residual.magnitude:.4g}", str(s.residual.channel),
        )
    console.print(table)


def print_magnitude(mag) -> None:
    pct = 100.0 * mag.total_flagged / max(mag.total_weights, 1)
    console.print(
        f"Magnitude z-score scan ({mag.scope}, z > {mag.threshold:g}): {mag.total_flagged:,} of "
        f"{mag.total_weights:,} weights flagged ({pct:.2f}%)."
    )
    for r in mag.super_weights:
        where = f"rank {r.rank_in_flagged:,} of {mag.total_flagged:,} flagged" if r.flagged else "NOT flagged"
        console.print(f"  super weight {r.layer}:[{r.row}, {r.col}] z={r.z:.1f}: {where}")
    if mag.top:
        t = mag.top[0]
        console.print(f"  highest z: {t['module']}[{t['row']}, {t['col']}] z={t['z']:.1f} value={t['value']:+.4g}")


@app.command()
def detect(
    model: str = ModelArg,
    prompt: List[str] = typer.Option(None, "--prompt", "-p", help="Prompt(s); repeat to compare. Default: the paper's."),
    method: str = typer.Option("activation", "--method", help="activation (the paper's), magnitude (z-score) or both."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned result here."),
    max_iter: int = typer.Option(10, "--max-iter", min=1, help="Most detect-zero-rerun iterations per prompt."),
    floor: float = typer.Option(50.0, "--floor", help="Spike rule: absolute |activation| floor."),
    ratio: float = typer.Option(50.0, "--ratio", help="Spike rule: times the median of the other layers' maxima."),
    z_threshold: float = typer.Option(3.0, "--z-threshold", help="Magnitude method: mean + z * std of |W|."),
    all_linear: bool = typer.Option(False, "--all-linear", help="Magnitude method: scan every linear layer."),
    dtype: str = DtypeOpt,
    cache_dir: Optional[Path] = CacheOpt,
    stream: bool = typer.Option(
        False, "--stream", help="Read a local safetensors model one layer at a time (automatic when it does not fit in memory)."
    ),
    device_map: Optional[str] = typer.Option(
        None, "--device-map", help="Passed to transformers/accelerate: auto (GPUs, CPU and disk offload), cpu, cuda, ..."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print the per-layer maxima."),
    quiet: bool = QuietOpt,
) -> None:
    """Find the super weights of MODEL (default: the built-in SmolLM2-135M)."""
    from .detect import DEFAULT_PROMPT, SpikeRule
    from .detect import detect as run_detect
    from .magnitude import magnitude_scan

    setup_logging(verbose, quiet)
    if method not in ("activation", "magnitude", "both"):
        raise SuperweightError(f"unknown method {method!r}: use activation, magnitude or both")
    prompts = list(prompt) if prompt else [DEFAULT_PROMPT]
    rule, scope = SpikeRule(floor=floor, ratio=ratio), "all_linear" if all_linear else "down_proj"
    from .stream import choose_mode, stream_detect, stream_magnitude_scan

    if choose_mode(model, dtype, stream, device_map, cache_dir) == "stream":
        result = stream_detect(model, prompts, rule, max_iter, model_name=model, dtype=dtype)
        scan = lambda sws: stream_magnitude_scan(model, z_threshold, scope, sws, dtype=dtype)  # noqa: E731
    else:
        lm = _load(model, dtype, cache_dir, device_map)
        result = run_detect(lm.model, lm.tokenizer, prompts, rule, max_iter, model_name=model, arch=lm.arch)
        result.notes = list(lm.notes)
        scan = lambda sws: magnitude_scan(lm.model, lm.arch, z_threshold, scope, sws)  # noqa: E731
    if method in ("magnitude", "both"):
        mag = scan(result.super_weights)
        result.magnitude = mag.to_dict()
    if method in ("activation", "both"):
        print_super_weights(result)
    if result.magnitude is not None:
        print_magnitude(mag)
    if verbose:
        print_layers(result)
    if json_path:
        result.save(json_path)
        console.print(f"wrote {json_path}")


def _detect_default(lm, prompts: Optional[List[str]] = None):
    from .detect import DEFAULT_PROMPT
    from .detect import detect as run_detect

    from .progress import step

    with step("detecting super weights"):
        result = run_detect(lm.model, lm.tokenizer, list(prompts or [DEFAULT_PROMPT]), model_name=lm.name, arch=lm.arch)
    result.notes = list(lm.notes)
    return result


@app.command("catalog")
def catalog_cmd(
    catalog_path: Optional[Path] = typer.Option(None, "--catalog", help="A catalog JSON file (default: the shipped one)."),
    json_out: bool = typer.Option(False, "--json", help="Print the catalog as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print each entry's notes and provenance."),
    quiet: bool = QuietOpt,
) -> None:
    """List the published super weight coordinates and where each comes from."""
    import json

    from .catalog import Catalog

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


@app.command()
def verify(
    model: str = ModelArg,
    catalog_path: Optional[Path] = typer.Option(None, "--catalog", help="A catalog JSON file (default: the shipped one)."),
    prompt: List[str] = typer.Option(None, "--prompt", "-p", help="Detection prompt(s). Default: the paper's."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the verdict here."),
    dtype: str = DtypeOpt,
    cache_dir: Optional[Path] = CacheOpt,
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Detect MODEL's super weights and compare them with its catalog entry.

    Prints agree / differ / not in catalog. Exit code: 0 agree, 1 differ, 0 not in catalog.
    """
    from .catalog import Catalog, model_names
    from .catalog import verify as run_verify
    from .detect import write_json_atomic

    setup_logging(verbose, quiet)
    cat = Catalog.load(catalog_path)
    lm = _load(model, dtype, cache_dir)
    result = _detect_default(lm, prompt)
    verdict = run_verify(model_names(model, lm.model, lm.source), result.super_weights, cat)
    print_verdict(verdict)
    if json_path:
        write_json_atomic(json_path, verdict.to_dict())
    raise typer.Exit(verdict.exit_code)


@app.command("llama-cpp-overrides")
def llama_cpp_overrides(
    source: str = typer.Argument(
        "smollm2-135m", help="A model (detection runs), a detect.json file, or with --from-catalog a catalog id or hub id."
    ),
    type_name: str = typer.Option("f16", "--type", help="ggml type for tensors holding super weights (f16, bf16, q8_0, ...)."),
    fmt: str = typer.Option("args", "--format", help="args (shell-quoted --tensor-type ...), file (for --tensor-type-file) or json."),
    from_catalog: bool = typer.Option(False, "--from-catalog", help="Use the published coordinates: no model needed."),
    catalog_path: Optional[Path] = typer.Option(None, "--catalog", help="A catalog JSON file (default: the shipped one)."),
    dtype: str = DtypeOpt,
    cache_dir: Optional[Path] = CacheOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the arguments."),
) -> None:
    """Print llama-quantize --tensor-type arguments that keep super-weight tensors at --type.

    Example: llama-quantize $(superweight llama-cpp-overrides sw.json --format args) ... or
    llama-quantize --tensor-type-file <(superweight llama-cpp-overrides sw.json --format file) in.gguf out.gguf Q4_K_M
    """
    import json

    from . import llama_cpp
    from .catalog import Catalog
    from .detect import DetectionResult

    setup_logging(verbose, quiet)
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
        det = DetectionResult.load(source)
        arch, n_layers, coords, origin = det.architecture, det.num_layers, det.coords, source
    else:
        det = _detect_default(_load(source, dtype, cache_dir))
        arch, n_layers, coords, origin = det.architecture, det.num_layers, det.coords, f"detection on {source}"
    if not coords:
        raise SuperweightError(f"{origin}: no super weight, so nothing to keep: llama-quantize needs no override")
    overrides = llama_cpp.overrides_for(arch, n_layers, coords, type_name)
    if not quiet:
        for o in overrides:
            err_console.print(f"{o.tensor} <- {o.hf_module}: super weights {o.super_weights} ({origin})", highlight=False)
    if fmt == "json":
        print(json.dumps({"version": 1, "source": origin, "architecture": arch, "overrides": [o.to_dict() for o in overrides]}, indent=2))
    else:
        print(llama_cpp.shell_args(overrides) if fmt == "args" else llama_cpp.tensor_type_file(overrides), end="\n" if fmt == "args" else "")


@app.command()
def report(
    model: str = ModelArg,
    out: Path = typer.Option(..., "--out", help="Folder for report.html, report.md and the PNGs (written all or nothing)."),
    ablation: Optional[Path] = typer.Option(None, "--ablation", help="An ablation JSON (`superweight ablate --json`)."),
    sweep: Optional[Path] = typer.Option(None, "--sweep", help="A sweep JSON (`superweight quantize --sweep --json`)."),
    run_ablation: bool = typer.Option(False, "--run-ablation", help="Run the ablation now (slow; see --limit)."),
    run_sweep: bool = typer.Option(False, "--run-sweep", help="Run the quantization sweep now (slow)."),
    limit: int = typer.Option(20, "--limit", min=1, help="Items per task when --run-ablation evaluates accuracy."),
    prompt: List[str] = typer.Option(None, "--prompt", "-p", help="Detection prompt(s). Default: the paper's."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
    dtype: str = DtypeOpt,
    cache_dir: Optional[Path] = CacheOpt,
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Write a one-page report (HTML with embedded figures, Markdown + PNGs) of MODEL's super weights."""
    from . import report as rep

    setup_logging(verbose, quiet)
    rep.check_out_dir(out, force)
    lm = _load(model, dtype, cache_dir)
    detection = _detect_default(lm, prompt)
    flags = [f"--ablation {ablation}" if ablation else "", f"--sweep {sweep}" if sweep else "",
             f"--run-ablation --limit {limit}" if run_ablation else "", "--run-sweep" if run_sweep else ""]
    command = " ".join(x for x in ["superweight report", model, f"--out {out}", *flags, *(f"-p {p!r}" for p in prompt or [])] if x)
    inputs = rep.gather(lm, detection, ablation, sweep, run_ablation, run_sweep, limit, command)
    figs = rep.build_figures(inputs)
    rep.write_report(inputs, figs, out, force)
    console.print(f"wrote {out}/report.html, report.md and {len(figs)} figures", highlight=False)
    for m in inputs.missing:
        console.print(f"  not shown: {m}", highlight=False)


def _parse_size(text: str) -> Optional[int]:
    """``16384``, ``128x128`` or ``tensor`` (per tensor) -> elements per block."""
    if text.lower() in ("tensor", "per-tensor", "none"):
        return None
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise SuperweightError(f"bad --size {text!r}: use e.g. 16384, 128x128 or tensor") from None
    size = 1
    for p in parts:
        size *= p
    return size


def _keep_for(lm, keep: bool, super_weights: Optional[Path]):
    """The super weights to hold out: from a detection JSON, or detected now; [] when not kept."""
    if not keep:
        return []
    if super_weights is not None:
        from .detect import DetectionResult

        return DetectionResult.load(super_weights).super_weights
    found = _detect_default(lm).super_weights
    if not found:
        err_console.print("[yellow]note:[/] no super weight detected: nothing is held out")
    return found


def print_sweep_tables(result) -> None:
    from .quant.sweep import tables

    for title, headers, rows in tables(result):
        table = Table(title=title)
        for h in headers:
            table.add_column(h, justify="right")
        for r in rows:
            table.add_row(*r)
        console.print(table)


@app.command("quantize")
def quantize_cmd(
    model: str = ModelArg,
    scheme: str = typer.Option("int4", "--scheme", help="int2, int3, int4, int8, nf4 or ternary."),
    block: Optional[int] = typer.Option(None, "--block", help="Paper's blocks: runs of B elements of the flattened tensor."),
    group: Optional[int] = typer.Option(None, "--group", help="Groups of G along the input dimension of each row."),
    per_channel: bool = typer.Option(False, "--per-channel", help="One scale per output channel."),
    clip_z: Optional[float] = typer.Option(None, "--clip-z", help="Clip weights at mean +- Z std before quantizing."),
    topk: int = typer.Option(0, "--topk", min=0, help="Ternary: also keep the K largest other weights per matrix in FP16."),
    keep_super_weights: bool = typer.Option(True, "--keep-super-weights/--no-keep-super-weights", help="Hold the super weights out (exact)."),
    super_weights: Optional[Path] = typer.Option(None, "--super-weights", help="A `superweight detect --json` file (default: detect now)."),
    include: Optional[str] = typer.Option(None, "--include", help="Regex: quantize only linear modules whose name matches."),
    exclude: str = typer.Option(r"(^|\.)lm_head$", "--exclude", help="Regex of linear modules to leave untouched."),
    oversize: str = typer.Option("error", "--oversize", help="A tensor smaller than --block/--group: error, or tensor (quantize it per tensor)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Artifact folder to write (written to a temp folder, then renamed)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
    sweep: bool = typer.Option(False, "--sweep", help="Evaluate perplexity over a grid of schemes instead of writing an artifact."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the manifest (or the sweep result) here."),
    text: str = typer.Option("wikitext2", "--text", help="Sweep text: wikitext2, wiki-intros or a file."),
    max_tokens: int = typer.Option(2048, "--max-tokens", min=2, help="Sweep: tokens of --text evaluated per grid point."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Sweep: perplexity window (default min(2048, model max))."),
    bits: List[int] = typer.Option(None, "--bits", help="Sweep: RTN bit widths (repeat; default 4 3)."),
    size: List[str] = typer.Option(None, "--size", help="Sweep: block sizes (repeat; 16384, 128x128 or tensor)."),
    sweep_group: List[int] = typer.Option(None, "--sweep-group", help="Sweep: naive group sizes (repeat; default 128)."),
    sweep_clip_z: float = typer.Option(9.0, "--sweep-clip-z", help="Sweep: z-score clip threshold of the clip variants."),
    dtype: str = DtypeOpt,
    cache_dir: Optional[Path] = CacheOpt,
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Quantize MODEL into a packed artifact (--out), or sweep schemes by perplexity (--sweep).

    Example: `superweight quantize --scheme int4 --block 16384 --clip-z 9 --out smol-int4`, then
    `superweight.load_quantized("smol-int4")` (or any command with MODEL = smol-int4).
    """
    from .quant.config import scheme_config

    setup_logging(verbose, quiet)
    if sweep:
        from .quant.sweep import DEFAULT_SIZES, default_grid, run_sweep

        sizes = tuple(_parse_size(s) for s in size) if size else DEFAULT_SIZES
        grid = default_grid(tuple(bits or (4, 3)), sizes, sweep_clip_z, tuple(sweep_group or (128,)))
        lm = _load(model, dtype, cache_dir)
        keep = _keep_for(lm, keep_super_weights, super_weights)
        result = run_sweep(
            lm, keep, grid, text_name=text, max_tokens=max_tokens, seq_len=seq_len,
            progress=lambda p: err_console.print(f"  {p.label}: ppl {p.ppl:.4g} ({p.seconds:.0f} s)", highlight=False),
        )
        print_sweep_tables(result)
        for note in result.notes:
            console.print(f"note: {note}", highlight=False)
        if json_path:
            result.save(json_path)
            console.print(f"wrote {json_path}")
        return
    from .export import export_artifact

    if out is None:
        raise SuperweightError("pass --out DIR to write an artifact (or --sweep to compare schemes)")
    if out.exists() and not force:
        raise SuperweightError(f"{out} already exists: pick another --out or pass --force to replace it")
    config = scheme_config(scheme, block, group, clip_z, topk, per_channel, oversize)
    lm = _load(model, dtype, cache_dir)
    keep = _keep_for(lm, keep_super_weights, super_weights)
    manifest = export_artifact(lm, config, keep, out, force, include, exclude)
    s = manifest["size"]
    table = Table(title=f"{manifest['scheme']} -> {out}")
    for col in ("quantized weights", "bits/weight", "sparse bits/weight", "kept", "file MB", "predicted MB", "file bits/param"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{s['quantized_weights']:,}", f"{s['bits_per_weight']:.4f}", f"{s['sparse_bits_per_weight']:.2e}",
        str(len(manifest["kept"])), f"{s['file_bytes'] / 1e6:.2f}", f"{(s['predicted_data_bytes'] + s['header_bytes']) / 1e6:.2f}",
        f"{s['file_bits_per_param']:.3f}",
    )
    console.print(table)
    if json_path:
        from .detect import write_json_atomic

        write_json_atomic(json_path, manifest)
        console.print(f"wrote {json_path}")


def _eval_config(ppl: str, tasks: str, limit: Optional[int], max_tokens: Optional[int], seq_len: Optional[int], **kw):
    from .eval.tasks import parse_tasks
    from .experiments import AblationConfig

    ppl_source = None if ppl.lower() in ("none", "") else ppl
    task_list = [] if tasks.lower() in ("none", "") else parse_tasks(tasks)
    return AblationConfig(ppl=ppl_source, tasks=task_list, limit=limit, max_tokens=max_tokens, seq_len=seq_len, **kw)


def _parse_scales(text: str) -> tuple:
    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise SuperweightError(f"--scales {text!r}: give comma-separated numbers, e.g. 0,0.5,1,2") from None


def _task_cell(r: Optional[dict]) -> str:
    if not r:
        return "-"
    return f"{100 * r['acc']:.1f} [{100 * r['ci'][0]:.0f}-{100 * r['ci'][1]:.0f}]"


def print_ablation_table(result) -> None:
    conds = result.conditions
    tasks = list(dict.fromkeys(t for c in conds.values() for t in c.get("tasks", {})))
    table = Table(title=f"Super weight ablation of {result.model} (paper Table 1 shape; acc % [95% CI], n per task)")
    for col in ["condition", "weights", "avg acc", "PPL", *tasks, "lambada ppl" if "lambada" in tasks else None]:
        if col:
            table.add_column(col, justify="right")
    for name, c in conds.items():
        avg = c.get("avg_acc")
        row = [name, str(c.get("weights_changed", 0)), "-" if avg is None else f"{100 * avg:.1f}",
               "-" if c.get("ppl") is None else f"{c['ppl']:.4g}"]
        row += [_task_cell(c.get("tasks", {}).get(t)) for t in tasks]
        if "lambada" in tasks:
            lam = c.get("tasks", {}).get("lambada")
            row.append("-" if not lam else f"{lam['ppl']:.4g}")
        table.add_row(*row)
    console.print(table)
    ns = {t: r["n"] for c in conds.values() for t, r in c.get("tasks", {}).items()}
    if ns:
        console.print("n: " + ", ".join(f"{t} {n}" for t, n in ns.items()), highlight=False)
    tokens = next((c.get("ppl_tokens") for c in conds.values() if c.get("ppl_tokens")), None)
    if tokens:
        console.print(f"PPL over {tokens:,} tokens ({result.config.get('ppl')}).", highlight=False)


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


@app.command()
def ablate(
    model: str = ModelArg,
    super_weights: Optional[Path] = typer.Option(None, "--super-weights", help="A detection JSON; default: detect now."),
    ppl: str = PplOpt,
    tasks: str = TasksOpt,
    limit: Optional[int] = LimitOpt,
    max_tokens: Optional[int] = MaxTokensOpt,
    seq_len: Optional[int] = SeqLenOpt,
    top_n: int = typer.Option(7000, "--top-n", min=1, help="zero_top_non_super: how many of the largest other weights."),
    random_n: Optional[int] = typer.Option(None, "--random-n", min=1, help="zero_random: how many (default: as many as super weights)."),
    scales: str = typer.Option("0,0.2,0.5,0.8,1,1.5,2,3", "--scales", help="Super weight scales to sweep ('' for none)."),
    scale_tasks: Optional[str] = typer.Option(None, "--scale-tasks", help="Tasks for the scale sweep (default: --tasks; 'none' for PPL only)."),
    stopword_prompts: int = typer.Option(50, "--stopword-prompts", min=0, help="LAMBADA contexts for the stopword statistics."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random null baseline."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned result here."),
    dtype: str = DtypeOpt,
    cache_dir: Optional[Path] = CacheOpt,
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Prove the super weights matter: zero, scale and restore them; paper Table 1, Fig. 5 and Fig. 6."""
    from .detect import DetectionResult
    from .eval.tasks import parse_tasks
    from .experiments import run_ablation

    setup_logging(verbose, quiet)
    sweep_tasks = None if scale_tasks is None else [] if scale_tasks.lower() == "none" else parse_tasks(scale_tasks)
    config = _eval_config(
        ppl, tasks, limit, max_tokens, seq_len, top_n=top_n, random_n=random_n, scales=_parse_scales(scales),
        scale_tasks=sweep_tasks, stopword_prompts=stopword_prompts, seed=seed,
    )
    lm = _load(model, dtype, cache_dir)
    found = DetectionResult.load(super_weights).super_weights if super_weights else _detect_default(lm).super_weights
    console.print("super weights: " + ", ".join(f"{s.layer}:[{s.row}, {s.col}]" for s in found), highlight=False)
    result = run_ablation(lm, found, config)
    print_ablation_table(result)
    print_stopwords(result)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    if json_path:
        result.save(json_path)
        console.print(f"wrote {json_path}")


@app.command("eval")
def eval_cmd(
    model: str = ModelArg,
    ppl: str = PplOpt,
    tasks: str = TasksOpt,
    limit: Optional[int] = LimitOpt,
    max_tokens: Optional[int] = MaxTokensOpt,
    seq_len: Optional[int] = SeqLenOpt,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned result here."),
    dtype: str = DtypeOpt,
    cache_dir: Optional[Path] = CacheOpt,
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Perplexity and zero-shot accuracy (lm-eval semantics, 95% bootstrap CI) of one model."""
    from .experiments import run_eval

    setup_logging(verbose, quiet)
    config = _eval_config(ppl, tasks, limit, max_tokens, seq_len)
    lm = _load(model, dtype, cache_dir)
    result = run_eval(lm, config)
    table = Table(title=f"Evaluation of {result.model}")
    for col in ("metric", "value", "95% CI", "n"):
        table.add_column(col, justify="right")
    if result.ppl is not None:
        table.add_row(f"PPL ({config.ppl})", f"{result.ppl:.4g}", "", f"{result.ppl_tokens} tokens")
    for t, r in result.tasks.items():
        table.add_row(f"{t} acc", f"{100 * r['acc']:.1f}", f"{100 * r['ci'][0]:.1f}-{100 * r['ci'][1]:.1f}", str(r["n"]))
        if "acc_norm" in r:
            lo, hi = r["acc_norm_ci"]
            table.add_row(f"{t} acc_norm", f"{100 * r['acc_norm']:.1f}", f"{100 * lo:.1f}-{100 * hi:.1f}", str(r["n"]))
        if "ppl" in r:
            table.add_row(f"{t} ppl", f"{r['ppl']:.4g}", f"{r['ppl_ci'][0]:.4g}-{r['ppl_ci'][1]:.4g}", str(r["n"]))
    if result.avg_acc is not None:
        table.add_row("avg acc", f"{100 * result.avg_acc:.1f}", "", "")
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    if json_path:
        result.save(json_path)
        console.print(f"wrote {json_path}")


@app.callback()
def _group() -> None:
    """Find, prove and use the super weights of causal language models."""


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except SuperweightError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
