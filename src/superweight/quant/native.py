"""Native CPU kernels (``native.c``): min/max RTN in one pass over the weights, and bit packing.

Torch runs min/max RTN as separate passes (range, then subtract / divide / round / clamp / cast,
then packing), each reading and writing the whole tensor; even fused by ``torch.compile`` it stayed
at 0.15-0.20x a plain copy. ``native.c`` does each run of a tensor in one go: its min and max, its
float16 parameters, its codes while the run is still in the L1 cache; a second function packs the
codes. Both are plain C with the same IEEE float operations in the same order as the torch
reference (built without ``-ffast-math``), so their codes, parameters and packed bytes are bitwise
those of ``quant/kernels.py`` and ``pack.pack_bits`` (``tests/test_quant_native.py`` checks it,
ties, signed zeros and float16 edge cases included).

The library is compiled on first use with the C compiler the machine has (``$CC`` or ``cc``,
``-O3 -march=native``, about a second) into ``$SUPERWEIGHT_CACHE`` (default
``~/.cache/superweight``), keyed by the source, the flags and the CPU. Calls release the GIL, so
the runs of a large tensor are split over ``torch.get_num_threads()`` Python threads. If there is
no compiler, or ``SUPERWEIGHT_NATIVE=0``, or the tensor is not a contiguous float32 CPU tensor,
callers get ``None`` and run the torch path: same results, slower, never an error. A non-finite
weight or parameter also returns ``None``, so the torch path raises its own error.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=gnu11", "-fno-strict-aliasing")
PARALLEL_MIN_NUMEL = 1 << 18  # below this a tensor runs on one thread
_ENV = "SUPERWEIGHT_NATIVE"
_state: dict = {"lib": None, "tried": False, "pool": None}


def _cpu_key() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _cache_dir() -> Path:
    root = os.environ.get("SUPERWEIGHT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "superweight")
    return Path(root)


def _build(compiler: str, flags: tuple[str, ...]) -> Path:
    """The compiled library's path, building it (atomically) when the cache lacks it."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(flags).encode() + compiler.encode() + _cpu_key().encode()).hexdigest()[:16]
    target = _cache_dir() / f"superweight_native_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL:
    """Build (or find in the cache) and load the kernels compiled with ``flags``; raises OSError or
    subprocess.SubprocessError when that fails. ``library()`` is the cached, never-failing entry."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) on PATH")
    lib = ctypes.CDLL(str(_build(compiler, flags)))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sw_rtn_minmax.argtypes = [ptr, i64, i64, ctypes.c_int, ptr, ctypes.c_int, ptr, ptr, ptr, i64, i64]
    lib.sw_pack_bits.argtypes = [ptr, ctypes.c_int, ptr, i64, i64]
    lib.sw_sum_squares.argtypes = [ptr, i64, i64, ptr, i64, i64]
    lib.sw_rtn_minmax.restype = lib.sw_pack_bits.restype = ctypes.c_int
    lib.sw_sum_squares.restype = None
    return lib


def set_enabled(mode: bool | None) -> None:
    """``False``: never use the native kernels in this process; ``None``: the environment decides."""
    _state["off"] = mode is False


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, or no compiler: one note, then the torch path)."""
    if _state.get("off") or os.environ.get(_ENV, "").strip() == "0":
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["lib"] = load()
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            log.warning("superweight's native kernels are unavailable (%s); the quantizer runs in torch (slower, same results)",
                        (str(detail).strip().splitlines() or [""])[0][:200])
    return _state["lib"]


def _spans(total: int, numel: int, align: int = 1) -> list[tuple[int, int]]:
    """``[0, total)`` cut into one span per thread (cut points multiples of ``align``)."""
    parts = torch.get_num_threads() if numel >= PARALLEL_MIN_NUMEL else 1
    step = max(1, -(-total // max(1, parts)))
    step = -(-step // align) * align
    return [(a, min(total, a + step)) for a in range(0, total, step)] or [(0, 0)]


def _run_spans(fn, spans: list[tuple[int, int]]) -> bool:
    """``fn(first, last)`` over the spans (threads when more than one); True when all returned 0."""
    if len(spans) == 1:
        return fn(*spans[0]) == 0
    if _state["pool"] is None:
        _state["pool"] = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="superweight-native")
    return all(code == 0 for code in _state["pool"].map(lambda span: fn(*span), spans))


def _usable(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()


def rtn_minmax(x2: torch.Tensor, size: int, qmax: int, param_dtype: torch.dtype, bounds: torch.Tensor | None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Min/max RTN of ``x2`` (``[rows, row_len]`` float32) in runs of ``size``: ``(codes uint8
    [rows, row_len], scale, zero [rows, runs] in param_dtype)``, bitwise ``search.UniformGrid``'s
    minmax + codes; None when the native path does not apply (see the module doc)."""
    lib = library()
    if lib is None or not _usable(x2) or x2.dim() != 2 or param_dtype not in (torch.float16, torch.float32):
        return None
    if bounds is not None:
        bounds = bounds.detach().to(device="cpu", dtype=torch.float32).contiguous()
    rows, row_len = x2.shape
    runs = -(-row_len // size)
    codes = torch.empty((rows, row_len), dtype=torch.uint8)
    scale = torch.empty((rows, runs), dtype=param_dtype)
    zero = torch.empty((rows, runs), dtype=param_dtype)
    args = (x2.data_ptr(), row_len, size, qmax, None if bounds is None else bounds.data_ptr(),
            int(param_dtype == torch.float16), scale.data_ptr(), zero.data_ptr(), codes.data_ptr())
    if not _run_spans(lambda a, b: lib.sw_rtn_minmax(*args, a, b), _spans(rows * runs, x2.numel())):
        return None
    return codes, scale, zero


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor | None:
    """``pack.pack_bits`` of uint8 codes (1-7 bits), or None when the native path does not apply."""
    lib = library()
    if lib is None or not 1 <= bits <= 7 or codes.device.type != "cpu" or codes.dtype != torch.uint8:
        return None
    c = codes.reshape(-1).contiguous()
    n = c.numel()
    out = torch.empty(-(-n * bits // 8), dtype=torch.uint8)
    if not _run_spans(lambda a, b: lib.sw_pack_bits(c.data_ptr(), bits, out.data_ptr(), a, b), _spans(n, n, 8)):
        return None
    return out


SUM_CHUNK = 1 << 16


def sum_squares(x: torch.Tensor) -> tuple[float, float] | None:
    """``(sum x, sum x^2)`` of a float32 CPU tensor in float64: fixed-size chunks summed in a fixed
    order, then added exactly (``math.fsum``), so the result does not depend on the thread count;
    None when the native path does not apply."""
    lib = library()
    if lib is None or not _usable(x):
        return None
    n = x.numel()
    chunks = max(1, -(-n // SUM_CHUNK))
    sums = torch.zeros(2 * chunks, dtype=torch.float64)
    _run_spans(lambda a, b: lib.sw_sum_squares(x.data_ptr(), n, SUM_CHUNK, sums.data_ptr(), a, b) or 0,
               _spans(chunks if n else 0, n))
    pairs = sums.view(-1, 2).tolist()
    return math.fsum(p[0] for p in pairs), math.fsum(p[1] for p in pairs)
