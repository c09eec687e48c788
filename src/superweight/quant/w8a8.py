"""W8A8 simulation (the paper's Table 3): per-tensor 8-bit weights, per-token 8-bit activations on the
input of every targeted linear layer, naive, with super-activation hold-out, or SmoothQuant.

``with simulate_w8a8(model, W8A8("holdout")) as stats: evaluate(...)``: weights are fake-quantized
inside the block, forward pre-hooks quantize the inputs, and on exit the hooks are removed and the
exact original weights written back. SmoothQuant (Xiao et al. 2023) divides each input channel j
by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies the weight's column j by it
(mathematically equal; a deployment folds ``1/s`` into the previous norm), calibrated on
``calib`` token batches. As in the reference code (mit-han-lab/smoothquant ``smooth_lm`` /
``smooth_ln_fcs``), only the layers matching ``W8A8.smooth`` are smoothed (those fed by a norm) and
the layers that read one norm (q/k/v; gate/up) share one ``s``. ``W8A8.weights="channel"`` and
``symmetric=True`` give the reference's fake quantization (symmetric absmax per output row and per
token); the defaults are the paper's Table 3 setting (asymmetric per tensor and per token).

The W8A8 artifact (``superweight quantize --scheme w8a8``, ``export.save_quantized(..., activations=...)``)
stores int8 weights with per-tensor scales and, in its manifest, the input channels held out of
activation quantization (``held_channels``: the super activations' channels, found on calibration
text); loading it installs ``activation_hook`` on every quantized linear layer and ``experts_forward``
with both inputs quantized on every experts module.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .api import DEFAULT_EXCLUDE, arch_of, out_in, target_modules
from .config import RTN, W8A8
from ..model.arch import expert_params
from ..model.edits import HookSet, edited_weights
from ..core.errors import SuperweightError
from .primitives import fake_quantize, holdout_quantize, quantize_per_token
from ..eval.perplexity import tokenize_stream
from ..eval.text import load_text


@dataclass
class W8A8Stats:
    """Counts gathered while the simulation runs (the hold-out's held elements, by module)."""

    config: W8A8
    modules: int = 0
    calls: int = 0
    held_out: dict[str, int] = field(default_factory=dict)
    experts: int = 0  # expert matrices simulated (an MoE's gate_up and down of each expert, counted once per expert)

    def to_dict(self) -> dict:
        return {"method": self.config.method, "modules": self.modules, "experts": self.experts, "calls": self.calls,
                "held_out_total": sum(self.held_out.values()), "held_out_by_module": dict(self.held_out)}


@torch.no_grad()
def input_channel_absmax(model: nn.Module, modules: dict[str, nn.Module], calib: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Max ``|x|`` per input channel of each module over the calibration batches."""
    return _input_stats(model, modules, calib)[0]


@torch.no_grad()
def _input_stats(model: nn.Module, modules: dict[str, nn.Module], calib: Sequence[torch.Tensor]):
    """Per module: max ``|x|`` per input channel, and each batch's median ``|x|``."""
    maxima: dict[str, torch.Tensor] = {}
    medians: dict[str, list[float]] = {}
    with recording_inputs(modules, maxima, medians):
        for ids in calib:
            model(input_ids=ids.reshape(1, -1).to(next(model.parameters()).device), use_cache=False)
    return maxima, medians


@contextlib.contextmanager
def recording_inputs(modules: dict[str, nn.Module], maxima: dict[str, torch.Tensor],
                     medians: dict[str, list[float]] | None = None) -> Iterator[None]:
    """Inside the block, each call of a module in ``modules`` raises ``maxima[name]`` to its input's
    max ``|x|`` per channel (and appends the input's median ``|x|`` to ``medians[name]``). An experts
    module records its two inputs, ``{name}.gate_up_proj`` and ``{name}.down_proj``, running
    ``experts_forward`` inside the block."""
    def record(name):
        def fn(x: torch.Tensor) -> torch.Tensor:
            a = x.detach().abs().reshape(-1, x.shape[-1]).float()
            m = a.amax(0)
            maxima[name] = torch.maximum(maxima[name], m) if name in maxima else m
            if medians is not None:
                medians.setdefault(name, []).append(float(a.median()))
            return x
        return fn

    def hook(name):
        r = record(name)

        def fn(module, args) -> None:
            r(args[0])
        return fn

    experts = {n: m for n, m in modules.items() if is_experts(m)}
    with HookSet() as hooks, _experts_forwards(experts, lambda n: (record(f"{n}.gate_up_proj"), record(f"{n}.down_proj"))):
        for n, m in modules.items():
            if n not in experts:
                hooks.pre(m, hook(n))
        yield


def is_experts(module: nn.Module) -> bool:
    """An MoE's experts module: 3-D expert weights, no linear layers (``down_proj`` a parameter)."""
    w = getattr(module, "down_proj", None)
    return isinstance(w, torch.Tensor) and w.dim() == 3


@contextlib.contextmanager
def _experts_forwards(experts: dict[str, nn.Module], inputs) -> Iterator[None]:
    """Each experts module runs ``experts_forward`` with ``inputs(name)`` (its two input functions) inside
    the block; its own forward back on exit."""
    try:
        for name, module in experts.items():
            module.forward = experts_forward(module, *inputs(name))
        yield
    finally:
        for module in experts.values():
            module.__dict__.pop("forward", None)


def smoothing_factors(act_max: torch.Tensor, weight: torch.Tensor | Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)`` (weights ``[out, in]``); several
    weights that read the same input (q/k/v after one norm) share one ``s``: the column maxima are
    taken over all of them, as the reference ``smooth_ln_fcs`` does."""
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp(min=1e-5)
    return (act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def smoothed_modules(modules: dict[str, nn.Module], config: W8A8) -> dict[str, nn.Module]:
    """The modules SmoothQuant smooths (``config.smooth``: those fed by a norm)."""
    return {n: m for n, m in modules.items() if re.search(config.smooth, n)}


def shared_smoothing(smoothed: dict[str, nn.Module], act: dict[str, torch.Tensor], alpha: float, arch) -> dict[str, torch.Tensor]:
    """One ``s`` per group of smoothed modules with the same parent (q/k/v of one attention block,
    gate/up of one MLP: they read the output of the same norm, into which ``1/s`` folds), from the
    calibration's input maxima ``act`` (``input_channel_absmax``)."""
    by_parent: dict[str, list[str]] = {}
    for name in smoothed:
        if name in act:
            by_parent.setdefault(name.rsplit(".", 1)[0], []).append(name)
    out = {}
    for names in by_parent.values():
        a = torch.stack([act[n] for n in names]).amax(0)
        s = smoothing_factors(a, [out_in(smoothed[n], arch) for n in names], alpha)
        out.update({n: s for n in names})
    return out


def quantize_weight_w8(w: torch.Tensor, config: W8A8) -> torch.Tensor:
    """8-bit weights: asymmetric RTN per tensor (the paper), or symmetric absmax per output row
    (SmoothQuant's ``quantize_weight_per_channel_absmax``)."""
    if config.weights == "tensor":
        return fake_quantize(w, RTN(bits=8), param_dtype=torch.float32)
    scale = w.detach().abs().amax(-1, keepdim=True).float().clamp(min=1e-5) / 127
    return ((w.float() / scale).round() * scale).to(w.dtype)


def quantize_act_w8(x: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Per-token 8-bit activations: asymmetric min/max, or symmetric absmax (SmoothQuant's code)."""
    if not symmetric:
        return quantize_per_token(x, 8)
    scale = x.detach().abs().amax(-1, keepdim=True).float().clamp(min=1e-5) / 127
    return ((x.float() / scale).round() * scale).to(x.dtype)


def _quantize_input(x: torch.Tensor, name: str, config: W8A8, stats: W8A8Stats, smooth: torch.Tensor | None = None) -> torch.Tensor:
    """One layer input as the simulation feeds it: smoothed, then 8-bit per token (the hold-out keeps
    the elements at least ``holdout_ratio`` x the input's median |x| exact, counted by ``name``)."""
    if smooth is not None:
        x = x / smooth.to(device=x.device, dtype=x.dtype)
    stats.calls += 1
    if config.method == "holdout":
        mag = x.detach().abs()
        mask = mag >= config.holdout_ratio * mag.float().median().clamp(min=1e-12)
        held = int(mask.sum())
        if held:
            stats.held_out[name] = stats.held_out.get(name, 0) + held
        return holdout_quantize(x, mask, 8)
    return quantize_act_w8(x, config.symmetric)


def _input_hook(name: str, config: W8A8, stats: W8A8Stats, smooth: torch.Tensor | None):
    def fn(module, args):
        return (_quantize_input(args[0], name, config, stats, smooth), *args[1:])
    return fn


def _standard_experts(module: nn.Module) -> bool:
    """transformers' experts layout the simulated forward reproduces: fused [gate; up], ``[out, in]``
    matrices, no bias, no norm after each expert (every supported MoE)."""
    return (getattr(module, "has_gate", True) and not getattr(module, "has_bias", False)
            and not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True)
            and not getattr(module, "has_post_expert_norm", False))


def experts_forward(module: nn.Module, quant_gate_up, quant_down):
    """An experts module's forward with its two inputs passed through ``quant_gate_up`` / ``quant_down``
    (the routed tokens' hidden states; each expert's ``act(gate) * up``), the loop of transformers' eager
    implementation. Per-token quantization of the hidden states before routing is the same as per
    expert, since a token's row is quantized on its own."""
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        x = quant_gate_up(hidden_states)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < module.down_proj.shape[0]:
                continue
            tok, slot = torch.where(top_k_index == e)
            gate, up = nn.functional.linear(x[tok], module.gate_up_proj[e]).chunk(2, dim=-1)
            y = nn.functional.linear(quant_down(module.act_fn(gate) * up), module.down_proj[e])
            out.index_add_(0, tok, (y * top_k_weights[tok, slot, None]).to(out.dtype))
        return out
    return forward


def _experts_modules(model: nn.Module, arch, include: str | None, exclude: str | None) -> dict[str, nn.Module]:
    """An MoE's experts modules whose weights ``quantize`` would take (``include``/``exclude`` on
    ``...experts.down_proj``), by module name."""
    if arch is None or not arch.is_moe:
        return {}
    out = {}
    for i in range(arch.num_layers(model)):
        module = arch.experts_module(model, i)
        name = arch.experts_name(i)
        if module is not None and (include is None or re.search(include, f"{name}.down_proj")) \
                and not (exclude and re.search(exclude, f"{name}.down_proj")):
            if not _standard_experts(module):
                raise ValueError(f"{name}: experts with biases, transposed or interleaved weights are not simulated")
            out[name] = module
    return out


@contextlib.contextmanager
def _simulated_experts(experts: dict[str, nn.Module], config: W8A8, stats: W8A8Stats) -> Iterator[None]:
    """8-bit weights (per expert matrix) and inputs for each experts module; forwards restored on exit."""
    for name, module in experts.items():
        for _, w in expert_params(module):
            for e in range(w.shape[0]):
                w[e].copy_(quantize_weight_w8(w[e], config))
        stats.experts += module.down_proj.shape[0]
    with _experts_forwards(experts, lambda n: (lambda x: _quantize_input(x, f"{n}.gate_up_proj", config, stats),
                                               lambda x: _quantize_input(x, f"{n}.down_proj", config, stats))):
        yield


def w8a8_targets(model: nn.Module, include: str | None = None, exclude: str | None = DEFAULT_EXCLUDE,
                 arch=None) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(linear modules, experts modules) W8A8 takes, by name: those whose weights ``quantize`` would take
    (a model with experts may have no linear target)."""
    arch = arch or arch_of(model)
    experts = _experts_modules(model, arch, include, exclude)
    return target_modules(model, include, exclude, arch, required=not experts), experts


@contextlib.contextmanager
def simulate_w8a8(
    model: nn.Module, config: W8A8, calib: Sequence[torch.Tensor] = (), include: str | None = None,
    exclude: str | None = DEFAULT_EXCLUDE, within: str | None = None, act_max: dict[str, torch.Tensor] | None = None,
) -> Iterator[W8A8Stats]:
    """Run ``model`` as W8A8 inside the block; original weights restored bitwise on exit.

    ``within`` (a name prefix, e.g. ``model.layers.3.``) simulates only the modules under it, as
    ``quantize``'s does (a streamed model's layer being read). SmoothQuant's input maxima are measured
    on ``calib`` unless given by module name in ``act_max`` (measured already, e.g. while streaming)."""
    arch = arch_of(model)
    modules, experts = w8a8_targets(model, include, exclude, arch)
    if within is not None:
        experts = {n: m for n, m in experts.items() if n.startswith(within)}
        modules = {n: m for n, m in modules.items() if n.startswith(within)}
    stats = W8A8Stats(config, modules=len(modules) + len(experts))
    smooth: dict[str, torch.Tensor] = {}
    if config.method == "smoothquant":
        smoothed = smoothed_modules(modules, config)
        if act_max is None:
            if not calib:
                raise ValueError("SmoothQuant needs calibration batches (calib=[token ids, ...])")
            act_max = input_channel_absmax(model, smoothed, calib)
        smooth = shared_smoothing(smoothed, act_max, config.alpha, arch)
    expert_weights = [w for m in experts.values() for _, w in expert_params(m)]
    with edited_weights([m.weight for m in modules.values()] + expert_weights), HookSet() as hooks, torch.no_grad():
        for name, module in modules.items():
            w = out_in(module, arch)
            s = smooth.get(name)
            scaled = w * s.to(device=w.device, dtype=w.dtype) if s is not None else w
            w.copy_(quantize_weight_w8(scaled, config))
            hooks.pre(module, _input_hook(name, config, stats, s))
        with _simulated_experts(experts, config, stats):
            yield stats


# ---------------------------------------------------------------- the W8A8 artifact's activations


CALIBRATION_TEXT = "wiki-intros"  # never a test text
CALIBRATION = "wiki-intros, 4 x 256 tokens"


def calibration_batches(tokenizer, text: str, n: int = 4, length: int = 256) -> list[torch.Tensor]:
    """``n`` consecutive ``length``-token samples of ``text`` (SmoothQuant's calibration set, and the W8A8
    artifact's)."""
    ids = tokenize_stream(tokenizer, text, n * length)
    return [ids[i * length:(i + 1) * length] for i in range(n) if ids[i * length:(i + 1) * length].numel() > 1]


def default_calibration(tokenizer) -> list[torch.Tensor]:
    """``calibration_batches`` of the built-in calibration text (``CALIBRATION``)."""
    return calibration_batches(tokenizer, load_text(CALIBRATION_TEXT))


def held_channels(model: nn.Module, calib: Sequence[torch.Tensor], ratio: float = 1000.0, include: str | None = None,
                  exclude: str | None = DEFAULT_EXCLUDE) -> dict[str, list[int]]:
    """Per linear module (and per experts module's two inputs, ``{name}.gate_up_proj`` / ``.down_proj``),
    the input channels whose calibration max ``|x|`` reaches ``ratio`` x the median ``|x|`` of its input
    (the super activations' channels): held out of 8-bit quantization."""
    modules, experts = w8a8_targets(model, include, exclude)
    return held_of(*_input_stats(model, {**modules, **experts}, calib), ratio)


def held_of(maxima: dict[str, torch.Tensor], medians: dict[str, list[float]], ratio: float = 1000.0) -> dict[str, list[int]]:
    """``held_channels`` from the recorded input statistics (``recording_inputs``: max ``|x|`` per channel,
    each call's median ``|x|``, whose median is the threshold's base)."""
    out = {}
    for name, mx in maxima.items():
        median = float(torch.tensor(medians[name], device="cpu").median())
        chans = torch.nonzero(mx >= ratio * max(median, 1e-12)).reshape(-1).tolist()
        if chans:
            out[name] = chans
    return out


def activation_spec(modules: Sequence[str], held: dict[str, list[int]], found_on: str = CALIBRATION,
                    experts: Sequence[str] = ()) -> dict:
    """The manifest's ``activations`` entry of a W8A8 artifact: 8-bit per-token inputs of the linear
    ``modules`` and of the ``experts`` modules (both their inputs), the ``held`` channels (the super
    activations') kept exact."""
    spec = {"bits": 8, "granularity": "per_token", "modules": list(modules), "held_out_channels": held,
            "found_on": found_on}
    return spec | ({"experts": list(experts)} if experts else {})


def w8a8_activations(model: nn.Module, tokenizer, include: str | None = None, exclude: str | None = DEFAULT_EXCLUDE,
                     ratio: float = 1000.0) -> dict:
    """The ``activations`` entry of ``model``'s W8A8 artifact, calibrated on ``CALIBRATION`` (the model's
    weights as they are now: call it before quantizing them)."""
    modules, experts = w8a8_targets(model, include, exclude)
    held = held_channels(model, default_calibration(tokenizer), ratio, include, exclude)
    return activation_spec(list(modules), held, experts=list(experts))


def input_quantizer(channels: Sequence[int], symmetric: bool = False):
    """``x ->`` its 8-bit per-token quantization, the ``channels`` kept exact (filled with the median while
    the range is taken, then put back)."""
    idx = torch.as_tensor(list(channels), dtype=torch.long, device="cpu")  # moved to each input's device

    def quant(x: torch.Tensor) -> torch.Tensor:
        if not idx.numel():
            return quantize_act_w8(x, symmetric)
        mask = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
        mask[idx.to(x.device)] = True
        return holdout_quantize(x, mask.expand_as(x), 8)
    return quant


def activation_hook(channels: Sequence[int], symmetric: bool = False):
    """A pre-hook quantizing a linear layer's input per token to 8 bits, the ``channels`` kept exact."""
    quant = input_quantizer(channels, symmetric)

    def fn(module, args):
        return (quant(args[0]), *args[1:])
    return fn


def attach_activation_quant(model: nn.Module, spec: dict) -> list:
    """Install the 8-bit activation quantization an artifact's manifest describes (``activations``:
    ``{"bits": 8, "modules": [...], "experts": [...], "held_out_channels": {input: [channel, ...]}}``): a
    pre-hook on each linear module, ``experts_forward`` with both inputs quantized on each experts module;
    they stay with the model (it is a W8A8 model). Returns the hooks' handles."""
    held = spec.get("held_out_channels", {})
    symmetric = bool(spec.get("symmetric"))
    handles = []
    for name in spec["modules"]:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(activation_hook(held.get(name, []), symmetric)))
    for name in spec.get("experts", []):
        module = model.get_submodule(name)
        if not is_experts(module) or not _standard_experts(module):
            raise SuperweightError(f"{name} is not an experts module this version runs as W8A8: re-export the artifact")
        module.forward = experts_forward(module, input_quantizer(held.get(f"{name}.gate_up_proj", []), symmetric),
                                         input_quantizer(held.get(f"{name}.down_proj", []), symmetric))
    return handles
