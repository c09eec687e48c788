"""How a tensor is cut into quantization groups, without copying or reordering it.

Every granularity is "rows of length L, each cut into runs of ``size`` (the last run of a row may be
shorter)": per tensor = 1 row of ``numel`` with one run; per output channel = ``out`` rows of
``in`` with one run each; per group = ``out`` rows of ``in`` cut every g; the paper's block = 1 row
of ``numel`` (the flattened tensor) cut every B. Codes therefore keep the tensor's own element
order and parameters are a ``[rows, runs]`` table.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..core.errors import SuperweightError


@dataclass(frozen=True)
class Layout:
    rows: int
    row_len: int
    size: int  # elements per run (the last run of a row may be shorter)

    @property
    def runs(self) -> int:
        return math.ceil(self.row_len / self.size)

    @property
    def numel(self) -> int:
        return self.rows * self.row_len

    def to_dict(self) -> dict:
        return asdict(self)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (any shape with ``numel`` elements) as ``[rows, row_len]``."""
        return x.reshape(self.rows, self.row_len)

    def padded(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """``[rows, runs, size]``, the short last run padded with ``fill``."""
        pad = self.runs * self.size - self.row_len
        x2 = self.view(x)
        if pad:
            x2 = torch.nn.functional.pad(x2, (0, pad), value=fill)
        return x2.reshape(self.rows, self.runs, self.size)

    def padded_edge(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, runs, size]``, the short last run padded with copies of the row's last element
        (inside that run's range, so a min/max over each run is unchanged)."""
        pad = self.runs * self.size - self.row_len
        x2 = self.view(x)
        if pad:
            x2 = torch.nn.functional.pad(x2.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
        return x2.reshape(self.rows, self.runs, self.size)

    def unpad(self, x3: torch.Tensor) -> torch.Tensor:
        """Inverse of ``padded``: ``[rows, runs, size]`` back to ``[rows, row_len]``."""
        return x3.reshape(self.rows, self.runs * self.size)[:, : self.row_len]

    def per_element(self, fn, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """``fn(x_runs, *params)`` with each run's ``[rows, runs]`` parameters broadcast over its
        elements, without materialising them per element: ``[rows, row_len]``."""
        return self.unpad(fn(self.padded(x, 0.0), *(p.unsqueeze(-1) for p in params)))

    def run_counts(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Elements in each run, ``[runs]`` (all equal but maybe the last), on ``device``."""
        counts = torch.full((self.runs,), self.size, dtype=torch.float32, device=device)
        counts[-1] = self.row_len - (self.runs - 1) * self.size
        return counts


def make_layout(
    shape: tuple[int, ...], group: int | None = None, block: int | None = None,
    per_channel: bool = False, oversize: str = "error",
) -> Layout:
    """The layout of a tensor of ``shape`` (2-D tensors are ``[out, in]``)."""
    numel = math.prod(shape)
    if numel == 0:
        raise SuperweightError(f"cannot quantize an empty tensor of shape {tuple(shape)}")
    out = shape[0] if len(shape) >= 2 else 1
    row_len = numel // out
    if block is not None:
        if block > numel:
            if oversize == "tensor":
                return Layout(1, numel, numel)
            raise SuperweightError(
                f"block {block} is larger than the tensor of shape {tuple(shape)} ({numel} elements): "
                "pick a smaller --block or quantize per tensor"
            )
        return Layout(1, numel, block)
    if group is not None:
        if group > row_len:
            if oversize == "tensor":
                return Layout(out, row_len, row_len)
            raise SuperweightError(
                f"group {group} is larger than the input dimension {row_len} of shape {tuple(shape)}: pick a smaller --group"
            )
        return Layout(out, row_len, group)
    if per_channel:
        return Layout(out, row_len, row_len)
    return Layout(1, numel, numel)
