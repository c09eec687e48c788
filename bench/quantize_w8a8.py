"""W8A8 on a real model: the paper's setting against SmoothQuant's reference procedure, and a W8A8
artifact that is written, loaded back and evaluated.

Rows (perplexity on the same WikiText-2 test tokens as bench/quantize_quality.py):
* the paper's Table 3 setting (asymmetric 8-bit weights per tensor, asymmetric per-token activations):
  naive, SmoothQuant (alpha 0.85, one ``s`` per norm shared by q/k/v and by gate/up, as the
  reference ``smooth_ln_fcs``), super-activation hold-out (elements >= 1000 x median |x|);
* the reference code's fake quantization (mit-han-lab/smoothquant ``fake_quant.py``: symmetric absmax
  per output row for weights, per token for activations): naive and SmoothQuant;
* the artifact: int8 weights with per-tensor scales (``RTN(bits=8)``), the activation channels held
  out of quantization recorded in the manifest (found on wiki-intros calibration text, never the test
  text), saved, loaded with ``load_quantized`` and evaluated.

    python bench/quantize_w8a8.py --model smollm2-135m --windows 4 --seq-len 1024
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from superweight.quant import RTN, W8A8, quantize, simulate_w8a8  # noqa: E402
from superweight.quant.sweep import WeightSnapshot  # noqa: E402
from superweight.quant.w8a8 import activation_spec, default_calibration, held_channels, target_modules  # noqa: E402

CONFIGS = [
    ("paper setting", "naive", W8A8("naive")),
    ("paper setting", "SmoothQuant alpha 0.85", W8A8("smoothquant")),
    ("paper setting", "SA hold-out", W8A8("holdout")),
    ("reference fake quant", "naive", W8A8("naive", weights="channel", symmetric=True)),
    ("reference fake quant", "SmoothQuant alpha 0.85", W8A8("smoothquant", weights="channel", symmetric=True)),
    ("reference fake quant", "SmoothQuant alpha 0.5", W8A8("smoothquant", alpha=0.5, weights="channel", symmetric=True)),
]


def ppl(model, tokenizer, text: str, seq_len: int, tokens: int) -> float:
    from superweight.eval.perplexity import evaluate_perplexity

    return evaluate_perplexity(model, tokenizer, text, seq_len, tokens).ppl


def artifact_row(lm, calib, text: str, seq_len: int, tokens: int, snapshot: WeightSnapshot) -> dict:
    """Write the W8A8 artifact, load it back, evaluate the loaded model."""
    from superweight.quant.artifact import load_quantized, save_quantized

    held = held_channels(lm.model, calib)
    modules = list(target_modules(lm.model))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = quantize(lm.model, RTN(bits=8), arch=lm.arch)
            manifest = save_quantized(lm.model, lm.tokenizer, result, Path(tmp) / "w8a8", source=lm.source, notes=lm.notes,
                                      activations=activation_spec(modules, held))
        finally:
            snapshot.restore()
        loaded = load_quantized(Path(tmp) / "w8a8")
        value = ppl(loaded.model, loaded.tokenizer, text, seq_len, tokens)
        size = manifest["size"]
    return {"setting": "artifact", "method": "int8 W per tensor + A per token, held-out channels", "ppl": value,
            "held_out_channels": held, "bits_per_weight": size["bits_per_weight"], "file_bytes": size["file_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize_w8a8.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import superweight as sw
    from superweight.eval.text import load_text

    lm = sw.load_model(args.model)
    text, tokens = load_text("wikitext2"), args.windows * args.seq_len
    calib = default_calibration(lm.tokenizer)
    snapshot = WeightSnapshot(lm.model)
    out = {"version": 1, "command": "python bench/quantize_w8a8.py " + " ".join(sys.argv[1:]), "model": args.model,
           "notes": list(lm.notes), "tokens": tokens, "seq_len": args.seq_len, "rows": []}

    def record(row: dict) -> None:
        out["rows"].append(row)
        print(f"{row['setting']:22s} {row['method']:45s} {row['ppl']:.3f}", flush=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    record({"setting": "-", "method": "unquantized", "ppl": ppl(lm.model, lm.tokenizer, text, args.seq_len, tokens)})
    for setting, method, config in CONFIGS:
        start = time.perf_counter()
        with simulate_w8a8(lm.model, config, calib) as stats:
            value = ppl(lm.model, lm.tokenizer, text, args.seq_len, tokens)
        record({"setting": setting, "method": method, "ppl": value, "seconds": time.perf_counter() - start,
                "stats": stats.to_dict()})
    assert snapshot.intact()
    record(artifact_row(lm, calib, text, args.seq_len, tokens, snapshot))


if __name__ == "__main__":
    main()
