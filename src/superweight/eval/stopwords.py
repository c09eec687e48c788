"""How the next-token distribution shifts towards stopwords without the super weights (paper Fig. 5).

For each prompt (default: LAMBADA contexts, whose next word is a content word) the next-token
distribution at the last position is read. Reported, averaged over prompts:
``stopword_prob`` the mean probability of a stopword token, ``other_prob`` the mean probability
of any other vocabulary token, ``target_prob`` the probability of the next word's first token
(LAMBADA prompts only), and ``per_token`` each stopword's probability.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..model.device import input_device
from .tasks import BATCH_TOKENS, in_input_order, length_batches, load_items, padded

DEFAULT_STOPWORDS: tuple[str, ...] = (
    "the", ",", ".", "a", "and", "of", "to", "in", "is", "that", "it", "was", "he", "she", "I", "for", "on",
    "with", "as", "his", "her", "at", "be", "had", "but", "not",
)
SEASON_PROMPT = "Summer is hot. Winter is"
DEFAULT_PROMPTS = 50


@dataclass
class StopwordStats:
    stopword_prob: float
    other_prob: float
    target_prob: float | None
    per_token: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def stopword_ids(tokenizer, words: Sequence[str] = DEFAULT_STOPWORDS) -> dict[str, int]:
    """Single-token ids of the stopwords as they follow a word (``" the"``; punctuation bare)."""
    ids = {}
    for w in words:
        text = w if not w[0].isalnum() else " " + w
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(toks) == 1:
            ids[w] = int(toks[0])
    return ids


def lambada_prompts(n: int = DEFAULT_PROMPTS) -> tuple[list[str], list[str]]:
    """The first ``n`` LAMBADA contexts and their target words."""
    items = load_items("lambada", n)
    return [it.contexts[0] for it in items], [it.choices[0] for it in items]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as the next-token statistics read them (no special tokens added)."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def next_token_probs(model: nn.Module, tokenizer, prompts: Sequence[str], batch_tokens: int = BATCH_TOKENS) -> torch.Tensor:
    """``[len(prompts), vocab]`` next-token probabilities after each prompt (right-padded batches)."""
    device = input_device(model)
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    batches = length_batches([len(e) for e in encoded], batch_tokens)
    out = []
    for batch in batches:
        rows = [encoded[i] for i in batch]
        out.append(last_probs(model(input_ids=padded(rows, device), use_cache=False).logits, rows))
    return torch.stack(in_input_order(batches, out))


def last_probs(logits: torch.Tensor, rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The next-token distribution after each row of a padded batch, on the host."""
    return [logits[k, len(r) - 1].float().softmax(-1).cpu() for k, r in enumerate(rows)]


def stopword_stats(
    model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str] | None = None,
    words: Sequence[str] = DEFAULT_STOPWORDS,
) -> StopwordStats:
    """Mean next-token probabilities of stopwords, of the other tokens and of the targets."""
    return stats_of(next_token_probs(model, tokenizer, prompts), tokenizer, targets, words)


def stats_of(probs: torch.Tensor, tokenizer, targets: Sequence[str] | None = None,
             words: Sequence[str] = DEFAULT_STOPWORDS) -> StopwordStats:
    """``stopword_stats`` of next-token probabilities already read (``[prompts, vocab]``, on the host)."""
    ids = stopword_ids(tokenizer, words)
    idx = torch.tensor(sorted(set(ids.values())), device="cpu")  # probs are on the host
    mask = torch.zeros(probs.shape[1], dtype=torch.bool, device="cpu")
    mask[idx] = True
    target_prob = None
    if targets is not None:
        first = [tokenizer(" " + t, add_special_tokens=False)["input_ids"][0] for t in targets]
        target_prob = float(probs[torch.arange(len(first), device="cpu"), torch.tensor(first, device="cpu")].mean())
    return StopwordStats(
        stopword_prob=float(probs[:, mask].mean()),
        other_prob=float(probs[:, ~mask].mean()),
        target_prob=target_prob,
        per_token={w: float(probs[:, i].mean()) for w, i in ids.items()},
    )


def top_next_tokens(model: nn.Module, tokenizer, prompt: str = SEASON_PROMPT, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``prompt`` with their probabilities."""
    return top_of(next_token_probs(model, tokenizer, [prompt])[0], tokenizer, k)


def top_of(probs: torch.Tensor, tokenizer, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most likely tokens of one next-token distribution, decoded, with their probabilities."""
    p, i = probs.topk(k)
    return [(tokenizer.decode([int(t)]), float(v)) for t, v in zip(i, p)]
