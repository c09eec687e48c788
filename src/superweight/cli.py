"""The ``superweight`` command: thin subcommands over the typed functions of the package.

Quick start::

    superweight detect                      # the built-in SmolLM2-135M, the paper's prompt
    superweight detect MODEL --json sw.json # any hub id, model folder or .gguf file
    superweight detect --method both        # compare with the weight-magnitude z-score scan
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


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
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
    for col in ("layer", "[row, col]", "value", "|w| rank", "input", "output", "share", "token", "iter", "prompts"):
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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print the per-layer maxima."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Find the super weights of MODEL (default: the built-in SmolLM2-135M)."""
    from .detect import DEFAULT_PROMPT, SpikeRule
    from .detect import detect as run_detect
    from .magnitude import magnitude_scan

    setup_logging(verbose, quiet)
    if method not in ("activation", "magnitude", "both"):
        raise SuperweightError(f"unknown method {method!r}: use activation, magnitude or both")
    prompts = list(prompt) if prompt else [DEFAULT_PROMPT]
    lm = _load(model, dtype, cache_dir)
    result = run_detect(
        lm.model, lm.tokenizer, prompts, SpikeRule(floor=floor, ratio=ratio), max_iter, model_name=model, arch=lm.arch
    )
    result.notes = list(lm.notes)
    if method in ("magnitude", "both"):
        mag = magnitude_scan(
            lm.model, lm.arch, z_threshold, "all_linear" if all_linear else "down_proj", result.super_weights
        )
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
