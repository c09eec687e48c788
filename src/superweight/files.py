"""Atomic writes and JSON reads with one-line errors, shared by every step that touches disk."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import SuperweightError


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON to ``path`` through a temporary file, so no half-written file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


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


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` is moved aside, then deleted."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Write a folder all or nothing: fill the yielded temporary folder; on success it replaces
    ``out``, on any error it is deleted and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
