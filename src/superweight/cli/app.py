"""The ``superweight`` Typer app, the options every command shares, and the entry point.

Each command group lives in its own module of this package and registers itself on ``app``;
table printers live in ``console``.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from ..core.errors import SuperweightError
from ..core.progress import configure, step
from ..core.files import check_output, write_json_atomic
from ..model import load
from .options import ModelOptions
from ..model.mode import Mode, choose_mode
from ..model.source import ModelSource
from ..model.streamed import StreamedModel
from ..find.loop import DEFAULT_PROMPT, detect as run_detect

app = typer.Typer(
    help="Find, prove and use the super weights of causal language models (Yu et al., 2024).\n\n"
    "Quick start: `superweight detect` finds the super weights of the built-in SmolLM2-135M offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)

def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)

    configure(quiet=quiet)  # progress bars: terminal only, never with --quiet
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_json_out(path: Optional[Path]) -> None:
    """Before any work: ``--json PATH`` can be written; ``--json -`` means stdout, so everything else the
    command prints goes to stderr from now on (stdout holds the JSON alone)."""
    if path is None:
        return
    if str(path) == "-":
        console.file = sys.stderr
        return
    check_output(path, "--json")


def write_json_out(path: Optional[Path], data: dict) -> None:
    """``data`` as JSON to ``--json PATH`` (atomically; "wrote PATH" is printed) or, for ``-``, to stdout."""
    import json

    if path is None:
        return
    if str(path) == "-":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        sys.stdout.flush()
        return
    write_json_atomic(path, data)
    console.print(f"wrote {path}", highlight=False)


def print_notes(notes, shown=()) -> None:
    """Each note once, skipping those already printed (``shown``: e.g. the model's, printed on load)."""
    for note in dict.fromkeys(n for n in notes if n not in set(shown)):
        console.print(f"note: {note}", highlight=False)


def load_lm(model: str, opts: ModelOptions, dequantize: bool = False):
    """The model a command runs, loaded as ``opts`` say; a quantized artifact packed, or dense with ``dequantize``."""
    lm = load.load_model(model, dtype=opts.dtype, cache_dir=opts.cache_dir, device_map=opts.device_map, device=opts.device,
                         dequantize=dequantize)
    for note in lm.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    return lm


def mode_of(model: str | ModelSource, stream: bool, opts: ModelOptions) -> Mode:
    """Memory or stream for MODEL under ``opts`` (``--stream`` forces streaming; ``model.mode.choose_mode``)."""
    return choose_mode(model, opts.dtype, stream, opts.device_map, opts.cache_dir, opts.device)


def open_streamed(source: str | ModelSource, opts: ModelOptions) -> StreamedModel:
    """The one ``StreamedModel`` a streamed command runs every pass on, as ``opts`` say (``--held-gb`` too)."""
    return StreamedModel(source, opts.dtype, opts.device, held_bytes=opts.held_bytes)


def detect_default(lm, prompts: Optional[List[str]] = None):
    with step("detecting super weights"):
        result = run_detect(lm.model, lm.tokenizer, list(prompts or [DEFAULT_PROMPT]), model_name=lm.name, arch=lm.arch)
    result.notes = [*lm.notes, *result.notes]  # the load's caveats, then detection's own (the fallback's)
    return result


@app.callback()
def _group() -> None:
    """Find, prove and use the super weights of causal language models."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the program is, so that every staged writer (the artifact,
    the report, the GGUF cache, JSON files) removes its unfinished output on the way out."""


_received: list[int] = []


def _raise_interrupted(signum: int, frame) -> None:
    _received.append(signum)
    raise Interrupted(signal.Signals(signum).name)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2; SIGINT and SIGTERM (what
    ``timeout`` and job schedulers send) stop the work, unfinished output is removed, exit 128 + N."""
    _received.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)
    try:
        app()
    except SuperweightError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except SystemExit:
        if _received:  # typer turns KeyboardInterrupt into a silent exit 130
            name = signal.Signals(_received[0]).name
            err_console.print(f"[red]interrupted[/] ({name}): unfinished output was removed", highlight=False)
            sys.exit(128 + _received[0])
        raise
    finally:
        console.file = None  # back to the current stdout (``--json -`` sent it to stderr for this run)

