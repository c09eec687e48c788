"""``sweep --stream`` against the in-memory sweep, on the real models.

    python bench/stream_sweep.py        # -> bench/results/stream_sweep.json (~20 min on 2 CPUs)
    python bench/stream_sweep.py --points w8a8 --out bench/results/stream_sweep_w8a8.json   # ~5 min

For each real model of the dev set (float weights dequantized from GGUF files: every baseline is that
of an already-quantized model), the default detection's super weights are held out in the sweep's
weight-only grid (``--points weight-only``, ``default_grid(w8a8=False)``: RTN 4 and 3 bits by block size,
naive / +SW / clip / clip+SW, group 128, ternary) or its W8A8 points (``--points w8a8``: naive,
SmoothQuant, super-activation hold-out, with the unquantized baseline) on the first 2,048 tokens of WikiText-2 (the offline Wikipedia
introductions without ``../shared``), in memory (``run_sweep``) and streamed from the safetensors copy
the first load wrote (``stream_sweep``, every point through each layer read). Records whether every
point's perplexity, bits per weight and SQNR (W8A8: the simulation's counts) are the same, and both
wall times.
"""
from __future__ import annotations

from pathlib import Path

from streamed_pair import command, in_memory_and_streamed, perplexity_text, write_results

ROOT = Path(__file__).resolve().parent
MODELS = ("smollm2-135m", "gemma3-270m")


def run(name: str, text_name: str, points: str) -> dict:
    import superweight as sw
    from superweight.quant.sweep import default_grid, run_sweep
    from superweight.quant.streamed_sweep import stream_sweep

    lm = sw.load_model(name)
    keep = sw.detect(lm.model, lm.tokenizer, arch=lm.arch).super_weights
    grid = default_grid(w8a8=False) if points == "weight-only" else \
        [p for p in default_grid() if p.family in ("fp", "w8a8")]
    mem, streamed, times = in_memory_and_streamed(lm, lambda: run_sweep(lm, keep, grid, text_name=text_name),
                                                  lambda folder: stream_sweep(folder, keep, grid, text_name=text_name))
    same = [(a.ppl, a.bits_per_weight, a.extra) == (b.ppl, b.bits_per_weight, b.extra) for a, b in zip(mem.rows, streamed.rows)]
    return {"model": name, "notes": lm.notes + streamed.notes, "super_weights": streamed.super_weights,
            "points": len(grid), "tokens": mem.rows[0].tokens, "all_same": all(same),
            "rows": [[r.label, r.ppl, r.bits_per_weight] for r in streamed.rows],
            "w8a8": {r.label: r.extra["w8a8"] for r in streamed.rows if "w8a8" in r.extra},
            **times}


def main(argv: list[str] | None = None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "stream_sweep.json")
    ap.add_argument("--points", choices=("weight-only", "w8a8"), default="weight-only")
    args = ap.parse_args(argv)
    text = perplexity_text()
    out = {"command": command("stream_sweep.py", argv), "text": text, "points": args.points,
           "models": [run(m, text, args.points) for m in MODELS]}
    return write_results(args.out, out, ("model", "points", "all_same", "in_memory_s", "streamed_s"))


if __name__ == "__main__":
    main()
