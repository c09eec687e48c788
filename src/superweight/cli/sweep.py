"""The sweep command: perplexity over a grid of quantization schemes (the paper's Fig. 7, Tables 3-4)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .inputs import check_seq_len, check_super_weights_early, check_text_source, read_super_weights
from ..quant.sweep import (
    DEFAULT_BITS, DEFAULT_CLIP_Z, DEFAULT_GROUPS, DEFAULT_MAX_TOKENS, DEFAULT_SIZES, default_grid, run_sweep,
)
from .app import check_json_out, write_json_out, app, console, err_console, load_lm, mode_of, open_streamed, setup_logging
from .options import ModelArg, ModelOptions, grouped
from .console import print_sweep_tables
from .quantize import keep_for, parse_size, streamed_keep
from ..core.progress import step
from ..quant.streamed_sweep import stream_sweep
from ..model.mode import Mode
from ..model.source import ModelSource
from ..model.streamed import StreamedModel


def _grid(bits: List[int], size: List[str], group: List[int], clip_z: float):
    sizes = tuple(parse_size(s) for t in size for s in t.split(",") if s) if size else DEFAULT_SIZES
    return default_grid(tuple(bits or DEFAULT_BITS), sizes, clip_z, tuple(group or DEFAULT_GROUPS))


def _streamed_sweep(sm: StreamedModel, super_weights: Optional[Path], grid, text: str, max_tokens: int,
                    seq_len: Optional[int]):
    """``sweep`` of a model read layer by layer (``stream_sweep``): every grid point, in one pass."""
    keep = streamed_keep(sm, super_weights)
    with step(f"sweep (streamed: {len(grid)} points through each layer read)"):
        return stream_sweep(sm, keep, grid, text_name=text, max_tokens=max_tokens, seq_len=seq_len,
                            model_name=sm.source.ref)


@app.command("sweep")
@grouped
def sweep_cmd(
    model: str = ModelArg,
    super_weights: Optional[Path] = typer.Option(None, "--super-weights", help="A `superweight detect --json` file (default: detect now)."),
    text: str = typer.Option("wikitext2", "--text", help="Perplexity text: wikitext2, wiki-intros or a file."),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", min=2, help="Tokens of --text evaluated per grid point."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Perplexity window (default min(2048, model max))."),
    bits: List[int] = typer.Option(None, "--bits", help=f"RTN bit widths (repeat; default {' '.join(map(str, DEFAULT_BITS))})."),
    size: List[str] = typer.Option(None, "--size", help="Block sizes (repeat, or comma-separated; 16384, 128x128 or tensor)."),
    group: List[int] = typer.Option(None, "--group", help=f"Naive group sizes (repeat; default {' '.join(map(str, DEFAULT_GROUPS))})."),
    clip_z: float = typer.Option(DEFAULT_CLIP_Z, "--clip-z", help="z-score clip threshold of the clip variants."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned sweep result here."),
    stream: bool = typer.Option(
        False, "--stream", help="Read a local safetensors model one layer at a time, every grid point through each layer "
        "read (automatic when it does not fit in memory)."
    ),
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Perplexity of MODEL over a grid of schemes: RTN naive / +SW / clip / clip+SW by block size, W8A8, ternary.

    Example: `superweight sweep --super-weights sw.json --json sweep.json`, then
    `superweight report --super-weights sw.json --sweep sweep.json --out rep`.
    """
    setup_logging(opts.verbose, opts.quiet)
    if super_weights is not None:  # a bad file fails now, not after loading the model
        check_super_weights_early(read_super_weights(super_weights), model, super_weights, opts.cache_dir)
    check_json_out(json_path)
    check_text_source(text)
    source = ModelSource.of(model)  # resolved once: the checks, the mode and the load share it
    check_seq_len(seq_len, source, opts.cache_dir)
    grid = _grid(bits, size, group, clip_z)
    if mode_of(source, stream, opts) is Mode.STREAM:
        with open_streamed(source, opts) as sm:
            result = _streamed_sweep(sm, super_weights, grid, text, max_tokens, seq_len)
    else:
        lm = load_lm(source, opts, dequantize=True)
        keep = keep_for(lm, True, super_weights)
        result = run_sweep(
            lm, keep, grid, text_name=text, max_tokens=max_tokens, seq_len=seq_len,
            progress=lambda p: err_console.print(f"  {p.label}: ppl {p.ppl:.4g} ({p.seconds:.0f} s)", highlight=False),
        )
    print_sweep_tables(result)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    write_json_out(json_path, result.to_dict())
