"""Architectures with no registered spec: the spec is read from the model's modules, then checked on
a forward pass (the attention and MLP hooks must add up to each layer's change of the residual stream)."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import superweight as sw
from superweight.model.arch import SUPPORTED, spec_for_name
from superweight.model.arch_infer import candidate_specs, infer_spec, unexplained_share
from superweight.cli import app
from superweight.core.errors import UnsupportedArchitectureError
from superweight.find.streamed import stream_detect
from superweight.testing.synthetic import UNREGISTERED, plant_super_weight, tiny_model

PLANT = (1, 5, 17)


def _behaviour(spec, model) -> dict:
    """What detection, ablation and quantization read of a spec (the paths the model really has)."""
    n = spec.num_layers(model)
    return dict(layers=spec.layers, attn=spec.attn_out, mlp_out=spec.mlp_out, experts=spec.experts,
                dense=[spec.dense_path(model, i) for i in range(n)], shared_gate=spec.shared_gate,
                transposed=spec.transposed, fused=spec.fused_gate_up, up=spec.up_proj, gate=spec.gate_proj,
                scale=spec.residual_scale, embed=spec.embed)


@pytest.mark.parametrize("arch_name", [a for a in SUPPORTED if a != "BloomForCausalLM"])
def test_reading_the_modules_gives_every_registered_spec(arch_name):
    """The registered specs are the check: 41 of 42 are read back from the modules alone."""
    model = tiny_model(arch_name)
    assert _behaviour(infer_spec(model), model) == _behaviour(spec_for_name(arch_name), model)


def test_a_structure_that_does_not_add_up_is_refused_not_analysed():
    """BLOOM adds the residual inside its attention and MLP: the hooks read from its modules see
    outputs that include the residual stream, far from the layer's change. Its registered spec hooks the
    last projections instead."""
    model = tiny_model("BloomForCausalLM")
    [spec] = candidate_specs(model)
    assert unexplained_share(model, spec) > 1.0
    with pytest.raises(UnsupportedArchitectureError, match="none read from its modules adds up"):
        infer_spec(model)
    assert unexplained_share(model, spec_for_name("BloomForCausalLM")) == 0.0


def test_sandwich_norms_are_told_apart_on_numbers():
    """GLM-4 has post_attention_layernorm (before its MLP) and post_self_attn_layernorm (after its
    attention): two readings; the forward pass picks the registered one."""
    model = tiny_model("Glm4ForCausalLM")
    assert [s.attn_out for s in candidate_specs(model)] == ["post_attention_layernorm", "post_self_attn_layernorm"]
    assert infer_spec(model).attn_out == "post_self_attn_layernorm"


@pytest.mark.parametrize("arch_name", UNREGISTERED)
def test_an_unregistered_architecture_is_read_and_its_plant_found(arch_name, byte_tokenizer):
    model = tiny_model(arch_name)
    arch = sw.get_arch(model)
    assert arch.inferred and arch.name == arch_name
    plant_super_weight(model, *PLANT)
    result = sw.detect(model, byte_tokenizer)
    assert result.coords == [PLANT]
    assert result.super_weights[0].module == arch.down_proj_name(1, model)


def test_unregistered_models_without_a_plant_show_nothing(byte_tokenizer):
    for arch_name in UNREGISTERED:
        assert sw.detect(tiny_model(arch_name), byte_tokenizer).super_weights == [], arch_name


def test_experts_in_another_layout_are_refused_with_the_reason():
    """Llama-4 stores its experts [experts, in, out] and routes before calling them: not guessed at."""
    with pytest.raises(UnsupportedArchitectureError, match=r"Llama4ForCausalLM .*feed_forward.experts.*register an ArchSpec"):
        sw.get_arch(tiny_model("Llama4ForCausalLM"))


def _saved(model, folder, byte_tokenizer):
    model.save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    return folder


def test_cli_detects_on_an_unregistered_model_and_refuses_an_unreadable_one(tmp_path, byte_tokenizer, capsys):
    from test_bad_inputs import run_main

    model = tiny_model("NemotronForCausalLM")
    plant_super_weight(model, *PLANT)
    good = _saved(model, tmp_path / "nemotron", byte_tokenizer)
    out = tmp_path / "sw.json"
    res = CliRunner().invoke(app, ["detect", str(good), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert '"module": "model.layers.1.mlp.down_proj"' in out.read_text()
    assert "NemotronForCausalLM has no registered spec: read from its modules (layers model.layers" in out.read_text()
    bad = _saved(tiny_model("Llama4ForCausalLM"), tmp_path / "llama4", byte_tokenizer)
    code, _, err = run_main(["detect", str(bad)], capsys)
    assert code == 2 and "register an ArchSpec" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3


@pytest.mark.parametrize("arch_name", UNREGISTERED)
def test_an_unregistered_model_streams_like_in_memory(arch_name, tmp_path, byte_tokenizer):
    """Streamed, the spec is read from the empty skeleton (structure only): the same answer."""
    model = tiny_model(arch_name)
    plant_super_weight(model, *PLANT)
    folder = _saved(model, tmp_path / "m", byte_tokenizer)
    streamed = stream_detect(folder)
    assert streamed.coords == [PLANT]
    assert streamed.to_dict()["super_weights"] == sw.detect(sw.load_model(str(folder)).model, byte_tokenizer).to_dict()["super_weights"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_check_allows_rounding_and_nothing_else(dtype):
    """Beyond the model's own rounding, a right reading leaves nothing (bfloat16 with a planted super
    activation too, where a layer's change is below the stream's precision); wrong readings leave most
    of the change (GLM-4's pre-MLP norm taken for its post-attention norm) or many times it (BLOOM)."""
    for arch_name in ("LlamaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "DeepseekV3ForCausalLM"):
        model = tiny_model(arch_name)
        plant_super_weight(model, *PLANT, expert=0 if arch_name.startswith("Deepseek") else None)
        assert unexplained_share(model.to(dtype), spec_for_name(arch_name)) == 0.0, arch_name
    glm, bloom = tiny_model("Glm4ForCausalLM").to(dtype), tiny_model("BloomForCausalLM").to(dtype)
    assert unexplained_share(glm, candidate_specs(glm)[0]) > 0.5
    assert unexplained_share(bloom, candidate_specs(bloom)[0]) > 10
