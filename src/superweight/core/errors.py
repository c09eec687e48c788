"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""
from __future__ import annotations


class SuperweightError(Exception):
    """A problem with the user's input (path, model, prompt, file). The message says what to do."""


class UnsupportedArchitectureError(SuperweightError):
    """The model's architecture has no entry in the registry (see ``superweight.model.arch``)."""
