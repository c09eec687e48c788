"""Read checkpoint tensors from disk onto a device, the next group already on its way.

``read_host`` reads each tensor's bytes straight from its safetensors file (one ``readinto`` per
tensor, no memory map that outlives the call) into host memory; when the target is a CUDA device
that memory is pinned, so the copy to the GPU is asynchronous. ``LayerPrefetcher`` runs such a
read on one background thread while the caller computes on the previous group (file reads and
torch kernels both release the GIL); the buffers are allocated, and cast for a CPU target, by the
caller's thread. Every tensor comes out bit for bit as ``safe_open(...).get_tensor(key).to(dtype)``
gives it.
"""
from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Hashable, Mapping

import torch

from .checkpoint import TensorInfo
from ..core.errors import SuperweightError

Wanted = Mapping[str, tuple[TensorInfo, torch.dtype]]  # name -> (where it is, the dtype it must have)


def read_host(wanted: Wanted, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors in host memory: pinned (stored dtype) for a CUDA target, cast for a CPU target."""
    buffers = allocate(wanted, device)
    fill(buffers, wanted)
    return host_tensors(buffers, wanted, device)


def allocate(wanted: Wanted, device: torch.device) -> dict[str, torch.Tensor]:
    """One byte buffer per tensor, pinned for a CUDA target. Allocated by the caller's thread: memory
    a worker thread allocates lands in that thread's malloc arena, which gives freed layers back to
    the system late (peak RSS grew by several layers in a test when the worker allocated)."""
    pin = device.type == "cuda"
    return {name: torch.empty(info.nbytes, dtype=torch.uint8, device="cpu", pin_memory=pin) for name, (info, _) in wanted.items()}


def fill(buffers: dict[str, torch.Tensor], wanted: Wanted) -> None:
    """Read each tensor's bytes into its buffer, file by file, in file order (sequential on disk)."""
    by_file: dict[Path, list[str]] = {}
    for name, (info, _) in wanted.items():
        by_file.setdefault(info.file, []).append(name)
    for file, names in by_file.items():
        with open(file, "rb", buffering=0) as f:
            for name in sorted(names, key=lambda n: wanted[n][0].offset):
                _read_into(f, wanted[name][0], buffers[name])


def _read_into(f, info: TensorInfo, buf: torch.Tensor) -> None:
    view, done = memoryview(buf.numpy()), 0
    f.seek(info.offset)
    while done < info.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise SuperweightError(f"{info.file} ended while reading a tensor: the file was truncated; re-download or re-save it")
        done += n


def host_tensors(buffers: dict[str, torch.Tensor], wanted: Wanted, device: torch.device) -> dict[str, torch.Tensor]:
    """The buffers viewed as their tensors; cast here for a CPU target (on the GPU for a CUDA one)."""
    out = {}
    for name, buf in buffers.items():
        info, dtype = wanted[name]
        t = buf.view(info.dtype).reshape(info.shape)
        out[name] = t if device.type == "cuda" else t.to(dtype)
    return out


def to_device(host: dict[str, torch.Tensor], wanted: Wanted, device: torch.device) -> dict[str, torch.Tensor]:
    """Move ``read_host``'s tensors to ``device`` (asynchronous from pinned memory) in their dtype."""
    return {n: t.to(device, non_blocking=t.is_pinned()).to(wanted[n][1]) for n, t in host.items()}


class LayerPrefetcher:
    """One read ahead: ``start(key, wanted)`` reads in the background, ``take(key, wanted)`` returns it
    (or reads now when nothing was started for ``key``); the result is on ``device``."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled = device, enabled
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ahead: tuple[Hashable, dict, dict, concurrent.futures.Future] | None = None  # key, wanted, buffers, read

    def start(self, key: Hashable, wanted: Wanted) -> None:
        if not self.enabled or self.pending(key):
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="superweight-prefetch")
        wanted = dict(wanted)
        buffers = allocate(wanted, self.device)
        self._ahead = (key, wanted, buffers, self._pool.submit(fill, buffers, wanted))

    def pending(self, key: Hashable) -> bool:
        return self._ahead is not None and self._ahead[0] == key

    def take(self, key: Hashable | None, wanted: Wanted) -> dict[str, torch.Tensor]:
        """``wanted`` on the device; ``key`` None reads now and leaves any read ahead alone."""
        if key is not None and self.pending(key):
            (_, wanted, buffers, read), self._ahead = self._ahead, None
            read.result()  # re-raises the thread's error here
            host = host_tensors(buffers, wanted, self.device)
        else:
            if key is not None and self._ahead is not None:
                concurrent.futures.wait([self._ahead[3]])  # a read ahead of another layer (a rerun):
                self._ahead = None  # let it finish into buffers nobody reads any more, then drop it
            host = read_host(wanted, self.device)
        return to_device(host, wanted, self.device)

    def close(self) -> None:
        self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
