"""Streaming detection on a checkpoint on disk: peak RSS / checkpoint size, wall time / cold read time.

    python bench/stream.py --model /tmp/big-llama            # a checkpoint from make_big_model.py
    python bench/stream.py --size-gb 3 --dtype bfloat16      # makes a small one in a temp folder

The detection time excludes Python imports (the child imports the model's modeling module before
starting the clock; ``process_s`` is the whole child process). Both timings start from a cold
page cache: each shard is evicted with
``posix_fadvise(DONTNEED)`` (and ``/proc/sys/vm/drop_caches`` when writable) before the baseline
read (every byte of every shard, once, sequentially) and again before the detection. Detection
runs in a child process that reports its own peak RSS (``VmHWM``), its RSS after imports, the wall
time of ``stream_detect`` and the coordinates it found; the planted coordinates come from
``superweight_planted.json`` when the checkpoint has one.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TARGET_RSS, TARGET_TIME = 0.25, 1.5


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def evict(folder: Path) -> bool:
    """Drop the checkpoint's pages from the page cache; True when the global drop also worked."""
    for path in shards(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def read_once(folder: Path, chunk: int = 16 << 20) -> float:
    """Seconds to read every shard once, sequentially."""
    buf = bytearray(chunk)
    t0 = time.perf_counter()
    for path in shards(folder):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def planted_method(folder: Path) -> str:
    """The detection method that finds the checkpoint's plant: ``superweight_planted.json``'s
    ``method``, else the paper's (make_big_model.py plants a down-projection spike in a random
    model, which has no residual-stream super activation for the default trace method to follow)."""
    planted = folder / "superweight_planted.json"
    return json.loads(planted.read_text()).get("method", "paper") if planted.is_file() else "paper"


def child(folder: str, dtype: str, threads: int | None, device: str = "cpu", prefetch: bool = True,
          method: str | None = None) -> None:
    """Run in a fresh process: stream_detect, print one JSON line."""
    import logging

    import torch

    import superweight.model.streamed as stream
    import superweight.find.streamed as sd
    from superweight.model.device import resolve_device

    if threads:
        torch.set_num_threads(threads)

    logging.basicConfig(level=logging.WARNING)
    counts: dict = {}  # stream_detect's own count of its disk work (its INFO line), kept for the JSON

    class _Counts(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("streamed %d layers"):
                counts.update(layers=record.args[0], layer_reads=record.args[1], passes=record.args[2])

    sd.log.setLevel(logging.INFO)
    sd.log.addHandler(_Counts())
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    # Python imports are a fixed cost (seconds, tens of seconds on a loaded machine) that does not
    # grow with the checkpoint: import the model's modeling module before the clock starts.
    t_imports = time.perf_counter()
    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(folder))]
    imports_s = time.perf_counter() - t_imports
    rss_imports = _status("VmRSS")
    t0 = time.perf_counter()
    if not prefetch:  # the same detection with the read-ahead thread off (the kernel's readahead only)
        sd.StreamedModel = functools.partial(stream.StreamedModel, prefetch=False)
    dev = resolve_device(device)
    method = method or planted_method(Path(folder))
    result = sd.stream_detect(folder, dtype=dtype, model_name=folder, device=dev, method=method)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    print(json.dumps({
        "stream_s": wall, "model_imports_s": imports_s, "peak_rss": _status("VmHWM"), "rss_after_imports": rss_imports,
        "method": method, "found": [list(c) for c in result.coords], "iterations": result.iterations, **counts,
        "torch_threads": torch.get_num_threads(), "device": str(dev), "prefetch": prefetch,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
    }))


def run_child(folder: Path, dtype: str, threads: int | None, device: str = "cpu", prefetch: bool = True,
              method: str | None = None) -> tuple[dict, float]:
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", str(folder), "--dtype", dtype, "--device", device]
    cmd += ["--method", method] if method else []
    cmd += ([] if prefetch else ["--no-prefetch"]) + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"streaming detection failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), total


def bench(folder: Path, dtype: str, threads: int | None = None, device: str = "cpu", compare: bool = False,
          method: str | None = None) -> dict:
    size = sum(p.stat().st_size for p in shards(folder))
    dropped = evict(folder)
    read_s = read_once(folder)
    without = {}
    if compare:  # the same run without the read-ahead thread (the kernel's readahead only), cold too
        evict(folder)
        off, _ = run_child(folder, dtype, threads, device, prefetch=False, method=method)
        without = {"no_prefetch": off, "no_prefetch_time_ratio": off["stream_s"] / read_s}
    evict(folder)
    out, process_s = run_child(folder, dtype, threads, device, method=method)
    planted_file = folder / "superweight_planted.json"
    planted = json.loads(planted_file.read_text()) if planted_file.is_file() else None
    coord = [planted["layer"], planted["row"], planted["col"]] if planted else None
    return {
        "checkpoint": str(folder), "checkpoint_bytes": size, "dtype": dtype,
        "read_s": read_s, "read_GBps": size / read_s / 1e9, "page_cache_dropped": dropped,
        **out, "process_s": process_s,
        "rss_ratio": out["peak_rss"] / size, "time_ratio": out["stream_s"] / read_s,
        "targets": {"rss_ratio": TARGET_RSS, "time_ratio": TARGET_TIME},
        "planted": coord, "found_planted": coord in out["found"] if coord else None,
        "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "python": platform.python_version()},
        **without,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a safetensors checkpoint folder (default: make one)")
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of the checkpoint to make (GiB)")
    ap.add_argument("--width", default="7b")
    ap.add_argument("--dtype", default="bfloat16", help="detection dtype (bfloat16: the checkpoint's own)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "stream.json")
    ap.add_argument("--threads", type=int, help="torch threads for detection (default: torch's own)")
    ap.add_argument("--device", default="cpu", help="where layers run: cpu, cuda, auto")
    ap.add_argument("--method", choices=["trace", "paper"],
                    help="detection method (default: the plant's, else the paper's; see planted_method)")
    ap.add_argument("--compare-prefetch", action="store_true", help="also time a run without the read-ahead thread")
    ap.add_argument("--no-prefetch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.dtype, args.threads, args.device, not args.no_prefetch, args.method)
        return {}
    tmp = None
    folder = args.model
    if folder is None:
        sys.path.insert(0, str(ROOT))
        from make_big_model import main as make

        tmp = Path(tempfile.mkdtemp(prefix="sw-stream-"))
        folder = tmp / "model"
        make(["--size-gb", str(args.size_gb), "--out", str(folder), "--width", args.width])
    try:
        result = bench(folder, args.dtype, args.threads, args.device, args.compare_prefetch, args.method)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["command"] = "python bench/stream.py " + " ".join(argv if argv is not None else sys.argv[1:])
    from superweight.core.files import write_json_atomic

    write_json_atomic(args.out, result)
    print(json.dumps({k: result[k] for k in ("checkpoint_bytes", "read_s", "stream_s", "peak_rss", "rss_ratio",
                                             "time_ratio", "found", "planted")}
                      | ({"no_prefetch_time_ratio": result["no_prefetch_time_ratio"]} if args.compare_prefetch else {}),
                      indent=1))
    return result


if __name__ == "__main__":
    main()
