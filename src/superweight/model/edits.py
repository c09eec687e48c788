"""Temporary changes to a model, always undone: weight edits and forward hooks.

``edited_weights`` snapshots the tensors it is given and writes the exact original bits back on
exit, whatever happens inside the block (an exception, Ctrl-C). ``HookSet`` owns forward hooks and
removes every one of them on exit. Every temporary weight change and every temporary hook in the
package goes through these two.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .arch import ArchSpec


class Snapshot:
    """Exact copies of whole tensors: ``restore()`` writes them back (as often as needed, e.g. after
    each point of a sweep), ``intact()`` says whether the tensors hold them bit for bit."""

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self._saved = [(t, t.detach().clone()) for t in _unique(tensors)]

    def restore(self) -> None:
        with torch.no_grad():
            for t, original in reversed(self._saved):
                t.copy_(original)

    def intact(self) -> bool:
        return all(torch.equal(t, original) for t, original in self._saved)


@contextlib.contextmanager
def edited_weights(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside the block, change the given tensors in place as you like; on exit they are restored
    bit for bit. Snapshots are taken of whole tensors (use ``edited_entries`` for a few scalars)."""
    snapshot = Snapshot(tensors)
    try:
        yield
    finally:
        snapshot.restore()


@contextlib.contextmanager
def edited_entries(entries: Iterable[tuple[torch.Tensor, tuple]]) -> Iterator[None]:
    """Like ``edited_weights`` for single entries ``(tensor, index)``: only those values are saved,
    so editing a handful of scalars of a large matrix costs no copy of the matrix."""
    saved = [(t, idx, t[idx].detach().clone()) for t, idx in entries]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, idx, original in reversed(saved):
                t[idx] = original


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class HookSet:
    """Forward hooks owned by one object: ``with HookSet() as hooks: hooks.forward(m, fn)``.
    Every hook is removed on exit, even when the forward pass raises."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward(self, module: nn.Module, fn: Callable, **kw) -> None:
        self._handles.append(module.register_forward_hook(fn, **kw))

    def pre(self, module: nn.Module, fn: Callable, **kw) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, **kw))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def weight_entries(model: nn.Module, arch: ArchSpec, weights: Iterable, layer: int | None = None) -> list:
    """``(tensor, index)`` of each SuperWeight-like (``layer, row, col[, expert]``), optionally of one layer."""
    out = []
    for w in weights:
        if layer is None or w.layer == layer:
            out.append(arch.weight_entry(model, w.layer, w.row, w.col, getattr(w, "expert", None)))
    return out


@contextlib.contextmanager
def zeroed(model: nn.Module, arch: ArchSpec, weights: Iterable, layer: int | None = None) -> Iterator[None]:
    """Zero the given weights (of one layer, or all) inside the block; restored bit for bit."""
    entries = weight_entries(model, arch, weights, layer)
    with edited_entries(entries), torch.no_grad():
        for tensor, idx in entries:
            tensor[idx] = 0
        yield
