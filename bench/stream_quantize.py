"""Quantize a checkpoint in memory and streamed, in one run: peak RSS, wall time, the same artifact?

    python bench/stream_quantize.py --size-gb 1.5     # -> bench/results/stream_quantize.json

Makes a planted random Llama checkpoint of 7B width (``bench/make_big_model.py``, bfloat16), then in
two child processes, alternating: (a) ``load_model`` + ``export_artifact`` (the whole model in memory),
(b) ``stream_quantize`` (one layer at a time); both INT4 group 64 with the planted super weight kept,
in bfloat16. Records each child's peak RSS (VmHWM) and wall time, their ratios to the checkpoint's
size and to each other (measured in the same run), and whether the two artifacts hold the same
manifest and bytes (the streamed one is sharded, a file per layer: its shards are joined to compare).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(mode: str, folder: str, out: str, device: str = "cpu") -> None:
    import superweight as sw
    from superweight.quant.artifact import export_artifact
    from superweight.quant.config import RTN
    from superweight.quant.streamed import stream_quantize

    planted = json.loads((Path(folder) / "superweight_planted.json").read_text())
    keep = [(planted["layer"], planted["row"], planted["col"])]
    config = RTN(bits=4, group=64)
    t0 = time.perf_counter()
    if mode == "memory":
        lm = sw.load_model(folder, dtype="bfloat16", device=device)
        export_artifact(lm, config, keep, out, write_back=False)
    else:
        stream_quantize(folder, config, keep, out, dtype="bfloat16", device=device)
    print(json.dumps({"mode": mode, "device": device, "seconds": time.perf_counter() - t0, "peak_rss": _status("VmHWM")}))


def run_child(mode: str, folder: Path, out: Path, device: str = "cpu") -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(folder), str(out), device],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} export failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def digest(artifact: Path) -> dict:
    """Hashes of the manifest (less what counts headers: a sharded artifact has one per shard), of the
    tensor entries and of the data; a sharded artifact's shards are joined first (not timed)."""
    from superweight.model.checkpoint import INDEX, join_safetensors, read_header

    manifest = json.loads((artifact / "superweight_manifest.json").read_text())
    manifest.pop("source_model", None)
    for key in ("file_bytes", "header_bytes", "file_bits_per_param"):
        manifest["size"].pop(key)
    weights, shards = artifact / "model.safetensors", 1
    if (artifact / INDEX).is_file():
        names = sorted(set(json.loads((artifact / INDEX).read_text())["weight_map"].values()))
        weights, shards = artifact / "joined.safetensors", len(names)
        join_safetensors([artifact / n for n in names], weights, read_header(artifact / names[0]).metadata)
    header = read_header(weights)
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        f.seek(header.data_start)
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return {"manifest": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
            "entries": hashlib.sha256(json.dumps(header.entries, sort_keys=True).encode()).hexdigest(), "data": h.hexdigest(),
            "weight_files": shards}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.5)
    ap.add_argument("--width", default="7b")
    ap.add_argument("--reps", type=int, default=2, help="runs of each mode, alternated")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "stream_quantize.json")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return {}
    sys.path.insert(0, str(ROOT))
    from make_big_model import main as make

    tmp = Path(tempfile.mkdtemp(prefix="sw-stream-quantize-"))
    try:
        folder = tmp / "model"
        make(["--size-gb", str(args.size_gb), "--out", str(folder), "--width", args.width])
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        runs: dict[str, list[dict]] = {"memory": [], "stream": []}
        digests = {}
        for rep in range(args.reps):
            for mode in ("memory", "stream"):
                art = tmp / f"{mode}-{rep}"
                runs[mode].append(run_child(mode, folder, art))
                digests[mode] = digest(art)
                shutil.rmtree(art)
        best = {m: min(r["seconds"] for r in rs) for m, rs in runs.items()}
        rss = {m: max(r["peak_rss"] for r in rs) for m, rs in runs.items()}
        result = {
            "command": "python bench/stream_quantize.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "checkpoint_bytes": size, "runs": runs,
            "peak_rss_over_checkpoint": {m: rss[m] / size for m in rss},
            "stream_rss_over_memory_rss": rss["stream"] / rss["memory"],
            "stream_time_over_memory_time": best["stream"] / best["memory"],
            "same_artifact": all(digests["memory"][k] == digests["stream"][k] for k in ("manifest", "entries", "data")),
            "digests": digests,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from superweight.core.files import write_json_atomic

    write_json_atomic(args.out, result)
    print(json.dumps({k: result[k] for k in ("checkpoint_bytes", "peak_rss_over_checkpoint", "stream_rss_over_memory_rss",
                                             "stream_time_over_memory_time", "same_artifact")}, indent=1))
    return result


if __name__ == "__main__":
    main()
