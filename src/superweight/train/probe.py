"""What a training run is measured by at each checkpoint step, without saving the model:
perplexity on WikiText-2 (BOS + consecutive tokens, as training sees them) and on LAMBADA passages
(context + target word, one BOS-led sequence each), the super activation's size and its creator
(``emergence.activation_state``), the value the forward uses at chosen down-projection
coordinates (e.g. the super weights, kept or not) and the largest |h| of chosen residual channels
over layers and tokens (e.g. the super activation's channel, whether or not it is still the largest).

``Probe(tokenizer, wikitext, lambada)`` is passed as ``train(measure=probe)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model.arch_infer import get_arch
from ..eval.text import load_lambada
from .loop import bos_id, token_stream
from .bitnet import effective_weights
from ..find.loop import DEFAULT_PROMPT
from ..model.edits import HookSet
from .emergence import activation_state


def lambada_passages(n: int) -> list[str]:
    """The first ``n`` LAMBADA test passages (context and target word: the ``lambada`` text source)."""
    return load_lambada().split("\n\n")[:n]


@torch.no_grad()
def passages_nll(model: nn.Module, sequences: Sequence[torch.Tensor]) -> tuple[float, int]:
    """Summed next-token NLL over each sequence after its first (BOS) token, and the token count."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in sequences:
        ids = ids.to(device).unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total, count


class Probe:
    """Measures a model in training (see the module docstring); one dict per call."""

    def __init__(self, tokenizer, wikitext: str, lambada: Sequence[str], wikitext_tokens: int = 1024,
                 seq_len: int = 128, watch: Sequence[Sequence[int]] = (), channels: Sequence[int] = ()) -> None:
        bos = torch.tensor([bos_id(tokenizer)])
        stream = token_stream(tokenizer, wikitext[: wikitext_tokens * 12])[:wikitext_tokens]
        step = seq_len - 1
        self.wikitext = [torch.cat([bos, stream[i : i + step]]) for i in range(0, len(stream) - step + 1, step)]
        self.lambada = [torch.cat([bos, token_stream(tokenizer, p)]) for p in lambada]
        self.watch = [list(c) for c in watch]
        self.channels = list(channels)

    def perplexities(self, model: nn.Module) -> dict:
        out = {}
        for name, seqs in (("wikitext2", self.wikitext), ("lambada", self.lambada)):
            if seqs:
                nll, n = passages_nll(model, seqs)
                out[f"{name}_ppl"], out[f"{name}_tokens"] = math.exp(nll / n), n
        return out

    def watched(self, model: nn.Module) -> list[float]:
        """The forward's value of each watched coordinate (a BitNet model's ternary one)."""
        arch = get_arch(model)
        with effective_weights(model):
            return [float(arch.weight_matrix(model, layer).detach()[row, col]) for layer, row, col in self.watch]

    @torch.no_grad()
    def channel_peaks(self, model: nn.Module, tokenizer) -> list[list[float]]:
        """Per watched channel: ``[max |h| over tokens and layers, its layer, its token]`` on the paper's prompt."""
        arch = get_arch(model)
        outs: list[torch.Tensor] = []
        ids = tokenizer(DEFAULT_PROMPT, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
        with HookSet() as hooks:
            for layer in arch.layer_modules(model):
                hooks.forward(layer, lambda m, a, out: outs.append((out[0] if isinstance(out, tuple) else out)[0].abs()))
            model(input_ids=ids, use_cache=False)
        h = torch.stack(outs).float()  # [layers, tokens, hidden]
        peaks = []
        for ch in self.channels:
            flat = int(h[:, :, ch].argmax())
            peaks.append([float(h[:, :, ch].flatten()[flat]), *divmod(flat, h.shape[1])])
        return peaks

    def __call__(self, model: nn.Module, tokenizer, step: int | None = None) -> dict:
        _, state = activation_state(model, tokenizer, get_arch(model))
        keys = ("residual_max", "residual_layer", "residual_channel", "residual_token", "residual_typical", "top",
                "top_value", "top_share", "top_output", "top_input", "detected", "residual_per_layer")
        activation = {k: state[k] for k in keys}
        activation["massive"] = state["residual_max"] / state["residual_typical"] if state["residual_typical"] else 0.0
        out = {**self.perplexities(model), "activation": activation, "watched": self.watched(model)}
        if self.channels:
            out["channels"] = self.channel_peaks(model, tokenizer)
        return out
