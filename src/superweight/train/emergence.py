"""Super weights across training: detection, the largest residual activation and its creator, and
whether zeroing the creator hurts yet, at every checkpoint of a run.

Per checkpoint (any ``save_pretrained`` folder: ``superweight train`` outputs, or e.g. Pythia
revisions downloaded by the user):

- ``superweight.find.loop`` (its default method: the super activation traced in the residual stream,
  its creating weights, and their verdict by impact when any are found) and its per-layer maxima: the largest
  residual-stream |h| over layers (value, layer, channel, token) and the median over layers;
- the *top creator*: in the layer whose down-projection output peak is the largest, the weight
  ``[row, col]`` whose term ``X[t, col] * W[row, col]`` carries most of that peak (found whether or
  not detection's spike rule accepts it, so its place can be followed from the first checkpoint);
- the held-out loss, the loss with the top creator zeroed and with the detected super weights
  zeroed: the verdict "does zeroing them hurt yet".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch
from torch import nn

from ..prove.ablate import zeroed_weights
from ..core.errors import SuperweightError
from ..core.results import Versioned
from ..find.loop import DEFAULT_PROMPT, detect
from ..find.trace import TraceRule
from ..find.verdict import judge
from ..model.edits import HookSet
from .bitnet import restore, effective_weights
from ..model.load import load_model
from .loop import (
    bos_id, checkpoint_step, eval_windows, heldout_loss, token_stream, checkpoint_folders, CHARS_PER_TOKEN_BOUND,
)
from ..eval.text import load_text

log = logging.getLogger(__name__)

HURT_NATS = 0.1  # a zeroing that raises the held-out loss by this much "hurts"


@dataclass
class CheckpointPoint:
    """What one checkpoint shows."""

    path: str
    step: int | None
    loss: float  # held-out next-token loss, nats
    loss_zero_top: float  # ... with the top creator zeroed
    loss_zero_detected: float | None  # ... with the detected super weights zeroed (None: none found)
    residual_max: float  # largest |h| of the residual stream over layers and tokens
    residual_layer: int  # the layer after which it is largest
    residual_channel: int
    residual_token: int
    residual_median_layer_max: float  # median over layers of the per-layer max |h|
    top: list[int]  # top creator [layer, row, col]
    top_value: float  # its weight value
    top_share: float  # share of the down-projection output peak its term carries
    top_output: float  # the down-projection output peak it creates
    top_input: float  # the input X[t, col] it multiplies
    detected: list[list[int]]  # detection's super weights [layer, row, col]
    residual_typical: float = 0.0  # median |h| over tokens and channels after the peak's layer
    activations: list[list[float]] = field(default_factory=list)  # detection's super activations: [token, channel, layer, ratio]
    verdicts: list[str] = field(default_factory=list)  # detection's verdict label per detected weight
    residual_per_layer: list[float] = field(default_factory=list)  # max |h| after each layer
    output_per_layer: list[float] = field(default_factory=list)  # max |down_proj output| per layer

    @property
    def massive(self) -> float:
        """How many times the typical |h| of its layer the largest activation is (paper: ~100-10,000x)."""
        return self.residual_max / self.residual_typical if self.residual_typical else 0.0

    @property
    def hurts(self) -> bool:
        return self.loss_zero_top - self.loss >= HURT_NATS


@dataclass
class EmergenceResult(Versioned):
    """A series of checkpoints (one training run) and what each shows."""

    KIND: ClassVar[str] = "emergence"
    VERSION: ClassVar[int] = 1
    WRITER: ClassVar[str] = "`superweight emergence CHECKPOINTS... --json PATH`"

    label: str
    text: str
    eval_tokens: int
    points: list[CheckpointPoint]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def _decode(cls, d: dict) -> dict:
        out = {k: d[k] for k in ("label", "text", "eval_tokens", "notes") if k in d}
        out["points"] = [CheckpointPoint(**p) for p in d["points"]]
        return out

    def first_hurting(self) -> CheckpointPoint | None:
        return next((p for p in self.points if p.hurts), None)


# ---------------------------------------------------------------- one checkpoint


def detect_checkpoint(model: nn.Module, tokenizer, arch, prompt: str | None = None, text: str = ""):
    """The one place this module calls detection: ``superweight.find.loop`` (its default method, the
    residual-stream trace) and, when it finds weights and ``text`` is given, its verdict by impact.
    Emergence is read against the calibrated rule alone (2000x its layer's median): the rule's
    fallback (``trace.threshold``) would accept the largest activation at any checkpoint from 100x,
    and the step at which detection first accepts one would then mean something else."""
    result = detect(model, tokenizer, [prompt or DEFAULT_PROMPT], arch=arch, trace_rule=TraceRule(fallback_ratio=0.0))
    if result.super_weights and text:
        judge(model, arch, tokenizer, result, text, tokens=1024, draws=2)
    return result


def top_creator(model: nn.Module, arch, layers) -> tuple[tuple[int, int, int], float, float, float, float]:
    """``((layer, row, col), weight, share, output, input)`` behind the largest down-projection output."""
    best = max(layers, key=lambda s: s.output.magnitude)
    row = best.output.channel
    w_row = arch.weight_matrix(model, best.layer)[row].detach().float()
    x = best.input_at_output_peak.to(w_row.device).float()
    terms = x * w_row
    col = int(terms.abs().argmax())
    share = float(terms[col]) / best.output.value if best.output.value else 0.0
    return (best.layer, row, col), float(w_row[col]), share, best.output.value, float(x[col])


@torch.no_grad()
def typical_residual(model: nn.Module, arch, tokenizer, layer: int, prompt: str | None = None) -> float:
    """Median |h| over tokens and channels of the residual stream after decoder ``layer`` on the prompt."""
    seen: list[torch.Tensor] = []
    device = next(model.parameters()).device
    ids = tokenizer(prompt or DEFAULT_PROMPT, return_tensors="pt")["input_ids"].to(device)
    with HookSet() as hooks:
        hooks.forward(arch.layer_modules(model)[layer], lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        model(input_ids=ids, use_cache=False)
    return float(seen[0].detach().abs().float().median())


def load_checkpoint(path: Path):
    """A checkpoint as a ``LoadedModel``; a BitNet QAT checkpoint gets its ternary forward back."""
    lm = load_model(str(path))
    restore(lm.model)
    return lm


def activation_state(model: nn.Module, tokenizer, arch, prompt: str | None = None, text: str = "") -> tuple[object, dict]:
    """Detection's result and the activation fields of a ``CheckpointPoint`` (no losses) for a model
    as it is now; a BitNet model is read through the weights its forward uses."""
    with effective_weights(model):
        result = detect_checkpoint(model, tokenizer, arch, prompt, text)
        layers = result.layers
        top, value, share, out_peak, in_val = top_creator(model, arch, layers)
        peak = max(layers, key=lambda s: s.residual.magnitude)
        typical = typical_residual(model, arch, tokenizer, peak.layer, prompt)
    res = [s.residual.magnitude for s in layers]
    return result, dict(
        residual_max=peak.residual.magnitude, residual_layer=peak.layer, residual_channel=peak.residual.channel,
        residual_token=peak.residual.token, residual_median_layer_max=float(torch.tensor(res, device="cpu").median()),
        residual_typical=typical, top=list(top), top_value=value, top_share=share, top_output=out_peak,
        top_input=in_val, detected=[list(c) for c in result.coords], residual_per_layer=res,
        activations=[[a.token, a.channel, a.peak_layer, a.ratio] for a in result.activations],
        verdicts=[sw.verdict for sw in result.super_weights], output_per_layer=[s.output.magnitude for s in layers],
    )


def measure(path: Path, text: str, eval_tokens: int, prompt: str | None = None) -> CheckpointPoint:
    """Everything one checkpoint shows (see the module docstring)."""
    lm = load_checkpoint(path)
    model, arch = lm.model.eval(), lm.arch
    seq_len = min(getattr(model.config, "max_position_embeddings", 128) or 128, 512)
    windows = eval_windows(token_stream(lm.tokenizer, text), bos_id(lm.tokenizer), seq_len, eval_tokens)
    result, fields = activation_state(model, lm.tokenizer, arch, prompt, text)
    loss = heldout_loss(model, windows)
    with zeroed_weights(model, arch, [fields["top"]]):
        loss_top = heldout_loss(model, windows)
    loss_det = None
    if result.super_weights:
        with zeroed_weights(model, arch, result.super_weights):
            loss_det = heldout_loss(model, windows)
    return CheckpointPoint(path=str(path), step=checkpoint_step(path), loss=loss, loss_zero_top=loss_top,
                           loss_zero_detected=loss_det, **fields)


def emergence(
    checkpoints: Sequence[str | Path], text: str = "wikitext2", eval_tokens: int = 4096,
    prompt: str | None = None, label: str = "", progress=None,
) -> EmergenceResult:
    """Measure every checkpoint (folders, or ``superweight train`` outputs holding ``step-*``)."""
    folders = checkpoint_folders(list(checkpoints))
    if not folders:
        raise SuperweightError("no checkpoints given: pass checkpoint folders or a `superweight train --out` folder")

    body = load_text(text)[: (eval_tokens + 1024) * CHARS_PER_TOKEN_BOUND]  # only what the windows use
    points = []
    for i, folder in enumerate(folders):
        points.append(measure(folder, body, eval_tokens, prompt))
        if progress:
            progress(i + 1, len(folders), points[-1])
    return EmergenceResult(label or Path(checkpoints[0]).name, text, eval_tokens, points)
