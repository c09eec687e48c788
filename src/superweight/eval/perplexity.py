"""Perplexity over a token stream with strided windows, as the field computes Wiki-2 perplexity.

The text is tokenized once into one stream (the tokenizer's default special tokens, so a
Llama-style BOS appears once at the start). Windows of ``seq_len`` tokens start every ``stride``
tokens; each window scores only the tokens that no earlier window scored (the Hugging Face
"perplexity of fixed-length models" recipe). With the default ``stride = seq_len`` the windows do
not overlap and the first token of each window is context only, exactly the GPTQ / super weight
paper evaluation (``nsamples = tokens // seq_len`` windows of ``seq_len``), except that a final
partial window is scored too. ``ppl = exp(total NLL / tokens scored)``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.device import input_device
from ..core.errors import SuperweightError
from ..core.progress import bar

log = logging.getLogger(__name__)

RESULT_VERSION = 1
DEFAULT_SEQ_LEN = 2048
MIN_TOKENS = 64  # below this a perplexity is logged as unreliable (the CLI refuses shorter texts up front)
CHARS_PER_TOKEN_BOUND = 12  # a prefix this many characters per token always holds enough tokens


@dataclass
class PerplexityResult:
    """Perplexity of one text: ``ppl = exp(nll)``, ``nll`` in nats per scored token."""

    ppl: float
    nll: float
    tokens: int  # tokens scored (predicted), the count the perplexity averages over
    windows: int
    seq_len: int
    stride: int = 0
    version: int = RESULT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PerplexityResult":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def model_max_length(model: nn.Module, tokenizer=None) -> int | None:
    """The longest sequence the model's positions allow, when the config says."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None


def default_seq_len(model: nn.Module, tokenizer=None) -> int:
    limit = model_max_length(model, tokenizer)
    return min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN


def tokenize_stream(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D stream, cut to ``max_tokens`` (only a prefix is tokenized)."""
    if max_tokens is not None and len(text) > max_tokens * CHARS_PER_TOKEN_BOUND:
        ids = tokenizer(text[: max_tokens * CHARS_PER_TOKEN_BOUND])["input_ids"]
        if len(ids) <= max_tokens:  # an unusual tokenizer: fall back to the whole text
            ids = tokenizer(text)["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long, device="cpu").flatten()
    return ids[:max_tokens] if max_tokens is not None else ids


def window_spans(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window: positions ``first_scored..end-1`` are predicted."""
    spans, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        first = max(prev_end, begin + 1)  # a window's first token has no context inside it
        if end > first:
            spans.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return spans


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, first_scored: int) -> torch.Tensor:
    """Summed NLL (float64) of ``ids[first_scored:]`` given the tokens before it in the window."""
    logits = model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0, first_scored - 1 : -1]
    return F.cross_entropy(logits.float(), ids[first_scored:], reduction="sum").double()


def token_nlls(model: nn.Module, ids: torch.Tensor, first_scored: int) -> torch.Tensor:
    """``window_nll`` token by token: the NLL (float64, on the CPU) of each of ``ids[first_scored:]``."""
    logits = model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0, first_scored - 1 : -1]
    return F.cross_entropy(logits.float(), ids[first_scored:], reduction="none").double().cpu()


def evaluate_perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    stride: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` over strided windows (see the module docstring).

    ``seq_len`` defaults to min(2048, the model's maximum), ``stride`` to ``seq_len`` (no overlap),
    ``max_tokens`` bounds the token stream (and so the work).
    """
    ids, spans, seq_len, stride = perplexity_windows(model, tokenizer, text, seq_len, max_tokens, stride)
    ids = ids.to(input_device(model))
    nlls = [window_nll(model, ids[b:e], f - b).cpu() for b, e, f in bar(spans, "perplexity", unit="window")]
    return perplexity_result(nlls, spans, seq_len, stride)


def perplexity_windows(model: nn.Module, tokenizer, text: str, seq_len: int | None = None, max_tokens: int | None = None,
                       stride: int | None = None) -> tuple[torch.Tensor, list[tuple[int, int, int]], int, int]:
    """The token stream and its windows ``(begin, end, first_scored)``, with the defaults and checks of
    ``evaluate_perplexity`` (``model`` may be a skeleton: only its config is read)."""
    seq_len = seq_len or default_seq_len(model, tokenizer)
    stride = stride or seq_len
    if seq_len < 2 or not 0 < stride <= seq_len:
        raise SuperweightError(f"need seq_len >= 2 and 0 < stride <= seq_len (got {seq_len}, {stride})")
    ids = tokenize_stream(tokenizer, text, max_tokens)
    spans = window_spans(len(ids), seq_len, stride)
    if not spans:
        raise SuperweightError("the text has fewer than 2 tokens: pass a longer text")
    return ids, spans, seq_len, stride


def perplexity_result(nlls, spans: list[tuple[int, int, int]], seq_len: int, stride: int) -> PerplexityResult:
    """The perplexity of summed window NLLs (float64, summed in window order)."""
    total = torch.zeros((), dtype=torch.float64, device="cpu")
    for n in nlls:
        total += n
    count = sum(e - f for _, e, f in spans)
    nll = float(total) / count
    if count < MIN_TOKENS:
        log.warning("perplexity over only %d token(s): with fewer than %d its value is noise, not a measurement; "
                    "score a longer text", count, MIN_TOKENS)
    log.debug("perplexity: %d tokens scored in %d windows of %d", count, len(spans), seq_len)
    return PerplexityResult(
        ppl=math.exp(nll), nll=nll, tokens=count, windows=len(spans), seq_len=seq_len, stride=stride
    )
