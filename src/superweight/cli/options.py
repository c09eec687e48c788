"""The command line's options, declared once.

Single options (``ModelArg``, ``PplOpt``, ...) are typer defaults a command names. Options that travel
together are an *option group*: a frozen dataclass whose fields carry their typer option
(``field(metadata={"cli": ...})``, written ``cli(OPTION)``). A command annotates one parameter with the
group (``opts: ModelOptions``) and ``@grouped`` expands it into the group's options on the command
line, then hands the command one built group:

>>> @app.command("detect")
... @grouped
... def detect(model: str = ModelArg, opts: ModelOptions = ModelOptions()) -> None: ...
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from ..model.device import resolve_device

ModelArg = typer.Argument("smollm2-135m", help="Hub id, local model folder, .gguf file or built-in name.")
CacheOpt = typer.Option(None, "--cache-dir", help="Where converted GGUF models are cached (env SUPERWEIGHT_CACHE).")
DtypeOpt = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Say more: debug logs (detect: also the per-layer maxima).")
QuietOpt = typer.Option(
    False, "--quiet", "-q", help="Only the results: no notes, no progress (llama-cpp-overrides: only the arguments).")
DequantizeOpt = typer.Option(
    False, "--dequantize", help="A quantized artifact as a dense float model (its weights are otherwise held packed; "
    "studies that edit weights need this).")
PplOpt = typer.Option("wikitext2", "--ppl", help="Perplexity text: wikitext2, wiki-intros, a file, or none.")
TasksOpt = typer.Option(
    None, "--tasks", help="Repeat (or comma-separate): piqa, arc_easy, arc_challenge, hellaswag, winogrande, sciq, "
    "lambada; all (the default); none.",
)
LimitOpt = typer.Option(100, "--limit", min=1, help="First N documents per task (lm-eval's --limit).")
MaxTokensOpt = typer.Option(
    20000, "--max-tokens", min=64, help="Tokens of the perplexity text to score (at least 64: eval.perplexity.MIN_TOKENS)."
)
SeqLenOpt = typer.Option(None, "--seq-len", help="Perplexity window (default min(2048, model max)).")


def _check_device(value: str) -> str:
    """Fail on a device this machine lacks before anything is loaded."""
    resolve_device(value)
    return value


DeviceOpt = typer.Option(
    "auto", "--device", callback=_check_device, help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N."
)
DeviceMapOpt = typer.Option(
    None, "--device-map", help="Instead of --device: passed to transformers/accelerate (auto: GPUs, CPU and disk offload)."
)


def cli(option: Any) -> Any:
    """A group field whose command-line form is ``option`` (a ``typer.Option``); its default is the option's."""
    return dataclasses.field(default=option.default, metadata={"cli": option})


@dataclass(frozen=True)
class ModelOptions:
    """Where and how a command loads its model, and how much it says: shared by every model command."""

    dtype: str = cli(DtypeOpt)
    cache_dir: Optional[Path] = cli(CacheOpt)
    device: str = cli(DeviceOpt)
    device_map: Optional[str] = cli(DeviceMapOpt)
    held_gb: Optional[float] = cli(typer.Option(
        None, "--held-gb", min=0.001, help="Streamed passes: GiB of residual streams one pass over the layers holds "
        "(default 2, or SUPERWEIGHT_HELD_GB); more memory, fewer passes."))
    verbose: bool = cli(VerboseOpt)
    quiet: bool = cli(QuietOpt)

    @property
    def held_bytes(self) -> Optional[int]:
        """``--held-gb`` in bytes (None: the default budget)."""
        return None if self.held_gb is None else int(self.held_gb * (1 << 30))


def _is_group(t: Any) -> bool:
    return dataclasses.is_dataclass(t) and all("cli" in f.metadata for f in dataclasses.fields(t))


def grouped(fn: Callable) -> Callable:
    """``fn`` with each option-group parameter expanded into the group's options (see the module's doc)."""
    hints = typing.get_type_hints(fn)
    params: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for p in inspect.signature(fn).parameters.values():
        t = hints.get(p.name, p.annotation)
        if not _is_group(t):
            params.append(p.replace(annotation=t))
            continue
        groups[p.name] = t
        types = typing.get_type_hints(t)
        params += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.metadata["cli"],
                                     annotation=types[f.name]) for f in dataclasses.fields(t)]
    names = [p.name for p in params]
    assert len(names) == len(set(names)), f"{fn.__name__}: an option group repeats a parameter name"

    @functools.wraps(fn)
    def command(**kw: Any) -> Any:
        built = {name: g(**{f.name: kw.pop(f.name) for f in dataclasses.fields(g)}) for name, g in groups.items()}
        return fn(**kw, **built)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command
