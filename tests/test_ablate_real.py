"""The super weight matters on the real SmolLM2 (float weights dequantized from a Q4_1 GGUF)."""
from __future__ import annotations

import pytest
import torch

from superweight.prove.ablate import random_coords, zeroed_entries
from superweight.eval import evaluate_perplexity, load_text
from superweight.eval.text import wikitext_candidates

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def detected(smollm2):
    from superweight.find.loop import detect

    result = detect(smollm2.model, smollm2.tokenizer, arch=smollm2.arch)
    assert result.super_weights, "detection found no super weight in SmolLM2"
    return result


@pytest.fixture(scope="module")
def real_text() -> str:
    return load_text("wikitext2" if any(p.is_file() for p in wikitext_candidates()) else "wiki-intros")


def test_zeroing_the_super_weights_multiplies_perplexity(smollm2, detected, real_text):
    """Issue 2's check: >= 5x perplexity for the super weights, < 1% for a random weight of the same matrix."""
    model, tok, arch = smollm2.model, smollm2.tokenizer, smollm2.arch
    ppl = lambda: evaluate_perplexity(model, tok, real_text, seq_len=1000, max_tokens=1000).ppl  # noqa: E731
    base = ppl()
    with zeroed_entries(model, arch, detected.coords[:1]):  # the weight behind the largest spike, alone
        zeroed_first = ppl()
    with zeroed_entries(model, arch, detected.coords):
        zeroed = ppl()
    layer = detected.super_weights[0].layer
    with zeroed_entries(model, arch, random_coords(model, arch, [layer], 1, exclude=detected.coords, seed=0)):
        random = ppl()
    assert zeroed_first >= 5 * base, (base, zeroed_first)
    assert zeroed >= zeroed_first, (zeroed_first, zeroed)
    assert abs(random / base - 1) < 0.01, (base, random)


def test_small_ablation_end_to_end(smollm2, detected, tmp_path):
    from superweight.prove.experiments import AblationConfig, AblationResult, run_ablation

    layers = sorted({sw.layer for sw in detected.super_weights})
    before = {layer: smollm2.arch.weight_matrix(smollm2.model, layer).detach().clone() for layer in layers}
    config = AblationConfig(
        ppl="wiki-intros", tasks=["lambada", "winogrande"], limit=2, max_tokens=256, seq_len=128, scales=(0.0, 1.0),
        stopword_prompts=2,
    )
    result = run_ablation(smollm2, detected, config)
    for layer in layers:
        assert torch.equal(smollm2.arch.weight_matrix(smollm2.model, layer), before[layer])
    conds = result.conditions
    assert set(conds) == {
        "original", "zero_super_weights", "zero_top_non_super", "restore_super_activation", "zero_random",
        "scale_0", "scale_1",
    }
    assert conds["zero_super_weights"].ppl > 5 * conds["original"].ppl
    assert conds["zero_random"].ppl == pytest.approx(conds["original"].ppl, rel=0.01)
    assert conds["original"].tasks["lambada"].n == 2
    assert any("GGUF" in n for n in result.notes)
    result.save(tmp_path / "a.json")
    assert AblationResult.load(tmp_path / "a.json") == result


def test_streamed_ablation_of_the_real_model_is_the_in_memory_one(smollm2, detected):
    """``ablate --stream``'s numbers on the real SmolLM2 (its safetensors copy read layer by layer):
    every condition's perplexity, task results and the stopword shift, bit for bit."""
    from superweight.prove.experiments import AblationConfig, run_ablation
    from superweight.core.files import default_cache_dir
    from superweight.model.load import gguf_cache_folder
    from superweight.prove.streamed import stream_ablation

    def config():
        return AblationConfig(ppl="wiki-intros", tasks=["piqa", "lambada"], limit=3, max_tokens=256, seq_len=128,
                              scales=(0.0, 1.0, 2.0), stopword_prompts=3)

    mem = run_ablation(smollm2, detected, config())
    streamed = stream_ablation(gguf_cache_folder(smollm2.source, default_cache_dir()), detected, config())
    assert {n: c.ppl for n, c in streamed.conditions.items()} == {n: c.ppl for n, c in mem.conditions.items()}
    assert {n: c.tasks for n, c in streamed.conditions.items()} == {n: c.tasks for n, c in mem.conditions.items()}
    assert streamed.conditions["zero_super_weights"].ppl > 5 * streamed.conditions["original"].ppl
    assert (streamed.stopwords, streamed.top5) == (mem.stopwords, mem.top5)
