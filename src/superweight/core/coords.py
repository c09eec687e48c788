"""One coordinate type for a super weight: ``Coord(layer, row, col)``, in the paper's convention.

``row`` is the output (hidden) channel of the layer's MLP down-projection and ``col`` its input
(intermediate) channel, whatever the weight layout (GPT-2's Conv1D stores the transpose; ``ArchSpec``
maps it). ``Coord`` is a named tuple: it equals, hashes, sorts and unpacks like ``(layer, row, col)``
and serialises to JSON as ``[layer, row, col]``. ``as_coord`` / ``as_coords`` accept everything the
tool writes or returns: ``Coord``, tuples and lists, ``{"layer", "row", "col"}`` dicts, and objects
with ``layer``/``row``/``col`` attributes (``detect.SuperWeight``, ``catalog.CatalogCoord``).
A weight of a mixture of experts also needs its expert: ``as_keys`` gives ``(Coord, expert)``.
"""
from __future__ import annotations

from typing import Any, Iterable, NamedTuple


class Coord(NamedTuple):
    layer: int
    row: int  # output (hidden) channel of the down-projection
    col: int  # input (intermediate) channel

    def __str__(self) -> str:
        return f"{self.layer}:[{self.row}, {self.col}]"


def as_coord(item: Any) -> Coord:
    """A ``Coord`` from a tuple/list, a dict or an object with ``layer``, ``row`` and ``col``."""
    if isinstance(item, dict):
        return Coord(int(item["layer"]), int(item["row"]), int(item["col"]))
    if hasattr(item, "layer"):
        return Coord(int(item.layer), int(item.row), int(item.col))
    layer, row, col = item
    return Coord(int(layer), int(row), int(col))


def as_coords(items: Iterable[Any]) -> list[Coord]:
    """``as_coord`` of each item; a ``DetectionResult`` (anything with ``super_weights``) gives its own."""
    items = getattr(items, "super_weights", items)
    return [as_coord(it) for it in items or []]


def as_key(item: Any) -> tuple[Coord, int | None]:
    """``(Coord, expert)``: the expert of an MoE weight (an ``expert`` attribute or key, or a 4-tuple's
    last element), None for a dense one."""
    if isinstance(item, (tuple, list)) and len(item) == 4:
        return as_coord(item[:3]), None if item[3] is None else int(item[3])
    expert = item.get("expert") if isinstance(item, dict) else getattr(item, "expert", None)
    return as_coord(item), None if expert is None else int(expert)


def as_keys(items: Iterable[Any]) -> list[tuple[Coord, int | None]]:
    """``as_key`` of each item; a ``DetectionResult`` gives its own."""
    items = getattr(items, "super_weights", items)
    return [as_key(it) for it in items or []]
