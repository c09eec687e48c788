"""One base for every result the tool writes: typed dataclasses that round-trip through versioned JSON.

A result class sets ``KIND`` (what the file holds, used in messages) and ``VERSION`` (bumped when
its schema changes). ``to_dict`` / ``from_dict`` default to the dataclass fields (nested
``Versioned`` / dataclass fields are handled by overriding ``_decode``); ``save`` writes
atomically and ``load`` turns every malformed file into one ``SuperweightError`` line::

    @dataclass
    class SweepResult(Versioned):
        KIND: ClassVar[str] = "sweep"
        VERSION: ClassVar[int] = 1
        rows: list[dict]

    SweepResult(rows=[]).save("sweep.json")
    SweepResult.load("sweep.json")
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import SuperweightError
from .files import read_json, write_json_atomic
from .version import __version__

T = TypeVar("T", bound="Versioned")


class Versioned:
    """Mixin for dataclass results: ``to_dict``, ``from_dict``, ``save``, ``load``, one version check."""

    KIND: ClassVar[str] = "result"
    VERSION: ClassVar[int] = 1
    WRITER: ClassVar[str] = ""  # the command that writes such a file, named in error messages

    @classmethod
    def hint(cls, verb: str = "write it with") -> str:
        """``": write it with `superweight ...`"``, the tail of an error message (empty without a writer)."""
        return f": {verb} {cls.WRITER}" if cls.WRITER else ""

    def to_dict(self) -> dict:
        body = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"kind": self.KIND, "version": self.VERSION, "tool_version": __version__, **body}

    @classmethod
    def check_version(cls, d: dict, source: str = "") -> None:
        """The file's ``kind`` (when it names one) is this class's, and its ``version`` this class's."""
        kind = d.get("kind")
        where = f"{source} " if source else "the data "
        if isinstance(kind, str) and kind != cls.KIND:
            raise SuperweightError(f"{where}is {_a(kind)} {kind} file, not {_a(cls.KIND)} {cls.KIND} file{cls.hint()}")
        if d.get("version") != cls.VERSION:
            raise SuperweightError(
                f"{where}is {_a(cls.KIND)} {cls.KIND} file of version {d.get('version')!r}, not {cls.VERSION} (another superweight "
                f"version wrote it){cls.hint('re-run')}"
            )

    @classmethod
    def from_dict(cls: type[T], d: dict, source: str = "") -> T:
        cls.check_version(d, source)
        try:
            return cls(**cls._decode(d))  # type: ignore[call-arg]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            where = source or "the data"
            raise SuperweightError(f"{where} is not a valid {cls.KIND} file ({exc}){cls.hint()}") from None

    @classmethod
    def _decode(cls, d: dict) -> dict[str, Any]:
        """Constructor keyword arguments from a dict; override to rebuild nested types."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return {k: v for k, v in d.items() if k in names}

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        data = read_json(path, cls.KIND, cls.hint())
        return cls.from_dict(data, str(path))


@dataclass
class Table:
    """One table of a result, as text cells: printed by the CLI (``cli.console``) and written by the report."""

    title: str
    header: list[str]
    rows: list[list[str]]


def num(x: float | None, fmt: str = "{:.4g}") -> str:
    """A table cell: ``-`` for a missing number."""
    return "-" if x is None else fmt.format(x)


def _a(noun: str) -> str:
    """The article before ``noun``: "an ablation", "a detection"."""
    return "an" if noun[:1].lower() in "aeio" else "a"


def _plain(value: Any) -> Any:
    """JSON-ready copy of a field value: nested results and dataclasses become dicts, tuples lists."""
    if isinstance(value, Versioned):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
