"""The ``superweight`` command: thin subcommands over the typed functions of the package.

Quick start::

    superweight detect                      # the built-in SmolLM2-135M, the paper's prompt
    superweight detect MODEL --json sw.json # any hub id, model folder or .gguf file
    superweight detect --method both        # compare with the weight-magnitude z-score scan
    superweight detect DIR --stream         # a checkpoint larger than memory, one layer at a time

One module per command group registers its commands on ``app``; printers live in ``console``.
"""
from . import detect, evaluate, generate, quantize, report, sweep, train  # noqa: F401  (registers the commands)
from .app import app, main

__all__ = ["app", "main"]
