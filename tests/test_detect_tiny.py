"""Detection on tiny random models of every supported architecture with a planted super weight."""
from __future__ import annotations

import pytest
import torch

import superweight as sw
from superweight.model.arch import DENSE, MOE
from superweight.find.loop import DetectionResult, SpikeRule
from superweight.find.magnitude import magnitude_scan
from superweight.testing.synthetic import plant_super_weight, tiny_model

PLANT = (1, 5, 17)  # layer, row (hidden channel), col (intermediate channel)


@pytest.mark.parametrize("arch_name", DENSE)
def test_detect_finds_exactly_the_planted_weight(arch_name, byte_tokenizer):
    model = tiny_model(arch_name)
    plant_super_weight(model, *PLANT)
    result = sw.detect(model, byte_tokenizer)
    assert result.coords == [PLANT]
    found = result.super_weights[0]
    assert found.value == pytest.approx(2.0)
    assert found.magnitude_rank == 1
    assert found.module == sw.get_arch(model).down_proj_name(1)


@pytest.mark.parametrize("arch_name", sw.SUPPORTED)
def test_detect_finds_nothing_without_a_plant(arch_name, byte_tokenizer):
    assert sw.detect(tiny_model(arch_name), byte_tokenizer).super_weights == []


@pytest.mark.parametrize("arch_name", ["LlamaForCausalLM", "GPT2LMHeadModel", "Phi3ForCausalLM"])
def test_weights_bitwise_identical_after_detection(arch_name, byte_tokenizer):
    model = tiny_model(arch_name)
    plant_super_weight(model, *PLANT)
    plant_super_weight(model, 2, 9, 40, seed=7)  # planted after layer 1's: calibrated with it present
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = sw.detect(model, byte_tokenizer)
    assert len(result.super_weights) == 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_two_independent_super_activations_found_in_one_pass_in_layer_order(byte_tokenizer):
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    plant_super_weight(model, 2, 9, 40, seed=7)
    result = sw.detect(model, byte_tokenizer)
    assert result.coords == [PLANT, (2, 9, 40)]
    assert [s.iteration for s in result.super_weights] == [0, 0]
    assert sorted(a.channel for a in result.activations) == [5, 9]


def test_prompts_agreement_is_reported(byte_tokenizer):
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    prompts = ["Apple Inc. is a worldwide tech company.", "The cat sat on the mat and looked around."]
    result = sw.detect(model, byte_tokenizer, prompts)
    assert result.agree and result.per_prompt == [[PLANT], [PLANT]]
    assert result.super_weights[0].prompts == [0, 1]
    # A rule that the second prompt cannot meet makes the prompts disagree.
    result.per_prompt[1] = []
    assert not result.agree


def test_spike_rule_uses_the_other_layers_median():
    rule = SpikeRule(floor=50, ratio=50)
    assert rule.spikes([400.0, 0.1], 0)  # two layers: the spike does not raise its own baseline
    assert not rule.spikes([40.0, 0.1], 0)  # under the absolute floor
    assert not rule.spikes([400.0, 10.0, 10.0], 0)  # only 40x the other layers
    assert rule.threshold([1.0, 2.0, 3.0, 100.0], 3) == 100.0


def test_result_json_round_trip(tmp_path, byte_tokenizer):
    model = tiny_model("Qwen2ForCausalLM")
    plant_super_weight(model, *PLANT)
    result = sw.detect(model, byte_tokenizer, model_name="tiny-qwen2")
    path = tmp_path / "sw.json"
    result.save(path)
    again = DetectionResult.load(path)
    assert again.to_dict() == result.to_dict()
    data = again.to_dict()
    assert data["version"] == 2 and data["kind"] == "detection" and data["model"] == "tiny-qwen2"
    assert data["activations"][0]["channel"] == PLANT[1] and data["sources"][0]["weights"] == [[*PLANT, None]]
    assert {"layer", "row", "col", "value"} <= set(data["super_weights"][0])
    assert len(data["layers"]) == 4


def test_detection_file_errors(tmp_path):
    with pytest.raises(sw.SuperweightError, match="no such detection file"):
        DetectionResult.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(sw.SuperweightError, match="not a JSON detection file"):
        DetectionResult.load(bad)
    bad.write_text('{"version": 99}')
    with pytest.raises(sw.SuperweightError, match="version"):
        DetectionResult.load(bad)
    bad.write_text('{"version": 1, "model": "m", "super_weights": []}')  # a file of the previous schema
    with pytest.raises(sw.SuperweightError, match="re-run `superweight detect"):
        DetectionResult.load(bad)


def test_empty_prompt_is_a_clear_error(byte_tokenizer):
    with pytest.raises(sw.SuperweightError, match="empty"):
        sw.detect(tiny_model("LlamaForCausalLM"), byte_tokenizer, ["   "])


def test_magnitude_scan_ranks_the_planted_weight(byte_tokenizer):
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    arch = sw.get_arch(model)
    mag = magnitude_scan(model, arch, threshold=3.0, super_weights=[PLANT])
    assert mag.total_weights == 4 * 64 * 128
    assert mag.total_flagged > 0
    ranked = mag.super_weights[0]
    assert ranked.flagged and ranked.rank_in_flagged == 1 and ranked.rank_in_matrix == 1
    assert mag.top[0]["module"] == arch.down_proj_name(1) and (mag.top[0]["row"], mag.top[0]["col"]) == (5, 17)


def test_magnitude_scan_all_linear_covers_more_weights():
    model = tiny_model("GPT2LMHeadModel")
    arch = sw.get_arch(model)
    down = magnitude_scan(model, arch, scope="down_proj")
    every = magnitude_scan(model, arch, scope="all_linear")
    assert every.total_weights > down.total_weights
    # Conv1D weights are reported as [out, in], like Linear.
    assert all(m.shape[0] == 64 for m in down.matrices)


@pytest.mark.parametrize("arch_name", MOE)
def test_moe_planted_weight_found_in_its_expert(arch_name, byte_tokenizer):
    model = tiny_model(arch_name)
    plant_super_weight(model, *PLANT, expert=2)
    result = sw.detect(model, byte_tokenizer)
    assert result.keys == [(*PLANT, 2)]
    found = result.super_weights[0]
    assert found.expert == 2 and found.value == pytest.approx(2.0) and found.role == "creates"
    assert ".down_proj[2]" in found.module


def test_paper_method_refuses_moe_with_a_clear_error(byte_tokenizer):
    with pytest.raises(sw.SuperweightError, match="default method"):
        sw.detect(tiny_model("MixtralForCausalLM"), byte_tokenizer, method="paper")


@pytest.mark.parametrize("method", ["trace", "paper"])
def test_both_methods_find_the_plant_on_llama_like_gemma(method, byte_tokenizer):
    model = tiny_model("GemmaForCausalLM")
    plant_super_weight(model, *PLANT)
    assert sw.detect(model, byte_tokenizer, method=method).coords == [PLANT]


def test_unknown_method_is_a_clear_error(byte_tokenizer):
    with pytest.raises(sw.SuperweightError, match="unknown detection method"):
        sw.detect(tiny_model("LlamaForCausalLM"), byte_tokenizer, method="magic")


def test_an_overflowing_forward_is_a_clear_error_not_an_empty_result(byte_tokenizer):
    """Gemma-3-270M in float16 overflows (inf/NaN from layer 7): detection must say so and name the
    dtypes that work, not report "no super weight"."""
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    with torch.no_grad():
        model.model.layers[PLANT[0]].mlp.down_proj.weight[PLANT[1], PLANT[2]] = 60000.0  # |y| far past 65504
    model = model.half()
    with pytest.raises(sw.SuperweightError, match=r"overflowed: layer 1's output holds inf/NaN in float16.*bfloat16"):
        sw.detect(model, byte_tokenizer)
    assert sw.detect(model.float(), byte_tokenizer).coords == [PLANT]  # the same model in float32 is fine


def test_a_super_weight_in_qwen2_moes_shared_expert_is_found_there(byte_tokenizer):
    """Qwen2-MoE adds a gated shared expert (a dense MLP) to the routed ones: a weight there is
    attributed through its gate (once reported "diffuse: the largest term is 0%")."""
    model = tiny_model("Qwen2MoeForCausalLM")
    plant_super_weight(model, *PLANT)  # no expert: the shared one
    result = sw.detect(model, byte_tokenizer)
    assert result.keys == [PLANT]
    found = result.super_weights[0]
    assert found.expert is None and found.module == "model.layers.1.mlp.shared_expert.down_proj"
    assert found.value == pytest.approx(2.0) and found.share > 0.9 and found.role == "creates"
    mag = magnitude_scan(model, sw.get_arch(model), super_weights=result)
    assert mag.super_weights[0].rank_in_flagged == 1 and mag.top[0]["module"] == found.module


DEEPSEEK_LIKE = ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Glm4MoeForCausalLM", "Ernie4_5_MoeForCausalLM"]


@pytest.mark.parametrize("arch_name", DEEPSEEK_LIKE)
@pytest.mark.parametrize("where", ["dense layer", "shared expert", "expert"])
def test_an_moe_with_dense_first_layers_finds_each_kind_of_weight(arch_name, where, byte_tokenizer):
    """DeepSeek-V2/V3 (Kimi-K2), GLM-4-MoE and ERNIE-4.5-MoE start with dense layers (layer 0 of the
    tiny ones) and add an ungated shared expert beside the routed ones: each weight is found with
    its own module, the layer's kind read from the model."""
    model = tiny_model(arch_name)
    layer, module, expert = {
        "dense layer": (0, "model.layers.0.mlp.down_proj", None),
        "shared expert": (1, "model.layers.1.mlp.shared_experts.down_proj", None),
        "expert": (1, "model.layers.1.mlp.experts.down_proj[2]", 2),
    }[where]
    plant_super_weight(model, layer, 5, 17, expert=expert)
    result = sw.detect(model, byte_tokenizer)
    assert result.keys == [(layer, 5, 17) if expert is None else (layer, 5, 17, expert)]
    found = result.super_weights[0]
    assert found.module == module and found.value == pytest.approx(2.0) and found.share > 0.9
    mag = magnitude_scan(model, sw.get_arch(model), super_weights=result)
    assert mag.super_weights[0].rank_in_flagged == 1


def test_qwen3_moe_mlp_only_layers_are_dense(byte_tokenizer):
    """Qwen-MoE configs can make some layers dense (``mlp_only_layers``): read from the model."""
    import transformers as tf

    from superweight.testing.synthetic import tiny_config

    config = tiny_config("Qwen3MoeForCausalLM")
    config.mlp_only_layers = [1]
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(config).eval()
    arch = sw.get_arch(model)
    assert arch.dense_path(model, 1) == "mlp.down_proj" and arch.dense_path(model, 2) is None
    plant_super_weight(model, *PLANT)
    found = sw.detect(model, byte_tokenizer).super_weights
    assert [(s.key, s.module) for s in found] == [(PLANT, "model.layers.1.mlp.down_proj")]


def test_granites_residual_multiplier_scales_what_each_sublayer_adds(byte_tokenizer):
    """Granite adds residual_multiplier (0.22 in its real configs) x each sublayer's output: the
    rise is the MLP's once scaled, nothing left over as "other"."""
    model = tiny_model("GraniteForCausalLM")
    assert model.config.residual_multiplier == pytest.approx(0.22)
    plant_super_weight(model, *PLANT)
    result = sw.detect(model, byte_tokenizer)
    assert result.coords == [PLANT]
    [rise] = [c for c in result.activations[0].rises if c.layer == PLANT[0]]
    assert rise.sublayer == "mlp" and abs(rise.other) < 0.01 * abs(rise.delta)
