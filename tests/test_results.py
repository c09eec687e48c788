"""Every result type round-trips through its versioned JSON: made by the real functions on a tiny
model, saved, loaded back equal; a wrong version or a damaged file is one SuperweightError line."""
from __future__ import annotations

import json

import pytest

import superweight as sw
from superweight.find.catalog import CatalogEntry, compare, Verdict
from superweight.core.coords import Coord, as_coords
from superweight.core.errors import SuperweightError
from superweight.prove.experiments import AblationConfig, AblationResult, EvalResult, run_ablation, run_eval
from superweight.find.magnitude import MagnitudeResult, magnitude_scan
from superweight.quant.config import RTN
from superweight.quant.sweep import GridPoint, SweepResult, run_sweep
from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model

PLANT = (1, 7, 21)
TEXT = "The quick brown fox jumps over the lazy dog. " * 12


@pytest.fixture(scope="module")
def lm():
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    return sw.LoadedModel(model, byte_tokenizer(), sw.get_arch(model), "tiny", "tiny", ["a note"])


def small_config(**kw) -> AblationConfig:
    return AblationConfig(**{"ppl": "wiki-intros", "tasks": ["piqa"], "limit": 2, "max_tokens": 80, "seq_len": 40, **kw})


def round_trip(result, cls, tmp_path):
    path = tmp_path / f"{cls.KIND.replace(' ', '_')}.json"
    result.save(path)
    back = cls.load(path)
    assert back == result
    assert json.loads(path.read_text())["kind"] == cls.KIND
    return back


def test_ablation_round_trips(lm, tmp_path):
    result = run_ablation(lm, [PLANT], small_config(scales=(0.0, 1.0, 2.0), stopword_prompts=2, top_n=20))
    back = round_trip(result, AblationResult, tmp_path)
    assert back.coords == [Coord(*PLANT)]
    assert back.scales == [(0.0, "scale_0"), (1.0, "scale_1"), (2.0, "scale_2")]
    assert back.conditions["scale_1"].same_as == "original"
    assert back.config.scales == (0.0, 1.0, 2.0)
    assert [t.title.split()[0] for t in back.tables()] == ["Super", "Next"]


def test_eval_round_trips(lm, tmp_path):
    result = run_eval(lm, small_config())
    back = round_trip(result, EvalResult, tmp_path)
    assert back.tasks["piqa"].n == 2 and back.notes == ["a note"]
    assert back.tables()[0].rows[0][0] == "PPL (wiki-intros)"


def test_sweep_round_trips(lm, tmp_path):
    grid = [GridPoint("fp", "fp"), GridPoint("rtn", "naive", RTN(bits=4, group=16)),
            GridPoint("rtn", "naive+SW", RTN(bits=4, group=16), keep_super=True)]
    result = run_sweep(lm, [PLANT], grid, text=TEXT, max_tokens=64, seq_len=32)
    back = round_trip(result, SweepResult, tmp_path)
    assert back.baseline_ppl == result.rows[0].ppl
    assert as_coords(back.super_weights) == [Coord(*PLANT)]


def test_magnitude_round_trips(lm, tmp_path):
    result = magnitude_scan(lm.model, lm.arch, 3.0, "down_proj", [PLANT])
    back = round_trip(result, MagnitudeResult, tmp_path)
    assert back.super_weights[0].row == PLANT[1]


def test_verdict_round_trips(tmp_path):
    entry = CatalogEntry.from_dict({"id": "x", "model": "x", "match": ["x"], "architecture": "LlamaForCausalLM",
                                    "super_weights": [{"layer": 1, "row": 7, "col": 21}], "source": {"kind": "measured"}})
    result = compare(entry, [Coord(*PLANT), Coord(2, 3, 4)], "x", "x")
    back = round_trip(result, Verdict, tmp_path)
    assert back.status == "differ" and back.extra == [[2, 3, 4]]


def test_wrong_version_and_damaged_files_are_one_line(lm, tmp_path):
    result = run_eval(lm, small_config(tasks=[]))
    path = tmp_path / "e.json"
    result.save(path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(SuperweightError, match="is an evaluation file of version 99, not 1"):
        EvalResult.load(path)
    path.write_text(json.dumps(data))
    with pytest.raises(SuperweightError, match="e.json is an evaluation file, not an ablation file: write it with `superweight ablate"):
        AblationResult.load(path)  # a file of another kind is named as such
    path.write_text(json.dumps({**{k: v for k, v in data.items() if k != "conditions"}, "kind": "ablation"}))
    with pytest.raises(SuperweightError, match="not a valid ablation file"):
        AblationResult.load(path)


def test_coords_accept_every_shape():
    class Obj:
        layer, row, col = 1, 2, 3

    assert as_coords([(1, 2, 3), [1, 2, 3], {"layer": 1, "row": 2, "col": 3}, Obj(), Coord(1, 2, 3)]) == [(1, 2, 3)] * 5
    assert str(Coord(1, 2, 3)) == "1:[2, 3]" and json.dumps(Coord(1, 2, 3)) == "[1, 2, 3]"


def test_sweep_command_writes_a_loadable_result(lm, tmp_path):
    from typer.testing import CliRunner

    from superweight.cli import app

    folder = tmp_path / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    args = ["sweep", str(folder), "--text", str(text), "--max-tokens", "64", "--seq-len", "32", "--bits", "4",
            "--size", "1024,tensor", "--group", "16", "--json", str(tmp_path / "s.json")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    result = SweepResult.load(tmp_path / "s.json")
    assert {r.granularity for r in result.rows if r.family == "rtn"} == {"block=1024", "per-tensor", "group=16"}
    assert "INT4 RTN perplexity" in res.output


def test_manifest_round_trips_and_prints(tmp_path):
    from superweight.quant.artifact import Manifest, read_manifest, save_quantized
    from superweight.quant.api import quantize

    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    written = save_quantized(model, byte_tokenizer(), quantize(model, RTN(bits=4, group=16), keep=[PLANT]),
                             tmp_path / "art", source="tiny")
    manifest = Manifest.from_dict(read_manifest(tmp_path / "art"))
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert manifest.to_dict() == written  # the typed manifest has exactly the file's fields
    assert manifest.tables("art")[0].rows[0][3] == "1"  # one kept super weight
