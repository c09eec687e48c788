"""superweight emergence reads a run's checkpoints and follows a (planted) super weight through them."""
from __future__ import annotations

import pytest

from superweight.train.emergence import EmergenceResult, emergence
from superweight.train.loop import TrainConfig, train

TEXT = "\n\n".join(f"Apple Inc. is a worldwide tech company. The mill {i} stands by the river." for i in range(300))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("em")
    (folder / "corpus.txt").write_text(TEXT)
    out = folder / "run"
    train(TrainConfig.preset("test", text=str(folder / "corpus.txt"), heldout="split", eval_tokens=64), out)
    return folder, out


def test_reads_every_checkpoint(run):
    folder, out = run
    result = emergence([out], text=str(folder / "corpus.txt"), eval_tokens=64, label="tiny")
    assert [p.step for p in result.points] == [0, 2, 4]
    for p in result.points:
        assert len(p.residual_per_layer) == 2 and p.residual_max == max(p.residual_per_layer)
        assert 0 <= p.residual_channel < 32 and len(p.top) == 3
    again = EmergenceResult.from_dict(result.to_dict())
    assert again.points[-1].top == result.points[-1].top


def test_follows_a_planted_super_weight(run, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from superweight.testing.synthetic import plant_super_weight

    folder, out = run
    model = LlamaForCausalLM.from_pretrained(out / "step-000004")
    plant_super_weight(model, layer=0, row=7, col=21, weight=4.0)
    model.save_pretrained(tmp_path / "planted")
    AutoTokenizer.from_pretrained(out / "step-000004").save_pretrained(tmp_path / "planted")
    result = emergence([out / "step-000000", tmp_path / "planted"], text=str(folder / "corpus.txt"), eval_tokens=64)
    before, planted = result.points
    assert planted.top == [0, 7, 21] and planted.top_share > 0.5
    assert [0, 7, 21] in planted.detected and before.detected == []
    assert planted.residual_channel == 7
    assert any(a[1] == 7 for a in planted.activations) and before.activations == []
    assert len(planted.verdicts) == len(planted.detected) and all(planted.verdicts)
    assert planted.loss_zero_top != planted.loss  # the zeroing changed the model
