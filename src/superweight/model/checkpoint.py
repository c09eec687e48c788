"""Safetensors files: the one header parser, and a local checkpoint (one file or shards with
``model.safetensors.index.json``), checked.

``read_header`` is the only code that parses a safetensors header (and checks that the file holds
every byte the header promises).
``open_checkpoint`` reads only the headers: it checks that every shard the index names exists and
holds all the bytes its header promises, and that the index and the shards agree on which tensor
lives where. It then knows each tensor's file, dtype and shape, so the streaming code can read
one tensor at a time and size its memory before reading anything.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import SuperweightError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


_ST_ORDER = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]  # the format's


@dataclass(frozen=True)
class Header:
    """A safetensors header: each tensor's entry (dtype, shape, data_offsets) and where the data starts."""

    entries: dict[str, dict]  # tensor name -> {"dtype", "shape", "data_offsets"}; no "__metadata__"
    metadata: dict
    data_start: int  # byte offset of the first tensor's data: 8 + the header's length

    @property
    def data_end(self) -> int:
        """The file size the header promises."""
        return self.data_start + max((e["data_offsets"][1] for e in self.entries.values()), default=0)


def read_header(path: str | os.PathLike) -> Header:
    """Parse a safetensors header and check the file holds every byte it promises (no data is read).

    Raises ``SuperweightError`` for a malformed, corrupted or truncated file.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            raw = json.loads(f.read(n))
        metadata = raw.pop("__metadata__", None) or {}
        header = Header(raw, metadata, 8 + n)
        end = header.data_end
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SuperweightError(f"{path} is not a valid safetensors file ({exc}): re-download or re-save it") from None
    if end > size:
        raise SuperweightError(f"{path} is truncated ({size} bytes, header promises {end}): re-download or re-save it")
    return header


def check_safetensors(path: str | os.PathLike) -> dict[str, dict]:
    """The tensor entries of a checked safetensors file (see ``read_header``)."""
    return read_header(path).entries


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # byte offset of the data in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Checkpoint:
    folder: Path
    tensors: dict[str, TensorInfo]  # checkpoint key -> where it is

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data, as stored."""
        return sum(t.nbytes for t in self.tensors.values())

    def prefetch(self, keys: list[str]) -> None:
        """Ask the kernel to start reading these tensors into the page cache (returns at once)."""
        if not hasattr(os, "posix_fadvise"):
            return
        by_file: dict[Path, list[TensorInfo]] = {}
        for k in keys:
            by_file.setdefault(self.tensors[k].file, []).append(self.tensors[k])
        for file, infos in by_file.items():
            fd = os.open(file, os.O_RDONLY)
            try:
                for t in infos:
                    os.posix_fadvise(fd, t.offset, t.nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def bytes_as(self, dtype: torch.dtype | None) -> int:
        """Bytes of all floating tensors once cast to ``dtype`` (None: as stored)."""
        return sum(t.numel * (dtype.itemsize if dtype and t.dtype.is_floating_point else t.dtype.itemsize)
                   for t in self.tensors.values())


def _index_map(folder: Path) -> dict[str, str]:
    path = folder / INDEX
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise SuperweightError(f"{path} is not a valid safetensors index ({exc}): re-download or re-save the model") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SuperweightError(f"{path} has an empty weight_map: re-download or re-save the model")
    return weight_map


def _shard_headers(folder: Path, files: set[str]) -> dict[str, Header]:
    headers = {}
    for name in sorted(files):
        path = folder / name
        if not path.is_file():
            raise SuperweightError(
                f"shard {name} named by {INDEX} is missing from {folder}: re-download the model (all shards)"
            )
        headers[name] = read_header(path)
    return headers


def _info(path: Path, header: Header, key: str) -> TensorInfo:
    entry = header.entries[key]
    dtype = _ST_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise SuperweightError(f"{path.name}: tensor {key} has dtype {entry['dtype']}, which streaming cannot read")
    return TensorInfo(path, dtype, tuple(entry["shape"]), header.data_start + entry["data_offsets"][0])


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Check a local safetensors checkpoint's files and index; return where each tensor lives."""
    folder = Path(path).expanduser()
    folder = folder.parent if folder.is_file() else folder
    if (folder / INDEX).is_file():
        weight_map = _index_map(folder)
        headers = _shard_headers(folder, set(weight_map.values()))
        tensors = {}
        for key, name in weight_map.items():
            if key not in headers[name].entries:
                raise SuperweightError(
                    f"{INDEX} is inconsistent: it puts {key} in {name}, which does not hold it; re-download or re-save the model"
                )
            tensors[key] = _info(folder / name, headers[name], key)
        return Checkpoint(folder, tensors)
    single = folder / SINGLE
    files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        what = "no .safetensors file" if not files else f"{len(files)} .safetensors files and no {INDEX}"
        raise SuperweightError(f"{folder} has {what}: streaming needs {SINGLE} or a sharded model with its index")
    header = read_header(files[0])
    return Checkpoint(folder, {k: _info(files[0], header, k) for k in header.entries})


def index_parts(parts: list[Path], folder: Path, metadata: dict[str, str]) -> list[Path]:
    """Rename safetensors ``parts`` to a sharded checkpoint in ``folder`` (``model-00001-of-0000N.safetensors``
    ...) and write its ``model.safetensors.index.json`` (``metadata`` plus ``total_size``, the ``weight_map``),
    as transformers writes them; returns the shard paths. Names must not repeat across parts."""
    shards, weight_map, total = [], {}, 0
    for i, part in enumerate(parts):
        header = read_header(part)
        shard = folder / f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        for name, entry in header.entries.items():
            if name in weight_map:
                raise ValueError(f"{name} is in two parts")
            weight_map[name] = shard.name
            total += entry["data_offsets"][1] - entry["data_offsets"][0]
        part.rename(shard)
        shards.append(shard)
    index = {"metadata": {**metadata, "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return shards


def join_safetensors(parts: list[Path], out: Path, metadata: dict[str, str]) -> None:
    """One safetensors file holding every tensor of ``parts`` (names must not repeat), byte for byte what
    ``safetensors.torch.save_file`` writes for them as one dict (its order: dtype, in the reverse of the
    format's dtype list, then name; so every tensor stays aligned), but for the order of the metadata's
    keys, which safetensors writes in hash-map order (it varies by process). Copies tensor by tensor:
    memory stays that of the copy buffer."""
    headers = [read_header(p) for p in parts]
    where: dict[str, tuple[int, dict]] = {}
    for i, h in enumerate(headers):
        for name, entry in h.entries.items():
            if name in where:
                raise ValueError(f"{name} is in two parts")
            where[name] = (i, entry)
    order = sorted(where, key=lambda n: (-_ST_ORDER.index(where[n][1]["dtype"]), n))
    entries, offset = {}, 0
    for name in order:
        e = where[name][1]
        n = e["data_offsets"][1] - e["data_offsets"][0]
        entries[name] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    files = [open(p, "rb") for p in parts]
    try:
        with open(out, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in order:
                i, e = where[name]
                src = files[i]
                src.seek(headers[i].data_start + e["data_offsets"][0])
                left = e["data_offsets"][1] - e["data_offsets"][0]
                while left:
                    chunk = src.read(min(left, 16 << 20))
                    if not chunk:
                        raise ValueError(f"{parts[i]} ends inside {name}")
                    f.write(chunk)
                    left -= len(chunk)
    finally:
        for src in files:
            src.close()


ARTIFACT_MANIFEST = "superweight_manifest.json"  # what `superweight quantize --out` writes beside its tensors


def is_artifact(path: str | os.PathLike) -> bool:
    """``path`` is a quantized artifact folder (written by ``superweight quantize --out``)."""
    return (Path(path) / ARTIFACT_MANIFEST).is_file()
