"""Detection over a checkpoint streamed one decoder layer at a time: the same loop as in memory.

``StreamedRunner`` implements the ``Runner`` interface of ``superweight.runner`` over a
``stream.StreamedModel``: ``run`` reads each layer once per iteration and runs every prompt
through it (under the same ``TraceCapture`` hooks as in memory, on the arguments the model's own
forward passes that layer), so ``superweight.detect.run_detection`` decides exactly as it does for
a loaded model. A pass that zeroes weights of layer ``L`` and later only restarts from ``L``, from
the cached residual input of that layer (earlier layers are unchanged, so are their outputs).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .capture import LayerTrace, TraceCapture
from .detect import DEFAULT_METHOD, DEFAULT_PROMPT, DetectionResult, SpikeRule, assemble, encode_prompt, run_detection
from .errors import SuperweightError
from .runner import zeroed
from .stream import Call, StreamedModel, _first_tensor, _hidden_of, _tokenizer, _with_hidden
from .trace import TraceRule

log = logging.getLogger(__name__)


class StreamedRunner:
    """``Runner`` over a ``StreamedModel``; ``passes`` / ``layers_read`` count the disk work."""

    def __init__(self, sm: StreamedModel):
        self.sm, self.arch, self.model, self.num_layers = sm, sm.arch, sm.model, sm.num_layers
        self.calls: dict[int, list[Call]] = {}  # id of an encoded prompt -> each layer's arguments
        self.cache: dict[int, tuple[frozenset, list[LayerTrace]]] = {}  # its last pass
        self.passes = 0
        self.layers_read = 0

    def _calls(self, enc: dict) -> list[Call]:
        if id(enc) not in self.calls:
            self.calls[id(enc)] = self.sm.layer_calls(enc)
        return self.calls[id(enc)]

    def _start(self, enc: dict, weights: Sequence) -> int:
        """The first layer whose output can differ from this prompt's previous pass."""
        keys = frozenset(w.key for w in weights)
        if id(enc) not in self.cache:
            return 0
        before, _ = self.cache[id(enc)]
        changed = [k[0] for k in keys ^ before]
        return min(changed) if changed else self.num_layers

    @torch.no_grad()
    def run(self, inputs: Sequence[dict], zeroed_weights: Sequence[Sequence]) -> list[list[LayerTrace]]:
        starts = [self._start(enc, ws) for enc, ws in zip(inputs, zeroed_weights)]
        traces = [list(self.cache[id(e)][1][:s]) if s else [] for e, s in zip(inputs, starts)]
        hidden = [self._first_hidden(e, s) for e, s in zip(inputs, starts)]
        first = min(starts, default=self.num_layers)
        if first < self.num_layers:
            self.passes += 1
        for i in range(first, self.num_layers):
            with self.sm.layer(i):
                self.layers_read += 1
                for p, (enc, ws) in enumerate(zip(inputs, zeroed_weights)):
                    if starts[p] <= i:
                        hidden[p], tr = self._run_layer(i, self._calls(enc)[i], hidden[p], ws)
                        traces[p].append(tr)
        for enc, ws, tr in zip(inputs, zeroed_weights, traces):
            self.cache[id(enc)] = (frozenset(w.key for w in ws), tr)
        return traces

    def _first_hidden(self, enc: dict, start: int) -> torch.Tensor | None:
        if start == 0:
            return _hidden_of(self._calls(enc)[0])
        if start >= self.num_layers:
            return None
        return self.cache[id(enc)][1][start].h_in.unsqueeze(0)

    def _run_layer(self, i: int, call: Call, hidden: torch.Tensor, weights: Sequence) -> tuple[torch.Tensor, LayerTrace]:
        args, kwargs = _with_hidden(call, hidden)
        with zeroed(self.model, self.arch, weights, layer=i), TraceCapture(self.model, self.arch, layers=[i]) as cap:
            out = self.sm.layers[i](*args, **kwargs)
        return _first_tensor(out), cap.as_list()[0]

    @contextlib.contextmanager
    def layer(self, layer: int, zeroed_weights: Sequence = ()) -> Iterator[None]:
        with self.sm.materialised(self.sm.layer_names(layer)), zeroed(self.model, self.arch, zeroed_weights, layer):
            yield


def stream_detect(
    path: str | Path,
    prompts: Sequence[str] | str = (DEFAULT_PROMPT,),
    rule: SpikeRule | None = None,
    max_iter: int = 10,
    model_name: str = "",
    dtype: str | torch.dtype = "float32",
    tokenizer=None,
    device: str | torch.device | None = None,
    method: str = DEFAULT_METHOD,
    trace_rule: TraceRule | None = None,
) -> DetectionResult:
    """``superweight.detect.detect`` for a local safetensors checkpoint, streamed layer by layer.

    The same ``DetectionResult`` as loading the model and calling ``detect`` (bit for bit on the
    same dtype and device); peak memory is about the embeddings plus two decoder layers.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SuperweightError("no prompt given: pass at least one --prompt")
    sm = StreamedModel(path, dtype, device)
    try:
        tokenizer = tokenizer or _tokenizer(sm.ckpt.folder)
        encoded = [encode_prompt(tokenizer, p) for p in prompts]
        runner = StreamedRunner(sm)
        states = run_detection(runner, encoded, method, rule, trace_rule, max_iter)
        log.info("streamed %d layers: %d layer reads in %d pass(es)", sm.num_layers, runner.layers_read, runner.passes)
        return assemble(states, runner, prompts, model_name or str(path), method, rule, trace_rule)
    finally:
        sm.close()
