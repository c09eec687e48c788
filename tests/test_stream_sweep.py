"""sweep --stream: every grid point (weight-only and W8A8) through each layer read, the in-memory sweep's numbers."""
from __future__ import annotations

import json

import pytest
import torch

import superweight as sw
from superweight.eval.text import load_text
from superweight.quant.sweep import default_grid, run_sweep
from superweight.quant.streamed_sweep import stream_sweep
from test_stream import planted

GRID = dict(bits=(3, 4), sizes=(1024, None), groups=(32,), w8a8=False, ternary_topk=8)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MixtralForCausalLM", "GPT2LMHeadModel"])
def test_streamed_sweep_is_the_in_memory_one(arch, tmp_path):
    """RTN naive / +SW / clip / clip+SW by block, groups, ternary (+SW, +top-k): perplexity, bits per weight,
    SQNR and sparse counts equal; Mixtral's experts quantized per layer; GPT-2's Conv1D transposed."""
    folder = planted(arch, tmp_path / arch)
    lm = sw.load_model(str(folder))
    before = {n: t.clone() for n, t in lm.model.state_dict().items()}
    keep = sw.detect(lm.model, lm.tokenizer).super_weights
    grid, text = default_grid(**GRID), load_text("wiki-intros")
    mem = run_sweep(lm, keep, grid, text=text, max_tokens=300, seq_len=96)
    streamed = stream_sweep(folder, keep, grid, text=text, max_tokens=300, seq_len=96)
    assert [r.label for r in streamed.rows] == [r.label for r in mem.rows]
    for a, b in zip(mem.rows, streamed.rows):
        assert (b.ppl, b.tokens, b.bits_per_weight, b.extra) == (a.ppl, a.tokens, a.bits_per_weight, a.extra), a.label
    assert len({r.ppl for r in mem.rows}) > len(mem.rows) // 2  # the points differ
    assert all(torch.equal(before[n], t) for n, t in lm.model.state_dict().items())  # the sweep restored every weight


def test_the_in_memory_sweep_restores_an_moes_experts(tmp_path):
    """Regression: the sweep's snapshot held only linear modules' weights, so a mixture of experts kept each
    point's quantized experts for the next point and after the sweep (the streamed sweep's comparison found it)."""
    lm = sw.load_model(str(planted("MixtralForCausalLM", tmp_path / "m")))
    before = {n: t.clone() for n, t in lm.model.state_dict().items()}
    run_sweep(lm, [(1, 7, 33, 0)], default_grid(bits=(4,), sizes=(1024,), groups=(), w8a8=False, ternary_topk=-1),
              text=load_text("wiki-intros"), max_tokens=100, seq_len=50)
    assert [n for n, t in lm.model.state_dict().items() if not torch.equal(before[n], t)] == []


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MixtralForCausalLM", "GPT2LMHeadModel"])
def test_streamed_w8a8_is_the_in_memory_one(arch, tmp_path):
    """W8A8 naive, SmoothQuant (calibrated in the same pass) and the super-activation hold-out: perplexity and
    the simulation's counts (modules, experts, calls, held-out elements by module) equal; Mixtral's experts
    simulated per layer; GPT-2's Conv1D transposed."""
    folder = planted(arch, tmp_path / arch)
    lm = sw.load_model(str(folder))
    grid = [p for p in default_grid(bits=(), sizes=(), groups=(), ternary_topk=-1) if p.family in ("fp", "w8a8")]
    assert [p.variant for p in grid if p.family == "w8a8"] == ["naive", "SmoothQuant", "SA hold-out"]
    text = load_text("wiki-intros")
    mem = run_sweep(lm, [], grid, text=text, max_tokens=300, seq_len=96)
    streamed = stream_sweep(folder, [], grid, text=text, max_tokens=300, seq_len=96)
    for a, b in zip(mem.rows, streamed.rows, strict=True):
        assert (b.label, b.ppl, b.tokens, b.bits_per_weight, b.extra) == (a.label, a.ppl, a.tokens, a.bits_per_weight,
                                                                          a.extra), a.label
    assert len({r.ppl for r in mem.rows}) == len(mem.rows)
    assert mem.rows[-1].extra["w8a8"]["held_out_total"] > 0  # the plant's super activation is held out


def test_streamed_smoothquant_calibrates_in_the_first_pass(tmp_path, monkeypatch):
    """Passes split by a tiny budget: the calibration runs stay together in the first pass, the numbers unchanged."""
    import superweight.model.streamed as stream

    folder = planted("LlamaForCausalLM", tmp_path / "m")
    grid = [p for p in default_grid(bits=(), sizes=(), groups=(), ternary_topk=-1) if p.variant == "SmoothQuant"]
    one = stream_sweep(folder, [], grid, text=load_text("wiki-intros"), max_tokens=300, seq_len=96)
    monkeypatch.setattr(stream.StreamedModel.run_heads, "__defaults__", (4096, 0))
    split = stream_sweep(folder, [], grid, text=load_text("wiki-intros"), max_tokens=300, seq_len=96)
    assert "1 pass(es)" in one.notes[0] and "1 pass(es)" not in split.notes[0]
    assert (split.rows[0].ppl, split.rows[0].extra) == (one.rows[0].ppl, one.rows[0].extra)


def test_cli_sweep_streams_the_in_memory_table(tmp_path, capsys):
    """``sweep --stream`` (detection streamed too) writes the in-memory command's perplexities for every
    point, W8A8 included."""
    from test_bad_inputs import run_main

    folder = planted("LlamaForCausalLM", tmp_path / "m")
    args = ["sweep", str(folder), "--text", "wiki-intros", "--max-tokens", "200", "--seq-len", "64", "--bits", "4",
            "--size", "tensor", "--group", "32"]
    runs = {}
    for name, extra in {"memory": [], "stream": ["--stream"]}.items():
        code, _, err = run_main([*args, *extra, "--json", str(tmp_path / f"{name}.json")], capsys)
        assert code == 0, err
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    mem = {r["label"]: r["ppl"] for r in runs["memory"]["rows"]}
    streamed = {r["label"]: r["ppl"] for r in runs["stream"]["rows"]}
    assert streamed == mem and any("W8A8" in k for k in mem)
    assert "streamed" in " ".join(runs["stream"]["notes"])
