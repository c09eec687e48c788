"""The detection dev set: both methods on the real models and the synthetic hard cases, with verdicts.

    python bench/detect_devset.py            # -> docs/results/detect_devset.json (~10 min on 2 CPUs)

Real models: SmolLM2-135M (Q4_1 GGUF) and Gemma-3-270M (Q4_K_M GGUF), float weights dequantized
from those files. Each method runs on the paper's prompt; the default method's findings get the
verdict (1,024 tokens of the offline Wikipedia introductions, 2 null draws). Synthetic cases:
``superweight.testing.synthetic.HARD_CASES`` on tiny Llama models, scored against their known answer.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summarize(result) -> dict:
    return {
        "method": result.method, "iterations": result.iterations,
        "super_weights": [
            {"layer": s.layer, "row": s.row, "col": s.col, "expert": s.expert, "role": s.role, "value": s.value,
             "input": s.input_value, "output": s.output_value, "share": s.share, "iteration": s.iteration,
             "verdict": s.verdict}
            for s in result.super_weights
        ],
        "activations": [
            {"token": a.token, "channel": a.channel, "peak": a.peak, "peak_layer": a.peak_layer, "ratio": a.ratio,
             "rises": [(c.layer, c.sublayer, c.delta) for c in a.rises],
             "falls": [(c.layer, c.sublayer, c.delta) for c in a.falls]}
            for a in result.activations
        ],
        "sources_without_weight": [
            {"layer": s.layer, "channel": s.channel, "role": s.role, "sublayer": s.sublayer, "note": s.note}
            for s in result.sources if not s.weights
        ],
        "verdicts": [v.to_dict() for v in result.verdicts],
    }


def real_model(name: str, tokens: int) -> dict:
    import superweight as sw
    from superweight.eval.text import load_text
    from superweight.find.verdict import judge

    lm = sw.load_model(name)
    out = {"model": name, "notes": lm.notes}
    for method in ("paper", "trace"):
        t0 = time.perf_counter()
        result = sw.detect(lm.model, lm.tokenizer, model_name=name, arch=lm.arch, method=method)
        seconds = time.perf_counter() - t0
        forwards = 0
        if method == "trace" and result.super_weights:
            forwards = judge(lm.model, lm.arch, lm.tokenizer, result, load_text("wiki-intros"), tokens)
        out[method] = {**summarize(result), "detect_s": seconds, "verdict_forwards": forwards}
    return out


def synthetic() -> list[dict]:
    import superweight as sw
    from superweight.testing.synthetic import HARD_CASES, byte_tokenizer, hard_case

    tok, rows = byte_tokenizer(), []
    for name in HARD_CASES:
        case = hard_case(name)
        row = {"case": name, "note": case.note, "creates": case.creates, "cancels": case.cancels}
        for method in ("paper", "trace"):
            r = sw.detect(case.model, tok, method=method)
            creates = sorted(s.coord for s in r.super_weights if s.role == "creates")
            cancels = sorted(s.coord for s in r.super_weights if s.role == "cancels")
            row[method] = {"creates": creates, "cancels": cancels,
                           "exact": creates == sorted(case.creates) and (method == "paper" or cancels == sorted(case.cancels)),
                           "ratios": [round(a.ratio) for a in r.activations]}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "detect_devset.json")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    result = {"command": "python bench/detect_devset.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "synthetic": synthetic(), "real": [real_model(m, args.tokens) for m in args.models]}
    from superweight.core.files import write_json_atomic

    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=1, default=str)[:4000])
    return result


if __name__ == "__main__":
    main()
