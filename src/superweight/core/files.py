"""Atomic writes and JSON reads with one-line errors, shared by every step that touches disk."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .errors import SuperweightError


def default_cache_dir() -> Path:
    """superweight's cache (converted GGUF models, the native kernels): ``$SUPERWEIGHT_CACHE``, else
    ``$XDG_CACHE_HOME/superweight`` or ``~/.cache/superweight``."""
    env = os.environ.get("SUPERWEIGHT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "superweight"


def check_output(path: str | Path, what: str = "--out", folder: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written: a parent that is a file,
    a folder the user cannot write, a file path that is an existing folder (or a folder path that
    is an existing file). Writes nothing: a probe file is created and removed in the nearest
    existing folder above ``path``."""
    path = Path(path).expanduser()
    if not folder and path.is_dir():
        raise SuperweightError(f"{what} {path} is a folder: pass a file path, e.g. {path / 'result.json'}")
    if folder and path.exists() and not path.is_dir():
        raise SuperweightError(f"{what} {path} is a file: pass a folder path")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SuperweightError(f"{what} {path}: {parent} is a file, not a folder: pick another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".superweight-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SuperweightError(f"{what} {path}: cannot write in {parent} ({reason}): pick a folder you can write") from None
    return path


def _disk_error(path: Path, exc: OSError) -> SuperweightError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return SuperweightError(f"cannot write {path} ({reason}): pick another path or free space")


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; return them, deepest first (to undo)."""
    missing = [p for p in path.absolute().parents if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _undo_parents(made: list[Path]) -> None:
    for folder in made:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so no half-written file is left (also
    on Ctrl-C / SIGTERM); a path that cannot be written is a one-line ``SuperweightError``."""
    path, made = Path(path), []
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        made = _make_parents(path)
        tmp.write_text(text)
        with signals_held():
            tmp.replace(path)
    except BaseException as exc:
        with signals_held():
            tmp.unlink(missing_ok=True)
            if not path.exists():
                _undo_parents(made)
        if isinstance(exc, OSError):
            raise _disk_error(path, exc) from None
        raise


def write_json_atomic(path: str | Path, data: dict) -> None:
    """``data`` as indented JSON, written with ``write_text_atomic``."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path, what: str, hint: str = "") -> dict:
    """A JSON object from ``path``; a missing, unreadable or non-object file is a one-line error."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SuperweightError(f"no such {what} file: {path}{hint}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SuperweightError(f"{path} is not a JSON {what} file ({exc}){hint}") from None
    if not isinstance(data, dict):
        raise SuperweightError(f"{path} is not a {what} file (expected a JSON object){hint}")
    return data


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Delay SIGINT and SIGTERM until the block is done (the renames that publish a result, the
    clean-up of a staging folder), so an interruption leaves the old result or the new one, never
    neither. The Python-level handlers are swapped for a recorder (a thread signal mask would not
    do: the OS may hand a process signal to any other thread); a signal that came meanwhile is then
    passed to the original handler. Outside the main thread, where handlers cannot change, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in pending[:1]:
            handler = old[s]
            if callable(handler):
                handler(s, None)  # raises: KeyboardInterrupt, or the CLI's Interrupted
            elif handler in (signal.SIG_DFL, None):
                signal.raise_signal(s)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` is moved aside, then deleted."""
    with signals_held():
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (else 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _files_readable(folder: Path) -> None:
    """Give the files under ``folder`` the mode a plain ``open()`` would (0666 minus the umask):
    safetensors writes its files 0600, which would keep an artifact from the user's group."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            path.chmod(mode)


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Write a folder all or nothing: fill the yielded temporary folder; on success it replaces
    ``out``, on any error it is deleted and ``out`` is left as it was."""
    out, made = Path(out), []
    try:
        made = _make_parents(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())
    except OSError as exc:
        _undo_parents(made)
        raise _disk_error(out, exc) from None
    try:
        yield tmp
        _files_readable(tmp)
        replace_dir(tmp, out)
    except BaseException as exc:
        with signals_held():  # a second Ctrl-C must not stop the clean-up half way
            shutil.rmtree(tmp, ignore_errors=True)
            if not out.exists():
                _undo_parents(made)
        if isinstance(exc, OSError):
            raise _disk_error(out, exc) from None
        raise
