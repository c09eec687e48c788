"""One coordinate type for a super weight: ``Coord(layer, row, col)``, in the paper's convention.

``row`` is the output (hidden) channel of the layer's MLP down-projection and ``col`` its input
(intermediate) channel, whatever the weight layout (GPT-2's Conv1D stores the transpose; ``ArchSpec``
maps it). ``Coord`` is a named tuple: it equals, hashes, sorts and unpacks like ``(layer, row, col)``
and serialises to JSON as ``[layer, row, col]``. ``as_coord`` / ``as_coords`` accept everything the
tool writes or returns: ``Coord``, tuples and lists, ``{"layer", "row", "col"}`` dicts, and objects
with ``layer``/``row``/``col`` attributes (``detect.SuperWeight``, ``catalog.CatalogCoord``).
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
