"""Detect super weights in a checkpoint larger than memory, one decoder layer at a time.

The model is built on the meta device (accelerate's ``init_empty_weights``); only the tensors
outside the decoder layers (embeddings, final norm) and the layer being run are materialised,
read with ``safe_open(...).get_tensor`` from the memory-mapped shards and freed right after.

Nothing of the model's forward is copied. One call of the model's own ``forward`` with every
decoder layer replaced by a recorder gives, per layer, the exact arguments the model passes it
(attention mask, rotary ``position_embeddings``, ``position_ids``, per-layer sliding-window masks);
the first recorder also receives the embedded input. ``StreamedModel.run_layer`` then calls the
real layer with those arguments and the running hidden state, under the same
``ActivationCapture`` hooks as in-memory detection, so every activation is bit for bit the one an
in-memory forward computes (same dtype, same kernels).

Detection itself lives once, in ``superweight.find.loop``; ``superweight.find.streamed`` runs it over a
``StreamedModel`` (every prompt through each layer read, and a rerun that zeroes a weight of layer
``L`` restarts from ``L`` with that layer's cached residual input).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .arch import ArchSpec, architecture_name, check_causal_name
from .arch_infer import get_arch
from .capture import first_tensor
from .checkpoint import Checkpoint
from .source import ModelSource
from .device import resolve_device
from ..core.errors import SuperweightError
from .keymap import checkpoint_keys, tied_names
from .prefetch import LayerPrefetcher
from .loaded import parse_dtype
from ..core import progress

log = logging.getLogger(__name__)

Call = tuple[tuple, dict]  # the positional and keyword arguments the model passes one layer
Edit = Callable[[int], contextlib.AbstractContextManager]  # changes layer i's weights inside the block
HELD_BYTES = 2 << 30  # residual streams one pass of ``StreamedModel.run_heads`` holds at most by default
HELD_ENV = "SUPERWEIGHT_HELD_GB"  # ... or this many GiB (fewer passes with more memory, or the reverse)


def held_budget() -> int:
    """Bytes of residual streams a streamed pass may hold: ``SUPERWEIGHT_HELD_GB`` GiB when set, else 2 GiB."""
    value = os.environ.get(HELD_ENV)
    if value is None:
        return HELD_BYTES
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if not gib > 0:
        raise SuperweightError(f"{HELD_ENV}={value!r}: give a positive number of GiB, e.g. {HELD_ENV}=8")
    return int(gib * (1 << 30))


class _Recorded(Exception):
    """Raised by the last recorder: the model's forward has built every layer's arguments."""


class _StandIn(nn.Module):
    """Stands in for a decoder layer during one call of the model's forward; the attributes the model
    reads of its layers (``attention_type``, ...) come from the layer it replaces."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.__dict__["_layer"] = layer  # not a submodule

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)


class _Recorder(_StandIn):
    """Stands in for decoder layer ``index``: records its arguments, passes the hidden state on."""

    def __init__(self, index: int, calls: list, last: bool, layer: nn.Module):
        super().__init__(layer)
        self.index, self.calls, self.last = index, calls, last

    def forward(self, *args, **kwargs):
        self.calls[self.index] = (args, kwargs)
        if self.last:
            raise _Recorded
        return args[0] if args else kwargs["hidden_states"]


class _Replay(_StandIn):
    """Stands in for a decoder layer and returns what the last layer returned (``output``): the model's
    own forward then applies its final norm, head and any logit softcapping to it."""

    def __init__(self, output, layer: nn.Module):
        super().__init__(layer)
        self.__dict__["_output"] = output

    def forward(self, *args, **kwargs):
        return self.__dict__["_output"]


def with_hidden(call: Call, hidden: torch.Tensor) -> Call:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def hidden_of(call: Call) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if leaf in module._parameters:
        module._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter's name -> every name it has (tied weights share one parameter)."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return {names[0]: names for names in by_id.values()}


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move every materialised buffer (``init_empty_weights`` leaves buffers real, on the CPU)."""
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and buf.device.type != "meta" and buf.device != device:
                mod._buffers[name] = buf.to(device)


def _persistent_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers: what a checkpoint stores."""
    out = dict(module.named_parameters())
    for mod_name, mod in module.named_modules():
        for b_name, buf in mod._buffers.items():
            if buf is not None and b_name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{b_name}" if mod_name else b_name] = buf
    return out


class StreamedModel:
    """A causal LM on the meta device whose layers are read from safetensors one at a time."""

    def __init__(
        self, path: str | Path | ModelSource, dtype: str | torch.dtype = "float32", device: str | torch.device | None = None,
        prefetch: bool = True, held_bytes: int | None = None,
    ):
        """``path``: a local safetensors model folder (or its ``ModelSource``, whose parsed headers are
        reused). ``held_bytes``: the residual streams one pass of ``run_heads`` may hold (default
        ``held_budget()``: 2 GiB, or ``SUPERWEIGHT_HELD_GB``). ``device``: where layers run (``auto``: CUDA when available; default the CPU). ``prefetch``:
        read the next layer on a background thread while the current one runs (pinned for CUDA)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.source = ModelSource.of(path)
        self.held_bytes = held_budget() if held_bytes is None else held_bytes
        if not self.held_bytes > 0:
            raise SuperweightError(f"the streamed passes' memory budget must be positive, got {held_bytes} bytes")
        self.ckpt: Checkpoint = self.source.checkpoint
        self.dtype = parse_dtype(dtype)
        self.device = resolve_device(device or "cpu")
        self._prefetcher = LayerPrefetcher(self.device, prefetch)
        try:
            config = AutoConfig.from_pretrained(self.ckpt.folder)
        except Exception as exc:
            raise SuperweightError(f"cannot read the config of {self.ckpt.folder}: {exc}".splitlines()[0]) from None
        check_causal_name(architecture_name(config))
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype).eval()
        self.arch: ArchSpec = get_arch(self.model)
        self.model.tie_weights()  # as from_pretrained does: a tied lm_head is the embedding
        _buffers_to(self.model, self.device)  # rotary frequencies, masks: built on the CPU
        self.layers = self.arch.layer_modules(self.model)
        self.num_layers = len(self.layers)
        self._meta = {n: t for n, t in _persistent_tensors(self.model).items()}
        self._aliases = _aliases(self.model)
        renamed, self._fused = checkpoint_keys(self.model, self.ckpt)
        self._renamed = tied_names(renamed, self._aliases)
        self._keys = {n: self._key(n) for n in self._needed_names()}
        self._check_shapes()
        self._load(self._outer_names())
        self.passes = 0  # passes over the layers by ``run_heads``

    # ------------------------------------------------------------ which tensor is where

    def _layer_prefix(self, i: int) -> str:
        return f"{self.arch.layers}.{i}."

    def _outside_layers(self, in_base_model: bool) -> list[str]:
        base = self.model.base_model_prefix + "."
        return [n for n in self._meta if n.startswith(base) == in_base_model and not n.startswith(self.arch.layers + ".")]

    def _outer_names(self) -> list[str]:
        """Tensors of the base model outside the decoder layers (embeddings, final norm)."""
        return self._outside_layers(True)

    def head_names(self) -> list[str]:
        """Tensors outside the base model (an untied output head): never read by detection, only when
        asked for (``materialised``: a streamed export)."""
        return self._outside_layers(False)

    def layer_names(self, i: int) -> list[str]:
        prefix = self._layer_prefix(i)
        return [n for n in self._meta if n.startswith(prefix)]

    def _needed_names(self) -> list[str]:
        return self._outer_names() + [n for i in range(self.num_layers) for n in self.layer_names(i)]

    def key(self, name: str) -> str:
        """The checkpoint key of model tensor ``name`` ("" for a buffer the file does not store or a
        tensor built from several, ``self._fused``)."""
        if name not in self._keys:
            self._keys[name] = self._key(name)
        return self._keys[name]

    def _key(self, name: str) -> str:
        if name in self._renamed:
            return self._renamed[name]
        if name in self._fused or name in dict(self.model.named_buffers()):
            return ""  # built from several keys (stored_keys), or a buffer the file does not store
        raise SuperweightError(
            f"{self.ckpt.folder} has no tensor {name}: the checkpoint does not match its config.json "
            "(incomplete download or a different layout); re-download it or load it without --stream"
        )

    def stored_keys(self, name: str) -> list[str]:
        """Every checkpoint key model tensor ``name`` is read from (none for an unstored buffer)."""
        return self._fused[name].keys if name in self._fused else [k for k in [self.key(name)] if k]

    def _check_shapes(self) -> None:
        for name in self._keys:
            shape = self._stored_shape(name)
            if shape is not None and shape != tuple(self._meta[name].shape):
                what = self.key(name) or f"{name} (built from {len(self._fused[name].keys)} stored tensors)"
                raise SuperweightError(
                    f"{what} has shape {list(shape)} in the checkpoint but "
                    f"{list(self._meta[name].shape)} in config.json: the files do not belong together"
                )

    def _stored_shape(self, name: str) -> tuple[int, ...] | None:
        if name in self._fused:  # the conversion run on meta tensors of the stored shapes
            f = self._fused[name]
            parts = {k: torch.empty(self.ckpt.tensors[k].shape, device="meta") for k in f.keys}
            return tuple(f.build(parts, self.model.config).shape)
        key = self.key(name)
        return tuple(self.ckpt.tensors[key].shape) if key else None

    # ------------------------------------------------------------ materialise / free

    def _wanted(self, names: Sequence[str]) -> dict[str, tuple]:
        """checkpoint key -> (where the checkpoint holds it, the dtype the model wants) for every
        tensor ``names`` are read from."""
        return {k: (self.ckpt.tensors[k], self._meta[n].dtype) for n in names for k in self.stored_keys(n)}

    def _read(self, names: Sequence[str], ahead: int | None = None) -> dict[str, torch.Tensor]:
        """Read tensors from their shards onto ``self.device`` (layer ``ahead``: what the background
        thread already read, when it did)."""
        return self._prefetcher.take(ahead, self._wanted(names))

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        aliases = self._aliases.get(name, [name])  # a tied lm_head follows its embedding
        if len(aliases) > 1 and not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=False)
        for alias in aliases:
            _set_tensor(self.model, alias, tensor)

    def _load(self, names: Sequence[str], ahead: int | None = None) -> None:
        read = self._read(names, ahead)
        for n in names:
            if n in self._fused:
                self._set(n, self._fused[n].build(read, self.model.config))
            elif self.key(n):
                self._set(n, read[self.key(n)])

    def _free(self, names: Sequence[str]) -> None:
        for n in names:
            if self.stored_keys(n):
                self._set(n, self._meta[n])

    @contextlib.contextmanager
    def materialised(self, names: Sequence[str], layer: int | None = None) -> Iterator[None]:
        """Read ``names`` into the model for the block, then put the meta tensors back. For decoder
        ``layer`` i, layer i + 1 is read in the background meanwhile."""
        try:
            self._load(names, layer)
            if layer is not None:
                self.prefetch_layer(layer + 1)
            yield
        finally:
            self._free(names)

    def layer(self, i: int) -> contextlib.AbstractContextManager:
        """Decoder layer ``i`` read for the block (the next one read ahead); a running spinner shows it."""
        progress.note(f"layer {i + 1}/{self.num_layers}")
        return self.materialised(self.layer_names(i), layer=i)

    def prefetch_layer(self, i: int) -> None:
        """Start reading layer ``i`` in the background: the kernel's readahead, and (unless
        ``prefetch=False``) a thread that reads it into (pinned) host memory. Idempotent."""
        if 0 <= i < self.num_layers:
            keys = [k for n in self.layer_names(i) for k in self.stored_keys(n)]
            if not self._prefetcher.pending(i):
                self.ckpt.prefetch(keys)
            self._prefetcher.start(i, self._wanted(self.layer_names(i)))

    def close(self) -> None:
        """Stop the background reader (it also stops with the process)."""
        self._prefetcher.close()

    def __enter__(self) -> "StreamedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def down_proj_names(self, i: int) -> list[str]:
        return [f"{self.arch.down_proj_name(i, self.model)}.weight"]

    # ------------------------------------------------------------ forward, layer by layer

    @torch.no_grad()
    def layer_calls(self, inputs: dict) -> list[Call]:
        """The arguments the model's own forward passes each decoder layer for ``inputs``."""
        calls: list = [None] * self.num_layers
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with self._stand_ins(lambda i, layer: _Recorder(i, calls, i == self.num_layers - 1, layer)):
            try:
                self.model(**inputs, use_cache=False)
            except _Recorded:
                pass
        if any(c is None for c in calls):
            raise SuperweightError(f"{self.arch.name}: the model's forward did not call every decoder layer")
        return calls

    @torch.no_grad()
    def last_outputs(self, windows: Sequence[torch.Tensor], runs: Sequence[tuple[int, Edit]],
                     each: Callable[[int, int, object], None] | None = None,
                     after_layer: Callable[[int], None] | None = None) -> list:
        """The last decoder layer's output for each run ``(window index, edit)``, in one pass: each layer
        is read once and run once per run, with ``edit(i)`` (a context manager that changes layer ``i``'s
        weights, entered while the layer is read) around it: entered once per layer for all the runs that
        share it (equal edits), so a costly edit (quantizing the layer) is made once per layer. The layers'
        arguments are recorded once per window, so every run of a window sees the model's own masks and
        positions. A window is one row of ids or a padded batch of rows (``[rows, tokens]``).
        ``each(layer, run, output)`` sees every layer's output as it comes; ``after_layer(i)`` runs once
        layer ``i`` has been let go."""
        calls = [self.layer_calls({"input_ids": _as_batch(ids).to(self.device)}) for ids in windows]
        hidden = [hidden_of(calls[w][0]) for w, _ in runs]
        last: list = [None] * len(runs)
        sharing: dict[Edit, list[int]] = {}
        for r, (_, edit) in enumerate(runs):
            sharing.setdefault(edit, []).append(r)
        for i in range(self.num_layers):
            with self.layer(i):
                for edit, group in sharing.items():
                    with edit(i):
                        for r in group:
                            args, kwargs = with_hidden(calls[runs[r][0]][i], hidden[r])
                            last[r] = self.layers[i](*args, **kwargs)
                            hidden[r] = first_tensor(last[r])
                            if each is not None:
                                each(i, r, last[r])
            if after_layer is not None:
                after_layer(i)
        return last

    @torch.no_grad()
    def through_head(self, outputs: Sequence, fns: Sequence) -> list:
        """``fn(model)`` for each last layer output and function, with the untied head read and every
        layer replaced by a replay of that output: the model's own forward applies its final norm, head
        and any logit softcapping (``fn`` calls ``model(input_ids=...)`` with the run's ids)."""
        with self.materialised(self.head_names()):
            out = []
            for output, fn in zip(outputs, fns):
                with self._stand_ins(lambda i, layer: _Replay(output, layer)):
                    out.append(fn(self.model))
            return out

    def run_heads(self, windows: Sequence[torch.Tensor], runs: Sequence[tuple[int, Edit]], fns: Sequence,
                  held_bytes: int | None = None, together: int = 0) -> list:
        """``through_head(last_outputs(...))`` of every run, with the runs' residual streams held at once
        kept under ``held_bytes`` (default ``self.held_bytes``; about tokens x hidden size x dtype bytes
        each): runs that do not fit one pass go to the next, each pass reading the layers once more. The
        first ``together`` runs are never split (the first pass holds them all, whatever their size)."""
        held_bytes = self.held_bytes if held_bytes is None else held_bytes
        width = self.model.get_input_embeddings().weight.shape[-1] * self.dtype.itemsize
        out, group, size = [], [], 0
        for r, (w, _) in enumerate(runs):
            need = windows[w].numel() * width
            if group and size + need > held_bytes and r >= together:
                out += self._one_pass(windows, runs, fns, group)
                group, size = [], 0
            group.append(r)
            size += need
        if group:
            out += self._one_pass(windows, runs, fns, group)
        return out

    def _one_pass(self, windows, runs, fns, group: list[int]) -> list:
        self.passes += 1
        outputs = self.last_outputs(windows, [runs[r] for r in group])
        return self.through_head(outputs, [fns[r] for r in group])

    @contextlib.contextmanager
    def _stand_ins(self, make) -> Iterator[None]:
        """Every decoder layer replaced by ``make(index, layer)`` inside the block, put back after."""
        original = list(self.layers)
        for i in range(self.num_layers):
            self.layers[i] = make(i, original[i])
        try:
            yield
        finally:
            for i, layer in enumerate(original):
                self.layers[i] = layer


def no_head(model) -> None:
    """A ``through_head`` function for runs whose last layer output is not wanted."""
    return None


def _as_batch(ids: torch.Tensor) -> torch.Tensor:
    """A window's ids as a batch: one row (``[tokens]``) or already several (``[rows, tokens]``, padded)."""
    return ids if ids.dim() == 2 else ids[None]


def load_tokenizer(folder: Path, required: bool = True):
    """The tokenizer saved beside a checkpoint; without one, a one-line error (or None when not ``required``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        if not required:
            return None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SuperweightError(f"cannot load the tokenizer of {folder}: {first}") from None


@contextlib.contextmanager
def streamed(
    model: "str | Path | ModelSource | StreamedModel", dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None, prefetch: bool = True, held_bytes: int | None = None,
) -> Iterator[StreamedModel]:
    """``model`` as a ``StreamedModel``: the one given (its owner closes it), or one built now and closed
    after the block. A command builds one and passes it to every streamed pass it runs."""
    if isinstance(model, StreamedModel):
        yield model
        return
    with StreamedModel(model, dtype, device, prefetch, held_bytes) as sm:
        yield sm
