"""The in-training probe: perplexities as exp(mean NLL) over BOS-led sequences, the watched weights'
forward values (ternary under BitNet), and a planted super activation's channel peak."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from superweight.testing.synthetic import plant_super_weight, tiny_model
from superweight.train.bitnet import BitNetConfig, convert, ternary_weight
from superweight.train.probe import Probe

TEXT = " ".join(f"The mill {i} stands by the river and the road." for i in range(60))


@pytest.fixture(scope="module")
def planted():
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, layer=1, row=7, col=21, weight=4.0)
    return model


def test_perplexities_are_exp_mean_nll_after_bos(planted, byte_tokenizer):
    probe = Probe(byte_tokenizer, TEXT, ["A short passage ends here."], wikitext_tokens=64, seq_len=32)
    got = probe.perplexities(planted)
    nll, n = 0.0, 0
    for ids in probe.wikitext + probe.lambada:
        assert int(ids[0]) == byte_tokenizer.eos_token_id  # BOS (the tokenizer's EOS) leads every sequence
        with torch.no_grad():
            logits = planted(input_ids=ids[None]).logits[0, :-1]
        nll_part = float(F.cross_entropy(logits, ids[1:], reduction="sum"))
        nll, n = nll + nll_part, n + len(ids) - 1
    assert got["wikitext2_tokens"] == 62 and len(probe.wikitext) == 2
    total_ppl = math.exp(nll / n)  # the two perplexities bracket the pooled one
    assert min(got["wikitext2_ppl"], got["lambada_ppl"]) <= total_ppl * (1 + 1e-5)
    assert max(got["wikitext2_ppl"], got["lambada_ppl"]) >= total_ppl * (1 - 1e-5)


def test_watched_values_and_channel_peak(planted, byte_tokenizer):
    probe = Probe(byte_tokenizer, TEXT, [], wikitext_tokens=32, seq_len=32, watch=[[1, 7, 21], [1, 0, 0]], channels=[7])
    out = probe(planted, byte_tokenizer, 0)
    down = planted.model.layers[1].mlp.down_proj.weight.detach()
    assert out["watched"] == [float(down[7, 21]), float(down[0, 0])]
    assert out["activation"]["residual_channel"] == 7 and out["channels"][0][0] == pytest.approx(out["activation"]["residual_max"])
    ternary = tiny_model("LlamaForCausalLM")
    ternary.load_state_dict(planted.state_dict())
    convert(ternary, BitNetConfig(keep=[(1, 7, 21)]))
    values = probe.watched(ternary)
    assert values[0] == float(down[7, 21]) and values[1] == float(ternary_weight(down)[0, 0])
