"""Does keeping the super-weight tensors at f16 matter under llama-quantize --pure? (quality, not speed)

Simulates llama.cpp's reference quantizers (gguf-py) on every decoder-layer linear weight of a
model and measures WikiText-2 perplexity for: float; pure BASE type; BASE with the
`superweight llama-cpp-overrides` tensors at f16; BASE with the same number of *other*
down-projections at f16 (a control for "any two tensors at f16"). Also reports, for each super
weight, the relative error of the 31 other weights of its 32-weight block vs the rest of the row.

    python bench/llama_cpp_pure.py [--model smollm2-135m] [--type q4_0] [--max-tokens 2048]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from superweight.quant import llama_cpp
from superweight.core.files import write_json_atomic
from superweight.find.loop import detect
from superweight.eval.perplexity import evaluate_perplexity
from superweight.eval.text import load_text
from superweight.model.load import load_model


def block_damage(lm, sw, type_name: str) -> dict:
    w = lm.arch.weight_matrix(lm.model, sw.layer).detach()
    q = llama_cpp.roundtrip(w, type_name)
    row, start = sw.row, sw.col // 32 * 32
    err = ((q[row] - w[row]).abs() / w[row].abs().clamp_min(1e-8))
    block = [c for c in range(start, start + 32) if c != sw.col]
    rest = [c for c in range(w.shape[1]) if not start <= c < start + 32]
    return {
        "super_weight": [sw.layer, sw.row, sw.col], "type": type_name, "value": float(w[row, sw.col]),
        "dequantized": float(q[row, sw.col]), "block_neighbours_median_rel_err": float(err[block].median()),
        "rest_of_row_median_rel_err": float(err[rest].median()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--type", default="q4_0")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "llama_cpp_pure.json"))
    args = ap.parse_args()
    lm = load_model(args.model)
    det = detect(lm.model, lm.tokenizer, model_name=args.model, arch=lm.arch)
    text = load_text("wikitext2")
    ppl = lambda: evaluate_perplexity(lm.model, lm.tokenizer, text, max_tokens=args.max_tokens)  # noqa: E731
    arch, n = det.architecture, det.num_layers
    sw_layers = sorted({s.layer for s in det.super_weights})
    control_layers = [next(l for l in (x - 1, x + 1, x - 2, x + 2) if 0 <= l < n and l not in sw_layers) for x in sw_layers]
    runs = {
        "float": None,
        f"{args.type} pure": [],
        f"{args.type} + super-weight tensors f16": llama_cpp.overrides_for(arch, n, det.coords, "f16"),
        f"{args.type} + control tensors f16 (layers {control_layers})": llama_cpp.overrides_for(
            arch, n, [(l, 0, 0) for l in control_layers], "f16"),
    }
    results = {}
    for name, overrides in runs.items():
        start = time.perf_counter()
        if overrides is None:
            r = ppl()
        else:
            with llama_cpp.simulated_quantize(lm.model, arch, args.type, overrides):
                r = ppl()
        results[name] = {"ppl": r.ppl, "tokens": r.tokens, "overrides": [o.tensor for o in overrides or []],
                         "seconds": time.perf_counter() - start}
        print(f"{name}: ppl {r.ppl:.4f} ({r.tokens} tokens)", flush=True)
    damage = [block_damage(lm, s, t) for s in det.super_weights for t in ("q4_0", "q8_0")]
    write_json_atomic(args.out, {
        "version": 1, "command": "python bench/llama_cpp_pure.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "model": args.model, "notes": lm.notes, "super_weights": [list(c) for c in det.coords],
        "text": "wikitext2", "torch_threads": torch.get_num_threads(), "runs": results, "block_damage": damage,
    })
    print(json.dumps(damage, indent=1))


if __name__ == "__main__":
    main()
