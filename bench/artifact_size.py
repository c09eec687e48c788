"""Artifact size as a ratio to the same model in float16, embeddings included: int4 g128 artifacts of the real
models written by `superweight quantize` (super weights detected and held out, as a new user runs it), with the
untouched tensors in 16 bits (the default) and with ``--embeddings int8``.

    nice python bench/artifact_size.py [--models smollm2-135m gemma3-270m] -> bench/results/artifact_size.json

Both built-in models are dequantized from GGUF files (Q4_1, Q4_K_M): the float16 reference is the parameter
count times two bytes, whatever the source file. The floor of each row is printed beside it: the decoder
linears at 4 bits plus the embedding (16 or 8 bits per weight), the part no choice of the untouched tensors'
dtype can remove.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from superweight.core.files import write_json_atomic  # noqa: E402

VARIANTS = {"16-bit untouched": [], "int8 embeddings": ["--embeddings", "int8"]}


def quantize(model: str, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "superweight", "quantize", model, "--scheme", "int4", "--group", "128",
           "--out", str(out), "--json", str(out) + ".json", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(Path(str(out) + ".json").read_text())


def row(model: str, variant: str, manifest: dict) -> dict:
    s = manifest["size"]
    emb = sum(e["shape"][0] * e["shape"][1] for e in manifest["tensors"].values() if e.get("embedding"))
    untouched = sum(manifest["stored_dtypes"].values())
    emb_bits = 8 if emb else 16
    emb_weights = emb or (s["total_params"] - s["quantized_weights"])
    floor = (4 * s["quantized_weights"] + emb_bits * emb_weights) / 8 / s["float16_bytes"]
    return {"model": model, "variant": variant, "scheme": manifest["scheme"], "file_bytes": s["file_bytes"],
            "float16_bytes": s["float16_bytes"], "ratio_to_float16": s["ratio_to_float16"],
            "quantized_weights": s["quantized_weights"], "untouched_weights": untouched,
            "stored_dtypes": manifest["stored_dtypes"], "bits_per_weight": s["bits_per_weight"],
            "floor_ratio_4bit_linears": floor, "kept": len(manifest["kept"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "artifact_size.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for variant, extra in VARIANTS.items():
                manifest = quantize(model, extra, Path(tmp) / f"{model}-{len(rows)}")
                rows.append(row(model, variant, manifest))
                print(json.dumps(rows[-1]), flush=True)
    write_json_atomic(args.out, {"command": "python " + " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
