"""The verdict of a streamed detection against the in-memory one, on the real models.

    python bench/stream_verdict.py        # -> bench/results/stream_verdict.json (~6 min on 2 CPUs)

For each real model of the dev set (float weights dequantized from GGUF files), the default detection
and its verdict (1,024 tokens of the offline Wikipedia introductions) run in memory and then streamed
from the safetensors copy the first load wrote (``stream_detect(..., verdict_text=...)``); records
whether every verdict is the same (``Verdict.to_dict`` equal) and both wall times.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODELS = ("smollm2-135m", "gemma3-270m")


def run(name: str, tokens: int) -> dict:
    import superweight as sw
    from superweight.eval.text import load_text
    from superweight.core.files import default_cache_dir
    from superweight.model.load import gguf_cache_folder
    from superweight.find.streamed import stream_detect
    from superweight.find.verdict import judge

    lm = sw.load_model(name)
    text = load_text("wiki-intros")
    t0 = time.perf_counter()
    mem = sw.detect(lm.model, lm.tokenizer, arch=lm.arch)
    judge(lm.model, lm.arch, lm.tokenizer, mem, text, tokens)
    in_memory_s = time.perf_counter() - t0
    folder = gguf_cache_folder(lm.source, default_cache_dir())
    t0 = time.perf_counter()
    streamed = stream_detect(folder, verdict_text=text, verdict_tokens=tokens)
    streamed_s = time.perf_counter() - t0
    return {"model": name, "notes": lm.notes, "verdicts": len(mem.verdicts),
            "same_verdicts": [v.to_dict() for v in streamed.verdicts] == [v.to_dict() for v in mem.verdicts],
            "max_abs_ppl_ratio_difference": max((abs(a.ppl_ratio - b.ppl_ratio) for a, b in zip(mem.verdicts, streamed.verdicts)), default=0.0),
            "in_memory_s": in_memory_s, "streamed_s": streamed_s, "streamed_over_in_memory": streamed_s / in_memory_s,
            "labels": [[v.target, v.weights, v.label, v.ppl_ratio] for v in streamed.verdicts]}


def main(argv: list[str] | None = None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "stream_verdict.json")
    args = ap.parse_args(argv)
    out = {"command": "python bench/stream_verdict.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "models": [run(m, args.tokens) for m in MODELS]}
    from superweight.core.files import write_json_atomic

    write_json_atomic(args.out, out)
    print(json.dumps([{k: m[k] for k in ("model", "verdicts", "same_verdicts", "in_memory_s", "streamed_s")} for m in out["models"]], indent=1))
    return out


if __name__ == "__main__":
    main()
