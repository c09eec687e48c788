"""Weight-only prediction: its metrics on hand-made lists, and its ranking of a planted super weight."""
from __future__ import annotations

import pytest
import torch

from superweight.core.errors import SuperweightError
from superweight.find.predict import Prediction, precision_recall, predict
from superweight.model.arch_infer import get_arch
from superweight.testing.synthetic import plant_super_weight, tiny_model

PLANT = (3, 7, 21)  # the last of the tiny model's 4 layers: outside the early half


@pytest.fixture(scope="module")
def planted():
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, layer=PLANT[0], row=PLANT[1], col=PLANT[2], weight=4.0)
    return model


def test_precision_and_recall_at_k():
    top = [[0, 1, 2, 9.0], [3, 4, 5, 8.0], [0, 1, 3, 7.0]]
    precision, recall = precision_recall(top, [(3, 4, 5), (0, 1, 3), (2, 2, 2)], ks=(1, 2, 3))
    assert precision == {"1": 0.0, "2": 0.5, "3": 2 / 3}
    assert recall == {"1": 0.0, "2": 1 / 3, "3": 2 / 3}


def test_a_planted_super_weight_tops_the_magnitude_and_neuron_statistics(planted):
    arch = get_arch(planted)
    result = predict(planted, arch, [PLANT], name="tiny")
    by = {r.predictor: r for r in result.rankings}
    for stat in ("abs", "magnitude_z", "up_gate_down", "gain_up_gate_down"):
        assert by[stat].target_ranks == [1] and by[stat].top[0][:3] == list(PLANT)
        assert by[stat].precision["1"] == 1.0 and by[stat].recall["1"] == 1.0 and by[stat].precision["3"] == 1 / 3
    rows, cols = arch.weight_matrix(planted, 0).shape
    layers = arch.num_layers(planted)
    assert result.entries == layers * rows * cols
    early = by["abs+early"]  # the plant sits in the second half of the layers: ranked after every early entry
    assert early.target_ranks == [(layers + 1) // 2 * rows * cols + 1] and early.recall["1000"] == 0.0
    assert Prediction.from_dict(result.to_dict()).rankings[0].target_ranks == result.rankings[0].target_ranks


def test_an_unplanted_model_does_not_rank_the_coordinate_first():
    model = tiny_model("LlamaForCausalLM")
    ranks = predict(model, get_arch(model), [PLANT], statistics=("abs",)).rankings[0].target_ranks
    assert ranks[0] > 1


def test_unknown_statistic_is_refused(planted):
    with pytest.raises(SuperweightError, match="unknown statistic"):
        predict(planted, get_arch(planted), [PLANT], statistics=("nope",))
