"""Progress bars for long steps, shown only on an interactive terminal and never with --quiet.

>>> for window in bar(windows, "perplexity"):
...     ...
>>> with step("converting the GGUF file"):
...     convert()

Bars go to stderr (so piped stdout stays clean) and vanish when stdout is not a terminal, when
``configure(quiet=True)`` was called (the CLI's ``--quiet``), or when ``SUPERWEIGHT_PROGRESS=0``.
Off a terminal (a pipe, a log file) a running ``step`` writes a plain line to stderr every
``SUPERWEIGHT_PROGRESS_EVERY`` seconds (default 30) instead: its description, where it is (the last
``note``: a layer, a condition) and the time so far.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("superweight")
_quiet = False


def configure(quiet: bool = False) -> None:
    """Turn bars off for the rest of the process (the CLI calls this from ``setup_logging``)."""
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    if _quiet or os.environ.get("SUPERWEIGHT_PROGRESS", "1") == "0":
        return False
    return sys.stdout.isatty() and sys.stderr.isatty()


def every() -> float:
    """Seconds between plain progress lines (``SUPERWEIGHT_PROGRESS_EVERY``, default 30)."""
    try:
        return max(float(os.environ.get("SUPERWEIGHT_PROGRESS_EVERY", "30")), 0.01)
    except ValueError:
        return 30.0


def plain() -> bool:
    """Plain progress lines instead of bars: not quiet, not ``SUPERWEIGHT_PROGRESS=0``, not a terminal."""
    if _quiet or os.environ.get("SUPERWEIGHT_PROGRESS", "1") == "0":
        return False
    return not (sys.stdout.isatty() and sys.stderr.isatty())


class _Ticker:
    """Writes ``... desc: where (N s)`` to stderr every ``every()`` seconds until ``stop``."""

    def __init__(self, desc: str):
        self.desc, self.where, self.start = desc, "", time.perf_counter()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="superweight-progress", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(every()):
            where = f": {self.where}" if self.where else ""
            print(f"... {self.desc}{where} ({time.perf_counter() - self.start:.0f} s)", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


_tickers: list[_Ticker] = []  # the plain-line steps running now, innermost last


def bar(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar when ``enabled()``; the plain iterable otherwise."""
    if not enabled():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)


_running: list = []  # the spinners shown now, innermost last: (rich Status, description)


@contextlib.contextmanager
def step(desc: str) -> Iterator[None]:
    """A spinner for a step of unknown length; logs its duration at DEBUG (``--verbose`` shows it).
    ``note(text)`` shows where the step is (a streamed pass's layer) beside its description."""
    start = time.perf_counter()
    if enabled():
        from rich.console import Console

        with Console(stderr=True).status(desc) as status:
            _running.append((status, desc))
            try:
                yield
            finally:
                _running.pop()
    elif plain():
        ticker = _Ticker(desc)
        _tickers.append(ticker)
        try:
            yield
        finally:
            _tickers.remove(ticker)
            ticker.stop()
    else:
        yield
    log.debug("%s: %.1f s", desc, time.perf_counter() - start)


def note(text: str) -> None:
    """Show ``text`` beside the innermost running step's description (e.g. ``layer 12/80``), on its
    spinner or in its next plain line; nothing when no step runs."""
    if _tickers:
        _tickers[-1].where = text
    if _running:
        status, desc = _running[-1]
        status.update(f"{desc}: {text}")


@contextlib.contextmanager
def counter(total: int, desc: str, unit: str = "it") -> Iterator:
    """A bar advanced by calling the yielded function once per finished item (for callbacks)."""
    if not enabled():
        yield lambda *_: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr) as t:
        yield lambda *_: t.update(1)
