"""The verdict's rounds continue a zeroed set where it stopped (``verdict.Judge``): its cache, built
with the same weights zeroed, carries the window on, so only the new tokens run through the model.
The NLLs so continued are those of scoring the whole prefix at once, on every supported architecture
(where the model's cache cannot continue a window, the prefix is scored again, and counted)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import superweight as sw
from superweight.eval.text import load_text
from superweight.find.verdict import Judge
from superweight.model.arch import SUPPORTED
from superweight.testing.synthetic import tiny_model

CANNOT_CONTINUE = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")  # their MLA cache fails on a chunk after a chunk


@pytest.fixture(scope="module")
def text():
    return load_text("wiki-intros")


@pytest.mark.parametrize("name", SUPPORTED)
def test_a_set_continued_from_its_cache_scores_what_its_whole_prefix_does(name, text, byte_tokenizer):
    m = tiny_model(name)
    arch = sw.get_arch(m)
    layer = m.config.num_hidden_layers - 1 if hasattr(m.config, "num_hidden_layers") else 1
    expert = 0 if arch.is_moe else None
    with torch.no_grad():
        arch.expert_matrix(m, layer, expert)[1, 2] = 200.0  # zeroing it moves every NLL well past the tolerance
    weight = [SimpleNamespace(layer=layer, row=1, col=2, expert=expert)]
    j = Judge(m, arch, byte_tokenizer, text, tokens=400)  # two windows of 256 positions (one where positions are unbounded)
    base, zeroed = j.token_nlls([[], weight], j.per_pass)
    assert float((zeroed - base).abs().max()) > 1e-3
    j.scored, parts, start = 0, [], 0
    for upto in (40, 200, 300, j.per_pass):  # inside the first window, across into the second, to the end
        parts.append(j.token_nlls([[], weight], upto, [start, start]))
        start = upto
    for k, whole in enumerate((base, zeroed)):
        got = torch.cat([p[k] for p in parts])
        torch.testing.assert_close(got, whole, atol=2e-5, rtol=0)
    if name in CANNOT_CONTINUE:
        assert not j.incremental and j.scored > 2 * j.per_pass
    else:
        assert j.incremental and j.scored == 2 * j.per_pass  # each token once
    assert float(arch.expert_matrix(m, layer, expert)[1, 2]) == 200.0  # restored after each round
