"""ablate --stream and eval --stream: every condition's perplexity, zero-shot tasks and the stopword
shift of a checkpoint read layer by layer, the in-memory numbers bit for bit (requests and prompts in
the in-memory batches)."""
from __future__ import annotations

import json

import pytest
import torch

import superweight as sw
from superweight.prove.experiments import AblationConfig, run_ablation
from superweight.prove.streamed import stream_ablation
from test_stream import planted


def _config(**kw) -> AblationConfig:
    base = dict(ppl="wiki-intros", tasks=[], max_tokens=400, seq_len=96, top_n=16, scales=(0.0, 0.5, 1.0, 2.0),
                stopword_prompts=3)
    return AblationConfig(**{**base, **kw})


@pytest.mark.parametrize("arch,plant", [("LlamaForCausalLM", (1, 7, 33)), ("Gemma2ForCausalLM", (1, 7, 33)),
                                        ("MixtralForCausalLM", (1, 7, 33, 0))])
def test_streamed_ablation_is_the_in_memory_one(arch, plant, tmp_path):
    """Zeroed, top-N, restored, random and scaled conditions in one pass; Mixtral's weight in expert 0."""
    folder = planted(arch, tmp_path / arch)
    lm = sw.load_model(str(folder))
    mem = run_ablation(lm, [plant], _config())
    before = {n: t.clone() for n, t in lm.model.state_dict().items()}
    streamed = stream_ablation(folder, [plant], _config())
    assert streamed.conditions.keys() == mem.conditions.keys()
    for name, c in mem.conditions.items():
        s = streamed.conditions[name]
        assert (s.description, s.weights_changed, s.ppl, s.ppl_tokens, s.same_as) == \
            (c.description, c.weights_changed, c.ppl, c.ppl_tokens, c.same_as), name
    ppl = {n: c.ppl for n, c in mem.conditions.items()}
    assert len({ppl["original"], ppl["zero_super_weights"], ppl["scale_2"], ppl["restore_super_activation"]}) == 4
    assert streamed.stopwords == mem.stopwords and streamed.top5 == mem.top5
    assert streamed.stopwords["original"]["stopword_prob"] != streamed.stopwords["zero_super_weights"]["stopword_prob"]
    assert "streamed" in streamed.notes[0] and streamed.architecture == mem.architecture
    assert all(torch.equal(before[n], t) for n, t in lm.model.state_dict().items())


def test_streamed_ablation_splits_passes_to_fit_the_held_streams(tmp_path, monkeypatch):
    """A budget smaller than all the runs' residual streams: more passes, the same numbers."""
    import superweight.model.streamed as stream

    folder = planted("LlamaForCausalLM", tmp_path / "m")
    one = stream_ablation(folder, [(1, 7, 33)], _config(stopword_prompts=0))
    monkeypatch.setattr(stream.StreamedModel.run_heads, "__defaults__", (4096, 0))
    split = stream_ablation(folder, [(1, 7, 33)], _config(stopword_prompts=0))
    assert {n: c.ppl for n, c in split.conditions.items()} == {n: c.ppl for n, c in one.conditions.items()}
    assert "1 pass(es)" in one.notes[0] and "1 pass(es)" not in split.notes[0]


def test_the_held_budget_comes_from_the_environment(tmp_path, monkeypatch, capsys):
    """``SUPERWEIGHT_HELD_GB`` sets how much residual stream a pass holds (more passes under a tiny one, the
    same numbers); a bad value is a one-line error before any work."""
    from test_bad_inputs import run_main

    from superweight.model.streamed import HELD_BYTES, held_budget

    folder = planted("LlamaForCausalLM", tmp_path / "m")
    monkeypatch.delenv("SUPERWEIGHT_HELD_GB", raising=False)
    assert held_budget() == HELD_BYTES
    one = stream_ablation(folder, [(1, 7, 33)], _config(stopword_prompts=0))
    monkeypatch.setenv("SUPERWEIGHT_HELD_GB", "0.000004")  # ~4 KiB
    assert held_budget() == 4294
    split = stream_ablation(folder, [(1, 7, 33)], _config(stopword_prompts=0))
    assert {n: c.ppl for n, c in split.conditions.items()} == {n: c.ppl for n, c in one.conditions.items()}
    assert "1 pass(es)" in one.notes[0] and "1 pass(es)" not in split.notes[0]
    for bad in ("lots", "0", "-2"):
        monkeypatch.setenv("SUPERWEIGHT_HELD_GB", bad)
        code, _, err = run_main(["eval", str(folder), "--stream", "--tasks", "none", "--json", str(tmp_path / "e.json")],
                                capsys)
        assert code == 2 and "SUPERWEIGHT_HELD_GB" in err and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MixtralForCausalLM"])
def test_streamed_zero_shot_tasks_are_the_in_memory_ones(arch, tmp_path):
    """Every request under every condition (the scale conditions only on --scale-tasks), in the in-memory
    batches: every task result the in-memory one."""
    folder = planted(arch, tmp_path / arch)
    plant = (1, 7, 33, 0) if arch == "MixtralForCausalLM" else (1, 7, 33)
    config = dict(tasks=["piqa", "lambada"], limit=5, stopword_prompts=0, scale_tasks=["lambada"])
    mem = run_ablation(sw.load_model(str(folder)), [plant], _config(**config))
    streamed = stream_ablation(folder, [plant], _config(**config))
    for name, c in mem.conditions.items():
        s = streamed.conditions[name]
        assert (s.ppl, s.tasks, s.avg_acc) == (c.ppl, c.tasks, c.avg_acc), name
    assert set(streamed.conditions["scale_2"].tasks) == {"lambada"}
    lls = {n: c.tasks["lambada"].ppl for n, c in streamed.conditions.items()}
    assert lls["original"] != lls["zero_super_weights"]


def test_streamed_eval_is_the_in_memory_one(tmp_path):
    """``stream_eval``: perplexity and every task as ``run_eval`` measures them in memory."""
    from superweight.prove.experiments import run_eval
    from superweight.prove.streamed import stream_eval

    folder = planted("LlamaForCausalLM", tmp_path / "m")
    config = dict(ppl="wiki-intros", max_tokens=400, seq_len=96, tasks=["piqa", "lambada"], limit=5)
    mem = run_eval(sw.load_model(str(folder)), AblationConfig(**config))
    streamed = stream_eval(folder, AblationConfig(**config))
    assert (streamed.ppl, streamed.ppl_tokens, streamed.tasks, streamed.avg_acc) == \
        (mem.ppl, mem.ppl_tokens, mem.tasks, mem.avg_acc)
    assert streamed.tasks["piqa"].n == 5 and "1 pass(es)" in streamed.notes[0]


def test_streamed_ablation_refuses_bad_weights(tmp_path):
    folder = planted("LlamaForCausalLM", tmp_path / "m")
    with pytest.raises(sw.SuperweightError, match="outside layer 1"):
        stream_ablation(folder, [(1, 7, 9999)], _config())
    with pytest.raises(sw.SuperweightError, match="no super weights"):
        stream_ablation(folder, [], _config())


def test_cli_ablate_streams_the_in_memory_table(tmp_path, capsys):
    """``ablate --stream`` (detection streamed too) writes the in-memory command's perplexities and
    accuracies."""
    from test_bad_inputs import run_main

    folder = planted("LlamaForCausalLM", tmp_path / "m")
    args = ["ablate", str(folder), "--ppl", "wiki-intros", "--max-tokens", "300", "--seq-len", "96", "--scales", "0,2",
            "--stopword-prompts", "2", "--top-n", "8", "--tasks", "piqa", "--limit", "2"]
    runs = {}
    for name, extra in {"memory": [], "stream": ["--stream"]}.items():
        code, out, err = run_main([*args, *extra, "--json", str(tmp_path / f"{name}.json")], capsys)
        assert code == 0, err
        assert "1:[7, 33]" in out
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert {n: c["ppl"] for n, c in runs["stream"]["conditions"].items()} == \
        {n: c["ppl"] for n, c in runs["memory"]["conditions"].items()}
    assert {n: c["avg_acc"] for n, c in runs["stream"]["conditions"].items()} == \
        {n: c["avg_acc"] for n, c in runs["memory"]["conditions"].items()}
    code, _, err = run_main([*args, "--stream", "--super-weights", str(tmp_path / "memory.json")], capsys)
    assert code == 2  # an ablation file is not a detection file


def test_cli_ablate_stream_checks_a_detection_file_against_the_checkpoint(tmp_path, capsys):
    from test_bad_inputs import run_main

    llama, gpt2 = planted("LlamaForCausalLM", tmp_path / "llama"), planted("GPT2LMHeadModel", tmp_path / "gpt2")
    code, _, err = run_main(["detect", str(gpt2), "--no-verdict", "--json", str(tmp_path / "sw.json")], capsys)
    assert code == 0, err
    code, _, err = run_main(["ablate", str(llama), "--stream", "--tasks", "none", "--super-weights", str(tmp_path / "sw.json")], capsys)
    assert code == 2 and "holds super weights of a GPT2LMHeadModel" in err
    code, out, err = run_main(["ablate", str(gpt2), "--stream", "--tasks", "none", "--ppl", "wiki-intros", "--max-tokens",
                               "200", "--scales", "", "--stopword-prompts", "0", "--super-weights", str(tmp_path / "sw.json")],
                              capsys)
    assert code == 0, err
    assert "zero_super_weights" in out
