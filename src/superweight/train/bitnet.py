"""BitNet b1.58 quantization-aware training: ternary linears that can keep chosen weights exact.

Forward pass of a ``BitLinear`` (Ma et al. 2024, "The Era of 1-bit LLMs", and the authors'
"Training Tips, Code and FAQ"):

- weights: ``gamma = mean|W|`` per tensor, ``W_q = clip(round(W / (gamma + eps)), -1, 1) * gamma``,
  computed by the project's ternary primitive (``quant.codes.ternary_codes``, gamma stored in
  float16), so a trained model packs into the project's ternary artifact with the very weights it
  was trained with;
- activations: 8-bit absmax per token, ``x_q = clip(round(x * 127 / max|x|), -128, 127) * max|x| / 127``;
- backward: straight-through estimator, ``W + (W_q - W).detach()`` and ``x + (x_q - x).detach()``.

Kept weights (e.g. super weights, given as down-projection ``(layer, row, col)``) skip the ternary
rounding: their latent full-precision value is used in the forward pass and gets its own gradient.
Every ``nn.Linear`` inside the decoder layers becomes a ``BitLinear``; embeddings and the output
head stay in full precision, as in BitNet. One deviation from the reference: no extra RMSNorm
inside each BitLinear (Llama's own norms already precede q/k/v/gate/up, and an extra norm would
change what a pretrained model such as SmolLM2 computes before continued training starts).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..model.arch import ArchSpec
from ..model.arch_infer import get_arch
from ..core.errors import SuperweightError
from ..quant.layout import make_layout
from ..quant.codes import ternary_codes
from ..core.results import Versioned
from ..quant.api import keep_indices, quantize
from ..quant.artifact import save_quantized
from ..quant.config import Ternary

EPS = 1e-5


@dataclass
class BitNetConfig(Versioned):
    """Which weights stay exact; saved in the checkpoint's config.json (``superweight_bitnet``)."""

    KIND: ClassVar[str] = "bitnet config"
    VERSION: ClassVar[int] = 1

    keep: list[tuple[int, int, int]] = field(default_factory=list)  # down_proj (layer, row, col)
    activation_bits: int = 8

    @classmethod
    def _decode(cls, d: dict) -> dict:
        return {"keep": [tuple(c) for c in d.get("keep", [])], "activation_bits": d["activation_bits"]}


def ternary_weight(w: torch.Tensor) -> torch.Tensor:
    """``W_q = codes * gamma`` (codes in {-1, 0, 1}, one float16 gamma per tensor), as float32."""
    x = w.detach().float()
    layout = make_layout(tuple(x.shape), None, None, False, "error")
    codes, gamma = ternary_codes(x, layout, EPS)
    return (codes.float() - 1.0).reshape(x.shape) * gamma.float().reshape(())


def absmax_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric absmax quantization of the last dimension, quantized and dequantized."""
    qmax = 2 ** (bits - 1) - 1
    scale = qmax / x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * scale).round().clamp(-qmax - 1, qmax) / scale


class BitLinear(nn.Linear):
    """A linear layer with a ternary forward (see the module doc); parameters are the latent weights."""

    def setup(self, keep_flat: Iterable[int] = (), activation_bits: int = 8) -> "BitLinear":
        idx = torch.as_tensor(sorted(set(int(i) for i in keep_flat)), dtype=torch.long, device=self.weight.device)
        self.register_buffer("keep_idx", idx, persistent=False)
        self.activation_bits = activation_bits
        return self

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: ternary x gamma, kept entries at their latent value."""
        w = self.weight
        if getattr(self, "materialised", False):  # inside ``effective_weights``: weight already is it
            return w
        w_q = w + (ternary_weight(w).to(w.dtype) - w).detach()
        if self.keep_idx.numel():
            flat = w_q.reshape(-1).index_put((self.keep_idx,), w.reshape(-1)[self.keep_idx])
            w_q = flat.reshape(w.shape)
        return w_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = x + (absmax_per_token(x, self.activation_bits) - x).detach()
        return F.linear(x_q, self.effective_weight(), self.bias)


@contextmanager
def effective_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: every ``BitLinear``'s ``weight`` holds the weight its forward uses (same forward, same
    outputs), so code that reads weight matrices (detection's creators) sees the ternary ones.
    The latent weights are restored on exit."""
    saved = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BitLinear) and not getattr(module, "materialised", False):
                saved.append((module, module.weight.detach().clone()))
                module.weight.copy_(module.effective_weight())
                module.materialised = True
    try:
        yield model
    finally:
        with torch.no_grad():
            for module, latent in saved:
                module.weight.copy_(latent)
                module.materialised = False


def whole_lines(model: nn.Module, arch: ArchSpec, coords: Iterable) -> list[tuple[int, int, int]]:
    """Every down-projection entry in the row or the column of one of ``coords`` (layer, row, col)."""
    out: set[tuple[int, int, int]] = set()
    for layer, row, col in (tuple(c)[:3] for c in coords):
        rows, cols = arch.weight_matrix(model, layer).shape
        out.update((layer, row, c) for c in range(cols))
        out.update((layer, r, col) for r in range(rows))
    return sorted(out)


def bit_targets(model: nn.Module, arch: ArchSpec) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder layers, by full module name."""
    prefix = arch.layers
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith(prefix + ".")
    }


def convert(model: nn.Module, config: BitNetConfig | None = None, arch: ArchSpec | None = None) -> dict[str, list[int]]:
    """Turn the decoder's linears into ``BitLinear`` in place (parameters are shared, not copied).

    Returns the kept flat ``[out, in]`` indices per module name.
    """
    config = config or BitNetConfig()
    arch = arch or get_arch(model)
    if arch.transposed:
        raise SuperweightError(f"BitNet conversion needs nn.Linear layers; {arch.name} uses Conv1D")
    keeps = keep_indices(model, config.keep, arch)
    targets = bit_targets(model, arch)
    for name, module in targets.items():
        if not isinstance(module, BitLinear):
            module.__class__ = BitLinear  # same parameters, same optimizer state, ternary forward
        module.setup(keeps.get(name, ()), config.activation_bits)
    model.config.superweight_bitnet = config.to_dict()
    return keeps


def unconvert(model: nn.Module) -> None:
    """Back to plain ``nn.Linear`` modules holding the latent weights (e.g. before packing)."""
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.__class__ = nn.Linear
            del module.keep_idx
    if hasattr(model.config, "superweight_bitnet"):
        del model.config.superweight_bitnet


def restore(model: nn.Module) -> bool:
    """Re-apply the BitNet forward to a model loaded from a QAT checkpoint (its config says so).

    Returns whether the model is a BitNet model."""
    saved = getattr(model.config, "superweight_bitnet", None)
    if not saved:
        return False
    convert(model, BitNetConfig.from_dict(saved, "the model config's superweight_bitnet entry"))
    return True


def kept_indices(model: nn.Module) -> dict[str, list[int]]:
    """The kept flat indices of every ``BitLinear``, by module name."""
    return {name: m.keep_idx.tolist() for name, m in model.named_modules() if isinstance(m, BitLinear) and m.keep_idx.numel()}


def export_ternary(model: nn.Module, tokenizer, out: str | Path, source: str = "", force: bool = False) -> dict:
    """Pack a BitNet model as the project's ternary artifact (``superweight.quant.artifact``); returns its manifest.

    The artifact's weights are bitwise the ones the ternary forward used (same primitive, same
    float16 gamma), kept weights as exact sparse values. The model is left as plain linears holding
    those weights (activations are no longer quantized): reload the checkpoint to train on.
    """
    arch = get_arch(model)
    keeps = kept_indices(model)
    names = list(bit_targets(model, arch))
    unconvert(model)
    include = "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"
    result = quantize(model, Ternary(eps=EPS), keep=keeps, include=include, arch=arch)
    notes = ["BitNet b1.58 QAT model: 8-bit per-token activations are part of its forward pass and not stored here"]
    return save_quantized(model, tokenizer, result, out, source=source, notes=notes, force=force)
