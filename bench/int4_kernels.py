"""One linear layer at a time: the native int4 kernel against torch's int4 kernel and dense matmuls.

    nice python bench/int4_kernels.py [--threads 1 2] [--rows 1 4 16 64] -> bench/results/int4_kernels.json

For each shape (the synthetic 1B Llama's MLP and attention layers, SmolLM2's MLP layer) and each number of
input rows, the median of ``--reps`` timed calls (after a warm-up) of: a float32 matmul ``x @ W^T``, a
bfloat16 one, torch's group-wise int4 kernel (``aten._weight_int4pack_mm_for_cpu``, bfloat16, the layout
``quant.runtime`` gives it), and ``quant.runtime.PackedLinear`` on the native kernel (float32), all on the same
random codes in groups of 128. Ratios are over the float32 matmul of the same shape and rows, measured in the
same run; the CPU's vector flags are recorded, since the int4 kernels' speed depends on them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from superweight.core.files import write_json_atomic  # noqa: E402
from superweight.quant import RTN  # noqa: E402
from superweight.quant.primitives import quantize_tensor  # noqa: E402
from superweight.quant.runtime import PackedLinear  # noqa: E402

SHAPES = {"1B mlp down (2048 x 5632)": (2048, 5632), "1B mlp up (5632 x 2048)": (5632, 2048),
          "1B attention (2048 x 2048)": (2048, 2048), "SmolLM2 mlp up (1536 x 576)": (1536, 576)}


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def cpu_flags() -> list[str]:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in line.split(":")[1].split() if f.startswith(("avx", "amx", "fma")))


def shape_rows(n: int, k: int, rows: list[int], reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    qt = quantize_tensor(w, RTN(bits=4, group=128))
    native, int4 = PackedLinear(qt, None, kernel="native"), PackedLinear(qt, None, kernel="int4")
    w_hat = qt.dequantize()
    wb = w_hat.bfloat16()
    out = {}
    with torch.no_grad():
        for m in rows:
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16()
            r = {"float32 matmul": median_ms(lambda: x @ w_hat.t(), reps),
                 "bfloat16 matmul": median_ms(lambda: xb @ wb.t(), reps),
                 "torch int4 kernel (bfloat16)": median_ms(lambda: int4(xb), reps),
                 "native int4 kernel (float32)": median_ms(lambda: native(x), reps)}
            out[str(m)] = {"ms": r, "vs_float32": {k2: r["float32 matmul"] / v for k2, v in r.items()}}
            print(n, k, m, {k2: round(v, 3) for k2, v in r.items()}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int4_kernels.json")
    args = ap.parse_args()
    result = {"command": "python bench/int4_kernels.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
              "cpu_flags": cpu_flags(), "group": 128, "note": "vs_float32: the float32 matmul's time over each one's (>1: faster)",
              "threads": {}}
    for t in args.threads:
        torch.set_num_threads(t)
        result["threads"][str(t)] = {name: shape_rows(n, k, args.rows, args.reps) for name, (n, k) in SHAPES.items()}
        write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
