"""What the streamed-against-in-memory benches share (``stream_ablate``, ``stream_eval``, ``stream_sweep``):
the same measurement in memory and streamed from the safetensors copy a real model's first load wrote,
each timed in the same run, the zero-shot task options, the perplexity text and how results are written."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def in_memory_and_streamed(lm, in_memory: Callable[[], T], streamed: Callable[[str], T]) -> tuple[T, T, dict]:
    """``in_memory()``, then ``streamed(folder)`` on ``lm``'s converted safetensors folder: (both results,
    their times and the streamed / in-memory ratio)."""
    from superweight.core.files import default_cache_dir
    from superweight.model.load import gguf_cache_folder

    t0 = time.perf_counter()
    mem = in_memory()
    in_memory_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = streamed(gguf_cache_folder(lm.source, default_cache_dir()))
    streamed_s = time.perf_counter() - t0
    return mem, out, {"in_memory_s": in_memory_s, "streamed_s": streamed_s, "streamed_over_in_memory": streamed_s / in_memory_s}


def task_options(ap: argparse.ArgumentParser, limit: int) -> None:
    """``--tokens``, ``--tasks`` and ``--limit`` (documents per task, default ``limit``)."""
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--tasks", default="piqa,lambada", help="comma-separated zero-shot tasks ('' for none)")
    ap.add_argument("--limit", type=int, default=limit, help="documents per task")


def task_list(spec: str) -> list[str]:
    return [t for t in spec.split(",") if t]


def perplexity_text() -> str:
    """WikiText-2 where its file is at hand (``../shared``), else the offline Wikipedia introductions."""
    from superweight.eval.text import wikitext_candidates

    return "wikitext2" if any(p.is_file() for p in wikitext_candidates()) else "wiki-intros"


def command(script: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces this run."""
    return f"python bench/{script} " + " ".join(sys.argv[1:] if argv is None else argv)


def write_results(path: Path, out: dict, keys: Sequence[str]) -> dict:
    """Write ``out`` (atomically) and print each model's ``keys``."""
    from superweight.core.files import write_json_atomic

    write_json_atomic(path, out)
    print(json.dumps([{k: m[k] for k in keys} for m in out["models"]], indent=1))
    return out
