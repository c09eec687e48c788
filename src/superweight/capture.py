"""Record per-layer activation maxima of the MLP down-projection and the residual stream.

``ActivationCapture`` owns its forward hooks and removes them on exit, even when the forward
pass raises. Per layer it keeps the largest |input| and |output| of the down-projection (value,
channel, token position) and the largest |value| of the residual stream after the layer. For the
output peak it also keeps the down-projection's input vector at that token, which is what
locates the super weight's column (``Y[t, j] = sum_k X[t, k] * W[j, k]``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .arch import ArchSpec


@dataclass
class Peak:
    """The largest-magnitude entry of an activation: signed value, channel, token position."""

    value: float = 0.0
    channel: int = -1
    token: int = -1

    @property
    def magnitude(self) -> float:
        return abs(self.value)


@dataclass
class LayerStats:
    layer: int
    input: Peak = field(default_factory=Peak)  # down-projection input (intermediate channels)
    output: Peak = field(default_factory=Peak)  # down-projection output (hidden channels)
    residual: Peak = field(default_factory=Peak)  # hidden state after the decoder layer
    input_at_output_peak: torch.Tensor | None = None  # X[t, :] at the output peak's token

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "input": asdict(self.input),
            "output": asdict(self.output),
            "residual": asdict(self.residual),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LayerStats":
        return cls(d["layer"], Peak(**d["input"]), Peak(**d["output"]), Peak(**d["residual"]))


def peak_of(t: torch.Tensor) -> tuple[Peak, tuple[int, ...]]:
    """The max-|value| entry of a ``[..., tokens, channels]`` tensor, and its full index."""
    flat = t.detach().reshape(-1)
    i = int(flat.abs().argmax())
    index = _unravel(i, t.shape)
    token = index[-2] if t.dim() >= 2 else 0
    return Peak(float(flat[i]), index[-1], token), index


def _unravel(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    """``torch.unravel_index`` in plain ints: it runs in every hook, and tensor ops cost ~10x more."""
    index = []
    for dim in reversed(shape):
        flat_index, rest = divmod(flat_index, dim)
        index.append(rest)
    return tuple(reversed(index))


def _first_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class ActivationCapture:
    """Context manager: hook every decoder layer of ``model``; maxima accumulate across calls.

    >>> with ActivationCapture(model, arch) as cap:
    ...     model(**inputs)
    >>> cap.stats[11].output.channel
    """

    def __init__(self, model: nn.Module, arch: ArchSpec, layers: list[int] | None = None):
        self.model, self.arch = model, arch
        self.layer_ids = list(range(arch.num_layers(model))) if layers is None else list(layers)
        self.stats: dict[int, LayerStats] = {}
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self.stats = {i: LayerStats(i) for i in self.layer_ids}

    def __enter__(self) -> "ActivationCapture":
        try:
            for i in self.layer_ids:
                layer = self.arch.layer_modules(self.model)[i]
                down = layer.get_submodule(self.arch.down_proj)
                self._handles.append(down.register_forward_hook(self._down_hook(i)))
                self._handles.append(layer.register_forward_hook(self._residual_hook(i)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _down_hook(self, i: int):
        def hook(module, args, output):
            st = self.stats[i]
            x = args[0]
            p_in, _ = peak_of(x)
            if p_in.magnitude > st.input.magnitude:
                st.input = p_in
            p_out, idx = peak_of(_first_tensor(output))
            if p_out.magnitude > st.output.magnitude:
                st.output = p_out
                st.input_at_output_peak = x.detach()[idx[:-1]].float().clone()

        return hook

    def _residual_hook(self, i: int):
        def hook(module, args, output):
            st = self.stats[i]
            p, _ = peak_of(_first_tensor(output))
            if p.magnitude > st.residual.magnitude:
                st.residual = p

        return hook

    def as_list(self) -> list[LayerStats]:
        return [self.stats[i] for i in self.layer_ids]
