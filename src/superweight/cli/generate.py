"""The generate command: text from any model the tool loads, streamed, with its speed and peak memory."""
from __future__ import annotations

from typing import Optional

import typer

from .app import app, err_console, load_lm, setup_logging
from .options import DequantizeOpt, ModelArg, ModelOptions, grouped
from ..eval.generate import DEFAULT_PROMPT, generate


@app.command("generate")
@grouped
def generate_cmd(
    model: str = ModelArg,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The prompt (default: a question about France's capital)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy; above: sampled at this temperature."),
    raw: bool = typer.Option(False, "--raw", help="Skip the tokenizer's chat template (a plain continuation)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (with --temperature)."),
    dequantize: bool = DequantizeOpt,
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Generate text with MODEL (built-in name, folder, .gguf, hub id or quantized artifact), streamed as it comes.

    Example: `superweight generate smollm2-135m --prompt "Name three colours."`; a quantized artifact runs
    with its weights packed: `superweight generate smol-int4 --max-new-tokens 32`.
    """
    setup_logging(opts.verbose, opts.quiet)
    lm = load_lm(model, opts, dequantize)
    result = generate(lm, prompt if prompt is not None else DEFAULT_PROMPT, max_new_tokens, temperature, raw, stream=True,
                      seed=seed)
    template = "chat template" if result.chat_template else "no chat template"
    err_console.print(f"[dim]{template}; {result.summary()}[/]")
