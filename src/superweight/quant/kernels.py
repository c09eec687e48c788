"""Fused element-wise kernels of min/max RTN: one plain torch implementation, compiled for large tensors.

Min/max RTN is a dozen cheap element-wise passes (range, subtract, divide, round, clamp, cast;
dequantize: cast, multiply, add). Run eagerly each pass reads and writes the
whole tensor, so the quantizer ran at 0.04-0.09x a plain copy. The functions here are written once,
in plain torch, and run either eagerly or through ``torch.compile`` (inductor), which fuses each of
them into one loop over the weights. Both runs compute the same float32 operations in the same
order (inductor compiles with ``-ffp-contract=off``, so no multiply-add is fused into an FMA; the
reductions are min/max, exact in any order), so compiled and eager codes, parameters and
dequantized values are bitwise equal (``tests/test_quant_kernels.py`` checks it, ties included).

When: ``SUPERWEIGHT_COMPILE=1`` compiles every call, ``0`` none; unset, a call compiles when its
tensor holds at least ``COMPILE_MIN_NUMEL`` elements (``set_compile`` overrides both). Compiling
costs seconds once per process and shape family (inductor caches the kernels on disk for later
processes). If it fails for any reason (no C++ compiler, no Python headers, an unsupported device)
one note is logged and everything runs eagerly from then on: never an error.

Runs are cut without padding: the full runs of each row are a ``[rows, full, size]`` view, the
short last run (when ``size`` does not divide the row) a ``[rows, tail]`` slice, each with its own
``[rows, runs]`` parameters broadcast; the results are concatenated (compiled as well: inductor
writes the two parts and ``aten.cat`` joins them, ~0.03 s over SmolLM2's 106M weights; gathering
each element's parameters by ``column // size`` instead, or copying both parts into slices of one
output, compiled to code 10x and 50x slower on this CPU, torch 2.13).

Bit packing (``pack.pack_bits``) is not compiled: inductor's code for its word-wise shifts ran
2-5x slower than eager torch on this CPU (torch 2.13).
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger(__name__)

COMPILE_MIN_NUMEL = 1 << 20
_ENV = "SUPERWEIGHT_COMPILE"
_state: dict = {"force": None, "failed": False, "compiled": {}}


def set_compile(mode: bool | None) -> None:
    """``True``: compile every call; ``False``: never; ``None``: the environment / size rule."""
    _state["force"] = mode


def compile_failed() -> bool:
    """True once compiling failed in this process (everything runs eagerly since)."""
    return bool(_state["failed"])


def wants_compile(numel: int) -> bool:
    """Whether a call on a tensor of ``numel`` elements runs compiled (see the module doc)."""
    if _state["failed"]:
        return False
    if _state["force"] is not None:
        return bool(_state["force"])
    env = os.environ.get(_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    return numel >= COMPILE_MIN_NUMEL


def run(fn: Callable, numel: int, *args):
    """``fn(*args)``, compiled when ``wants_compile(numel)``; eager after any compile failure."""
    if not wants_compile(numel):
        return fn(*args)
    compiled = _state["compiled"].get(fn)
    if compiled is None:
        compiled = _state["compiled"][fn] = torch.compile(fn, dynamic=True)
    try:
        return compiled(*args)
    except Exception as exc:  # inductor raises many kinds (no compiler, no headers, a device it lacks)
        out = fn(*args)  # an error of the inputs raises here again, and is not blamed on the compiler
        _state["failed"] = True
        first = (str(exc).strip().splitlines() or [""])[0]
        log.warning("torch.compile is unavailable here (%s: %s); the quantizer runs eagerly (slower, same results)",
                    type(exc).__name__, first[:200])
        return out


# ---------------------------------------------------------------- the kernels (plain torch)


def _split(x2: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, row_len]`` as the full runs ``[rows, full, size]`` (a view) and the tail ``[rows, tail]``."""
    rows, full = x2.shape[0], x2.shape[1] // size
    return x2[:, : full * size].reshape(rows, full, size), x2[:, full * size:]


def per_run(fn: Callable, x2: torch.Tensor, size: int, *params: torch.Tensor) -> torch.Tensor:
    """``fn(values, *params)`` over the runs of ``x2`` (``[rows, row_len]``), each run's
    ``[rows, runs]`` parameters broadcast over its elements: ``[rows, row_len]``, no padding."""
    main, tail = _split(x2, size)
    full = main.shape[1]
    out = fn(main, *(p[:, :full, None] for p in params)).reshape(x2.shape[0], full * size)
    if tail.shape[1] == 0:
        return out
    return torch.cat([out, fn(tail, *(p[:, -1:] for p in params))], dim=1)


def run_range(x2: torch.Tensor, size: int, bounds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each run, ``[rows, runs]`` each; ``bounds`` (``[2]``: clip low, high) clamps
    them as clamping every value first would (clamping is monotone)."""
    main, tail = _split(x2, size)
    lo, hi = main.amin(-1), main.amax(-1)
    if tail.shape[1]:
        lo = torch.cat([lo, tail.amin(-1, keepdim=True)], dim=1)
        hi = torch.cat([hi, tail.amax(-1, keepdim=True)], dim=1)
    if bounds is not None:
        lo, hi = lo.clamp(bounds[0], bounds[1]), hi.clamp(bounds[0], bounds[1])
    return lo, hi


def rtn_codes(x2: torch.Tensor, size: int, grid, scale: torch.Tensor, zero: torch.Tensor,
              bounds: torch.Tensor | None) -> torch.Tensor:
    """``grid.codes`` of every value (clamped to ``bounds`` first when given), uint8 ``[rows, row_len]``."""

    def codes(v: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if bounds is not None:
            v = v.clamp(bounds[0], bounds[1])
        return grid.codes(v, (s, z)).to(torch.uint8)

    return per_run(codes, x2, size, scale, zero)


def dense(codes2: torch.Tensor, size: int, grid, *params: torch.Tensor) -> torch.Tensor:
    """Codes (uint8 ``[rows, row_len]``) to float32 values: ``grid.levels_``, the artifact's dequantization."""
    return per_run(lambda q, *p: grid.levels_(q.float(), p), codes2, size, *params)
