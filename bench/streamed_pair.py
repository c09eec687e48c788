"""What the streamed-against-in-memory benches share (``stream_ablate``, ``stream_eval``, ``stream_sweep``):
the same measurement in memory and streamed from the safetensors copy a real model's first load wrote,
each timed in the same run, and the zero-shot task options."""
from __future__ import annotations

import argparse
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def in_memory_and_streamed(lm, in_memory: Callable[[], T], streamed: Callable[[str], T]) -> tuple[T, T, dict]:
    """``in_memory()``, then ``streamed(folder)`` on ``lm``'s converted safetensors folder: (both results,
    their times and the streamed / in-memory ratio)."""
    from superweight.load import _gguf_cache_folder, default_cache_dir

    t0 = time.perf_counter()
    mem = in_memory()
    in_memory_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = streamed(_gguf_cache_folder(lm.source, default_cache_dir()))
    streamed_s = time.perf_counter() - t0
    return mem, out, {"in_memory_s": in_memory_s, "streamed_s": streamed_s, "streamed_over_in_memory": streamed_s / in_memory_s}


def task_options(ap: argparse.ArgumentParser, limit: int) -> None:
    """``--tokens``, ``--tasks`` and ``--limit`` (documents per task, default ``limit``)."""
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--tasks", default="piqa,lambada", help="comma-separated zero-shot tasks ('' for none)")
    ap.add_argument("--limit", type=int, default=limit, help="documents per task")


def task_list(spec: str) -> list[str]:
    return [t for t in spec.split(",") if t]
