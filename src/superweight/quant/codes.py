"""The leaves of the quantizers: NF4 levels, parameter rounding, absmean ternary codes.

No import of the scheme registry: ``primitives``, ``schemes`` and ``search`` all build on these.
"""
from __future__ import annotations

import torch

from ..core.errors import SuperweightError
from .layout import Layout

# QLoRA's NormalFloat4 levels (Dettmers et al. 2023, bitsandbytes).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def to_dtype(x: torch.Tensor, dtype: torch.dtype, direction: float) -> torch.Tensor:
    """Round float32 ``x`` to ``dtype`` towards ``direction`` (-inf: down, +inf: up)."""
    h = x.to(dtype)
    if not torch.isfinite(h).all():
        raise SuperweightError(
            f"quantization parameters overflow {dtype}: the tensor holds values too large for it; use param_dtype=float32"
        )
    if dtype == torch.float32:
        return h
    wrong = h.float() > x if direction < 0 else h.float() < x
    return torch.where(wrong, torch.nextafter(h, torch.full_like(h, direction)), h)


def ternary_codes(
    x: torch.Tensor, layout: Layout, eps: float = 1e-5, param_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 absmean: ``gamma = mean|x|`` per run; codes ``round(x / (gamma + eps))`` clipped to
    {-1, 0, 1}, stored as {0, 1, 2}; ``x_hat = (code - 1) * gamma``."""
    gamma = layout.padded(x.abs(), 0.0).sum(-1) / layout.run_counts(x.device)
    gamma = gamma.to(param_dtype)
    q = layout.per_element(lambda v, g: (v / g).round_().clamp_(-1, 1) + 1, x, gamma.float() + eps)
    codes = q.to(torch.uint8).reshape(-1)
    return codes, gamma
