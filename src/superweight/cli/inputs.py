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
from ..eval.text import check_text
from ..find.loop import DetectionResult
from ..model.arch_infer import get_arch
from ..model.load import config_skeleton
from ..eval.perplexity import model_max_length
from ..prove.experiments import AblationResult
from ..quant.sweep import SweepResult

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
    for i, sw in enumerate(det.super_weights):
        if sw.layer >= det.num_layers:
            raise SuperweightError(f"{path}: super weight {i} has layer {sw.layer}, but the file's model has {det.num_layers} "
                                   "layers: write the file again with `superweight detect --json`")
    return det


def check_super_weights_early(det, model: str, origin: str | Path, cache_dir: Path | None = None,
                              to_ablate: bool = False) -> None:
    """``det`` checked against MODEL's config before any weight loads (``load.config_skeleton``: same
    architecture, every layer, expert, row and column in range); with ``to_ablate`` an empty list is
    refused too. Where the config needs the weights (an uncached hub id) the check after loading runs alone."""
    if to_ablate and not det.super_weights:
        raise SuperweightError(f"{origin} lists no super weight, so there is nothing to ablate: leave out --super-weights "
                               f"to detect them now, or pass a detection that found some")
    skeleton = config_skeleton(model, cache_dir)
    if skeleton is not None:
        checked_against(det, get_arch(skeleton), skeleton, model, origin)


def check_seq_len(seq_len: int | None, model: str, cache_dir: Path | None = None) -> None:
    """``--seq-len`` holds at least 2 tokens and no more than MODEL's positions (read from its config,
    ``load.config_skeleton``), before any weight loads."""
    if seq_len is None:
        return
    if seq_len < 2:
        raise SuperweightError(f"--seq-len {seq_len}: a perplexity window needs at least 2 tokens, e.g. --seq-len 1024")
    skeleton = config_skeleton(model, cache_dir)
    limit = model_max_length(skeleton) if skeleton is not None else None
    if limit is not None and seq_len > limit:
        raise SuperweightError(f"--seq-len {seq_len} is longer than {model}'s {limit:,} positions: pass at most --seq-len {limit}")


def check_super_weights(det, lm, origin: str | Path) -> list:
    """``det``'s super weights, refused unless they belong to ``lm``'s architecture and lie inside its
    down-projections (layer, row and column in range). Returns the list of ``SuperWeight``."""
    return checked_against(det, lm.arch, lm.model, lm.name, origin)


def read_results(ablation: Path | None = None, sweep: Path | None = None):
    """``(AblationResult | None, SweepResult | None)`` read from the files given, each through its own
    validation (kind, version, fields), so that a wrong file fails before any model loads."""
    return (AblationResult.load(ablation) if ablation is not None else None,
            SweepResult.load(sweep) if sweep is not None else None)
