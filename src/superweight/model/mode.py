"""Which way to load a model: in memory or streamed layer by layer, sized from the checkpoint headers.

``memory_plan`` sizes both modes from the headers alone (nothing is read); ``choose_mode`` picks
one for a model argument (logging an automatic switch, failing with the fix when neither fits);
``check_gguf_disk`` refuses a first GGUF conversion the cache disk cannot hold.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

from ..core.errors import SuperweightError
from .loaded import parse_dtype
from ..core.files import check_output
from .load import gguf_cache_folder, default_cache_dir
from .source import ModelSource, SourceKind
from .streamed import held_budget
from .device import resolve_device

log = logging.getLogger(__name__)


class Mode(StrEnum):
    """How a command holds its model: all of it in memory, or one decoder layer at a time."""

    MEMORY = "memory"
    STREAM = "stream"


@dataclass
class MemoryPlan:
    """Bytes each mode needs for a checkpoint, and what this machine has."""

    in_memory: int  # the whole model in the chosen dtype
    streaming: int  # outer tensors + the largest layer, twice (read + cast), + a float32 down_proj
    available: int
    disk_free: int

    @property
    def fits_in_memory(self) -> bool:
        return self.in_memory * 1.2 < self.available

    @property
    def fits_streaming(self) -> bool:
        return self.streaming < self.available


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def memory_plan(source: str | Path | ModelSource, dtype: str | torch.dtype = "float32") -> MemoryPlan:
    """Size both modes from a local checkpoint's headers alone (nothing is read)."""
    import shutil

    import psutil

    ckpt = ModelSource.of(source).checkpoint
    torch_dtype = parse_dtype(dtype)
    per_layer: dict[str, int] = {}
    outer = 0
    down = 0
    for key, info in ckpt.tensors.items():
        size = info.numel * (torch_dtype.itemsize if info.dtype.is_floating_point else info.dtype.itemsize)
        layer = _layer_key(key)
        if layer is None:
            outer += size if "lm_head" not in key else 0
        else:
            per_layer[layer] = per_layer.get(layer, 0) + size
            if any(p in key for p in ("down_proj", "dense_4h_to_h", "c_proj", "fc2")):
                down = max(down, info.numel * 4)
    largest = max(per_layer.values(), default=0)
    # + one layer read ahead by the prefetch thread, + interpreter, torch, transformers
    streaming = outer + 3 * largest + 2 * down + 512 * 2**20
    return MemoryPlan(ckpt.bytes_as(torch_dtype), streaming, psutil.virtual_memory().available,
                      shutil.disk_usage(ckpt.folder).free)


def _layer_key(key: str) -> str | None:
    """``model.layers.12.`` for a key inside a decoder layer, else None."""
    parts = key.split(".")
    for j, p in enumerate(parts[:-1]):
        if p.isdigit() and j > 0:
            return ".".join(parts[: j + 1])
    return None


def check_gguf_disk(source: str | ModelSource, cache_dir: str | Path | None = None) -> None:
    """A first GGUF load writes a float32 copy to the cache: refuse early when the disk cannot hold it."""
    import shutil

    src = ModelSource.of(source)
    if src.kind is not SourceKind.GGUF:
        return
    where = src.path
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    cached = (gguf_cache_folder(where, root) / "model.safetensors").is_file()
    if not cached:  # a cache folder that cannot be written: said first, and before any conversion
        check_output(root, "the GGUF cache (--cache-dir or SUPERWEIGHT_CACHE)", folder=True)
    need = GGUF_EXPANSION * os.path.getsize(where)
    existing = next(p for p in [root, *root.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need and not cached:
        raise SuperweightError(
            f"converting {Path(where).name} writes up to {gib(need)} (float32) to {root}, which has {gib(free)} free: "
            "pass --cache-dir on a disk with room (or convert it elsewhere and --stream the saved folder)"
        )


GGUF_EXPANSION = 8  # float32 bytes per GGUF byte, at most (4-bit blocks: 32 / 4.5 ~ 7.1)


def _streaming() -> Mode:
    """``Mode.STREAM``, once the streamed passes' memory budget (``SUPERWEIGHT_HELD_GB``) reads well: a bad
    value fails before any work."""
    held_budget()
    return Mode.STREAM


def choose_mode(
    source: str | Path | ModelSource | None, dtype: str, stream: bool, device_map: str | None,
    cache_dir: str | Path | None = None, device: str | None = None,
) -> Mode:
    """Memory or stream for a model argument; logs the automatic switch, errors when neither fits.
    With a CUDA ``device`` (and no ``device_map``), in memory means in the GPU's free memory."""
    src = ModelSource.of(source) if source is not None else None
    if src is not None and src.kind is SourceKind.ARTIFACT:
        if stream:
            raise SuperweightError(f"{src.ref} is a quantized artifact, which loads in memory (its weights are unpacked "
                                   "on load): drop --stream")
        return Mode.MEMORY
    if src is None or not src.local_safetensors:
        if src is not None and not stream:
            check_gguf_disk(src, cache_dir)
        if stream:
            raise SuperweightError(
                "--stream reads a local safetensors model folder; a .gguf file or hub id is loaded in memory "
                "(drop --stream, or save the model with save_pretrained first)"
            )
        return Mode.MEMORY
    plan = memory_plan(src, dtype)
    fits_in_memory = plan.in_memory * 1.2 < _room_for_model(plan.available, device if device_map is None else None)
    if stream:
        if not plan.fits_streaming:
            raise SuperweightError(
                f"not enough memory to stream: about {gib(plan.streaming)} needed (embeddings + one layer), "
                f"{gib(plan.available)} available; free memory, try --dtype bfloat16, or use --device-map auto (disk offload)"
            )
        return _streaming()
    if device_map not in (None, "cpu") or fits_in_memory:
        return Mode.MEMORY
    if plan.fits_streaming:
        log.info("the model needs %s in memory, %s available: streaming it layer by layer (as with --stream)",
                 gib(plan.in_memory), gib(plan.available))
        return _streaming()
    raise SuperweightError(
        f"not enough memory: in memory needs {gib(plan.in_memory)}, streaming about {gib(plan.streaming)}, "
        f"{gib(plan.available)} available; free memory or try --dtype bfloat16"
    )


def _room_for_model(host_available: int, device: str | None) -> int:
    """Bytes free where an in-memory model would live: the GPU's for a CUDA device, else the host's."""
    dev = resolve_device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        return host_available
    return torch.cuda.mem_get_info(dev)[0]
