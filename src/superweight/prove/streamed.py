"""``ablate`` and ``eval`` of a checkpoint larger than memory (``superweight ablate --stream``,
``superweight eval --stream``).

The same conditions as in memory (``experiments.build_conditions``: the super weights zeroed, the
largest other weights zeroed, the super activation restored, random weights zeroed, every scale),
and the same stopword statistics, season-prompt top-5 and zero-shot tasks, measured with the model
read one decoder layer at a time: every perplexity window and every batch of task requests under
every condition, and every batch of stopword prompts with and without the super weights, runs through
each layer while that layer is in memory (``StreamedModel.run_heads``; one pass over the checkpoint
while the runs' residual streams fit ``stream.HELD_BYTES``). A condition edits a layer only while
that layer is read (``Condition.edit_layer``), restored bit for bit after. ``eval`` is the
``original`` condition alone, without the stopword prompts.

Requests and prompts are batched as in memory (``eval.tasks.length_batches``, the same padded rows),
so every number is the in-memory one: the same rows through the same kernels.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from .ablate import checked_keys, sw_layers
from .plan import plan_line
from ..eval.perplexity import default_seq_len, perplexity_result, perplexity_windows
from ..eval.stopwords import SEASON_PROMPT, lambada_prompts, last_probs, prompt_ids, stats_of, top_of
from ..eval.tasks import (
    average_accuracy,
    batch_scores,
    in_input_order,
    length_batches,
    padded,
    prepare_task,
    request_ids,
    request_lengths,
    scored,
)
from ..eval.streamed import nll_head
from ..eval.text import load_text
from ..model.arch import checked_against
from .experiments import (
    AblationConfig,
    AblationResult,
    Condition,
    ConditionResult,
    EvalResult,
    ablation_inputs,
    build_conditions,
    configured,
    copied_result,
    stopword_result,
    super_weight_dicts,
)
from ..model.streamed import StreamedModel, load_tokenizer, streamed


log = logging.getLogger(__name__)


def _work(config: AblationConfig) -> str:
    """What each condition scores, from the config (the streamed pass tokenizes as it goes)."""
    tokens = f"up to {config.max_tokens:,} tokens of {config.ppl}" if config.max_tokens else f"all of {config.ppl}"
    parts = [tokens] if config.ppl else []
    if config.tasks:
        parts.append(f"{len(config.tasks)} task(s) ({', '.join(config.tasks)}; "
                     f"{f'at most {config.limit} items each' if config.limit else 'all items'})")
    return " x ".join(parts) or "nothing to score"


def stream_ablation(
    path: str | Path, super_weights, config: AblationConfig | None = None, dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None, tokenizer=None, model_name: str = "", origin: str | None = None,
    **overrides,
) -> AblationResult:
    """``experiments.run_ablation`` of a local safetensors checkpoint, streamed layer by layer. A ``DetectionResult``
    read from a file (``origin``) is checked against the checkpoint's architecture first."""
    config, sws, coords = ablation_inputs(super_weights, config, overrides)
    start = time.perf_counter()
    with streamed(path, dtype, device) as sm:
        tokenizer = tokenizer or load_tokenizer(sm.ckpt.folder)
        if origin is not None:
            checked_against(super_weights, sm.arch, sm.model, model_name or sm.source.ref, origin)
        checked_keys(sm.model, sm.arch, coords)
        names = [n for layer in sw_layers(coords) for n in sm.layer_names(layer)]
        with sm.materialised(names):  # the null baselines read the super weights' layers
            conds = build_conditions(sm.model, sm.arch, coords, config)
        measured = [c for c in conds if c.same_as is None]
        log.info("%s", plan_line(len(conds), len(conds) - len(measured), _work(config),
                                 ", every condition through each layer read (one pass: no estimate before its end)"))
        ppl, tasks, stop, top5 = _measure(sm, tokenizer, config, measured)
        conditions: dict[str, ConditionResult] = {}
        for cond in conds:
            if cond.same_as is None:
                value, tokens = ppl.get(cond.name, (None, None))
                scores = tasks[cond.name]
                conditions[cond.name] = ConditionResult(cond.description, cond.weights_changed, value, tokens,
                                                        average_accuracy(scores) if scores else None, scores)
            else:
                conditions[cond.name] = copied_result(cond, conditions[cond.same_as], config)
        seconds = time.perf_counter() - start
        note = (f"streamed: every condition through each layer read, {sm.passes} pass(es) over the checkpoint "
                f"in {seconds:.0f} s")
        return AblationResult(
            model=model_name or sm.source.ref, architecture=sm.arch.name, super_weights=super_weight_dicts(sws),
            config=config, conditions=conditions, stopwords=stop, top5=top5, notes=[note],
        )


def stream_eval(
    path: str | Path, config: AblationConfig | None = None, dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None, tokenizer=None, model_name: str = "", **overrides,
) -> EvalResult:
    """``experiments.run_eval`` of a local safetensors checkpoint, streamed layer by layer: its perplexity
    and zero-shot tasks, every window and request batch through each layer read."""
    config = configured(config, overrides)
    start = time.perf_counter()
    with streamed(path, dtype, device) as sm:
        tokenizer = tokenizer or load_tokenizer(sm.ckpt.folder)
        original = Condition("original", "as it is", lambda coords: contextlib.nullcontext(), [])
        ppl, tasks, _, _ = _measure(sm, tokenizer, config, [original], stopwords=False)
        value, tokens = ppl.get("original", (None, None))
        scores = tasks["original"]
        seconds = time.perf_counter() - start
        note = f"streamed: each layer read once per pass, {sm.passes} pass(es) over the checkpoint in {seconds:.0f} s"
        return EvalResult(model_name or sm.source.ref, config, value, tokens, average_accuracy(scores) if scores else None,
                          scores, [note], seconds)


class _Runs:
    """The runs of one streamed measurement, each under a key: windows added once, run under any edits."""

    def __init__(self) -> None:
        self.windows: list[torch.Tensor] = []
        self.runs: list[tuple[int, object]] = []
        self.fns: list = []
        self.keys: list[tuple] = []

    def window(self, ids) -> int:
        """A window of ids: one row, or a padded batch of rows (``[rows, tokens]``)."""
        self.windows.append(torch.as_tensor(ids, dtype=torch.long, device="cpu"))
        return len(self.windows) - 1

    def add(self, key: tuple, window: int, cond, fn) -> None:
        self.keys.append(key)
        self.runs.append((window, cond.edit_layer))
        self.fns.append(fn)

    def measure(self, sm: StreamedModel) -> dict:
        return dict(zip(self.keys, sm.run_heads(self.windows, self.runs, self.fns)))


def _measure(sm: StreamedModel, tokenizer, config: AblationConfig, measured: list,
             stopwords: bool = True) -> tuple[dict, dict, dict | None, dict]:
    """({condition: (ppl, tokens)}, {condition: {task: TaskResult}}, stopwords, top5): every run in the same
    passes over the layers; ``stopwords=False``: no stopword prompts, (None, {}) for the last two."""
    plan = _Runs()
    ppl = _plan_perplexity(plan, sm, tokenizer, config, measured)
    tasks = _plan_tasks(plan, sm, tokenizer, config, measured)
    probs = _plan_prompts(plan, sm, tokenizer, config, measured) if stopwords else None
    v = plan.measure(sm)
    stop = probs(v) if probs else (None, {})
    return ppl(v), tasks(v), *stop


def _plan_perplexity(plan: _Runs, sm: StreamedModel, tokenizer, config: AblationConfig, measured: list):
    """Every perplexity window under every condition; a function of the measured values -> {condition: (ppl, tokens)}."""
    if config.ppl is None:
        return lambda v: {}
    ids, spans, seq_len, stride = perplexity_windows(sm.model, tokenizer, load_text(config.ppl), config.seq_len,
                                                      config.max_tokens)
    for k, (b, e, f) in enumerate(spans):
        w = plan.window(ids[b:e])
        for cond in measured:
            plan.add(("ppl", cond.name, k), w, cond, nll_head(sm, ids[b:e], f - b))

    def result(v: dict) -> dict:
        out = {}
        for cond in measured:
            r = perplexity_result([v["ppl", cond.name, k] for k in range(len(spans))], spans, seq_len, stride)
            out[cond.name] = (r.ppl, r.tokens)
        return out

    return result


def _plan_tasks(plan: _Runs, sm: StreamedModel, tokenizer, config: AblationConfig, measured: list):
    """Every zero-shot request under every condition, in the in-memory batches (``length_batches``, padded
    as ``eval.tasks.score_batch`` pads them); a function of the measured values -> {condition: {task: TaskResult}}."""
    if not config.tasks:
        return lambda v: {cond.name: {} for cond in measured}
    max_len = default_seq_len(sm.model, tokenizer)
    tasks = {t: prepare_task(tokenizer, t, config.limit, max_len) for t in config.tasks}
    batches = {t: length_batches(request_lengths(task.pairs)) for t, task in tasks.items()}
    windows = {t: [plan.window(request_ids([tasks[t].pairs[i] for i in b], "cpu")) for b in bs] for t, bs in batches.items()}
    for cond in measured:
        for t in cond.task_names(config):
            for k, b in enumerate(batches[t]):
                w = windows[t][k]
                plan.add(("task", cond.name, t, k), w, cond,
                         _requests_head(plan.windows[w], [tasks[t].pairs[i] for i in b], sm.device))

    def result(v: dict) -> dict:
        return {cond.name: {t: scored(tasks[t], in_input_order(batches[t], [v["task", cond.name, t, k]
                                                                            for k in range(len(batches[t]))]))
                            for t in cond.task_names(config)}
                for cond in measured}

    return result


def _plan_prompts(plan: _Runs, sm: StreamedModel, tokenizer, config: AblationConfig, measured: list):
    """The season prompt and the stopword prompts (batched as ``eval.stopwords.next_token_probs`` batches
    them) with and without the super weights; a function of the measured values -> (stopwords, top5)."""
    prompts, targets = lambada_prompts(config.stopword_prompts) if config.stopword_prompts else ([], [])
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    batches = length_batches([len(e) for e in encoded])
    groups = [[prompt_ids(tokenizer, SEASON_PROMPT)], *([encoded[i] for i in b] for b in batches)]
    both = [c for c in measured if c.name in ("original", "zero_super_weights")]
    for j, rows in enumerate(groups):
        w = plan.window(padded(rows, "cpu"))
        for cond in both:
            plan.add(("probs", cond.name, j), w, cond, _probs_head(plan.windows[w], rows, sm.device))

    def result(v: dict) -> tuple[dict | None, dict]:
        probs = {c.name: [v["probs", c.name, j] for j in range(len(groups))] for c in both}
        stats = {c: stats_of(torch.stack(in_input_order(batches, p[1:])), tokenizer, targets).to_dict() if prompts else None
                 for c, p in probs.items()}
        return stopword_result(len(prompts), stats["original"], stats["zero_super_weights"],
                               top_of(probs["original"][0][0], tokenizer),
                               top_of(probs["zero_super_weights"][0][0], tokenizer))

    return result


def _requests_head(ids: torch.Tensor, pairs: list, device: torch.device):
    """A ``through_head`` function: (log-likelihood, is greedy) of each request of a padded batch
    (``ids``: ``eval.tasks.request_ids``), as ``eval.tasks.score_batch`` scores them."""
    def head(model) -> list[tuple[float, bool]]:
        return batch_scores(model(input_ids=ids.to(device), use_cache=False).logits, pairs)

    return head


def _probs_head(ids: torch.Tensor, rows: list, device: torch.device):
    """A ``through_head`` function: the next-token distribution after each prompt of a padded batch, on
    the host (as ``eval.stopwords.next_token_probs`` reads them)."""
    def head(model) -> list[torch.Tensor]:
        return last_probs(model(input_ids=ids.to(device), use_cache=False).logits, rows)

    return head
