"""The trace rule's fallback: a super activation under the calibrated 2000x (other families run
smaller ones) is still traced, marked, and a miss is reported with its numbers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import superweight as sw
from superweight.find.streamed import stream_detect
from superweight.testing.synthetic import byte_tokenizer as make_tokenizer
from superweight.testing.synthetic import UNREGISTERED, plant_super_weight, real_scale, tiny_model
from superweight.find.trace import TraceRule

PLANT = (1, 5, 17)
# dense pre-norm, post-norm, learned positions, and two MoE routings (where real peaks run lowest)
ARCHS = ["LlamaForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel", "MixtralForCausalLM", "Qwen2MoeForCausalLM"]


def small_plant(arch: str, ratio: float = 300.0, **overrides):
    """A tiny model at a real model's residual scale whose super activation is ``ratio`` x its median."""
    model = tiny_model(arch, **overrides)
    real_scale(model)
    plant_super_weight(model, *PLANT, ratio=ratio)
    return model


def saved(model, folder):
    model.save_pretrained(folder, max_shard_size="60KB")
    make_tokenizer().save_pretrained(folder)
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "superweight", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_activation_under_the_rule_is_traced_by_the_fallback(arch, byte_tokenizer):
    model = small_plant(arch)
    result = sw.detect(model, byte_tokenizer)
    assert [s.coord for s in result.super_weights] == [PLANT]
    (sa,) = result.activations
    assert sa.channel == PLANT[1]
    assert sa.fallback and 150 < sa.ratio < 2000
    assert any("fallback" in n and "channel 5" in n for n in result.notes)
    assert "(fallback)" in result.finding_tables()[0].rows[0][4]
    # turned off: nothing found, and the miss says where the largest activation was and how large
    off = sw.detect(model, byte_tokenizer, trace_rule=TraceRule(fallback_ratio=0))
    assert off.super_weights == []
    (note,) = off.notes
    assert "no super activation" in note and "channel 5" in note and "2,000x" in note and "100x" not in note


@pytest.mark.parametrize("arch", [*sw.SUPPORTED, *UNREGISTERED])
def test_every_architecture_finds_a_300x_plant_through_the_fallback(arch, byte_tokenizer):
    """MoE layouts included (an expert, a shared expert, a dense first layer: where each plant goes)."""
    result = sw.detect(small_plant(arch), byte_tokenizer)
    assert [s.coord for s in result.super_weights] == [PLANT]
    assert [a.fallback for a in result.activations] == [True]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM", "DeepseekV3ForCausalLM"])
def test_no_plant_at_real_scale_finds_nothing_and_says_how_far_it_was(arch, byte_tokenizer):
    model = tiny_model(arch)
    real_scale(model)
    result = sw.detect(model, byte_tokenizer)
    assert result.super_weights == [] and result.activations == []
    (note,) = result.notes
    ratio = float(note.split("x its layer's median")[0].rsplit(", ", 1)[1])
    assert ratio < 20  # unplanted: far under the fallback's 100x


def test_an_activation_at_40x_stays_under_the_fallback(byte_tokenizer):
    result = sw.detect(small_plant("LlamaForCausalLM", ratio=40.0), byte_tokenizer)
    assert result.super_weights == []
    assert "channel 5" in result.notes[0] and "or 100x when nothing reaches that" in result.notes[0]


def test_the_first_pass_sets_the_bar_for_the_later_ones(byte_tokenizer):
    """A model whose super activation passes 2000x keeps that bar once its weights are zeroed: a
    second, smaller one (300x) is not picked up by the fallback on the next pass."""
    model = tiny_model("LlamaForCausalLM")
    real_scale(model)
    plant_super_weight(model, *PLANT, ratio=8000.0)
    plant_super_weight(model, 2, 9, 40, ratio=300.0, seed=7)
    result = sw.detect(model, byte_tokenizer)
    assert result.coords == [PLANT]
    assert [a.fallback for a in result.activations] == [False] and result.notes == []
    both = sw.detect(model, byte_tokenizer, trace_rule=TraceRule(ratio=250.0))  # a bar both pass
    assert sorted(both.coords) == [PLANT, (2, 9, 40)]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MixtralForCausalLM"])
def test_the_fallback_streams_bit_for_bit(arch, tmp_path, byte_tokenizer):
    folder = saved(small_plant(arch), tmp_path / arch)
    lm = sw.load_model(str(folder))
    expected = sw.detect(lm.model, lm.tokenizer, model_name="m")
    got = stream_detect(folder, model_name="m")
    assert [s.coord for s in got.super_weights] == [PLANT]
    assert got.to_dict() == expected.to_dict()


def test_cli_reports_the_fallback_and_turns_it_off(tmp_path):
    folder = saved(small_plant("LlamaForCausalLM"), tmp_path / "m")
    out = tmp_path / "sw.json"
    proc = run_cli("detect", str(folder), "--no-verdict", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert [(s["layer"], s["row"], s["col"]) for s in doc["super_weights"]] == [PLANT]
    assert doc["activations"][0]["fallback"] is True and doc["trace_rule"]["fallback_ratio"] == 100.0
    (top,) = doc["largest"]  # the numbers behind the note, one per prompt
    assert top["channel"] == 5 and top["channels"][0][0] == 5 and top["ratio"] >= 5 * top["channels"][1][1]
    assert sw.DetectionResult.load(out).largest[0].ratio == top["ratio"]
    assert "fallback" in proc.stderr
    proc = run_cli("detect", str(folder), "--no-verdict", "--sa-fallback", "0")
    assert proc.returncode == 0, proc.stderr
    assert "No super weight found" in proc.stdout and "no super activation: the largest" in proc.stderr
    proc = run_cli("report", str(folder), "--out", str(tmp_path / "report"))  # the report says so too
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    assert "(fallback)" in report and "The fallback traced channel(s) 5" in report
    proc = run_cli("ablate", str(folder), "--ppl", "wiki-intros", "--max-tokens", "256", "--tasks", "none", "--scales", "",
                   "--stopword-prompts", "2", "--json", str(tmp_path / "ablate.json"))
    assert proc.returncode == 0, proc.stderr
    assert any("The fallback traced channel(s) 5" in n for n in json.loads((tmp_path / "ablate.json").read_text())["notes"])
    proc = run_cli("quantize", str(folder), "--out", str(tmp_path / "q"))  # what it holds out, and why
    assert proc.returncode == 0, proc.stderr
    assert "held out were found by detection's fallback" in " ".join(proc.stderr.split())


def _two_independent(model):
    plant_super_weight(model, 1, 5, 17, ratio=400.0)
    plant_super_weight(model, 2, 9, 40, ratio=300.0, seed=7)
    return [(1, 5, 17, "creates"), (2, 9, 40, "creates")]


def _two_layers(model):
    from superweight.testing.synthetic import _unit

    plant_super_weight(model, 1, 5, 17, ratio=200.0)
    plant_super_weight(model, 2, 5, 40, ratio=500.0, direction=_unit(model.config.hidden_size, 5))
    return [(1, 5, 17, "creates"), (2, 5, 40, "creates")]


def _late_cancel(model):
    from superweight.testing.synthetic import _median_after, _unit

    plant_super_weight(model, 1, 5, 17, ratio=400.0)
    median, ratio = _median_after(model, 4, 5)
    plant_super_weight(model, 5, 5, 60, weight=-2.0, peak_input=0.7 * ratio * median / 2.0,
                       direction=_unit(model.config.hidden_size, 5))
    return [(1, 5, 17, "creates"), (5, 5, 60, "cancels")]


def _one_column_three_rows(model):
    import torch

    plant_super_weight(model, 1, 5, 17, ratio=400.0)
    down = sw.get_arch(model).expert_matrix(model, 1, None)
    with torch.no_grad():
        down[9, 17], down[30, 17] = -0.8 * down[5, 17], 1.2 * down[5, 17]
    return [(1, 5, 17, "creates"), (1, 9, 17, "creates"), (1, 30, 17, "creates")]


@pytest.mark.parametrize("build, layers", [(_two_independent, 4), (_two_layers, 4), (_late_cancel, 6), (_one_column_three_rows, 4)])
def test_the_hard_cases_hold_under_the_fallback(build, layers, byte_tokenizer):
    """synthetic.HARD_CASES' shapes at a few hundred x (each found exactly at 5,800-9,600x by the rule):
    every channel that stands out is traced, rises over two layers and a late cancel keep their roles."""
    model = tiny_model("LlamaForCausalLM", layers=layers)
    real_scale(model)
    expected = build(model)
    result = sw.detect(model, byte_tokenizer)
    assert sorted((*s.coord, s.role) for s in result.super_weights) == sorted(expected)
    assert result.activations and all(a.fallback for a in result.activations)
