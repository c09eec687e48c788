"""``ablate`` of a checkpoint larger than memory (``superweight ablate --stream``).

The same conditions as in memory (``experiments.build_conditions``: the super weights zeroed, the
largest other weights zeroed, the super activation restored, random weights zeroed, every scale),
and the same stopword statistics, season-prompt top-5 and zero-shot tasks, measured with the model
read one decoder layer at a time: every perplexity window and every task request under every
condition, and every stopword prompt with and without the super weights, runs through each layer
while that layer is in memory
(``StreamedModel.run_heads``; one pass over the checkpoint while the runs' residual streams fit
``stream.HELD_BYTES``). A condition edits a layer only while that layer is read
(``Condition.edit_layer``), restored bit for bit after.

Perplexities are the in-memory numbers bit for bit (the same windows through the same kernels).
Stopword probabilities and task requests are read one at a time, where in memory those of similar
length share a padded batch: equal up to float rounding (an accuracy can flip on a near tie).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .ablate import checked_keys, sw_layers
from .eval.perplexity import default_seq_len, perplexity_result, perplexity_windows
from .eval.stopwords import SEASON_PROMPT, lambada_prompts, prompt_ids, stats_of, top_of
from .eval.tasks import average_accuracy, continuation_scores, prepare_task, scored
from .eval.text import load_text
from .inputs import checked_against
from .experiments import (
    AblationConfig,
    AblationResult,
    ConditionResult,
    ablation_inputs,
    build_conditions,
    copied_result,
    stopword_result,
    super_weight_dicts,
)
from .stream import StreamedModel, _tokenizer

REQUESTS_ONE_BY_ONE = ("zero-shot requests scored one at a time (in memory, batched by length): log-likelihoods "
                       "equal to float rounding")


def stream_ablation(
    path: str | Path, super_weights, config: AblationConfig | None = None, dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None, tokenizer=None, model_name: str = "", origin: str | None = None,
    **overrides,
) -> AblationResult:
    """``experiments.run_ablation`` of a local safetensors checkpoint, streamed layer by layer. A ``DetectionResult``
    read from a file (``origin``) is checked against the checkpoint's architecture first."""
    config, sws, coords = ablation_inputs(super_weights, config, overrides)
    start = time.perf_counter()
    sm = StreamedModel(path, dtype, device)
    try:
        tokenizer = tokenizer or _tokenizer(sm.ckpt.folder)
        if origin is not None:
            checked_against(super_weights, sm.arch, sm.model, model_name or str(path), origin)
        checked_keys(sm.model, sm.arch, coords)
        names = [n for layer in sw_layers(coords) for n in sm.layer_names(layer)]
        with sm.materialised(names):  # the null baselines read the super weights' layers
            conds = build_conditions(sm.model, sm.arch, coords, config)
        measured = [c for c in conds if c.same_as is None]
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
                f"in {seconds:.0f} s" + (f"; {REQUESTS_ONE_BY_ONE}" if config.tasks else ""))
        return AblationResult(
            model=model_name or str(path), architecture=sm.arch.name, super_weights=super_weight_dicts(sws),
            config=config, conditions=conditions, stopwords=stop, top5=top5, notes=[note],
        )
    finally:
        sm.close()


class _Runs:
    """The runs of one streamed measurement, each under a key: windows added once, run under any edits."""

    def __init__(self) -> None:
        self.windows: list[torch.Tensor] = []
        self.runs: list[tuple[int, object]] = []
        self.fns: list = []
        self.keys: list[tuple] = []

    def window(self, ids) -> int:
        self.windows.append(torch.as_tensor(ids, dtype=torch.long, device="cpu"))
        return len(self.windows) - 1

    def add(self, key: tuple, window: int, cond, fn) -> None:
        self.keys.append(key)
        self.runs.append((window, cond.edit_layer))
        self.fns.append(fn)

    def measure(self, sm: StreamedModel) -> dict:
        return dict(zip(self.keys, sm.run_heads(self.windows, self.runs, self.fns)))


def _measure(sm: StreamedModel, tokenizer, config: AblationConfig, measured: list) -> tuple[dict, dict, dict | None, dict]:
    """({condition: (ppl, tokens)}, {condition: {task: TaskResult}}, stopwords, top5): every run in the same
    passes over the layers."""
    plan, spans, tasks = _Runs(), [], {}
    if config.ppl is not None:
        ids, spans, seq_len, stride = perplexity_windows(sm.model, tokenizer, load_text(config.ppl), config.seq_len,
                                                          config.max_tokens)
        for k, (b, e, f) in enumerate(spans):
            w = plan.window(ids[b:e])
            for cond in measured:
                plan.add(("ppl", cond.name, k), w, cond, sm.nll_head(ids[b:e], f - b))
    if config.tasks:
        max_len = default_seq_len(sm.model, tokenizer)
        tasks = {t: prepare_task(tokenizer, t, config.limit, max_len) for t in config.tasks}
        windows = {t: [plan.window((c + x)[:-1]) for c, x in task.pairs] for t, task in tasks.items()}
        for cond in measured:
            for t in cond.task_names(config):
                for i, (ctx, cont) in enumerate(tasks[t].pairs):
                    w = windows[t][i]
                    plan.add(("task", cond.name, t, i), w, cond, _request_head(plan.windows[w], len(ctx), cont, sm.device))
    prompts, targets = lambada_prompts(config.stopword_prompts) if config.stopword_prompts else ([], [])
    for j, prompt in enumerate((SEASON_PROMPT, *prompts)):
        w = plan.window(prompt_ids(tokenizer, prompt))
        for cond in measured:
            if cond.name in ("original", "zero_super_weights"):
                plan.add(("probs", cond.name, j), w, cond, _probs_head(plan.windows[w], sm.device))
    v = plan.measure(sm)
    ppl, results = {}, {}
    for cond in measured:
        if spans:
            r = perplexity_result([v["ppl", cond.name, k] for k in range(len(spans))], spans, seq_len, stride)
            ppl[cond.name] = (r.ppl, r.tokens)
        results[cond.name] = {t: scored(tasks[t], [v["task", cond.name, t, i] for i in range(len(tasks[t].pairs))])
                              for t in cond.task_names(config)}
    probs = {c: [v["probs", c, j] for j in range(len(prompts) + 1)] for c in ("original", "zero_super_weights")}
    stats = {c: stats_of(torch.stack(p[1:]), tokenizer, targets).to_dict() if prompts else None for c, p in probs.items()}
    return ppl, results, *stopword_result(len(prompts), stats["original"], stats["zero_super_weights"],
                                          top_of(probs["original"][0], tokenizer),
                                          top_of(probs["zero_super_weights"][0], tokenizer))


def _request_head(ids: torch.Tensor, context_len: int, continuation: list[int], device: torch.device):
    """A ``through_head`` function: (log-likelihood, is greedy) of a request's continuation, as
    ``eval.tasks.score_batch`` scores it (``ids``: the run's ``(context + continuation)[:-1]``)."""
    def head(model) -> tuple[float, bool]:
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits
        lp = logits[0, context_len - 1: context_len - 1 + len(continuation)].float().log_softmax(-1)
        return continuation_scores(lp, continuation)

    return head


def _probs_head(ids: torch.Tensor, device: torch.device):
    """A ``through_head`` function: the next-token distribution after the prompt ``ids``, on the host
    (as ``eval.stopwords.next_token_probs`` reads it)."""
    def head(model) -> torch.Tensor:
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits
        return logits[0, -1].float().softmax(-1).cpu()

    return head
