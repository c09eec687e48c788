"""The verdict's early stop on a planted tiny model: each zeroed set is scored in rounds (in memory 128
tokens at a time, continued from its cache) and stops once a confidence bound on the whole text's mean
decides its label; a borderline set runs to the end. The labels are those of scoring every set on the
whole text (``full=True``)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import superweight as sw
from superweight.eval.text import load_text
from superweight.find.verdict import Judge, judge
from superweight.find.verdict_labels import CHUNK, JOINT, SUPER_WEIGHT, SURVIVES
from superweight.find.verdict_rounds import decide
from superweight.testing.synthetic import tiny_model

LAYER, ROW, COL, PARTNER = 1, 5, 17, 18  # down_proj[ROW, COL] cancels down_proj[ROW, PARTNER]
SURVIVOR = (2, 9, 40)  # an ordinary weight


@pytest.fixture(scope="module")
def model():
    """A tiny Llama whose channel ROW carries +a*act - a*act = 0 at every token (two intermediate
    channels with the same gate and up rows): zeroing down_proj[ROW, COL] leaves -a*act there, which
    the head (column ROW scaled up) turns into confident wrong predictions, a collapse."""
    m = tiny_model("LlamaForCausalLM")
    mlp = m.model.layers[LAYER].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[PARTNER] = mlp.gate_proj.weight[COL]
        mlp.up_proj.weight[PARTNER] = mlp.up_proj.weight[COL]
        mlp.down_proj.weight[:, [COL, PARTNER]] = 0.0
        mlp.down_proj.weight[ROW, COL], mlp.down_proj.weight[ROW, PARTNER] = 400.0, -400.0
        m.lm_head.weight[:, ROW] = torch.randn(m.config.vocab_size, generator=torch.Generator().manual_seed(0))
    return m


def finding(layer: int, row: int, col: int):
    return SimpleNamespace(layer=layer, row=row, col=col, expert=None, role="creates", verdict="")


def findings(*coords):
    return SimpleNamespace(super_weights=[finding(*c) for c in coords], activations=[], prompts=[])


def run(model, tokenizer, *coords, **kw):
    result = findings(*coords)
    judge(model, sw.get_arch(model), tokenizer, result, load_text("wiki-intros"), tokens=512, **kw)
    return {tuple(v.weights[0][:3]): v for v in result.verdicts if v.target == "weight"}


def test_a_collapse_and_a_survivor_are_decided_on_the_first_chunk(model, byte_tokenizer):
    early = run(model, byte_tokenizer, (LAYER, ROW, COL), SURVIVOR)
    full = run(model, byte_tokenizer, (LAYER, ROW, COL), SURVIVOR, full=True)
    collapse, survivor = early[(LAYER, ROW, COL)], early[SURVIVOR]
    assert collapse.label == full[(LAYER, ROW, COL)].label == SUPER_WEIGHT and collapse.ppl_ratio > 10
    assert survivor.label == full[SURVIVOR].label == SURVIVES and abs(survivor.ppl_ratio - 1) < 0.05
    assert collapse.scored == survivor.scored == CHUNK and collapse.null_scored == [CHUNK, CHUNK]
    per_pass = full[SURVIVOR].scored
    assert per_pass > 3 * CHUNK and full[(LAYER, ROW, COL)].null_scored == [per_pass] * 2


def test_a_borderline_set_is_scored_to_the_end(model, byte_tokenizer):
    """The collapse line put at the survivor's own ratio over the whole text: no bound can decide it
    before the end, where the point estimate does, as in the full verdict."""
    full = run(model, byte_tokenizer, SURVIVOR, full=True)[SURVIVOR]
    line = full.ppl_ratio * (1 + 1e-6)  # above float noise: a set continued from its cache sums its tokens apart
    early = run(model, byte_tokenizer, SURVIVOR, collapse=line)[SURVIVOR]
    assert early.scored == full.scored and early.label == SURVIVES
    assert early.ppl_ratio == pytest.approx(full.ppl_ratio, rel=1e-6)


def test_the_verdict_scores_at_most_twice_the_text_on_decided_sets(model, byte_tokenizer):
    """Two findings of one row (a group and each alone) and their shared nulls: every set decided on
    its first chunk, so the verdict's tokens (base included) stay under the text's length."""
    j = Judge(model, sw.get_arch(model), byte_tokenizer, load_text("wiki-intros"), 512)
    from superweight.find.verdict import judge_with

    result = findings((LAYER, ROW, COL), (LAYER, ROW, 3))
    judge_with(j, result)
    labels = [v.label for v in result.verdicts]
    assert labels[1:] == [SUPER_WEIGHT, JOINT]
    assert {v.scored for v in result.verdicts} == {CHUNK}
    # base + group + 2 weights + 2 shared group nulls, one chunk each
    assert j.scored == 6 * CHUNK < j.per_pass * 2


@pytest.mark.parametrize("mean, expected", [(1.95, True), (0.01, False), (0.69, None)])
def test_the_bound_decides_clear_means_and_waits_on_borderline_ones(mean, expected):
    g = torch.Generator().manual_seed(0)
    x = mean + 0.5 * torch.randn(CHUNK, generator=g, dtype=torch.float64)
    x += mean - x.mean()  # exactly this mean
    assert decide(x, 0.6931471805599453, True, final=False) is expected
    assert decide(x, 0.6931471805599453, True, final=True) is (mean >= 0.6931471805599453)


def test_detect_says_each_sets_tokens_and_verdict_full_scores_the_whole_text(tmp_path):
    """``superweight detect``: the early-stopped verdict by default (the table's tokens column, the
    JSON's ``scored``), every set on the whole text with ``--verdict-full``."""
    import json

    from typer.testing import CliRunner

    from superweight.cli.app import app
    from superweight.testing.synthetic import byte_tokenizer, plant_super_weight

    m = tiny_model("LlamaForCausalLM")
    plant_super_weight(m, 1, 5, 17)
    m.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    scored = {}
    for flag in ([], ["--verdict-full"]):
        out = tmp_path / f"d{len(flag)}.json"
        res = CliRunner().invoke(app, ["detect", str(tmp_path / "m"), "--verdict-tokens", "512", "--json", str(out), *flag])
        assert res.exit_code == 0, res.output
        assert "tokens" in res.output and "until its label is decided" in res.output
        scored[bool(flag)] = {v["scored"] for v in json.loads(out.read_text())["verdicts"]}
    assert scored[False] == {CHUNK} and scored[True] == {510}


def test_the_bound_narrows_to_the_point_estimate_at_the_end_of_the_text():
    """The label is read from the whole text's mean, and the first ``n`` of its ``total`` tokens leave
    less of it unknown as ``n`` grows (the finite population correction): a mean 2.5 plain standard
    errors under the line is undecided alone, decided with 7/8 of the text scored, and the whole
    text is its own point estimate."""
    g = torch.Generator().manual_seed(1)
    x = 0.3 + torch.randn(896, generator=g, dtype=torch.float64)
    from superweight.find.verdict_rounds import estimate

    mean, se = estimate(x)
    line = mean + 2.5 * se
    assert decide(x, line, True, final=False) is None
    assert estimate(x, 1024)[1] == pytest.approx(se * ((1024 - 896) / (1024 - 16)) ** 0.5)
    assert decide(x, line, True, final=False, total=1024) is False
    assert decide(x, mean - 2.5 * se, True, final=False, total=1024) is True
    assert decide(x, line, True, final=False, total=4 * 896) is None  # a quarter of a longer text
    assert estimate(x, 896)[1] == 0.0 and decide(x, mean * (1 - 1e-9), True, final=False, total=896) is True


def test_a_near_line_set_stops_before_the_end_where_only_the_corrected_bound_decides(model, byte_tokenizer):
    """The collapse line put a little above the survivor's damage: the plain bound (an unending text)
    decides at no round, the corrected one before the end; the label is the whole-text verdict's."""
    import math

    from superweight.find.verdict_rounds import estimate

    j = Judge(model, sw.get_arch(model), byte_tokenizer, load_text("wiki-intros"), 512)
    base, zeroed = j.token_nlls([[], [finding(*SURVIVOR)]], j.per_pass)
    x = zeroed - base
    n = 3 * CHUNK
    mean, se = estimate(x[:n], j.per_pass)
    line = mean + 5 * se
    assert all(decide(x[:k], line, True, final=False) is None for k in range(CHUNK, j.per_pass, CHUNK))
    early = run(model, byte_tokenizer, SURVIVOR, collapse=math.exp(line))[SURVIVOR]
    full = run(model, byte_tokenizer, SURVIVOR, collapse=math.exp(line), full=True)[SURVIVOR]
    assert early.label == full.label == SURVIVES
    assert early.scored <= n < full.scored == j.per_pass and early.null_scored == [] and len(full.null_scored) == 2


def test_a_cancelling_weight_is_not_zeroed_unless_the_verdict_is_full(model, byte_tokenizer):
    """A late / cancelling weight's label asks nothing: the early verdict labels it without zeroing it
    (no verdict row, no tokens); ``full`` zeroes it on the whole text as before."""
    from superweight.find.verdict import judge_with
    from superweight.find.verdict_labels import CANCELLING

    out = {}
    for full in (False, True):
        result = findings((LAYER, ROW, COL))
        late = finding(*SURVIVOR)
        late.role = "cancels"
        result.super_weights.append(late)
        j = Judge(model, sw.get_arch(model), byte_tokenizer, load_text("wiki-intros"), 512)
        judge_with(j, result, full=full)
        out[full] = (j.scored, [v.weights[0][:3] for v in result.verdicts], late.verdict)
    assert out[False][2] == out[True][2] == CANCELLING
    assert list(SURVIVOR) not in out[False][1] and list(SURVIVOR) in out[True][1]
    # early: the base, the group (its weight alone is the same set) and its two nulls, one chunk each
    assert out[False][0] == 4 * CHUNK
