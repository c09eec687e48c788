"""The synthetic half of the detection dev set: each hard case has a known answer (docs/detect.md)."""
from __future__ import annotations

import pytest
import torch

import superweight as sw
from superweight.testing.synthetic import HARD_CASES, hard_case
from superweight.find.verdict import judge
from superweight.find.verdict_labels import CANCELLING

TEXT = (
    "The history of the city begins with a small harbour on the river, where traders from the north met "
    "farmers from the valley. Over the centuries the market grew into a town, the town into a city, and the "
    "harbour into one of the busiest ports of the region. "
) * 6


def creating(result) -> list[tuple]:
    return sorted(s.coord for s in result.super_weights if s.role == "creates")


def cancelling(result) -> list[tuple]:
    return sorted(s.coord for s in result.super_weights if s.role == "cancels")


@pytest.mark.parametrize("name", list(HARD_CASES))
def test_default_method_finds_every_creating_weight_exactly(name, byte_tokenizer):
    case = hard_case(name)
    result = sw.detect(case.model, byte_tokenizer)
    assert creating(result) == sorted(case.creates)
    assert cancelling(result) == sorted(case.cancels)
    assert len(result.activations) == case.activations
    if case.activations:
        if case.first_token is not None:
            assert all((a.token == 0) == case.first_token for a in result.activations)
        assert all(a.ratio >= result.trace_rule.ratio for a in result.activations)


def test_two_layers_are_both_reported_as_rises(byte_tokenizer):
    result = sw.detect(hard_case("two_layers").model, byte_tokenizer)
    [sa] = result.activations
    assert [c.layer for c in sa.rises] == [1, 2] and all(c.sublayer == "mlp" for c in sa.rises)


def test_late_cancelling_layer_is_a_fall_and_labelled(byte_tokenizer):
    case = hard_case("late_cancel")
    result = sw.detect(case.model, byte_tokenizer)
    [sa] = result.activations
    assert [c.layer for c in sa.falls] == [5]
    late = next(s for s in result.super_weights if s.role == "cancels")
    assert late.late_layer and late.coord == (5, 5, 60)


@pytest.mark.parametrize("name", ["weak_spike", "two_layers"])
def test_the_papers_rule_misses_what_the_default_finds(name, byte_tokenizer):
    case = hard_case(name)
    paper = sw.detect(case.model, byte_tokenizer, method="paper")
    assert creating(paper) != sorted(case.creates)


def test_verdict_numbers_labels_and_bitwise_restore(byte_tokenizer):
    case = hard_case("late_cancel")
    result = sw.detect(case.model, byte_tokenizer)
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    forwards = judge(case.model, sw.get_arch(case.model), byte_tokenizer, result, TEXT, tokens=256, draws=2)
    after = case.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert forwards > 0
    by_target = {v.target: v for v in result.verdicts}
    group = by_target["activation"]
    assert group.weights == [[1, 5, 17, None]] and group.tokens == 256
    assert "survives" in group.label and group.null_ppl_ratios == [] == group.null_scored  # no collapse: no null scored
    assert abs(group.activation_after) < 0.05 * abs(group.activation_before)  # the plant made all of it
    late = next(s for s in result.super_weights if s.role == "cancels")
    assert late.verdict == CANCELLING
    assert all(s.verdict for s in result.super_weights)
    again = sw.DetectionResult.from_dict(result.to_dict())
    assert again.to_dict() == result.to_dict()


def test_verdict_restores_weights_when_scoring_fails(byte_tokenizer, monkeypatch):
    from superweight.find import verdict

    case = hard_case("weak_spike")
    result = sw.detect(case.model, byte_tokenizer)
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    calls = {"n": 0}
    real = verdict.Judge.nll

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:  # the first zeroed measurement
            raise RuntimeError("interrupted")
        return real(self, *args)

    monkeypatch.setattr(verdict.Judge, "nll", failing)
    with pytest.raises(RuntimeError):
        judge(case.model, sw.get_arch(case.model), byte_tokenizer, result, TEXT, tokens=128)
    after = case.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch_name", ["GPT2LMHeadModel", "Phi3ForCausalLM", "Gemma2ForCausalLM", "Olmo2ForCausalLM",
                                       "FalconForCausalLM"])
def test_every_case_that_is_as_designed_is_found_exactly_on_other_architectures(arch_name, byte_tokenizer):
    """The hard cases were built for Llama; on other families a plant can fall short (a post-norm
    model's FFN norm bounds what one weight adds), which ``as_designed`` measures by ablation. Where
    the plant holds, detection must be exact (all 14 dense architectures: bench/detect_archs.py)."""
    held = 0
    for name in HARD_CASES:
        case = hard_case(name, arch_name)
        if case.as_designed(byte_tokenizer):
            continue
        held += 1
        result = sw.detect(case.model, byte_tokenizer)
        assert (creating(result), cancelling(result)) == (sorted(case.creates), sorted(case.cancels)), name
    assert held >= 4


def test_a_post_norm_weight_spiking_only_relative_to_its_token_is_found(byte_tokenizer):
    """OLMo-2's two_independent: the second weight's down-projection output is +0.37 (under the trace
    rule's floor of 20) but 7.7x its token's RMS (of at most 8x over 64 channels), what the post-FFN norm divides by; zeroing
    the weight removes the super activation, so it is a creating weight, not "the norm's gain"."""
    case = hard_case("two_independent", "Olmo2ForCausalLM")
    assert case.as_designed(byte_tokenizer) == []
    result = sw.detect(case.model, byte_tokenizer)
    assert creating(result) == sorted(case.creates)
    src = next(s for s in result.sources if s.layer == 2 and s.weights)
    assert src.weights == [[2, 9, 40, None]] and "x its token's RMS" in src.note
