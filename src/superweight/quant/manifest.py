"""Validation of a quantized artifact's ``superweight_manifest.json`` before anything is loaded.

Every field the loader reads is checked for presence and type (``check_manifest``), and every
quantized tensor entry against the model its ``config.json`` builds (``check_against_model``):
shape, orientation (``transposed`` is true exactly for GPT-2's ``Conv1D``) and layout. A damaged
or hand-edited manifest is then one ``SuperweightError`` line, never an error from deep inside
torch (a size mismatch) or a weight silently loaded transposed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from ..core.errors import SuperweightError
from .schemes import kinds as scheme_kinds
from .config import from_dict, EMBEDDING_INT8
from .layout import make_layout

KINDS = scheme_kinds()  # every registered scheme handler (quant/schemes.py)
DTYPE_NAMES = ("float32", "float16", "bfloat16")
_LAYOUT_KEYS = ("rows", "row_len", "size")


def _fail(path: str | Path, what: str) -> SuperweightError:
    return SuperweightError(f"{path} is a corrupted artifact (manifest: {what}): re-export it with `superweight quantize --out`")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _check_fields(m: dict, path: str | Path) -> None:
    if not isinstance(m.get("scheme"), str):
        raise _fail(path, "'scheme' must be a string")
    for key in ("source_model", "architecture", "tool_version"):
        if key in m and not isinstance(m[key], str):
            raise _fail(path, f"{key!r} must be a string")
    for key in ("dtype", "param_dtype"):
        if key in m and m[key] not in DTYPE_NAMES:
            raise _fail(path, f"{key!r} must be one of {', '.join(DTYPE_NAMES)}, not {m[key]!r}")
    if not isinstance(m.get("notes", []), list) or not all(isinstance(n, str) for n in m.get("notes", [])):
        raise _fail(path, "'notes' must be a list of strings")
    if not isinstance(m.get("kept", []), list) or not all(isinstance(k, dict) for k in m.get("kept", [])):
        raise _fail(path, "'kept' must be a list of objects")
    tied = m.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(v, str) for v in tied.values()):
        raise _fail(path, "'tied' must map tensor names to tensor names")
    size = m.get("size")
    if not isinstance(size, dict) or not _is_number(size.get("bits_per_weight")):
        raise _fail(path, "'size' must be an object with a numeric 'bits_per_weight'")
    if not all(_is_number(v) for v in size.values()):
        raise _fail(path, "every 'size' value must be a number")


def _check_entry(key: str, e: Any, path: str | Path) -> None:
    if not isinstance(e, dict):
        raise _fail(path, f"tensor {key} is not an object")
    if e.get("kind") not in KINDS:
        raise _fail(path, f"tensor {key}: 'kind' must be one of {', '.join(KINDS)}, not {e.get('kind')!r}")
    if not _is_int(e.get("bits")) or not 1 <= e["bits"] <= 8:
        raise _fail(path, f"tensor {key}: 'bits' must be an integer from 1 to 8, not {e.get('bits')!r}")
    shape = e.get("shape")
    if not isinstance(shape, list) or not shape or not all(_is_int(s) and s > 0 for s in shape):
        raise _fail(path, f"tensor {key}: 'shape' must be a list of positive integers, not {shape!r}")
    layout = e.get("layout")
    if not isinstance(layout, dict) or set(layout) != set(_LAYOUT_KEYS) or not all(_is_int(v) and v > 0 for v in layout.values()):
        raise _fail(path, f"tensor {key}: 'layout' must hold positive integers {', '.join(_LAYOUT_KEYS)}")
    if layout["rows"] * layout["row_len"] != math.prod(shape) or layout["size"] > layout["row_len"]:
        raise _fail(path, f"tensor {key}: layout {layout} does not fit shape {shape}")
    if not isinstance(e.get("transposed"), bool):
        raise _fail(path, f"tensor {key}: 'transposed' must be true or false")
    view = e.get("view")
    if view is not None and (not isinstance(view, list) or len(view) < 3 or not all(_is_int(s) and s > 0 for s in view)
                             or [math.prod(view[:-1]), view[-1]] != shape or e["transposed"]):
        raise _fail(path, f"tensor {key}: 'view' {view!r} is not an [experts, out, in] shape of the [rows, cols] {shape}")
    if not _is_int(e.get("sparse", 0)) or e.get("sparse", 0) < 0:
        raise _fail(path, f"tensor {key}: 'sparse' must be a count (integer >= 0)")
    if e.get("sparse_dtype") is not None and e["sparse_dtype"] not in DTYPE_NAMES:
        raise _fail(path, f"tensor {key}: 'sparse_dtype' must be null or one of {', '.join(DTYPE_NAMES)}")


def check_manifest(m: dict, path: str | Path) -> dict:
    """``m`` when every field the loader reads is present and well typed; else a one-line error."""
    _check_fields(m, path)
    try:
        config = from_dict(m.get("config"))
    except Exception as exc:  # config classes raise several kinds on bad values
        raise _fail(path, f"'config' is not a quantization config ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    tensors = m.get("tensors")
    if not isinstance(tensors, dict):
        raise _fail(path, "'tensors' must be an object")
    for key, entry in tensors.items():
        _check_entry(key, entry, path)
        _check_scheme(key, entry, config, path)
    return m


def _check_scheme(key: str, e: dict, config, path: str | Path) -> None:
    """The entry is what ``config`` makes of a tensor of its shape: kind, bits and layout (a layout
    with other groups but as many of them would otherwise dequantize silently wrong)."""
    if e.get("embedding"):  # an 8-bit embedding (``embeddings="int8"``), whatever the weights' scheme
        config = EMBEDDING_INT8
    kind = getattr(config, "kind", None)  # the scheme handler the config stores with (quant/schemes.py)
    if e["kind"] != kind or (kind != "ternary" and e["bits"] != getattr(config, "bits", e["bits"])):
        raise _fail(path, f"tensor {key}: {e['kind']} {e['bits']}-bit does not match the config's scheme")
    try:
        expected = make_layout(tuple(e["shape"]), config.group, config.block, getattr(config, "per_channel", False), config.oversize)
    except (SuperweightError, AttributeError, TypeError) as exc:
        raise _fail(path, f"tensor {key}: no layout for shape {e['shape']} under the config ({exc})") from None
    if expected.to_dict() != e["layout"]:
        raise _fail(path, f"tensor {key}: layout {e['layout']} is not the config's {expected.to_dict()}")


def check_against_model(m: dict, model: nn.Module, path: str | Path) -> None:
    """Each quantized tensor names a weight of ``model`` with its shape and orientation."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, entry in m["tensors"].items():
        if key not in params:
            raise _fail(path, f"tensor {key} is not a weight of the model its config.json describes")
        module = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
        conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores [in, out]: quantized transposed
        if entry["transposed"] != conv1d:
            raise _fail(path, f"tensor {key}: 'transposed' is {str(entry['transposed']).lower()}, the model's "
                              f"{type(module).__name__} needs {str(conv1d).lower()}")
        shape = tuple(params[key].shape)
        expected = shape[::-1] if conv1d else shape
        stored = tuple(entry.get("view") or entry["shape"])
        if stored != expected:
            raise _fail(path, f"tensor {key}: shape {list(stored)}, the model needs {list(expected)}")
