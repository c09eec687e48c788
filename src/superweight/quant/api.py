"""The model-level verb: ``quantize(model, RTN(bits=4, block=128 * 128, clip=ZScore(9)), keep=sws)``.

Targets every ``nn.Linear`` (and GPT-2 ``Conv1D``) whose name matches ``include`` and not
``exclude`` (default: ``lm_head``; embeddings are not linear layers and are never touched), and in
a mixture of experts every experts' 3-D weight (``mlp.experts.gate_up_proj`` / ``down_proj``,
``[experts, out, in]``, quantized as one ``[experts * out, in]`` matrix: each expert's rows are
rows of it). Each weight is quantized as ``[out, in]`` (Conv1D weights are transposed for that),
written back fake-quantized in place (unless ``write_back=False``: an artifact needs only the
codes), and returned as a ``QuantizedTensor`` for packing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..core.coords import as_coords, as_keys
from ..model.arch import ArchSpec, check_index, expert_params
from ..model.arch_infer import get_arch
from ..core.errors import SuperweightError
from .config import RTN, SMOOTHABLE, Ternary, W8A8, describe, to_dict
from .primitives import QuantizedTensor, quantize_tensor

DEFAULT_EXCLUDE = r"(^|\.)lm_head$"


@dataclass
class QuantResult:
    """What ``quantize`` did: per weight name, the quantized tensor and its SQNR (dB)."""

    config: RTN | Ternary
    tensors: dict[str, QuantizedTensor]
    transposed: dict[str, bool]
    sqnr_db: dict[str, float]
    kept: list[dict] = field(default_factory=list)  # {"name", "index", "value"} per kept weight
    views: dict[str, list[int]] = field(default_factory=dict)  # a weight's own shape when not [out, in] (experts)

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


def is_linear(module: nn.Module, arch: ArchSpec | None = None) -> bool:
    """``nn.Linear``, or a 2-D weight module in an architecture whose ``ArchSpec`` says its linear
    layers are stored transposed (GPT-2's ``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return bool(arch is not None and arch.transposed and isinstance(weight, torch.Tensor) and weight.dim() == 2
                and not isinstance(module, (nn.Embedding, nn.LayerNorm)))


def is_transposed(module: nn.Module, arch: ArchSpec | None) -> bool:
    """True when the module stores ``[in, out]`` (``arch.transposed`` and not an ``nn.Linear``)."""
    return bool(arch is not None and arch.transposed and not isinstance(module, nn.Linear))


def arch_of(model: nn.Module) -> ArchSpec | None:
    try:
        return get_arch(model)
    except SuperweightError:
        return None


def target_modules(model: nn.Module, include: str | None = None, exclude: str | None = DEFAULT_EXCLUDE,
                   arch: ArchSpec | None = None, required: bool = True) -> dict[str, nn.Module]:
    """Linear modules by name, filtered by ``include`` / ``exclude`` regular expressions (re.search);
    none matching is an error when ``required`` (a caller with other weights to take passes False)."""
    arch = arch or arch_of(model)
    found = {
        name: m for name, m in model.named_modules()
        if is_linear(m, arch) and (include is None or re.search(include, name))
        and not (exclude and re.search(exclude, name))
    }
    if not found and required:
        raise SuperweightError(f"no linear module matches include={include!r} exclude={exclude!r}")
    return found


@dataclass(frozen=True)
class Target:
    """One weight ``quantize`` covers: ``name`` (what kept indices and fit weights are keyed by: the
    module, or the experts' parameter), its state-dict ``key``, its ``[out, in]`` view ``weight``
    (written in place), whether the stored tensor is that view transposed, and the stored shape
    when it is not 2-D (``view``)."""

    name: str
    key: str
    weight: torch.Tensor
    transposed: bool = False
    view: tuple[int, ...] | None = None


def target_weights(model: nn.Module, include: str | None = None, exclude: str | None = DEFAULT_EXCLUDE,
                   arch: ArchSpec | None = None, required: bool = True) -> list[Target]:
    """``target_modules``' weights, then (a mixture of experts) each experts module's 3-D weights whose
    parameter name matches ``include`` and not ``exclude``; none at all is an error when ``required``."""
    arch = arch or arch_of(model)
    experts = _expert_weights(model, include, exclude) if arch is not None and arch.is_moe else []
    linear = target_modules(model, include, exclude, arch, required=required and not experts)
    out = [Target(n, f"{n}.weight", out_in(m, arch), is_transposed(m, arch)) for n, m in linear.items()]
    return out + experts


def _expert_weights(model: nn.Module, include: str | None, exclude: str | None) -> list[Target]:
    out = []
    for mod_name, module in model.named_modules():
        for p, w in expert_params(module):
            name = f"{mod_name}.{p}"
            if (include is None or re.search(include, name)) and not (exclude and re.search(exclude, name)):
                out.append(Target(name, name, w.detach().view(-1, w.shape[-1]), False, tuple(w.shape)))
    return out


def out_in(module: nn.Module, arch: ArchSpec | None = None) -> torch.Tensor:
    """A module's weight as ``[out, in]`` (a transposed view where the ``ArchSpec`` says so)."""
    return module.weight.t() if is_transposed(module, arch) else module.weight


def keep_indices(model: nn.Module, keep: Iterable | dict | None, arch: ArchSpec | None) -> dict[str, list[int]]:
    """Flat ``[out, in]`` indices per module name. ``keep``: super weights / (layer, row, col) tuples
    (down-projection coordinates), or ``{module_name: [flat indices]}``."""
    if not keep:
        return {}
    if isinstance(keep, dict):
        return {k: [int(i) for i in v] for k, v in keep.items()}
    arch = arch or get_arch(model)
    out: dict[str, list[int]] = {}
    for (layer, row, col), expert in as_keys(keep):
        check_index(arch, model, layer, row, col, expert)
        if expert is None:
            n_in = out_in(arch.down_proj_module(model, layer), arch).shape[1]
            out.setdefault(arch.down_proj_name(layer, model), []).append(row * n_in + col)
        else:  # row ``row`` of expert ``expert`` is row ``expert * out + row`` of the [experts * out, in] matrix
            n_out, n_in = arch.expert_matrix(model, layer, expert).shape
            out.setdefault(f"{arch.experts_name(layer)}.down_proj", []).append((expert * n_out + row) * n_in + col)
    return out


def sa_fit_weights(model: nn.Module, modules: dict[str, nn.Module], keep: Iterable | dict | None,
                   weight: float, arch: ArchSpec) -> dict[str, torch.Tensor]:
    """Fit weights (``[out, in]``, 1 everywhere but ``weight``) on the elements that read the super
    activation: the super weight's input column of its down-projection (the channel carrying the
    massive gate*up value) and, in every later layer, the column of the super activation's hidden
    channel (the SW's row) of the layers fed by a norm (q/k/v, gate/up: ``SMOOTHABLE``)."""
    if weight == 1 or not keep or isinstance(keep, dict):
        return {}
    coords = as_coords(keep)
    first = min(layer for layer, _, _ in coords)
    rows = sorted({row for _, row, _ in coords})
    out: dict[str, torch.Tensor] = {}

    def mark(name: str, col: int) -> None:
        w = out_in(modules[name], arch)
        m = out.setdefault(name, torch.ones(w.shape, dtype=torch.float32, device=w.device))
        if 0 <= col < w.shape[1]:
            m[:, col] = weight

    for layer, _, col in coords:
        if arch.has_dense(model, layer) and arch.down_proj_name(layer, model) in modules:
            mark(arch.down_proj_name(layer, model), col)
    for name in modules:
        layer = _layer_of(name, arch)
        if layer is not None and layer >= first and re.search(SMOOTHABLE, name):
            for row in rows:
                mark(name, row)
    return out


def _layer_of(name: str, arch: ArchSpec) -> int | None:
    head = arch.layers + "."
    if not name.startswith(head):
        return None
    index = name[len(head):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


@torch.no_grad()
def quantize(
    model: nn.Module, config: RTN | Ternary, keep: Iterable | dict | None = None,
    include: str | None = None, exclude: str | None = DEFAULT_EXCLUDE, arch: ArchSpec | None = None,
    param_dtype: torch.dtype = torch.float16, write_back: bool = True, within: str | None = None,
) -> QuantResult:
    """Fake-quantize the target weights of ``model`` in place; return the codes for packing.

    ``within`` (a name prefix, e.g. ``model.layers.3.``) quantizes only the targets under it, with the
    kept weights that fall there and the fit weights the whole ``keep`` sets: what a streamed export
    runs for each layer it holds (``stream_quantize``), the same codes as one call over the model.

    ``write_back=False`` leaves the weights untouched and measures no SQNR (``sqnr_db`` stays
    empty): the codes, parameters and sparse part are all an artifact needs (``save_quantized``
    never reads the quantized weights), so writing one skips two passes over every weight.
    Works on any device: every tensor it builds follows the weight's device."""
    if isinstance(config, W8A8):
        raise SuperweightError("W8A8 quantizes activations too: use superweight.quant.simulate_w8a8(model, config)")
    arch = arch or arch_of(model)
    targets = target_weights(model, include, exclude, arch)
    keeps = keep_indices(model, keep, arch)
    if within is not None:
        targets = [t for t in targets if t.name.startswith(within)]
        keeps = {k: v for k, v in keeps.items() if k.startswith(within)}
    missing = sorted(set(keeps) - {t.name for t in targets})
    if missing:
        raise SuperweightError(f"kept weights in {missing[0]}, which is not quantized: widen include/exclude")
    modules = {t.name: model.get_submodule(t.name) for t in targets if t.view is None}
    care = sa_fit_weights(model, modules, keep, getattr(config, "sa_weight", 1.0), arch) if arch else {}
    result = QuantResult(config, {}, {}, {})
    for t in targets:
        w = t.weight
        qt = quantize_tensor(w, config, keeps.get(t.name), param_dtype, fit_weights=care.get(t.name), packed=not write_back)
        if write_back:
            result.sqnr_db[t.key] = qt.write_into(w)
        result.tensors[t.key] = qt
        result.transposed[t.key] = t.transposed
        if t.view is not None:
            result.views[t.key] = list(t.view)
        for i in keeps.get(t.name, []):
            result.kept.append({"name": t.key, "index": i, "value": float(w.detach().reshape(-1)[i])})
    return result
