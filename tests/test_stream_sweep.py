"""sweep --stream: every weight-only grid point through each layer read, the in-memory sweep's numbers."""
from __future__ import annotations

import json

import pytest
import torch

import superweight as sw
from superweight.eval.text import load_text
from superweight.quant.sweep import default_grid, run_sweep
from superweight.stream_sweep import stream_sweep
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


def test_streamed_sweep_refuses_w8a8(tmp_path):
    folder = planted("LlamaForCausalLM", tmp_path / "m")
    with pytest.raises(sw.SuperweightError, match="W8A8 points"):
        stream_sweep(folder, [(1, 7, 33)], default_grid(bits=(4,), sizes=(None,), groups=(), w8a8=True, ternary_topk=-1))


def test_cli_sweep_streams_the_in_memory_table(tmp_path, capsys):
    """``sweep --stream`` (detection streamed too) writes the in-memory command's perplexities for every
    weight-only point and leaves the W8A8 ones out with a note."""
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
    assert streamed == {k: v for k, v in mem.items() if "W8A8" not in k and "w8a8" not in k.lower()}
    assert len(mem) > len(streamed) and "W8A8" in " ".join(runs["stream"]["notes"])
