"""Where tensors go: the device a user asks for, and the device a model's inputs must be on.

``resolve_device("auto")`` is the first CUDA GPU when there is one, else the CPU; asking for
``cuda`` on a machine without one is a one-line ``SuperweightError``. ``input_device(model)`` is
the device of the input embedding, which is where token ids must go also when accelerate spread
the model over several devices (``--device-map auto``).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from ..core.errors import SuperweightError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) -> cuda when available, else cpu; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise SuperweightError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise SuperweightError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SuperweightError(f"--device {name}: this machine has no CUDA GPU that torch can use; pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SuperweightError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); pass cuda:0 or auto")
    return dev


def input_device(model: nn.Module) -> torch.device:
    """The device token ids must be on: the input embedding's (the first parameter's as a fallback)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    return next(model.parameters()).device


def device_map_for(device: str | torch.device | None, device_map: str | dict | None) -> str | dict | None:
    """The ``from_pretrained(device_map=...)`` for ``--device`` and ``--device-map`` together.

    An explicit ``--device-map`` wins (accelerate places the layers); else the whole model goes
    to the resolved ``--device``; ``None`` for both keeps transformers' default (the CPU).
    """
    if device_map is not None:
        if device is not None and str(device).strip().lower() != "auto":
            raise SuperweightError(f"--device {device} and --device-map {device_map}: pass one of them (--device-map places the layers itself)")
        return device_map
    if device is None:
        return None
    dev = resolve_device(device)
    return None if dev.type == "cpu" else str(dev)


# torch functions that make a tensor on the default device unless given ``device=``
_FACTORIES = (torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.as_tensor,
              torch.randn, torch.rand, torch.randint, torch.linspace, torch.eye, torch.randperm)


class StraysOnMeta(torch.overrides.TorchFunctionMode):
    """A CPU stand-in for a GPU: a tensor that code under ``prefix`` makes without a ``device``
    (or reads from numpy) goes to the meta device, so any that would stay on the CPU while the model
    sits on a GPU fails here too ("Tensor on device meta is not on the expected device cpu"), with a
    traceback at the line that made it; files ending in one of ``skip`` are left alone. ``hits`` lists
    (file, line, function) of every such tensor.

    >>> with StraysOnMeta(superweight_dir) as strays:
    ...     detect(model, tokenizer)      # a stray tensor mixed into the model's math raises
    """

    def __init__(self, prefix: str, skip: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.prefix, self.skip = str(prefix), tuple(str(s) for s in skip)
        self.hits: list[tuple[str, int, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        stray = (func in _FACTORIES and kwargs.get("device") is None) or func is torch.from_numpy
        if stray:
            caller = sys._getframe(1)
            name = caller.f_code.co_filename
            if name.startswith(self.prefix) and not name.endswith(self.skip):
                self.hits.append((name, caller.f_lineno, func.__name__))
                if func is torch.from_numpy:
                    return func(*args, **kwargs).to("meta")
                kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)
