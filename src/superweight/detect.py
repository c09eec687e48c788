"""Find super weights: the paper's data-free activation-spike method and the seed's z-score scan.

Activation method (Yu et al. 2024, Sec. 3.1), one forward pass of one prompt per iteration:

1. ``ActivationCapture`` records, per layer, max |input| and max |output| of the MLP
   down-projection.
2. A layer *spikes* when ``SpikeRule`` says so for both its input and its output maximum:
   at least ``floor`` in absolute value **and** at least ``ratio`` times the median of the same
   maximum over the *other* layers.
3. In the earliest spiking layer the output peak ``Y[t, j]`` gives the row ``j``; the column is the
   ``k`` whose term ``X[t, k] * W[j, k]`` contributes most to it. That weight is a super weight
   when its term carries at least ``min_share`` of ``Y[t, j]`` (one weight makes the spike) and
   its input ``|X[t, k]|`` itself passes the spike rule, and ``|W[j, k]|`` is an outlier of its
   matrix (at least ``min_weight_z`` standard deviations): a large input on an ordinary weight
   is not a super weight.
4. The weight is zeroed (temporarily; restored bit for bit afterwards) and the prompt is run
   again, until no spiking layer yields a new super weight or ``max_iter`` is reached.

The defaults (floor 50, ratio 50, share 0.5) were chosen by measuring SmolLM2-135M (see
docs in README.md): its super activation layers sit 300-700x above the median layer, the
largest non-super layer about 30x.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .version import __version__
from .ablate import zeroed_weights
from .arch import ArchSpec, get_arch
from .capture import ActivationCapture, LayerStats
from .errors import SuperweightError
from .files import read_json, write_json_atomic  # noqa: F401  (write_json_atomic: re-exported)

SCHEMA_VERSION = 1
DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."


@dataclass
class SpikeRule:
    """When is a layer maximum a spike? Both conditions must hold."""

    floor: float = 50.0  # absolute |activation| floor (the authors' plots printed |x| > 50)
    ratio: float = 50.0  # times the median of the other layers' maxima
    min_share: float = 0.5  # the weight's term must carry this share of the output spike
    min_weight_z: float = 5.0  # |w| must be this many standard deviations of its matrix

    def threshold(self, maxima: Sequence[float], layer: int) -> float:
        others = [m for i, m in enumerate(maxima) if i != layer]
        median = statistics.median(others) if others else 0.0
        return max(self.floor, self.ratio * median)

    def spikes(self, maxima: Sequence[float], layer: int) -> bool:
        return maxima[layer] >= self.threshold(maxima, layer)


@dataclass
class SuperWeight:
    layer: int
    row: int  # output (hidden) channel
    col: int  # input (intermediate) channel
    module: str
    value: float  # the weight's original value
    magnitude_rank: int  # 1 = largest |w| in its matrix
    input_value: float  # X[t, col] that revealed it
    output_value: float  # Y[t, row] that revealed it
    share: float  # X[t, col] * W[row, col] / Y[t, row]
    token: int  # token position of the spike
    iteration: int
    late_layer: bool = False  # in the last quarter of the model: see the paper's Llama-2-7B layer 30
    prompts: list[int] = field(default_factory=list)  # indices of the prompts that found it

    @property
    def coord(self) -> tuple[int, int, int]:
        return (self.layer, self.row, self.col)


@dataclass
class DetectionResult:
    model: str
    architecture: str
    num_layers: int
    prompts: list[str]
    rule: SpikeRule
    super_weights: list[SuperWeight]
    layers: list[LayerStats]  # per-layer maxima of the unmodified model, first prompt
    per_prompt: list[list[tuple[int, int, int]]]  # coordinates found by each prompt
    iterations: int = 0
    notes: list[str] = field(default_factory=list)
    magnitude: dict | None = None  # the z-score scan (see magnitude_scan), when run
    version: int = SCHEMA_VERSION
    tool_version: str = __version__

    @property
    def agree(self) -> bool:
        return all(sorted(p) == sorted(self.per_prompt[0]) for p in self.per_prompt)

    @property
    def coords(self) -> list[tuple[int, int, int]]:
        return [sw.coord for sw in self.super_weights]

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "tool_version": self.tool_version,
            "model": self.model,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "prompts": self.prompts,
            "rule": asdict(self.rule),
            "agree_across_prompts": self.agree,
            "super_weights": [asdict(sw) for sw in self.super_weights],
            "per_prompt": [[list(c) for c in p] for p in self.per_prompt],
            "iterations": self.iterations,
            "layers": [s.to_dict() for s in self.layers],
            "magnitude": self.magnitude,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DetectionResult":
        if d.get("version") != SCHEMA_VERSION:
            raise SuperweightError(
                f"detection file version {d.get('version')!r} is not {SCHEMA_VERSION}: re-run `superweight detect`"
            )
        return cls(
            model=d["model"],
            architecture=d["architecture"],
            num_layers=d["num_layers"],
            prompts=d["prompts"],
            rule=SpikeRule(**d["rule"]),
            super_weights=[SuperWeight(**sw) for sw in d["super_weights"]],
            layers=[LayerStats.from_dict(x) for x in d["layers"]],
            per_prompt=[[tuple(c) for c in p] for p in d["per_prompt"]],
            iterations=d.get("iterations", 0),
            notes=d.get("notes", []),
            magnitude=d.get("magnitude"),
            tool_version=d.get("tool_version", "?"),
        )

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "DetectionResult":
        data = read_json(path, "detection", f" (write one with `superweight detect --json {path}`)")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as exc:
            raise SuperweightError(f"{path} is not a detection result (missing {exc})") from None


# ---------------------------------------------------------------- activation method


def encode_prompt(tokenizer, prompt: str, device: torch.device | str = "cpu") -> dict:
    if not prompt or not prompt.strip():
        raise SuperweightError("the prompt is empty: pass some text, e.g. --prompt 'Apple Inc. is a worldwide tech company.'")
    enc = tokenizer(prompt, return_tensors="pt")
    if enc["input_ids"].shape[-1] == 0:
        raise SuperweightError(f"the prompt {prompt!r} encodes to no tokens: pass some text")
    return {k: v.to(device) for k, v in enc.items()}


def run_capture(model: nn.Module, arch: ArchSpec, inputs: dict) -> list[LayerStats]:
    """One forward pass under an ``ActivationCapture``; per-layer maxima."""
    with ActivationCapture(model, arch) as cap, torch.no_grad():
        model(**inputs, use_cache=False)
    return cap.as_list()


def magnitude_rank(matrix: torch.Tensor, row: int, col: int) -> int:
    return int((matrix.abs() > matrix[row, col].abs()).sum()) + 1


def find_candidate(
    model: nn.Module, arch: ArchSpec, stats: list[LayerStats], rule: SpikeRule, skip: set
) -> SuperWeight | None:
    """The super weight behind the earliest spiking layer, or None (see module doc)."""
    ins = [s.input.magnitude for s in stats]
    outs = [s.output.magnitude for s in stats]
    for i, st in enumerate(stats):
        if not (rule.spikes(ins, i) and rule.spikes(outs, i)) or st.input_at_output_peak is None:
            continue
        row = st.output.channel
        w_row = arch.weight_matrix(model, i)[row].detach().float()
        x = st.input_at_output_peak.to(w_row.device)
        terms = x * w_row
        col = int(terms.abs().argmax())
        share = float(terms[col]) / st.output.value if st.output.value else 0.0
        x_col = abs(float(x[col]))
        if share < rule.min_share or x_col < rule.threshold(ins, i) or (i, row, col) in skip:
            continue
        if abs(float(w_row[col])) < rule.min_weight_z * float(arch.weight_matrix(model, i).detach().float().std()):
            continue
        return SuperWeight(
            layer=i, row=row, col=col, module=arch.down_proj_name(i), value=float(w_row[col]),
            magnitude_rank=0, input_value=float(x[col]), output_value=st.output.value, share=share,
            token=st.output.token, iteration=0, late_layer=i >= 0.75 * len(stats),
        )
    return None


def detect_prompt(
    model: nn.Module, arch: ArchSpec, inputs: dict, rule: SpikeRule, max_iter: int
) -> tuple[list[SuperWeight], list[LayerStats], int]:
    """Iterative detection for one encoded prompt. Returns (super weights, first stats, iterations)."""
    found: list[SuperWeight] = []
    first: list[LayerStats] = []
    iterations = 0
    for it in range(max_iter):
        with zeroed_weights(model, arch, found):
            stats = run_capture(model, arch, inputs)
            iterations += 1
            first = first or stats
            sw = find_candidate(model, arch, stats, rule, {s.coord for s in found})
        if sw is None:
            break
        matrix = arch.weight_matrix(model, sw.layer).detach()
        sw.value = float(matrix[sw.row, sw.col])
        sw.magnitude_rank = magnitude_rank(matrix, sw.row, sw.col)
        sw.iteration = it
        found.append(sw)
    return found, first, iterations


def detect(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str] | str = (DEFAULT_PROMPT,),
    rule: SpikeRule | None = None,
    max_iter: int = 10,
    model_name: str = "",
    arch: ArchSpec | None = None,
) -> DetectionResult:
    """Find super weights with the paper's iterative activation-spike method.

    The model's weights are bitwise unchanged afterwards.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SuperweightError("no prompt given: pass at least one --prompt")
    rule = rule or SpikeRule()
    arch = arch or get_arch(model)
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p, device) for p in prompts]
    merged: dict[tuple[int, int, int], SuperWeight] = {}
    per_prompt, layers, total_iter = [], [], 0
    for pi, inputs in enumerate(encoded):
        found, stats, iters = detect_prompt(model, arch, inputs, rule, max_iter)
        layers = layers or stats
        total_iter += iters
        per_prompt.append([sw.coord for sw in found])
        for sw in found:
            merged.setdefault(sw.coord, sw).prompts.append(pi)
    return DetectionResult(
        model=model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        architecture=arch.name,
        num_layers=arch.num_layers(model),
        prompts=prompts,
        rule=rule,
        super_weights=list(merged.values()),
        layers=layers,
        per_prompt=per_prompt,
        iterations=total_iter,
    )
