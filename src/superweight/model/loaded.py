"""What every step takes as its model: ``LoadedModel``, and the dtype names the tool accepts.

Kept apart from ``load`` (which reads checkpoints) and ``export`` (which reads artifacts) so both
can build one without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import ArchSpec
from ..core.errors import SuperweightError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model ready to analyse: the module, its tokenizer, its ArchSpec and where it came from."""

    model: nn.Module
    tokenizer: object
    arch: ArchSpec
    name: str  # what the user asked for (a built-in name, a path, a hub id)
    source: str  # the file or folder actually read
    notes: list[str] = field(default_factory=list)  # caveats every report should repeat


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise SuperweightError(f"unknown dtype {dtype!r}: use one of float32, bfloat16, float16") from None
