"""One call that finds the super weights of any model reference, in memory or streamed.

``find_super_weights("smollm2-135m")`` loads (or streams, when the checkpoint does not fit in
memory) the model, runs the detection loop of ``detect.py`` on it (the same code either way),
adds the verdict by impact when a text is given (streamed: every zeroed set in one pass) and
the magnitude z-score scan when asked. ``superweight detect`` is a thin shell over it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .loop import DEFAULT_PROMPT, DetectionResult, Method, SpikeRule, detect
from ..core.errors import SuperweightError
from .magnitude import MagnitudeResult, magnitude_scan, stream_magnitude_scan
from ..model.mode import Mode, choose_mode
from ..model.source import ModelSource
from ..model.streamed import StreamedModel
from .trace import TraceRule
from ..core.progress import step
from .streamed import stream_detect
from ..model.load import load_model
from .verdict import judge

# the CLI's --method names: the detection method each runs (``magnitude`` runs detection too: the scan
# ranks the super weights it finds among the large weights), and whether the magnitude scan runs
METHODS = {"default": Method.TRACE, "trace": Method.TRACE, "paper": Method.PAPER, "activation": Method.PAPER,
           "magnitude": Method.TRACE, "both": Method.TRACE}


@dataclass(frozen=True)
class FindConfig:
    """What to run. ``method``: default (trace), paper, magnitude (z-score scan only) or both."""

    method: str = "default"
    prompts: tuple[str, ...] = (DEFAULT_PROMPT,)
    rule: SpikeRule = field(default_factory=SpikeRule)
    trace_rule: TraceRule = field(default_factory=TraceRule)
    max_iter: int = 10
    verdict_text: str | None = None  # the text the verdict scores; None: no verdict
    verdict_tokens: int = 1024
    verdict_full: bool = False  # score every zeroed set on the whole text (no early stop)
    z_threshold: float = 3.0
    scope: str = "down_proj"  # magnitude scan: down_proj or all_linear

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SuperweightError(f"unknown method {self.method!r}: use default, paper, magnitude or both")

    @property
    def magnitude(self) -> bool:
        return self.method in ("magnitude", "both")


def find_super_weights(
    model_ref: str | Path | ModelSource, config: FindConfig = FindConfig(), stream: bool | str = "auto", dtype: str = "float32",
    cache_dir: str | Path | None = None, device: str | None = None, device_map: str | None = None,
    held_bytes: int | None = None,
) -> tuple[DetectionResult, MagnitudeResult | None]:
    """Detection (and, per ``config``, the verdict and the magnitude scan) of ``model_ref``.

    ``stream``: "auto" streams a local safetensors checkpoint only when it does not fit in memory,
    True always streams it, False always loads it. ``held_bytes``: the streamed passes' memory budget
    (``StreamedModel``).
    """
    source = ModelSource.of(model_ref)  # resolved once: the mode, the loader and the streamed model share it
    mode = Mode.MEMORY if stream is False else choose_mode(source, dtype, stream is True, device_map, cache_dir, device)
    if mode is Mode.STREAM:
        return _streamed(StreamedModel(source, dtype, device, held_bytes=held_bytes), config)
    return _in_memory(source, config, dtype, cache_dir, device, device_map)


def _kw(config: FindConfig) -> dict:
    return dict(method=METHODS[config.method], trace_rule=config.trace_rule)


def _streamed(sm: StreamedModel, config: FindConfig):
    with sm:  # one for detection, the verdict and the magnitude scan
        with step("detecting super weights (streamed, layer by layer)"):
            result = stream_detect(sm, list(config.prompts), config.rule, config.max_iter, model_name=sm.source.ref,
                                   verdict_text=config.verdict_text, verdict_tokens=config.verdict_tokens,
                                   verdict_full=config.verdict_full, **_kw(config))
        mag = None
        if config.magnitude:
            with step("magnitude scan (streamed)"):
                mag = stream_magnitude_scan(sm, config.z_threshold, config.scope, result.super_weights)
            result.magnitude = mag.to_dict()
    return result, mag


def _in_memory(source: ModelSource, config: FindConfig, dtype: str, cache_dir, device, device_map):
    lm = load_model(source, dtype=dtype, cache_dir=cache_dir, device_map=device_map, device=device,
                    dequantize=True)  # detection reads the weights
    with step("detecting super weights"):
        result = detect(lm.model, lm.tokenizer, list(config.prompts), config.rule, config.max_iter, model_name=source.ref,
                        arch=lm.arch, **_kw(config))
    result.notes = [*lm.notes, *result.notes]
    if config.verdict_text is not None and result.super_weights:
        with step("verdict: zeroing each finding"):
            judge(lm.model, lm.arch, lm.tokenizer, result, config.verdict_text, config.verdict_tokens,
                  full=config.verdict_full)
    mag = None
    if config.magnitude:
        mag = magnitude_scan(lm.model, lm.arch, config.z_threshold, config.scope, result.super_weights)
        result.magnitude = mag.to_dict()
    return result, mag
