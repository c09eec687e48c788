"""Native CPU kernels (``native.c``) for min/max RTN: quantize (packing on the fly), pack, dequantize.

Torch runs min/max RTN as separate passes (range, then subtract / divide / round / clamp / cast,
then packing), each reading and writing the whole tensor; even fused by ``torch.compile`` it stayed
at 0.15-0.20x a plain copy. ``native.c`` does each run of a tensor in one go: its min and max, its
float16 parameters, its codes while the run is still in the L1 cache, packed into the artifact's
bit stream when asked; it also packs codes, dequantizes, writes the fake-quantized weights back with
their SQNR sums, and sums a tensor for the z-score clip. The C code does the same IEEE float
operations in the same order as the torch reference (built without ``-ffast-math`` and with
``-ffp-contract=off``), so codes, parameters, packed bytes and dequantized values are bitwise those
of ``quant/kernels.py``, ``search.UniformGrid`` and ``pack.pack_bits`` (``tests/test_quant_native.py``
checks it, ties, signed zeros and float16 edge cases included).

The library is compiled on first use with the C compiler the machine has (``$CC``, ``cc`` or
``gcc``; ``-O3 -march=native -fopenmp``, about a second) into ``native/`` of superweight's cache
(``$SUPERWEIGHT_CACHE``, default ``~/.cache/superweight``), keyed by the source, the flags and the
CPU. ``$SUPERWEIGHT_CFLAGS`` (split on spaces) is appended to the flags: ``-mno-avx2`` builds the
portable kernels that CI's second test pass runs, ``-march=x86-64`` a baseline build. Each call runs its loop on ``torch.get_num_threads()`` OpenMP threads (one for small calls).
The library links ``libgomp.so.1``, the name of the runtime torch's Linux wheels load, so the
dynamic linker hands it torch's runtime and its warm threads (Python threads were tried first:
waking a pool thread cost ~0.4 ms in this 2-core VM, more than a whole 1536x576 matrix takes).
Without OpenMP it builds for one thread, without ``-march=native`` portable. If there is no
compiler, or ``SUPERWEIGHT_NATIVE=0``, or a tensor is not a contiguous float32 CPU tensor, callers
get ``None`` and run the torch path: same results, slower, never an error. A non-finite weight or
parameter also returns ``None``, so the torch path raises its own error.
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
from pathlib import Path

import torch

from ..core.files import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-std=gnu11", "-fno-strict-aliasing")
OPENMP = ("-fopenmp",)  # tried first; without it every call runs on one thread
PARALLEL_MIN_NUMEL = 1 << 16  # below this a call runs on one thread
_ENV = "SUPERWEIGHT_NATIVE"
_CFLAGS_ENV = "SUPERWEIGHT_CFLAGS"
_state: dict = {"lib": None, "tried": False}


def _cpu_key() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _cache_dir() -> Path:
    """``native/`` in superweight's cache (``files.default_cache_dir``); a per-user folder under the
    temporary directory when that cannot be written."""
    root = default_cache_dir() / "native"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"superweight-native-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


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


def extra_flags() -> tuple[str, ...]:
    """``$SUPERWEIGHT_CFLAGS`` split on whitespace: flags appended to every build (e.g. ``-mno-avx2``)."""
    return tuple(os.environ.get(_CFLAGS_ENV, "").split())


def load(flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL:
    """Build (or find in the cache) and load the kernels compiled with ``flags`` and then
    ``extra_flags()``; raises OSError or subprocess.SubprocessError when that fails. ``library()`` is
    the cached, never-failing entry."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) on PATH")
    lib = ctypes.CDLL(str(_build(compiler, flags + extra_flags())))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.sw_rtn_minmax.argtypes = [ptr, i64, i64, i64, i32, ptr, i32, ptr, ptr, ptr, i32, i32]
    lib.sw_pack_bits.argtypes = [ptr, i64, i32, ptr, i32]
    lib.sw_unpack_bits.argtypes = [ptr, i64, i32, ptr, i32]
    lib.sw_unpack_bits.restype = ctypes.c_int
    lib.sw_sum_squares.argtypes = [ptr, i64, i64, ptr, i32]
    lib.sw_rtn_dense.argtypes = [ptr, i64, i64, i64, i32, ptr, ptr, ptr, i32]
    lib.sw_sqnr_sums.argtypes = [ptr, ptr, i64, i64, ptr, i32]
    lib.sw_rtn_write_back.argtypes = [ptr, ptr, i64, i64, i64, i32, ptr, ptr, ptr, ptr, i32]
    lib.sw_rtn_write_back.restype = None
    lib.sw_rtn_write_back_bf16.argtypes = lib.sw_rtn_write_back.argtypes
    lib.sw_rtn_write_back_bf16.restype = None
    lib.sw_int4_pack.argtypes = [ptr, i64, i64, ptr, i32]
    lib.sw_int4_mm.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i32]
    lib.sw_int4_dense.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ptr, i32]
    lib.sw_int4_pack.restype = lib.sw_int4_mm.restype = lib.sw_int4_dense.restype = None
    lib.sw_rtn_minmax.restype = lib.sw_pack_bits.restype = ctypes.c_int
    lib.sw_sum_squares.restype = lib.sw_rtn_dense.restype = lib.sw_sqnr_sums.restype = None
    return lib


def set_enabled(mode: bool | None) -> None:
    """``False``: never use the native kernels in this process; ``None``: the environment decides."""
    _state["off"] = mode is False


def _first_that_loads(variants: tuple[tuple[str, ...], ...]) -> ctypes.CDLL:
    """The first flag set that builds and loads (no OpenMP: one thread; no ``-march=native``: a
    compiler that lacks it); the last failure is raised."""
    for flags in variants[:-1]:
        try:
            return load(flags)
        except (OSError, subprocess.SubprocessError):
            continue
    return load(variants[-1])


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, or no compiler: one note, then the torch path)."""
    if _state.get("off") or os.environ.get(_ENV, "").strip() == "0":
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["lib"] = _first_that_loads((FLAGS + OPENMP, FLAGS, tuple(f for f in FLAGS if f != "-march=native")))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            log.warning("superweight's native kernels are unavailable (%s); the quantizer runs in torch (slower, same results)",
                        (str(detail).strip().splitlines() or [""])[0][:200])
    return _state["lib"]


def _threads(numel: int) -> int:
    """Threads for a call on ``numel`` elements: torch's intra-op count, one for small calls."""
    return torch.get_num_threads() if numel >= PARALLEL_MIN_NUMEL else 1


def _usable(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    return x.device.type == "cpu" and x.dtype in dtypes and x.is_contiguous()


def rtn_minmax(x2: torch.Tensor, size: int, qmax: int, param_dtype: torch.dtype, bounds: torch.Tensor | None,
               pack_bits: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Min/max RTN of ``x2`` (``[rows, row_len]`` float32) in runs of ``size``: ``(codes uint8
    [rows, row_len], scale, zero [rows, runs] in param_dtype)``, bitwise ``search.UniformGrid``'s
    minmax + codes. ``pack_bits`` (1-7): the codes come packed instead (``pack.pack_bits``), never
    stored one per byte; that needs ``row_len`` and ``size`` multiples of 8. None when the native
    path does not apply (see the module doc)."""
    lib = library()
    if lib is None or not _usable(x2) or x2.dim() != 2 or param_dtype not in (torch.float16, torch.float32):
        return None
    rows, row_len = x2.shape
    if pack_bits and not (1 <= pack_bits <= 7 and row_len % 8 == 0 and size % 8 == 0 and 2**pack_bits > qmax):
        return None
    if bounds is not None:
        bounds = bounds.detach().to(device="cpu", dtype=torch.float32).contiguous()
    runs = -(-row_len // size)
    codes = torch.empty(rows * row_len * pack_bits // 8 if pack_bits else (rows, row_len), dtype=torch.uint8, device="cpu")
    scale = torch.empty((rows, runs), dtype=param_dtype, device="cpu")
    zero = torch.empty((rows, runs), dtype=param_dtype, device="cpu")
    bad = lib.sw_rtn_minmax(x2.data_ptr(), rows, row_len, size, qmax, None if bounds is None else bounds.data_ptr(),
                            int(param_dtype == torch.float16), scale.data_ptr(), zero.data_ptr(), codes.data_ptr(),
                            pack_bits, _threads(x2.numel()))
    return None if bad else (codes, scale, zero)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor | None:
    """``pack.pack_bits`` of uint8 codes (1-7 bits), or None when the native path does not apply."""
    lib = library()
    if lib is None or not 1 <= bits <= 7 or codes.device.type != "cpu" or codes.dtype != torch.uint8:
        return None
    c = codes.reshape(-1).contiguous()
    n = c.numel()
    out = torch.empty(-(-n * bits // 8), dtype=torch.uint8, device="cpu")
    return None if lib.sw_pack_bits(c.data_ptr(), n, bits, out.data_ptr(), _threads(n)) else out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor | None:
    """``pack.unpack_bits``: the first ``n`` codes (1-7 bits) of a packed stream, or None when the native
    path does not apply."""
    lib = library()
    if lib is None or not 1 <= bits <= 7 or packed.device.type != "cpu" or packed.dtype != torch.uint8:
        return None
    p = packed.reshape(-1).contiguous()
    out = torch.empty(n, dtype=torch.uint8, device="cpu")
    return None if lib.sw_unpack_bits(p.data_ptr(), n, bits, out.data_ptr(), _threads(n)) else out


SUM_CHUNK = 1 << 16


def _chunked_sums(kernel, n: int, *tensors: torch.Tensor) -> tuple[float, float]:
    """Two float64 sums per fixed-size chunk (``kernel(*ptrs, n, chunk, sums, threads)``), each
    chunk in a fixed order, the chunks added exactly (``math.fsum``): the same for any thread count."""
    chunks = max(1, -(-n // SUM_CHUNK))
    sums = torch.zeros(2 * chunks, dtype=torch.float64, device="cpu")
    if n:
        kernel(*(t.data_ptr() for t in tensors), n, SUM_CHUNK, sums.data_ptr(), _threads(n))
    pairs = sums.view(-1, 2).tolist()
    return math.fsum(p[0] for p in pairs), math.fsum(p[1] for p in pairs)


def sum_squares(x: torch.Tensor) -> tuple[float, float] | None:
    """``(sum x, sum x^2)`` of a float32 CPU tensor in float64; None when the native path does not apply."""
    lib = library()
    if lib is None or not _usable(x):
        return None
    return _chunked_sums(lib.sw_sum_squares, x.numel(), x)


def sqnr_sums(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float] | None:
    """``(sum x^2, sum (y - x)^2)`` in float64 of two float32 CPU tensors of one shape, or None."""
    lib = library()
    if lib is None or not (_usable(x) and _usable(y)) or x.shape != y.shape:
        return None
    return _chunked_sums(lib.sw_sqnr_sums, x.numel(), x, y)


def _run_params(codes2: torch.Tensor, size: int, scale: torch.Tensor, zero: torch.Tensor):
    """``(codes, scale, zero)`` contiguous when they are a CPU ``[rows, row_len]`` uint8 table and its
    ``[rows, runs]`` float16 / float32 parameters; else None."""
    if (codes2.device.type != "cpu" or codes2.dtype != torch.uint8 or codes2.dim() != 2 or scale.dtype != zero.dtype
            or scale.dtype not in (torch.float16, torch.float32) or scale.device.type != "cpu" or zero.device.type != "cpu"):
        return None
    rows, row_len = codes2.shape
    if tuple(scale.shape) != (rows, -(-row_len // size)) or scale.shape != zero.shape:
        return None
    return codes2.contiguous(), scale.contiguous(), zero.contiguous()


def rtn_dense(codes2: torch.Tensor, size: int, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor | None:
    """``codes * scale + zero`` per run (``search.UniformGrid.levels_``), float32 ``[rows, row_len]``,
    bitwise the torch kernels; None when the native path does not apply."""
    lib, parts = library(), _run_params(codes2, size, scale, zero)
    if lib is None or parts is None:
        return None
    c, s, z = parts
    out = torch.empty(tuple(c.shape), dtype=torch.float32, device="cpu")
    lib.sw_rtn_dense(c.data_ptr(), c.shape[0], c.shape[1], size, int(s.dtype == torch.float16), s.data_ptr(),
                     z.data_ptr(), out.data_ptr(), _threads(c.numel()))
    return out


def rtn_write_back(w2: torch.Tensor, codes2: torch.Tensor, size: int, scale: torch.Tensor, zero: torch.Tensor,
                   ) -> tuple[float, float] | None:
    """Overwrite ``w2`` (``[rows, row_len]`` float32 or bfloat16, contiguous) with ``codes * scale +
    zero`` per run (bitwise ``rtn_dense``, rounded to bfloat16 as ``.to(torch.bfloat16)`` rounds) in one
    pass; returns ``(sum w^2, sum (w_new - w)^2)`` in float64 over the old values, or None (nothing
    written) when the native path does not apply."""
    lib, parts = library(), _run_params(codes2, size, scale, zero)
    if lib is None or parts is None or not _usable(w2, (torch.float32, torch.bfloat16)) or w2.shape != codes2.shape:
        return None
    c, s, z = parts
    run_sums, sums = torch.empty(2 * s.numel(), dtype=torch.float64, device="cpu"), torch.zeros(2, dtype=torch.float64, device="cpu")
    fn = lib.sw_rtn_write_back_bf16 if w2.dtype == torch.bfloat16 else lib.sw_rtn_write_back
    fn(w2.data_ptr(), c.data_ptr(), c.shape[0], c.shape[1], size, int(s.dtype == torch.float16),
       s.data_ptr(), z.data_ptr(), run_sums.data_ptr(), sums.data_ptr(), _threads(c.numel()))
    return float(sums[0]), float(sums[1])


# ---------------------------------------------------------------- 4-bit linear layers (quant/runtime.py)


def int4_pack(codes2: torch.Tensor) -> torch.Tensor | None:
    """``[N, K]`` 4-bit codes (one per byte, ``K`` a multiple of 64) as ``[N, K / 8]`` int32 words in the layout
    of ``int4_mm`` (each chunk of 64: bits ``4j..4j+3`` of word ``i`` hold weight ``8j + i``), or None when the
    native path does not apply."""
    lib = library()
    if lib is None or codes2.dim() != 2 or codes2.shape[1] % 64 or codes2.dtype != torch.uint8 or codes2.device.type != "cpu":
        return None
    c = codes2.contiguous()
    out = torch.empty((c.shape[0], c.shape[1] // 8), dtype=torch.int32)
    lib.sw_int4_pack(c.data_ptr(), c.shape[0], c.shape[1], out.data_ptr(), _threads(c.numel()))
    return out


def int4_mm(x2: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, size: int,
            sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x2 @ W^T`` (float32 ``[M, K]``) for ``W = q * scale + zero`` held as ``int4_pack`` codes and float32
    ``[N, runs]`` parameters (per run ``scale * sum q x + zero * sum x``), plus the held-out entries ``sparse``:
    ``(ptr int64 [N + 1], col int32, val float32)``, row ``n``'s at ``ptr[n]:ptr[n + 1]``. The caller checks
    ``library()``."""
    lib = library()
    M, K = x2.shape
    N, runs = scale.shape
    x2 = x2.contiguous()
    work = torch.empty(M * (K + runs), dtype=torch.float32)  # the kernel's scaled x and per-run sums
    y = torch.empty((M, N), dtype=torch.float32)
    ptr, col, val = (t.data_ptr() for t in sparse) if sparse is not None else (None, None, None)
    lib.sw_int4_mm(x2.data_ptr(), work.data_ptr(), M, K, codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), N, size,
                   ptr, col, val, y.data_ptr(), _threads(N * K))
    return y


def int4_dense(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, size: int, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of ``q * scale + zero`` (float32 ``[r1 - r0, K]``, bitwise ``rtn_dense``) from ``int4_pack``
    codes. The caller checks ``library()``."""
    lib = library()
    K = codes.shape[1] * 8
    out = torch.empty((r1 - r0, K), dtype=torch.float32)
    lib.sw_int4_dense(codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), r0, r1, K, size, out.data_ptr(),
                      _threads((r1 - r0) * K))
    return out
