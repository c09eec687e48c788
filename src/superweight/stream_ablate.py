"""``ablate`` of a checkpoint larger than memory (``superweight ablate --stream``).

The same conditions as in memory (``experiments.build_conditions``: the super weights zeroed, the
largest other weights zeroed, the super activation restored, random weights zeroed, every scale),
and the same stopword statistics and season-prompt top-5, measured with the model read one decoder
layer at a time: every perplexity window under every condition, and every stopword prompt with and
without the super weights, runs through each layer while that layer is in memory
(``StreamedModel.run_heads``; one pass over the checkpoint while the runs' residual streams fit
``stream.HELD_BYTES``). A condition edits a layer only while that layer is read
(``Condition.edit_layer``), restored bit for bit after.

Perplexities are the in-memory numbers bit for bit (the same windows through the same kernels).
Stopword probabilities are read one prompt at a time, where in memory prompts of similar length
share a padded batch: equal up to float rounding. Zero-shot tasks need the model in memory.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .ablate import sw_layers
from .arch import check_index
from .coords import as_key
from .errors import SuperweightError
from .eval.perplexity import perplexity_result, perplexity_windows
from .eval.stopwords import SEASON_PROMPT, lambada_prompts, prompt_ids, stats_of, top_of
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

log = logging.getLogger(__name__)

TASKS_NEED_MEMORY = "zero-shot tasks need the model in memory"


def stream_ablation(
    path: str | Path, super_weights, config: AblationConfig | None = None, dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None, tokenizer=None, model_name: str = "", origin: str | None = None,
    **overrides,
) -> AblationResult:
    """``experiments.run_ablation`` of a local safetensors checkpoint, streamed layer by layer.

    ``config.tasks`` must be empty (zero-shot tasks need the model in memory). A ``DetectionResult``
    read from a file (``origin``) is checked against the checkpoint's architecture first."""
    config, sws, coords = ablation_inputs(super_weights, config, overrides)
    if config.tasks:
        raise SuperweightError(f"{TASKS_NEED_MEMORY}: pass --tasks none with --stream (or drop --stream where the model fits)")
    start = time.perf_counter()
    sm = StreamedModel(path, dtype, device)
    try:
        tokenizer = tokenizer or _tokenizer(sm.ckpt.folder)
        if origin is not None:
            checked_against(super_weights, sm.arch, sm.model, model_name or str(path), origin)
        for c in coords:
            (layer, row, col), expert = as_key(c)
            check_index(sm.arch, sm.model, layer, row, col, expert)
        names = [n for layer in sw_layers(coords) for n in sm.layer_names(layer)]
        with sm.materialised(names):  # the null baselines read the super weights' layers
            conds = build_conditions(sm.model, sm.arch, coords, config)
        measured = [c for c in conds if c.same_as is None]
        ppl, stop, top5 = _measure(sm, tokenizer, config, measured)
        conditions: dict[str, ConditionResult] = {}
        for cond in conds:
            if cond.same_as is None:
                value, tokens = ppl.get(cond.name, (None, None))
                conditions[cond.name] = ConditionResult(cond.description, cond.weights_changed, value, tokens)
            else:
                conditions[cond.name] = copied_result(cond, conditions[cond.same_as], config)
        seconds = time.perf_counter() - start
        note = (f"streamed: every condition through each layer read, {sm.passes} pass(es) over the checkpoint "
                f"in {seconds:.0f} s; perplexity and stopwords only ({TASKS_NEED_MEMORY})")
        return AblationResult(
            model=model_name or str(path), architecture=sm.arch.name, super_weights=super_weight_dicts(sws),
            config=config, conditions=conditions, stopwords=stop, top5=top5, notes=[note],
        )
    finally:
        sm.close()


def _measure(sm: StreamedModel, tokenizer, config: AblationConfig, measured: list) -> tuple[dict, dict | None, dict]:
    """({condition: (ppl, tokens)}, stopwords, top5): every run in the same passes over the layers."""
    windows, runs, fns, spans = [], [], [], []
    if config.ppl is not None:
        ids, spans, seq_len, stride = perplexity_windows(sm.model, tokenizer, load_text(config.ppl), config.seq_len,
                                                          config.max_tokens)
        for b, e, f in spans:
            windows.append(ids[b:e])
            for cond in measured:
                runs.append((len(windows) - 1, cond.edit_layer))
                fns.append(sm.nll_head(ids[b:e], f - b))
    prompts, targets = lambada_prompts(config.stopword_prompts) if config.stopword_prompts else ([], [])
    pair = [c for c in measured if c.name in ("original", "zero_super_weights")]
    for prompt in (SEASON_PROMPT, *prompts):
        windows.append(torch.tensor(prompt_ids(tokenizer, prompt), dtype=torch.long, device="cpu"))
        for cond in pair:
            runs.append((len(windows) - 1, cond.edit_layer))
            fns.append(_probs_head(windows[-1], sm.device))
    values = sm.run_heads(windows, runs, fns)
    n = len(measured)
    ppl = {}
    if spans:
        for k, cond in enumerate(measured):
            r = perplexity_result([values[w * n + k] for w in range(len(spans))], spans, seq_len, stride)
            ppl[cond.name] = (r.ppl, r.tokens)
    probs = values[len(spans) * n:]  # [prompt][original, zeroed]
    before = torch.stack(probs[2::2]) if prompts else None
    after = torch.stack(probs[3::2]) if prompts else None
    return ppl, *stopword_result(
        len(prompts), stats_of(before, tokenizer, targets).to_dict() if prompts else None,
        stats_of(after, tokenizer, targets).to_dict() if prompts else None,
        top_of(probs[0], tokenizer), top_of(probs[1], tokenizer),
    )


def _probs_head(ids: torch.Tensor, device: torch.device):
    """A ``through_head`` function: the next-token distribution after the prompt ``ids``, on the host
    (as ``eval.stopwords.next_token_probs`` reads it)."""
    def head(model) -> torch.Tensor:
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits
        return logits[0, -1].float().softmax(-1).cpu()

    return head
