"""Where a packed model's decode time goes: the int4 matmuls against everything else.

    nice python bench/decode_breakdown.py ARTIFACT [--threads 2] [--tokens 24] -> bench/results/decode_breakdown.json

Three measurements in one process, on an artifact whose layers run the native int4 kernel: (1) ms per decoded
token (batch 1, a 16-token prompt, greedy, after a 4-token warm-up); (2) the same decode with every int4 matmul
replaced by a zero output of the right shape (what the rest of the model costs: head, norms, attention,
conversions, Python); (3) every packed layer's kernel called once, back to back, on one input row (the matmuls
alone, caches cold: each layer's codes come from memory), with the bytes they read and the rate.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import superweight as sw  # noqa: E402
from superweight.core.files import write_json_atomic  # noqa: E402
from superweight.quant import runtime  # noqa: E402
from superweight.quant.runtime import PackedLinear  # noqa: E402


def ms_per_token(lm, tokens: int) -> float:
    ids = torch.arange(1, 17).reshape(1, -1)
    with torch.no_grad():
        lm.model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        lm.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return (time.perf_counter() - t) / tokens * 1e3


def kernels_once(layers: list[PackedLinear], reps: int = 3) -> tuple[float, int]:
    """Best of ``reps`` passes over every layer (one input row each): ms, and the bytes the codes and parameters hold."""
    xs = {m.in_features: torch.randn(1, m.in_features) for m in layers}
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            for m in layers:
                runtime.native.int4_mm(xs[m.in_features], m.native_codes, m.native_scale, m.native_zero, m.group)
            best = min(best, time.perf_counter() - t)
    nbytes = sum(b.numel() * b.element_size() for m in layers for b in (m.native_codes, m.native_scale, m.native_zero))
    return best * 1e3, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decode_breakdown.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = sw.load_quantized(args.artifact)
    layers = [m for m in lm.model.modules() if isinstance(m, PackedLinear) and m.kernel == "native"]
    if not layers:
        raise SystemExit("no layer of this artifact runs the native int4 kernel")
    total = ms_per_token(lm, args.tokens)
    real = runtime.native.int4_mm
    runtime.native.int4_mm = lambda x2, codes, scale, zero, size, sparse=None: torch.zeros(x2.shape[0], scale.shape[0])
    try:
        rest = ms_per_token(lm, args.tokens)
    finally:
        runtime.native.int4_mm = real
    once, nbytes = kernels_once(layers)
    result = {"command": "python bench/decode_breakdown.py " + " ".join(sys.argv[1:]), "threads": args.threads,
              "native_layers": len(layers), "ms_per_token": total, "ms_per_token_without_int4_matmuls": rest,
              "int4_matmuls_once_ms": once, "int4_bytes": nbytes, "int4_gb_per_s": nbytes / once / 1e6,
              "int4_share_estimate": (total - rest) / total}
    print(result)
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
