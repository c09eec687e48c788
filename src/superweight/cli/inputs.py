"""Checks of what a user passes in, done before any model loads (so a typo costs nothing), and the
one check of super weight coordinates against a model, shared by every command that takes them.

>>> det = read_super_weights("sw.json")      # the file: readable, typed coordinates
>>> lm = load_model(...)
>>> check_super_weights(det, lm, "sw.json")   # the model: same architecture, inside every matrix
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..core.errors import SuperweightError
from ..model.arch import checked_against

EXAMPLE_PROMPT = "Apple Inc. is a worldwide tech company."


def check_prompts(prompts: Sequence[str] | None) -> None:
    """Every ``--prompt`` holds some text."""
    for p in prompts or []:
        if not p or not p.strip():
            raise SuperweightError(f"a --prompt is empty: pass some text, e.g. --prompt {EXAMPLE_PROMPT!r}")


def check_text_source(source: str | None) -> None:
    """A ``--ppl`` / ``--text`` source is available and long enough (``none`` skips perplexity)."""
    if source is None or source.lower() in ("none", ""):
        return
    from ..eval.text import check_text

    check_text(source)


def _coordinate(sw, i: int, path: str | Path) -> tuple[int, int, int]:
    values = (getattr(sw, "layer", None), getattr(sw, "row", None), getattr(sw, "col", None))
    for name, v in zip(("layer", "row", "col"), values):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SuperweightError(
                f"{path}: super weight {i} has {name} {v!r}, not an integer >= 0: write the file again with `superweight detect --json`"
            )
    return values  # type: ignore[return-value]


def read_super_weights(path: str | Path):
    """A detection JSON (``superweight detect --json``) whose coordinates are integers: a ``DetectionResult``."""
    from ..find.loop import DetectionResult

    try:
        det = DetectionResult.load(path)
    except SuperweightError:
        raise
    except Exception as exc:  # a hand-edited file can fail anywhere in the nested records
        raise SuperweightError(f"{path} is not a detection result ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if not isinstance(det.super_weights, list):
        raise SuperweightError(f"{path}: 'super_weights' must be a list: write the file again with `superweight detect --json`")
    for i, sw in enumerate(det.super_weights):
        _coordinate(sw, i, path)
    if not isinstance(det.architecture, str) or not isinstance(det.num_layers, int) or isinstance(det.num_layers, bool):
        raise SuperweightError(f"{path}: 'architecture' must be a string and 'num_layers' an integer")
    return det


def check_super_weights(det, lm, origin: str | Path) -> list:
    """``det``'s super weights, refused unless they belong to ``lm``'s architecture and lie inside its
    down-projections (layer, row and column in range). Returns the list of ``SuperWeight``."""
    return checked_against(det, lm.arch, lm.model, lm.name, origin)


def check_json_inputs(**files: Path | None) -> None:
    """Result files passed by name (``ablation=``, ``sweep=``) are readable JSON objects."""
    from ..core.files import read_json

    for what, path in files.items():
        if path is not None:
            read_json(path, what)
