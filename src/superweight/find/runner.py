"""The "forward + capture" interface the detection loop is written against, and its in-memory form.

Detection (``superweight.find.loop``) needs two things from a model: run prompts with some
down-projection weights zeroed and return a ``LayerTrace`` per layer, and lend one layer's weights
(with the same weights zeroed) to read the terms ``X[t, k] * W[j, k]``. ``InMemoryRunner`` does this
for a loaded model; ``superweight.find.streamed.StreamedRunner`` for a checkpoint read one layer at
a time. Zeroing goes through ``edits.edited_entries``: weights are restored bit for bit.
"""
from __future__ import annotations

import contextlib
from typing import Protocol, Sequence

import torch
from torch import nn

from ..model.arch import ArchSpec
from ..model.capture import LayerTrace, TraceCapture
from ..model.edits import zeroed
from ..core.errors import SuperweightError


def encode_prompt(tokenizer, prompt: str, device: torch.device | str = "cpu") -> dict:
    """The tokenized prompt on ``device``; an empty prompt is a one-line error."""
    if not prompt or not prompt.strip():
        raise SuperweightError("the prompt is empty: pass some text, e.g. --prompt 'Apple Inc. is a worldwide tech company.'")
    enc = tokenizer(prompt, return_tensors="pt")
    if enc["input_ids"].shape[-1] == 0:
        raise SuperweightError(f"the prompt {prompt!r} encodes to no tokens: pass some text")
    return {k: v.to(device) for k, v in enc.items()}


class Runner(Protocol):
    arch: ArchSpec
    model: nn.Module  # layers may be on the meta device until ``layer`` materialises them
    num_layers: int

    def run(self, inputs: Sequence[dict], zeroed: Sequence[Sequence]) -> list[list[LayerTrace]]:
        """One forward pass per prompt, with ``zeroed[p]`` (SuperWeight-like) zeroed for prompt ``p``."""
        ...

    def layer(self, layer: int, zeroed: Sequence = ()) -> contextlib.AbstractContextManager:
        """Inside the block ``layer``'s weights are in ``model``, with the ``zeroed`` ones at zero."""
        ...


def decoder_stack(model: nn.Module) -> nn.Module:
    """The model without its language-model head (``model.base_model``): detection reads the
    residual stream, never the logits, so it skips the head's vocabulary-wide matmul."""
    return getattr(model, "base_model", model)


class InMemoryRunner:
    """``Runner`` over a model whose weights are all in memory."""

    def __init__(self, model: nn.Module, arch: ArchSpec):
        self.model, self.arch = model, arch
        self.num_layers = arch.num_layers(model)

    @torch.no_grad()
    def run(self, inputs: Sequence[dict], zeroed_weights: Sequence[Sequence]) -> list[list[LayerTrace]]:
        out = []
        for enc, weights in zip(inputs, zeroed_weights):
            with zeroed(self.model, self.arch, weights), TraceCapture(self.model, self.arch) as cap:
                decoder_stack(self.model)(**enc, use_cache=False)
            out.append(cap.as_list())
        return out

    def layer(self, layer: int, zeroed_weights: Sequence = ()) -> contextlib.AbstractContextManager:
        return zeroed(self.model, self.arch, zeroed_weights, layer)
