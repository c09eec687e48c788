"""W8A8 simulation (the paper's Table 3): per-tensor 8-bit weights, per-token 8-bit activations on the
input of every targeted linear layer, naive, with super-activation hold-out, or SmoothQuant.

``with simulate_w8a8(model, W8A8("holdout")) as stats: evaluate(...)``: weights are fake-quantized
inside the block, forward pre-hooks quantize the inputs, and on exit the hooks are removed and the
exact original weights written back. SmoothQuant (Xiao et al. 2023) divides each input channel j
by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies the weight's column j by it
(mathematically equal; a deployment folds ``1/s`` into the previous norm), calibrated on
``calib`` token batches. Only the layers matching ``W8A8.smooth`` are smoothed (those fed by a norm,
where a deployment can fold ``1/s``); the others are quantized as in the naive method.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .api import DEFAULT_EXCLUDE, _arch_of, out_in, target_modules
from .config import RTN, W8A8
from .primitives import fake_quantize, holdout_quantize, quantize_per_token


@dataclass
class W8A8Stats:
    """Counts gathered while the simulation runs (the hold-out's held elements, by module)."""

    config: W8A8
    modules: int = 0
    calls: int = 0
    held_out: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.config.method, "modules": self.modules, "calls": self.calls,
                "held_out_total": sum(self.held_out.values()), "held_out_by_module": dict(self.held_out)}


@torch.no_grad()
def input_channel_absmax(model: nn.Module, modules: dict[str, nn.Module], calib: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Max ``|x|`` per input channel of each module over the calibration batches."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for ids in calib:
            model(input_ids=ids.reshape(1, -1).to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return maxima


def smoothing_factors(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)`` (``weight`` is ``[out, in]``)."""
    w_max = weight.detach().abs().amax(0).float().clamp(min=1e-5)
    return (act_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def _input_hook(name: str, config: W8A8, stats: W8A8Stats, smooth: torch.Tensor | None):
    def fn(module, args):
        x = args[0]
        if smooth is not None:
            x = x / smooth.to(x.dtype)
        stats.calls += 1
        if config.method == "holdout":
            mag = x.detach().abs()
            mask = mag >= config.holdout_ratio * mag.float().median().clamp(min=1e-12)
            held = int(mask.sum())
            if held:
                stats.held_out[name] = stats.held_out.get(name, 0) + held
            return (holdout_quantize(x, mask, 8), *args[1:])
        return (quantize_per_token(x, 8), *args[1:])
    return fn


@contextlib.contextmanager
def simulate_w8a8(
    model: nn.Module, config: W8A8, calib: Sequence[torch.Tensor] = (), include: str | None = None,
    exclude: str | None = DEFAULT_EXCLUDE,
) -> Iterator[W8A8Stats]:
    """Run ``model`` as W8A8 inside the block; original weights restored bitwise on exit."""
    arch = _arch_of(model)
    modules = target_modules(model, include, exclude, arch)
    stats = W8A8Stats(config, modules=len(modules))
    smooth: dict[str, torch.Tensor] = {}
    if config.method == "smoothquant":
        if not calib:
            raise ValueError("SmoothQuant needs calibration batches (calib=[token ids, ...])")
        smoothed = {n: m for n, m in modules.items() if re.search(config.smooth, n)}
        act = input_channel_absmax(model, smoothed, calib)
        smooth = {n: smoothing_factors(act[n], out_in(m, arch), config.alpha) for n, m in smoothed.items() if n in act}
    saved = {n: m.weight.detach().clone() for n, m in modules.items()}
    handles = []
    try:
        with torch.no_grad():
            for name, module in modules.items():
                w = out_in(module, arch)
                s = smooth.get(name)
                scaled = w * s.to(w.dtype) if s is not None else w
                w.copy_(fake_quantize(scaled, RTN(bits=8), param_dtype=torch.float32))
                handles.append(module.register_forward_pre_hook(_input_hook(name, config, stats, s)))
        yield stats
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, module in modules.items():
                module.weight.copy_(saved[name])
