"""Read checkpoint tensors from disk onto a device, the next group already on its way.

``read_host`` reads each tensor's bytes straight from its safetensors file (one ``readinto`` per
tensor, no memory map that outlives the call) into host memory; when the target is a CUDA device
that memory is pinned, so the copy to the GPU is asynchronous. ``LayerPrefetcher`` runs such a
read on one background thread while the caller computes on the previous group (file reads and
torch kernels both release the GIL), and casts on the CPU in that thread when the target is the
CPU. Every tensor comes out bit for bit as ``safe_open(...).get_tensor(key).to(dtype)`` gives it.
"""
from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Hashable, Mapping

import torch

from .checkpoint import TensorInfo
from .errors import SuperweightError

Wanted = Mapping[str, tuple[TensorInfo, torch.dtype]]  # name -> (where it is, the dtype it must have)


def read_host(wanted: Wanted, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors in host memory: pinned (stored dtype) for a CUDA target, cast for a CPU target."""
    pin = device.type == "cuda"
    by_file: dict[Path, list[str]] = {}
    for name, (info, _) in wanted.items():
        by_file.setdefault(info.file, []).append(name)
    out = {}
    for file, names in by_file.items():
        with open(file, "rb", buffering=0) as f:
            for name in sorted(names, key=lambda n: wanted[n][0].offset):  # sequential on disk
                info, dtype = wanted[name]
                t = _read_one(f, info, pin)
                out[name] = t if pin else t.to(dtype)
    return out


def _read_one(f, info: TensorInfo, pin: bool) -> torch.Tensor:
    buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin)
    view, done = memoryview(buf.numpy()), 0
    f.seek(info.offset)
    while done < info.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise SuperweightError(f"{info.file} ended while reading a tensor: the file was truncated; re-download or re-save it")
        done += n
    return buf.view(info.dtype).reshape(info.shape)


def to_device(host: dict[str, torch.Tensor], wanted: Wanted, device: torch.device) -> dict[str, torch.Tensor]:
    """Move ``read_host``'s tensors to ``device`` (asynchronous from pinned memory) in their dtype."""
    return {n: t.to(device, non_blocking=t.is_pinned()).to(wanted[n][1]) for n, t in host.items()}


class LayerPrefetcher:
    """One read ahead: ``start(key, wanted)`` reads in the background, ``take(key, wanted)`` returns it
    (or reads now when nothing was started for ``key``); the result is on ``device``."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled = device, enabled
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ahead: tuple[Hashable, concurrent.futures.Future] | None = None

    def start(self, key: Hashable, wanted: Wanted) -> None:
        if not self.enabled or self.pending(key):
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="superweight-prefetch")
        self._ahead = (key, self._pool.submit(read_host, dict(wanted), self.device))

    def pending(self, key: Hashable) -> bool:
        return self._ahead is not None and self._ahead[0] == key

    def take(self, key: Hashable | None, wanted: Wanted) -> dict[str, torch.Tensor]:
        """``wanted`` on the device; ``key`` None reads now and leaves any read ahead alone."""
        if key is not None and self.pending(key):
            ahead, self._ahead = self._ahead, None
            host = ahead[1].result()  # re-raises the thread's error here
        else:
            if key is not None:
                self._ahead = None  # a read ahead of another layer (a re-stream): drop it
            host = read_host(wanted, self.device)
        return to_device(host, wanted, self.device)

    def close(self) -> None:
        self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
