"""Published super weight coordinates, as data with their source, and a check against detection.

The coordinates live once, in ``superweight/find/catalog.json`` (schema version 1): each entry
names the model, the hub ids (or built-in names) it matches, its architecture, its super weights
``{layer, row, col}`` in the paper's convention, and where the numbers come from
(``paper`` = Table 2, ``authors_code`` = the authors' released code, ``measured`` = this tool,
with the command, rule and file that produced them).

``verify`` compares a detection with the entry matched by the model's names:

* ``agree``: every catalog coordinate was detected and every detected coordinate is in the
  catalog; extra detections flagged ``late_layer`` are listed but do not make it differ (the
  paper reports such a spike for Llama-2-7B layer 30 and does not call it a super weight);
* ``differ``: a catalog coordinate was not detected, or an early-layer detection is not listed;
* ``not in catalog``: no entry matches the model's names.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

from ..core.coords import Coord
from ..core.errors import SuperweightError
from ..core.results import Versioned
from ..core.files import read_json
from ..core.files import write_json_atomic

SCHEMA_VERSION = 1
SOURCE_KINDS = ("paper", "authors_code", "measured")
AGREE, DIFFER, NOT_IN_CATALOG = "agree", "differ", "not in catalog"

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class CatalogCoord:
    layer: int
    row: int
    col: int
    paper_layer: int | None = None  # where the paper's table disagrees with the authors' code
    late_layer: bool = False  # a measured late-layer spike, kept for the record

    @property
    def coord(self) -> Coord:
        return Coord(self.layer, self.row, self.col)

    def accepted(self) -> set[Coord]:
        """Detected coordinates that count as this one (the paper's layer too, when it differs)."""
        alt = {(self.paper_layer, self.row, self.col)} if self.paper_layer is not None else set()
        return {self.coord} | alt

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, False)}


@dataclass
class CatalogEntry:
    id: str
    model: str
    match: list[str]  # hub ids, built-in names or file names this entry applies to
    architecture: str  # Hugging Face class name
    super_weights: list[CatalogCoord]
    source: dict  # {"kind": paper | authors_code | measured, ...provenance}
    notes: list[str] = field(default_factory=list)

    @property
    def coords(self) -> list[Coord]:
        return [c.coord for c in self.super_weights]

    def to_dict(self) -> dict:
        d = {
            "id": self.id, "model": self.model, "match": self.match, "architecture": self.architecture,
            "super_weights": [c.to_dict() for c in self.super_weights], "source": self.source,
        }
        return {**d, "notes": self.notes} if self.notes else d

    @classmethod
    def from_dict(cls, d: dict) -> "CatalogEntry":
        return cls(
            id=d["id"], model=d["model"], match=list(d["match"]), architecture=d["architecture"],
            super_weights=[CatalogCoord(**c) for c in d["super_weights"]], source=dict(d["source"]),
            notes=list(d.get("notes", [])),
        )


@dataclass
class Catalog:
    entries: list[CatalogEntry]
    sources: dict = field(default_factory=dict)  # kind -> full reference
    convention: str = ""
    path: str = ""
    version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {
            "version": self.version, "convention": self.convention, "sources": self.sources,
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: dict, path: str = "") -> "Catalog":
        validate(d, path or "catalog")
        return cls(
            entries=[CatalogEntry.from_dict(e) for e in d["entries"]], sources=d.get("sources", {}),
            convention=d.get("convention", ""), path=path,
        )

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Catalog":
        """The catalog at ``path``, or the one shipped with the package."""
        if path is None:
            text = resources.files("superweight").joinpath("find/catalog.json").read_text()
            return cls.from_dict(json.loads(text), "superweight/find/catalog.json")

        return cls.from_dict(read_json(path, "catalog"), str(path))

    def save(self, path: str | Path) -> None:
        validate(self.to_dict(), str(path))
        write_json_atomic(path, self.to_dict())

    def get(self, entry_id: str) -> CatalogEntry | None:
        return next((e for e in self.entries if e.id == entry_id), None)

    def find(self, names: Iterable[str]) -> tuple[CatalogEntry | None, str]:
        """The entry matching one of ``names`` (exact id first, then folder name), and that name."""
        names = [n for n in names if n]
        for exact in (True, False):
            for name in names:
                for cand in candidate_names(name):
                    for entry in self.entries:
                        if any(_same(cand, m, exact) for m in entry.match):
                            return entry, name
        return None, ""


# ---------------------------------------------------------------- schema


def _fail(where: str, msg: str) -> SuperweightError:
    return SuperweightError(f"{where}: {msg} (see superweight/find/catalog.json for the format)")


def _check_coord(c: object, where: str) -> None:
    if not isinstance(c, dict) or not all(k in c for k in ("layer", "row", "col")):
        raise _fail(where, f"a super weight must be {{layer, row, col}}, got {c!r}")
    for k in ("layer", "row", "col", "paper_layer"):
        v = c.get(k, 0)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise _fail(where, f"{k} must be a non-negative integer, got {v!r}")
    unknown = set(c) - {"layer", "row", "col", "paper_layer", "late_layer"}
    if unknown:
        raise _fail(where, f"unknown super weight keys {sorted(unknown)}")


def _check_entry(e: object, where: str) -> None:
    required = ("id", "model", "match", "architecture", "super_weights", "source")
    if not isinstance(e, dict) or any(k not in e for k in required):
        raise _fail(where, f"an entry needs {', '.join(required)}")
    if not e["match"] or not all(isinstance(m, str) and m for m in e["match"]):
        raise _fail(where, "match must be a non-empty list of names")
    if e["source"].get("kind") not in SOURCE_KINDS:
        raise _fail(where, f"source.kind must be one of {', '.join(SOURCE_KINDS)}")
    if not e["super_weights"]:
        raise _fail(where, "super_weights is empty")
    for c in e["super_weights"]:
        _check_coord(c, where)


def validate(d: dict, where: str = "catalog") -> None:
    """Raise ``SuperweightError`` unless ``d`` is a well-formed catalog of this schema version."""
    if not isinstance(d, dict) or d.get("version") != SCHEMA_VERSION:
        raise _fail(where, f"version must be {SCHEMA_VERSION}")
    if not isinstance(d.get("entries"), list):
        raise _fail(where, "entries must be a list")
    seen_ids, seen_names = set(), {}
    for i, e in enumerate(d["entries"]):
        _check_entry(e, f"{where} entry {i}")
        if e["id"] in seen_ids:
            raise _fail(where, f"duplicate id {e['id']!r}")
        seen_ids.add(e["id"])
        for m in e["match"]:
            key = normalize(m)
            if key in seen_names:
                raise _fail(where, f"{m!r} is matched by both {seen_names[key]!r} and {e['id']!r}")
            seen_names[key] = e["id"]


# ---------------------------------------------------------------- matching names


def normalize(name: str) -> str:
    return name.strip().rstrip("/").lower()


def candidate_names(name: str) -> list[str]:
    """Forms of a model name worth matching: itself, a hub-cache folder's id, a path's last part.

    A hub id (``org/name``) is matched only as a whole: ``someone/llama-7b`` is not Llama 7B.
    """
    name = normalize(name)
    out = [name]
    for part in name.split("/"):
        if part.startswith("models--") and part.count("--") >= 2:
            out.append(part[len("models--"):].replace("--", "/", 1))
    if not _HUB_ID.fullmatch(name):
        out.append(name.split("/")[-1])
    return list(dict.fromkeys(out))


def _same(candidate: str, match: str, exact: bool) -> bool:
    m = normalize(match)
    return candidate == m if exact else "/" not in candidate and candidate == m.split("/")[-1]


def model_names(name: str, model=None, source: str = "") -> list[str]:
    """What a loaded model calls itself: the name asked for, the file read, the config's path."""
    config = getattr(model, "config", None)
    return [n for n in (name, source, getattr(config, "_name_or_path", "") or "") if n]


# ---------------------------------------------------------------- verdict


@dataclass
class Verdict(Versioned):
    """How detected coordinates compare with the catalog entry of the model."""

    KIND: ClassVar[str] = "catalog verdict"
    VERSION: ClassVar[int] = SCHEMA_VERSION
    WRITER: ClassVar[str] = "`superweight verify --json PATH`"
    status: str  # agree | differ | not in catalog
    model: str
    entry: str | None = None  # catalog entry id
    matched_name: str = ""
    source: dict = field(default_factory=dict)
    catalog: list[list[int]] = field(default_factory=list)
    detected: list[list[int]] = field(default_factory=list)
    missing: list[list[int]] = field(default_factory=list)  # in the catalog, not detected
    extra: list[list[int]] = field(default_factory=list)  # detected early, not in the catalog
    extra_late: list[list[int]] = field(default_factory=list)  # detected late-layer spikes, not listed
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 agree, 1 differ, 0 not in catalog (nothing to contradict; the message says so)."""
        return 1 if self.status == DIFFER else 0


def compare(entry: CatalogEntry, detected: Sequence, model: str = "", matched_name: str = "") -> Verdict:
    """Compare detected super weights (objects with layer/row/col/late_layer) with ``entry``."""
    found = {(d.layer, d.row, d.col): bool(getattr(d, "late_layer", False)) for d in detected}
    notes = list(entry.notes)
    missing, used = [], set()
    for c in entry.super_weights:
        hit = sorted(c.accepted() & set(found))
        if not hit:
            missing.append(list(c.coord))
        used.update(hit)
        if c.paper_layer is not None and (c.paper_layer, c.row, c.col) in hit and c.paper_layer != c.layer:
            notes.append(f"[{c.row}, {c.col}] was detected in layer {c.paper_layer}, the paper table's layer")
    rest = [k for k in found if k not in used]
    extra = [list(k) for k in rest if not found[k]]
    extra_late = [list(k) for k in rest if found[k]]
    return Verdict(
        status=DIFFER if missing or extra else AGREE, model=model, entry=entry.id, matched_name=matched_name,
        source=entry.source, catalog=[list(c) for c in entry.coords], detected=[list(k) for k in found],
        missing=missing, extra=extra, extra_late=extra_late, notes=notes,
    )


def verify(names: Sequence[str], detected: Sequence, catalog: Catalog | None = None) -> Verdict:
    """Find the catalog entry for ``names`` and compare ``detected`` with it."""
    catalog = catalog or Catalog.load()
    entry, matched = catalog.find(names)
    model = names[0] if names else ""
    if entry is None:
        return Verdict(status=NOT_IN_CATALOG, model=model, detected=[[d.layer, d.row, d.col] for d in detected])
    return compare(entry, detected, model, matched)


def entry_from_detection(result, entry_id: str, match: list[str], how: dict, model: str = "") -> CatalogEntry:
    """A ``measured`` catalog entry from a ``DetectionResult``, with how it was measured."""
    if not result.super_weights:
        raise SuperweightError(f"{result.model}: the detection found no super weight to record")
    source = {
        "kind": "measured", "tool_version": result.tool_version, "prompts": result.prompts,
        "rule": asdict(result.rule), **how,
    }
    coords = [CatalogCoord(s.layer, s.row, s.col, late_layer=s.late_layer) for s in result.super_weights]
    return CatalogEntry(entry_id, model or result.model, match, result.architecture, coords, source, list(result.notes))
