"""The model-level verb: ``quantize(model, RTN(bits=4, block=128 * 128, clip=ZScore(9)), keep=sws)``.

Targets every ``nn.Linear`` (and GPT-2 ``Conv1D``) whose name matches ``include`` and not
``exclude`` (default: ``lm_head``; embeddings are not linear layers and are never touched). Each
weight is quantized as ``[out, in]`` (Conv1D weights are transposed for that), written back
fake-quantized in place, and returned as a ``QuantizedTensor`` for packing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..ablate import as_coords
from ..arch import ArchSpec, get_arch
from ..errors import SuperweightError
from .config import RTN, Ternary, W8A8, describe, to_dict
from .primitives import QuantizedTensor, quantize_tensor, sqnr

DEFAULT_EXCLUDE = r"(^|\.)lm_head$"


@dataclass
class QuantResult:
    """What ``quantize`` did: per weight name, the quantized tensor and its SQNR (dB)."""

    config: RTN | Ternary
    tensors: dict[str, QuantizedTensor]
    transposed: dict[str, bool]
    sqnr_db: dict[str, float]
    kept: list[dict] = field(default_factory=list)  # {"name", "index", "value"} per kept weight

    @property
    def quantized_weights(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def summary(self) -> dict:
        return {
            "config": to_dict(self.config),
            "label": describe(self.config),
            "modules": len(self.tensors),
            "quantized_weights": self.quantized_weights,
            "kept": self.kept,
            "sparse_values": sum(int(t.sparse_idx.numel()) for t in self.tensors.values()),
            "min_sqnr_db": min(self.sqnr_db.values(), default=float("nan")),
        }


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2
    )


def target_modules(model: nn.Module, include: str | None = None, exclude: str | None = DEFAULT_EXCLUDE) -> dict[str, nn.Module]:
    """Linear modules by name, filtered by ``include`` / ``exclude`` regular expressions (re.search)."""
    found = {
        name: m for name, m in model.named_modules()
        if is_linear(m) and (include is None or re.search(include, name))
        and not (exclude and re.search(exclude, name))
    }
    if not found:
        raise SuperweightError(f"no linear module matches include={include!r} exclude={exclude!r}")
    return found


def out_in(module: nn.Module) -> torch.Tensor:
    """A module's weight as ``[out, in]`` (a transposed view for Conv1D)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def keep_indices(model: nn.Module, keep: Iterable | dict | None, arch: ArchSpec | None) -> dict[str, list[int]]:
    """Flat ``[out, in]`` indices per module name. ``keep``: super weights / (layer, row, col) tuples
    (down-projection coordinates), or ``{module_name: [flat indices]}``."""
    if not keep:
        return {}
    if isinstance(keep, dict):
        return {k: [int(i) for i in v] for k, v in keep.items()}
    arch = arch or get_arch(model)
    out: dict[str, list[int]] = {}
    for layer, row, col in as_coords(keep):
        module = arch.down_proj_module(model, layer)
        n_out, n_in = out_in(module).shape
        if not (0 <= row < n_out and 0 <= col < n_in):
            raise SuperweightError(f"kept weight {layer}:[{row}, {col}] is outside its [{n_out}, {n_in}] down-projection")
        out.setdefault(arch.down_proj_name(layer), []).append(row * n_in + col)
    return out


@torch.no_grad()
def quantize(
    model: nn.Module, config: RTN | Ternary, keep: Iterable | dict | None = None,
    include: str | None = None, exclude: str | None = DEFAULT_EXCLUDE, arch: ArchSpec | None = None,
    param_dtype: torch.dtype = torch.float16,
) -> QuantResult:
    """Fake-quantize the target weights of ``model`` in place; return the codes for packing."""
    if isinstance(config, W8A8):
        raise SuperweightError("W8A8 quantizes activations too: use superweight.quant.simulate_w8a8(model, config)")
    modules = target_modules(model, include, exclude)
    keeps = keep_indices(model, keep, arch)
    missing = sorted(set(keeps) - set(modules))
    if missing:
        raise SuperweightError(f"kept weights in {missing[0]}, which is not quantized: widen include/exclude")
    result = QuantResult(config, {}, {}, {})
    for name, module in modules.items():
        w = out_in(module)
        qt = quantize_tensor(w, config, keeps.get(name), param_dtype)
        w_hat = qt.dequantize(w.dtype)
        key = f"{name}.weight"
        result.sqnr_db[key] = sqnr(w, w_hat)
        w.copy_(w_hat)
        result.tensors[key] = qt
        result.transposed[key] = type(module).__name__ == "Conv1D"
        for i in keeps.get(name, []):
            result.kept.append({"name": key, "index": i, "value": float(w.reshape(-1)[i])})
    return result
