"""Detection over a checkpoint streamed one decoder layer at a time: the same loop as in memory.

``StreamedRunner`` implements the ``Runner`` interface of ``superweight.find.runner`` over a
``stream.StreamedModel``: ``run`` reads each layer once per iteration and runs every prompt
through it (under the same ``TraceCapture`` hooks as in memory, on the arguments the model's own
forward passes that layer), so ``superweight.find.loop.run_detection`` decides exactly as it does for
a loaded model. A pass that zeroes weights of layer ``L`` and later only restarts from ``L``, from
the cached residual input of that layer (earlier layers are unchanged, so are their outputs). And
the pass before it usually saved that read: while each layer is in memory, ``detect.propose``
guesses the weights the next iteration will zero, and a speculative branch runs the rest of the
pass with them zeroed; when the guess is exactly what the next iteration asks for, that iteration
is served from the branch without touching the checkpoint. The branch guesses in turn (a chain of
branches, one per iteration to come), so however many iterations detection takes, a checkpoint
larger than memory is read once when every guess is right.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ..model.capture import LayerTrace, TraceCapture
from .loop import DEFAULT_METHOD, DEFAULT_PROMPT, DetectionResult, SpikeRule, assemble, propose, run_detection
from .runner import encode_prompt
from ..core.errors import SuperweightError
from ..model.edits import zeroed
from ..model.source import ModelSource
from ..model.streamed import Call, StreamedModel, first_tensor, hidden_of, load_tokenizer, streamed, with_hidden
from .trace import TraceRule
from .verdict import JudgeBase, judge_with
from ..eval.streamed import window_token_nlls

log = logging.getLogger(__name__)


@dataclass
class _Branch:
    """One level of a prompt's chain of speculative branches: the layers from ``start`` run again
    with ``weights`` zeroed, those of the level before it (the pass itself for the first) plus
    ``own``, the weights proposed on that level's traces. Level ``d`` is a guess at the pass of the
    ``d``-th iteration after this one."""

    start: int
    hidden: torch.Tensor
    own: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    traces: list[LayerTrace] = field(default_factory=list)

    @property
    def keys(self) -> frozenset:
        return frozenset(w.key for w in self.weights)


Propose = Callable[["StreamedRunner", list[LayerTrace], Sequence, Sequence], list]


class StreamedRunner:
    """``Runner`` over a ``StreamedModel``; ``passes`` / ``layers_read`` count the disk work.

    ``propose`` (``detect.propose`` with the method bound): a guess, while a layer is in memory, at
    the weights the next iteration will zero; they run as a speculative branch beside the pass, and
    when the next iteration asks for exactly those weights its traces come from the branch instead of
    a second read of the checkpoint (bitwise what that read would give: the same layers, inputs and
    zeroed weights). The branch proposes in turn, up to ``depth`` levels (a chain: each level guesses
    the iteration after the previous one's), so a model whose detection takes several iterations is
    still read once. A wrong guess only costs the branch's compute."""

    def __init__(self, sm: StreamedModel, propose: Propose | None = None, depth: int = 9):
        self.sm, self.arch, self.model, self.num_layers = sm, sm.arch, sm.model, sm.num_layers
        self.calls: dict[int, list[Call]] = {}  # id of an encoded prompt -> each layer's arguments
        self.cache: dict[int, tuple[frozenset, list[LayerTrace]]] = {}  # its last pass
        self.spec: dict[int, list[tuple[frozenset, list[LayerTrace]]]] = {}  # its next iterations, guessed
        self.propose, self.depth = propose, depth
        self.passes = 0
        self.layers_read = 0
        self._held: int | None = None  # the layer the pass holds in memory

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

    def _speculated(self, enc: dict, weights: Sequence) -> list[LayerTrace] | None:
        """The traces of the next guessed iteration when it zeroed exactly ``weights`` (the guesses
        after it are kept for the iterations after it); else None, and every guess is dropped."""
        chain = self.spec.pop(id(enc), [])
        if not chain or chain[0][0] != frozenset(w.key for w in weights):
            return None
        if len(chain) > 1:
            self.spec[id(enc)] = chain[1:]
        return chain[0][1]

    @torch.no_grad()
    def run(self, inputs: Sequence[dict], zeroed_weights: Sequence[Sequence]) -> list[list[LayerTrace]]:
        served = [self._speculated(enc, ws) for enc, ws in zip(inputs, zeroed_weights)]
        starts = [self.num_layers if sv is not None else self._start(enc, ws)
                  for enc, ws, sv in zip(inputs, zeroed_weights, served)]
        traces = [sv if sv is not None else (list(self.cache[id(e)][1][:s]) if s else [])
                  for e, s, sv in zip(inputs, starts, served)]
        hidden = [self._first_hidden(e, s) for e, s in zip(inputs, starts)]
        chains: dict[int, list[_Branch]] = {p: [] for p in range(len(inputs))}
        first = min(starts, default=self.num_layers)
        if first < self.num_layers:
            self.passes += 1
        for i in range(first, self.num_layers):
            with self.sm.layer(i), self._holding(i):
                self.layers_read += 1
                for p, (enc, ws) in enumerate(zip(inputs, zeroed_weights)):
                    if starts[p] <= i:
                        hidden[p], tr = self._run_layer(i, self._calls(enc)[i], hidden[p], ws)
                        traces[p].append(tr)
                        self._grow(i, enc, ws, traces[p], chains[p])
        for p, chain in chains.items():
            if chain:
                self.spec[id(inputs[p])] = self._guesses(traces[p], chain)
        for enc, ws, tr in zip(inputs, zeroed_weights, traces):
            self.cache[id(enc)] = (frozenset(w.key for w in ws), tr)
        return traces

    def _grow(self, i: int, enc: dict, ws: Sequence, traces: list[LayerTrace], chain: list[_Branch]) -> None:
        """Grow a prompt's chain of branches by layer ``i``, level after level: the weights proposed
        on a level's traces (they sit in layer ``i``, so the layers the next level already ran are
        unchanged) join the next level, created here if it is new, which then runs the layer."""
        if self.propose is None:
            return
        zeroing, line = list(ws), traces
        for depth in range(self.depth):
            b = chain[depth] if depth < len(chain) else None
            new = self.propose(self, line, zeroing, b.own if b else [])
            if b is None:
                if not new:
                    return
                b = _Branch(i, line[i].h_in.unsqueeze(0))  # what a rerun from i starts from
                chain.append(b)
            b.own += new
            b.weights = zeroing + b.own  # the level before it may have grown in this layer too
            b.hidden, tr = self._run_layer(i, self._calls(enc)[i], b.hidden, b.weights)
            b.traces.append(tr)
            zeroing, line = b.weights, line[:b.start] + b.traces

    @staticmethod
    def _guesses(traces: list[LayerTrace], chain: list[_Branch]) -> list[tuple[frozenset, list[LayerTrace]]]:
        """(zeroed weights, every layer's trace) of each level, in iteration order."""
        out, line = [], traces
        for b in chain:
            line = line[:b.start] + b.traces
            out.append((b.keys, line))
        return out

    @contextlib.contextmanager
    def _holding(self, i: int) -> Iterator[None]:
        self._held = i
        try:
            yield
        finally:
            self._held = None

    def _first_hidden(self, enc: dict, start: int) -> torch.Tensor | None:
        if start == 0:
            return hidden_of(self._calls(enc)[0])
        if start >= self.num_layers:
            return None
        return self.cache[id(enc)][1][start].h_in.unsqueeze(0)

    def _run_layer(self, i: int, call: Call, hidden: torch.Tensor, weights: Sequence) -> tuple[torch.Tensor, LayerTrace]:
        args, kwargs = with_hidden(call, hidden)
        with zeroed(self.model, self.arch, weights, layer=i), TraceCapture(self.model, self.arch, layers=[i]) as cap:
            out = self.sm.layers[i](*args, **kwargs)
        return first_tensor(out), cap.as_list()[0]

    @contextlib.contextmanager
    def layer(self, layer: int, zeroed_weights: Sequence = ()) -> Iterator[None]:
        held = layer == self._held  # the pass holds it already (a proposal looks at it): no second read
        with (contextlib.nullcontext() if held else self.sm.materialised(self._mlp_weights(layer))), \
                zeroed(self.model, self.arch, zeroed_weights, layer):
            yield

    def _mlp_weights(self, layer: int) -> list[str]:
        """What detection reads of a layer outside a pass: its down-projection (an MoE layer's experts),
        a fifth of a Llama layer's bytes instead of all of it."""
        prefixes = [f"{self.arch.down_proj_name(layer, self.model)}."] if self.arch.has_dense(self.model, layer) else []
        if self.arch.experts:
            prefixes.append(f"{self.arch.experts_name(layer)}.")
        return [n for n in self.sm.layer_names(layer) if n.startswith(tuple(prefixes))]


def stream_detect(
    path: str | Path | ModelSource | StreamedModel,
    prompts: Sequence[str] | str = (DEFAULT_PROMPT,),
    rule: SpikeRule | None = None,
    max_iter: int = 10,
    model_name: str = "",
    dtype: str | torch.dtype = "float32",
    tokenizer=None,
    device: str | torch.device | None = None,
    method: str = DEFAULT_METHOD,
    trace_rule: TraceRule | None = None,
    verdict_text: str | None = None,
    verdict_tokens: int = 1024,
    verdict_full: bool = False,
) -> DetectionResult:
    """``superweight.find.loop.detect`` for a local safetensors checkpoint, streamed layer by layer.

    The same ``DetectionResult`` as loading the model and calling ``detect`` (bit for bit on the
    same dtype and device); peak memory is about the embeddings plus two decoder layers. ``path``
    may be a ``StreamedModel`` already built (then left open).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SuperweightError("no prompt given: pass at least one --prompt")
    with streamed(path, dtype, device) as sm:
        tokenizer = tokenizer or load_tokenizer(sm.ckpt.folder)
        encoded = [encode_prompt(tokenizer, p) for p in prompts]
        runner = StreamedRunner(sm, lambda r, traces, ws, proposed: propose(method, r, traces, ws, proposed, rule, trace_rule),
                                depth=max_iter - 1)
        states = run_detection(runner, encoded, method, rule, trace_rule, max_iter)
        log.info("streamed %d layers: %d layer reads in %d pass(es)", sm.num_layers, runner.layers_read, runner.passes)
        result = assemble(states, runner, prompts, model_name or sm.source.ref, method, rule, trace_rule)
        if verdict_text is not None and result.super_weights:
            judge_with(StreamedJudge(sm, tokenizer, verdict_text, verdict_tokens), result, full=verdict_full)
        return result


class StreamedJudge(JudgeBase):
    """``verdict.Judge`` for a streamed model: each round's zeroed sets (and the base) in one pass over the
    layers for all the text's windows (``eval.streamed.window_token_nlls``), and the super activations
    after zeroing in one more pass: a read of the checkpoint per round (most verdicts need one), and one."""

    def __init__(self, sm: StreamedModel, tokenizer, text: str, tokens: int = 1024, seed: int = 0):
        super().__init__(sm.model, sm.arch, tokenizer, text, tokens, seed)
        self.sm = sm

    def token_nlls(self, sets: Sequence[Sequence], upto: int, starts: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The NLL of scored tokens ``starts[i]`` (default 0) to ``upto`` with each set zeroed, all in one pass:
        every set's whole prefix is scored again (and counted), then cut."""
        windows = self.windows(upto)
        flops = 2 * sum(p.numel() for p in self.model.parameters()) * sum(len(ids) for ids, _ in windows) * len(sets)
        log.info("verdict, streamed: %d zeroed sets (the base included) on %d tokens, about %.3g TFLOP of forward "
                 "passes (--no-verdict skips it)", len(sets), upto, flops / 1e12)
        per_window = window_token_nlls(self.sm, windows, sets)
        self.scored += upto * len(sets)
        starts = starts or [0] * len(sets)
        return [torch.cat([w[s] for w in per_window])[starts[s]:] for s in range(len(sets))]

    def activations_after(self, requests: Sequence[tuple]) -> list[float]:
        if not requests:
            return []
        encoded = [encode_prompt(self.tokenizer, prompt) for prompt, _, _ in requests]
        traces = StreamedRunner(self.sm).run(encoded, [list(ws) for _, _, ws in requests])
        return [float(tr[sa.peak_layer].h_out[sa.token, sa.channel]) for tr, (_, sa, _) in zip(traces, requests)]
