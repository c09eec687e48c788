"""bench/qat_arms.py --collect on tiny ternary runs: arms and seeds per step, the paired differences
from arm (a), and --merge with an earlier JSON whose runs folder is gone (the longer run of a name
wins, a rerun of the same seed reproduces the earlier probes, other settings are refused)."""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from superweight.train.loop import TrainConfig, TrainResult, train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import qat_arms  # noqa: E402

KEEP = [[1, 3, 5], [1, 3, 9]]
ARM_KW = {"ternary": {}, "super": {"keep": KEEP}, "random": {"keep": KEEP, "keep_random": True},
          "lines": {"keep": KEEP, "keep_lines": True}}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(f"The river {i % 7} flows past mill {i % 5} into the valley {i}." for i in range(300)))
    return path


def probe(model, tokenizer, step):
    """What Probe returns, in the keys collect reads: perplexities of two fixed texts and the largest |h|."""
    out = {}
    for key, text in (("wikitext2_ppl", "The river flows past the mill."), ("lambada_ppl", "Into the valley it goes.")):
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            res = model(input_ids=ids, labels=ids, output_hidden_states=True)
        out[key] = math.exp(float(res.loss))
        out["activation"] = {"residual_max": float(max(h.abs().max() for h in res.hidden_states))}
    return out


def run(folder: Path, arm: str, seed: int, text_file: Path, stop_at: int | None = None, **kw) -> None:
    """One arm-seed, 4 steps probed every 2; ``stop_at``: cut like a killed run (no done.json)."""
    out = folder / f"{arm}-s{seed}"
    config = TrainConfig.preset("test", text=str(text_file), heldout="split", eval_tokens=32, steps=4, save_every=2,
                                bitnet=True, seed=seed, save_checkpoints=False, **{**ARM_KW[arm], **kw})
    train(config, out, measure=probe)
    if stop_at is None:
        (out / "done.json").write_text("{}")
    else:
        log = TrainResult.load(out / "train_log.json")
        log.measures = [m for m in log.measures if m["step"] <= stop_at]
        log.save(out / "train_log.json")


def collect(runs: Path, merge: Path | None = None) -> dict:
    return qat_arms.collect(argparse.Namespace(runs=runs, merge=merge))


def seeds(result: dict, arm: str, step: int) -> int:
    return result["arms"][arm]["by_step"][str(step)]["wikitext2_ppl"]["n"]


def test_collect_merges_an_earlier_json(tmp_path, text_file):
    first = tmp_path / "first"
    for arm in ("ternary", "super"):
        for seed in (0, 1):
            run(first, arm, seed, text_file)
    run(first, "random", 0, text_file)
    run(first, "random", 1, text_file, stop_at=2)
    run(first, "lines", 0, text_file, stop_at=2)
    (first / "float.json").write_text(json.dumps({"wikitext2_ppl": 3.0, "lambada_ppl": 4.0}))
    earlier = collect(first)
    assert earlier["merged"] is None
    assert seeds(earlier, "random", 4) == 1 and seeds(earlier, "lines", 2) == 1
    assert earlier["arms"]["random"]["finished"] == ["random-s0"]
    assert earlier["arms"]["lines"]["by_step"]["4"] == {}
    saved = tmp_path / "earlier.json"
    saved.write_text(json.dumps(earlier))
    shutil.rmtree(first)  # the runs folder is gone: only the JSON is left

    second = tmp_path / "second"
    run(second, "random", 1, text_file)
    run(second, "lines", 0, text_file)
    run(second, "lines", 1, text_file)
    run(second, "super", 0, text_file, stop_at=0)  # a cut rerun: the earlier, longer one stays
    result = collect(second, merge=saved)
    assert result["merged"]["runs_from_earlier_json"] == ["random-s0", "super-s0", "super-s1", "ternary-s0", "ternary-s1"]
    assert list(result["runs"]) == sorted(result["runs"])
    assert result["runs"]["random-s1"]["done"] and [m["step"] for m in result["runs"]["random-s1"]["measures"]] == [0, 2, 4]
    assert [m["step"] for m in result["runs"]["super-s0"]["measures"]] == [0, 2, 4]
    # reruns of the same seed and settings on the same machine reproduce the earlier probes
    reruns = result["merged"]["reruns"]
    assert set(reruns) == {"random-s1", "lines-s0", "super-s0"}
    assert list(reruns["random-s1"]) == ["0", "2"] and list(reruns["super-s0"]) == ["0"]
    assert all(abs(step[k]) < 1e-4 for r in reruns.values() for step in r.values() for k in ("wikitext2_ppl", "lambada_ppl"))
    assert all(step["residual_max"][0] == pytest.approx(step["residual_max"][1], rel=1e-4)
               for r in reruns.values() for step in r.values())
    assert reruns["random-s1"]["2"]["residual_max"][1] == result["runs"]["random-s1"]["measures"][1]["activation"]["residual_max"]
    for arm in qat_arms.ARMS:
        for step in (0, 2, 4):
            assert seeds(result, arm, step) == 2, (arm, step)
    # the paired difference from arm (a) on the same seed, with its interval across the two seeds
    for step in (0, 2, 4):
        d = result["paired_vs_ternary"]["lines"][str(step)]["wikitext2_ppl"]
        pairs = [math.log(qat_arms_value(result, f"lines-s{s}", step)) - math.log(qat_arms_value(result, f"ternary-s{s}", step))
                 for s in (0, 1)]
        assert d["mean"] == pytest.approx(sum(pairs) / 2, rel=1e-9, abs=1e-12)
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert "--seeds 0,1 " in result["command"] and result["command"].endswith("--merge EARLIER.json")
    assert result["float_reference"] == {"wikitext2_ppl": 3.0, "lambada_ppl": 4.0}
    assert result["setup"]["steps"] == 4 and result["arms"]["lines"]["extra_bits"] > result["arms"]["super"]["extra_bits"] == 96
    assert "| 4 | lines | 2 |" in qat_arms.markdown(result)

    # a run with other settings (another token budget) is refused, whichever side it comes from
    third = tmp_path / "third"
    run(third, "lines", 0, text_file, batch=1)
    with pytest.raises(SystemExit, match="lines-s0"):
        collect(third, merge=saved)


def qat_arms_value(result: dict, name: str, step: int) -> float:
    return next(m["wikitext2_ppl"] for m in result["runs"][name]["measures"] if m["step"] == step)
