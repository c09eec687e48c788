"""``ablate`` and ``eval`` say their plan before they start and an estimate after the first condition
(or stage); off a terminal, every running step writes a plain progress line every N seconds."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from superweight.core import progress
from superweight.prove.plan import Estimate, duration


def test_a_step_off_a_terminal_writes_plain_lines_with_where_it_is(monkeypatch, capsys):
    monkeypatch.setenv("SUPERWEIGHT_PROGRESS_EVERY", "0.02")
    monkeypatch.delenv("SUPERWEIGHT_PROGRESS", raising=False)
    assert progress.plain()  # pytest captures stdout: not a terminal
    with progress.step("ablation"):
        progress.note("condition 2/7 (zero_random): perplexity")
        time.sleep(0.3)
    time.sleep(0.1)  # the ticker has stopped: no line after the step
    err = capsys.readouterr().err
    assert re.search(r"^\.\.\. ablation: condition 2/7 \(zero_random\): perplexity \(\d+ s\)$", err, re.M), err
    assert progress._tickers == []
    progress.configure(quiet=True)
    try:
        with progress.step("quiet"):
            time.sleep(0.1)
    finally:
        progress.configure(quiet=False)
    assert "quiet" not in capsys.readouterr().err


def test_the_estimate_scales_the_first_piece_by_the_tokens_left():
    e = Estimate([100, 200, 100])
    assert e.first("original", 10.0) == "original took 10 s; the 2 condition(s) left: about 30 s"
    assert e.first("again", 10.0) is None  # said once
    assert duration(600) == "10.0 min" and duration(7200) == "2.0 h"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from superweight.find.loop import detect
    from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model

    folder = tmp_path_factory.mktemp("plan")
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, 1, 7, 21)
    model.save_pretrained(folder / "m")
    byte_tokenizer().save_pretrained(folder / "m")
    detect(model, byte_tokenizer()).save(folder / "sw.json")
    (folder / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    # long enough (about 4,500 tokens, 70 windows) that a step outlasts many 0.01 s ticks on any machine
    (folder / "long.txt").write_text("The quick brown fox jumps over the lazy dog. " * 100)
    return folder


def piped(*args: str) -> subprocess.CompletedProcess:
    """The CLI with stdout and stderr to pipes (not a terminal), a progress line every 0.01 s."""
    env = {**os.environ, "SUPERWEIGHT_PROGRESS_EVERY": "0.01"}
    env.pop("SUPERWEIGHT_PROGRESS", None)
    return subprocess.run([sys.executable, "-m", "superweight", *args], capture_output=True, text=True, env=env, timeout=600)


def test_ablate_shows_its_plan_an_estimate_and_progress_lines_through_a_pipe(tiny):
    proc = piped("ablate", str(tiny / "m"), "--super-weights", str(tiny / "sw.json"), "--ppl", str(tiny / "t.txt"),
                 "--tasks", "winogrande", "--limit", "2", "--seq-len", "64", "--scales", "0", "--stopword-prompts", "2",
                 "--json", str(tiny / "a.json"))
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    plan = re.search(r"^plan: 6 conditions \(1 copied from another, not run\) x (\d+) tokens of .*t\.txt x "
                     r"1 task\(s\) \(winogrande; at most 2 items each, [\d,]+ request tokens\), then the stopword", err, re.M)
    assert plan, err
    assert int(plan.group(1)) == json.loads((tiny / "a.json").read_text())["conditions"]["original"]["ppl_tokens"]
    assert re.search(r"^original took \d+ s; the 4 condition\(s\) left: about \d+ s$", err, re.M), err
    assert err.index("plan: ") < err.index("original took")
    assert re.search(r"^\.\.\. ablation: condition \d/6 \(\w+\): (perplexity|task 1/1)", err, re.M), err


def test_eval_shows_its_plan_an_estimate_and_progress_lines_through_a_pipe(tiny):
    proc = piped("eval", str(tiny / "m"), "--ppl", str(tiny / "long.txt"), "--tasks", "winogrande", "--limit", "2",
                 "--seq-len", "64")
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert re.search(r"^plan: [\d,]+ tokens of .*long\.txt x 1 task\(s\) \(winogrande; at most 2 items each", err, re.M), err
    assert re.search(r"^perplexity took \d+ s; the 1 stage\(s\) left: about \d+ s$", err, re.M), err
    assert re.search(r"^\.\.\. evaluation: (perplexity|task 1/1: winogrande)", err, re.M), err
