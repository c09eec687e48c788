"""Metric code on hand-computed cases: a bigram model whose probabilities are known exactly."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from superweight.errors import SuperweightError
from superweight.eval import evaluate_perplexity, load_text
from superweight.eval.perplexity import window_spans


class Bigram(nn.Module):
    """logits[t] = log P(next | ids[t]) from a fixed table: every probability is known by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.logp = nn.Parameter(table.log_softmax(-1), requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.logp[input_ids])


class ListTokenizer:
    """Each character of ``"abc"`` is one token: a=0, b=1, c=2."""

    def __call__(self, text, **kw):
        return {"input_ids": ["abc".index(ch) for ch in text]}


def bigram(p_next: dict[tuple[int, int], float], vocab: int = 3) -> Bigram:
    probs = torch.full((vocab, vocab), 1e-9)
    for (a, b), p in p_next.items():
        probs[a, b] = p
    return Bigram((probs / probs.sum(-1, keepdim=True)).log())


def test_two_token_perplexity_by_hand():
    model = bigram({(0, 1): 0.5, (0, 2): 0.5, (1, 2): 0.25, (1, 0): 0.75, (2, 0): 1.0})
    r = evaluate_perplexity(model, ListTokenizer(), "abc")
    # two tokens scored: P(b|a) = 0.5, P(c|b) = 0.25 -> ppl = (0.5 * 0.25) ** -0.5
    assert r.tokens == 2 and r.windows == 1
    assert r.ppl == pytest.approx((0.5 * 0.25) ** -0.5, rel=1e-6)
    assert r.nll == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2, rel=1e-6)


def test_windows_score_each_token_once():
    model = bigram({(0, 1): 0.5, (0, 0): 0.5, (1, 2): 0.25, (1, 1): 0.75, (2, 0): 0.9, (2, 2): 0.1})
    text = "abcabcaabbcc"
    full = evaluate_perplexity(model, ListTokenizer(), text, seq_len=64)
    strided = evaluate_perplexity(model, ListTokenizer(), text, seq_len=4, stride=2)
    assert full.tokens == strided.tokens == len(text) - 1  # overlap: every token but the first
    assert strided.ppl == pytest.approx(full.ppl, rel=1e-6)  # a bigram needs only one token of context
    disjoint = evaluate_perplexity(model, ListTokenizer(), text, seq_len=4)
    assert disjoint.tokens == len(text) - 3  # each window's first token is context only
    assert evaluate_perplexity(model, ListTokenizer(), text, seq_len=4, max_tokens=5).tokens == 3


def test_window_spans():
    assert window_spans(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert window_spans(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert window_spans(9, 4, 4) == [(0, 4, 1), (4, 8, 5)]


def test_text_sources(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world", encoding="utf-8")
    assert load_text(str(path)) == "hello world"
    with pytest.raises(SuperweightError, match="unknown text source"):
        load_text("no-such-source")
    with pytest.raises(SuperweightError, match="fewer than 2 tokens"):
        evaluate_perplexity(bigram({}), ListTokenizer(), "a")
