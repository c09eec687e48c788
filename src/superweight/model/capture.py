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
from .edits import HookSet


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


def peaks_of(tensors: list[torch.Tensor]) -> list[tuple[Peak, tuple[int, ...]]]:
    """``peak_of`` of each tensor, computed in one stacked reduction per shape (same answers)."""
    groups: dict[tuple, list[int]] = {}
    for j, t in enumerate(tensors):
        groups.setdefault((t.shape, t.dtype, t.device), []).append(j)
    out: list = [None] * len(tensors)
    for (shape, _, _), idxs in groups.items():
        flat = torch.stack([tensors[j] for j in idxs]).reshape(len(idxs), -1)
        pos = flat.abs().argmax(dim=1)
        values = flat.gather(1, pos[:, None])[:, 0].tolist()
        for j, i, v in zip(idxs, pos.tolist(), values):
            index = _unravel(i, shape)
            out[j] = (Peak(float(v), index[-1], index[-2] if len(shape) >= 2 else 0), index)
    return out


def _unravel(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    """``torch.unravel_index`` in plain ints: it runs in every hook, and tensor ops cost ~10x more."""
    index = []
    for dim in reversed(shape):
        flat_index, rest = divmod(flat_index, dim)
        index.append(rest)
    return tuple(reversed(index))


def first_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class ActivationCapture:
    """Context manager: hook every decoder layer of ``model``; maxima accumulate across calls.

    >>> with ActivationCapture(model, arch) as cap:
    ...     model(**inputs)
    >>> cap.stats[11].output.channel

    The hooks only copy the activations they see; the peaks are computed in a few batched tensor
    ops when ``stats`` is read (or when the copies pass ``flush_bytes``), which keeps the hooks'
    cost to a few percent of a forward pass. Copies, not references: some models add to a
    module's output in place (Falcon's parallel attention).
    """

    def __init__(self, model: nn.Module, arch: ArchSpec, layers: list[int] | None = None, flush_bytes: int = 64 << 20):
        self.model, self.arch = model, arch
        self.layer_ids = list(range(arch.num_layers(model))) if layers is None else list(layers)
        self.flush_bytes = flush_bytes
        self._stats: dict[int, LayerStats] = {}
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (layer, x or residual, y)
        self._pending_bytes = 0
        self._hooks = HookSet()
        self.reset()

    @property
    def stats(self) -> dict[int, LayerStats]:
        self.flush()
        return self._stats

    def reset(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0
        self._stats = {i: LayerStats(i) for i in self.layer_ids}

    def __enter__(self) -> "ActivationCapture":
        try:
            for i in self.layer_ids:
                layer = self.arch.layer_modules(self.model)[i]
                if self.arch.has_dense(self.model, i):  # an MoE layer without a shared expert: only the residual
                    self._hooks.forward(self.arch.down_proj_module(self.model, i), self._down_hook(i))
                self._hooks.forward(layer, self._residual_hook(i))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        self._hooks.remove()

    def _defer(self, layer: int, a: torch.Tensor, b: torch.Tensor | None) -> None:
        a = a.detach().clone()
        b = None if b is None else b.detach().clone()
        self._pending.append((layer, a, b))
        self._pending_bytes += a.nbytes + (0 if b is None else b.nbytes)
        if self._pending_bytes > self.flush_bytes:
            self.flush()

    def _down_hook(self, i: int):
        def hook(module, args, output):
            self._defer(i, args[0], first_tensor(output))

        return hook

    def _residual_hook(self, i: int):
        def hook(module, args, output):
            self._defer(i, first_tensor(output), None)

        return hook

    def flush(self) -> None:
        """Fold the pending copies into ``stats``, in the order the hooks saw them."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        tensors = [t for _, a, b in pending for t in ((a,) if b is None else (a, b))]
        peaks = iter(peaks_of(tensors))
        for layer, a, b in pending:
            st = self._stats[layer]
            if b is None:
                p, _ = next(peaks)
                if p.magnitude > st.residual.magnitude:
                    st.residual = p
                continue
            (p_in, _), (p_out, idx) = next(peaks), next(peaks)
            if p_in.magnitude > st.input.magnitude:
                st.input = p_in
            if p_out.magnitude > st.output.magnitude:
                st.output = p_out
                st.input_at_output_peak = a[idx[:-1]].float().clone()

    def as_list(self) -> list[LayerStats]:
        return [self.stats[i] for i in self.layer_ids]


# ---------------------------------------------------------------- full per-layer trace


@dataclass
class LayerTrace:
    """What one decoder layer saw and did for one prompt (batch 0), kept whole for attribution.

    ``h_in``/``h_out``: the residual stream before and after the layer ``[tokens, hidden]``;
    ``attn``/``mlp``: what the attention and the MLP added to it (post-norm models: the outputs of
    the post-attention / post-FFN norms); ``x``/``y``: the dense down-projection's input and output;
    ``moe``: for an MoE layer, the experts module's ``(hidden_states, top_k_index, top_k_weights)``;
    with a shared expert ``x``/``y`` are its down-projection's, and for a gated one (Qwen2-MoE) ``gate``
    its gate's logits ``[tokens, 1]`` (the block adds ``sigmoid(gate) * y``; DeepSeek's adds ``y``).
    """

    layer: int
    h_in: torch.Tensor | None = None
    h_out: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    mlp: torch.Tensor | None = None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    moe: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    gate: torch.Tensor | None = None
    scale: float = 1.0  # the residual stream gets ``scale`` x ``attn`` and ``mlp`` (Granite's residual_multiplier)

    def stats(self) -> LayerStats:
        """The paper method's per-layer maxima (as ``ActivationCapture`` records them)."""
        st = LayerStats(self.layer)
        if self.h_out is not None:
            st.residual = peak_of(self.h_out)[0]
        if self.x is not None and self.y is not None:
            st.input = peak_of(self.x)[0]
            st.output, idx = peak_of(self.y)
            st.input_at_output_peak = self.x[idx[0]].float().clone()
        return st


def _batch0(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t[0] if t.dim() == 3 else t).clone()


class TraceCapture:
    """Context manager: a ``LayerTrace`` per decoder layer of one forward pass (hooks in a ``HookSet``).

    ``traces[i]`` holds the layer's input and output hidden states, the attention and MLP outputs
    added to the residual, and the down-projection's input/output (or, for MoE, the experts' call).
    """

    def __init__(self, model: nn.Module, arch: ArchSpec, layers: list[int] | None = None):
        self.model, self.arch = model, arch
        self.layer_ids = list(range(arch.num_layers(model))) if layers is None else list(layers)
        self.traces: dict[int, LayerTrace] = {i: LayerTrace(i) for i in self.layer_ids}
        self._hooks = None

    def __enter__(self) -> "TraceCapture":
        self._hooks = HookSet()
        try:
            for i in self.layer_ids:
                self._hook_layer(i)
        except BaseException:
            self._hooks.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.remove()

    def _set(self, i: int, name: str):
        def hook(module, args, output):
            setattr(self.traces[i], name, _batch0(first_tensor(output)))

        return hook

    def _hook_layer(self, i: int) -> None:
        arch, hooks, tr = self.arch, self._hooks, self.traces[i]
        block = arch.layer_modules(self.model)[i]

        def layer_in(module, args, kwargs):
            tr.h_in = _batch0(args[0] if args else kwargs["hidden_states"])

        if i == self.layer_ids[0]:  # later layers' inputs are the previous outputs (``as_list``)
            hooks.pre(block, layer_in, with_kwargs=True)
        hooks.forward(block, self._set(i, "h_out"))
        hooks.forward(arch.attn_module(block), self._set(i, "attn"))
        if arch.residual_scale:  # what the block adds is this times each sublayer's output (Granite)
            tr.scale = float(getattr(self.model.config, arch.residual_scale))
        if arch.post_norm or arch.is_moe:  # otherwise the MLP adds exactly its down-projection's output
            hooks.forward(block.get_submodule(arch.mlp_out), self._set(i, "mlp"))
        experts = arch.experts_module(self.model, i) if arch.is_moe else None
        if experts is not None:
            def moe_in(module, args, kwargs):
                names = ("hidden_states", "top_k_index", "top_k_weights")
                vals = list(args) + [kwargs[n] for n in names[len(args):]]
                tr.moe = tuple(v.detach().clone() for v in vals[:3])

            hooks.pre(experts, moe_in, with_kwargs=True)
        if arch.shared_gate is not None and arch.is_shared(self.model, i):
            hooks.forward(block.get_submodule(arch.shared_gate), self._set(i, "gate"))
        if arch.has_dense(self.model, i):  # a dense model's, an MoE's dense layer's or its shared expert's
            down = arch.down_proj_module(self.model, i)

            def down_io(module, args, output):
                tr.x, tr.y = _batch0(args[0]), _batch0(first_tensor(output))

            hooks.forward(down, down_io)

    def as_list(self) -> list[LayerTrace]:
        out = [self.traces[i] for i in self.layer_ids]
        for prev, tr in zip([None, *out], out):
            if tr.h_in is None and prev is not None and prev.layer == tr.layer - 1:
                tr.h_in = prev.h_out
            if tr.mlp is None and tr.y is not None:
                tr.mlp = tr.y
        return out


def stats_of(traces: list[LayerTrace]) -> list[LayerStats]:
    """``LayerTrace.stats()`` of every layer, in three stacked reductions instead of one per tensor."""
    dense = [t for t in traces if t.x is not None and t.y is not None]
    if len(dense) != len(traces) or any(t.h_out is None for t in traces):
        return [t.stats() for t in traces]
    peaks = peaks_of([t.h_out for t in traces] + [t.x for t in traces] + [t.y for t in traces])
    n = len(traces)
    out = []
    for i, t in enumerate(traces):
        (res, _), (inp, _), (outp, idx) = peaks[i], peaks[n + i], peaks[2 * n + i]
        st = LayerStats(t.layer, inp, outp, res)
        st.input_at_output_peak = t.x[idx[0]].float().clone()
        out.append(st)
    return out
