"""Packed quantized artifact: write it (``save_quantized``) and load it back (``load_quantized``).

A folder holding ``model.safetensors`` (bit-packed codes, scales, zero points, a sparse exact
outlier table per matrix, the untouched tensors), the model's ``config.json``, its tokenizer and
``superweight_manifest.json`` (scheme, kept weights, source model, tool version, sizes). A model
quantized layer by layer (``quantize --stream``) is written sharded instead, one file per layer and
``model.safetensors.index.json`` as transformers writes them: the same tensors, byte for byte. For a
quantized weight ``W`` the file holds ``W::codes`` (uint8, packed), ``W::scale`` and ``W::zero``
(``[rows, runs]``, float16), and ``W::sparse_idx`` (int32 flat ``[out, in]`` indices) with
``W::sparse_val`` (float16 when that is exact for every value, else the model's dtype: the manifest
says which). The folder is written under a temporary name and renamed, so it is complete or absent.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..core.version import __version__
from ..model.checkpoint import (
    read_header, ARTIFACT_MANIFEST, INDEX, open_checkpoint, index_parts, join_safetensors,
)
from ..model.device import resolve_device
from ..core.errors import SuperweightError
from ..core.files import staged_dir
from ..core.results import Table, Versioned
from .manifest import check_against_model, check_manifest
from ..model.loaded import LoadedModel, parse_dtype
from .api import QuantResult, DEFAULT_EXCLUDE, quantize
from .config import describe, to_dict, EMBEDDING_INT8
from .layout import Layout
from ..model.load import register_artifact_loader
from .schemes import handler
from .primitives import QuantizedTensor, predicted_bytes, sparse_bytes, sparse_dtype, quantize_tensor
from .runtime import KERNELS, replace_linear
from ..model.arch_infer import get_arch
from .w8a8 import attach_activation_quant

MANIFEST = ARTIFACT_MANIFEST
WEIGHTS = "model.safetensors"
MANIFEST_VERSION = 1
SEP = "::"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- sizes


# ---------------------------------------------------------------- packing


def pack_tensor(key: str, qt: QuantizedTensor, param_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = handler(qt.kind).pack(key, qt.packed_codes(), qt.scale, qt.zero, param_dtype)
    if qt.sparse_idx.numel():
        out[f"{key}{SEP}sparse_idx"] = qt.sparse_idx.to(torch.int32)
        out[f"{key}{SEP}sparse_val"] = qt.sparse_val.to(sparse_dtype(qt.sparse_val)).contiguous()
    return {k: v.cpu() for k, v in out.items()}  # packed on the model's device, written from host memory


def untouched_tensors(model: nn.Module, skip: set[str], only=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict minus the quantized weights; tied tensors stored once (alias -> stored name).
    ``only(name)``: the names to take (a streamed export takes one layer's at a time)."""
    tensors, tied, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        if name in skip or (only is not None and not only(name)):
            continue
        ptr = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and ptr in seen:
            tied[name] = seen[ptr]
            continue
        seen[ptr] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()  # the file is written from host memory
    return tensors, tied


def _tensor_entry(qt: QuantizedTensor, transposed: bool, view: list[int] | None = None) -> dict:
    entry = {
        "kind": qt.kind, "bits": qt.bits, "shape": list(qt.shape), "layout": qt.layout.to_dict(),
        "transposed": transposed, "packing": handler(qt.kind).packing(qt.bits),
        "sparse": int(qt.sparse_idx.numel()),
        "sparse_dtype": _dtype_name(sparse_dtype(qt.sparse_val)) if qt.sparse_idx.numel() else None,
    }
    return entry | ({"view": view} if view else {})  # experts: the [experts, out, in] the matrix is a view of


def embedding_names(model: nn.Module) -> set[str]:
    """The weights of the input and output embeddings (``model.embed_tokens.weight``, ``lm_head.weight``)."""
    found = {getattr(model, get)() for get in ("get_input_embeddings", "get_output_embeddings") if hasattr(model, get)}
    return {f"{name}.weight" for name, m in model.named_modules() if m in found and m is not None}


def int8_embeddings(model: nn.Module, embeddings: str) -> set[str]:
    """The names ``embeddings`` (``float`` or ``int8``) stores as 8-bit codes."""
    if embeddings not in ("float", "int8"):
        raise SuperweightError(f"embeddings must be 'float' or 'int8', not {embeddings!r}")
    return embedding_names(model) if embeddings == "int8" else set()


def stored_dtype(t: torch.Tensor, asked: torch.dtype | None) -> torch.dtype:
    """The dtype an untouched tensor is stored in: ``asked``, else a 16-bit model's own dtype, and a float32
    tensor in float16 (bfloat16 when a value is beyond float16's range)."""
    if not t.is_floating_point():
        return t.dtype
    if asked is not None:
        return asked
    if t.dtype != torch.float32:
        return t.dtype
    return torch.float16 if not t.numel() or float(t.abs().max()) <= torch.finfo(torch.float16).max else torch.bfloat16


class ArtifactWriter:
    """An artifact's weights file, written in pieces: quantized results (packed) and untouched tensors are
    added as they come, ``flush`` writes what has come to a part file in the staging folder, ``write``
    joins the parts into one ``model.safetensors`` (a single part is renamed: the in-memory export is one
    ``save_file``). A model quantized layer by layer (``stream_quantize``) flushes each layer, so no more
    than one layer's packed tensors are ever held. Keeps what the manifest needs: entries, kept, sizes.

    Untouched tensors are stored in ``stored_dtype(t, untouched_dtype)`` (16-bit unless asked); those
    named in ``int8_names`` (the embeddings, ``embeddings="int8"``) as per-row 8-bit codes instead
    (``EMBEDDING_INT8``: a manifest entry like a quantized weight's, marked ``"embedding": true``)."""

    def __init__(self, folder: Path, param_dtype: torch.dtype, untouched_dtype: torch.dtype | None = None,
                 int8_names: set[str] | frozenset = frozenset()):
        self.folder, self.param_dtype = Path(folder), param_dtype
        self.untouched_dtype, self.int8_names = untouched_dtype, set(int8_names)
        self.stored_dtypes: dict[str, int] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._parts: list[Path] = []
        self.entries: dict[str, dict] = {}
        self.kept: list[dict] = []
        self.tied: dict[str, str] = {}
        self.quantized_weights = self.quantized_bytes = self.sparse_bytes = self.untouched_bytes = 0

    def add_quantized(self, result: QuantResult) -> None:
        for key, qt in result.tensors.items():
            self._pending.update(pack_tensor(key, qt, self.param_dtype))
            self.entries[key] = _tensor_entry(qt, result.transposed[key], result.views.get(key))
            self.quantized_weights += qt.numel
            self.quantized_bytes += predicted_bytes(qt)
            self.sparse_bytes += sparse_bytes(qt)
        self.kept += result.kept

    def add_untouched(self, tensors: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
        self.tied.update(tied)
        for name, t in tensors.items():
            if name in self.int8_names and t.is_floating_point() and t.dim() == 2:
                self._add_int8(name, t)
                continue
            t = t.to(stored_dtype(t, self.untouched_dtype))
            self._pending[name] = t
            key = _dtype_name(t.dtype)
            self.stored_dtypes[key] = self.stored_dtypes.get(key, 0) + t.numel()
            self.untouched_bytes += t.numel() * t.element_size()

    def _add_int8(self, name: str, t: torch.Tensor) -> None:
        qt = quantize_tensor(t, EMBEDDING_INT8, param_dtype=torch.float16, packed=True)
        self._pending.update(pack_tensor(name, qt, torch.float16))
        self.entries[name] = _tensor_entry(qt, False) | {"embedding": True}
        self.stored_dtypes["int8"] = self.stored_dtypes.get("int8", 0) + t.numel()
        self.untouched_bytes += predicted_bytes(qt)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self._pending:
            part = self.folder / f".part-{len(self._parts):05d}.safetensors"
            save_file(self._pending, str(part), metadata=_FILE_METADATA)
            self._parts.append(part)
            self._pending = {}

    def write(self, folder: Path, sharded: bool = False) -> list[Path]:
        """The weights files in ``folder`` (the staging folder: the publishing rename is ``staged_dir``'s):
        one ``model.safetensors``, the parts joined, or with ``sharded`` the parts themselves and an index
        (a single part is always renamed to ``model.safetensors``). Returns the files."""
        self.flush()
        if len(self._parts) == 1:
            self._parts[0].rename(folder / WEIGHTS)
        elif sharded:
            return index_parts(self._parts, folder, _FILE_METADATA)
        else:
            join_safetensors(self._parts, folder / WEIGHTS, _FILE_METADATA)
            for part in self._parts:
                part.unlink()
        return [folder / WEIGHTS]

    def size(self, file_bytes: int, total_params: int, header_bytes: int) -> dict:
        """Measured and predicted sizes, and bits per quantized weight."""
        n = self.quantized_weights
        return {
            "file_bytes": file_bytes,
            "predicted_data_bytes": self.quantized_bytes + self.untouched_bytes,
            "data_bytes": file_bytes - header_bytes,
            "header_bytes": header_bytes,
            "quantized_weights": n,
            "quantized_bytes": self.quantized_bytes,
            "bits_per_weight": 8.0 * self.quantized_bytes / n,
            "sparse_bits_per_weight": 8.0 * self.sparse_bytes / n,
            "total_params": total_params,
            "file_bits_per_param": 8.0 * file_bytes / total_params,
            "float16_bytes": 2 * total_params,
            "ratio_to_float16": file_bytes / (2 * total_params),
        }


_FILE_METADATA = {"format": "pt", "superweight": __version__}


@dataclass
class Manifest(Versioned):
    """``superweight_manifest.json`` typed: the scheme, the kept weights, every quantized tensor's entry
    and the sizes. ``save_quantized`` writes it; ``Manifest.from_dict(read_manifest(path))`` reads it back."""

    KIND: ClassVar[str] = "artifact manifest"
    VERSION: ClassVar[int] = MANIFEST_VERSION
    WRITER: ClassVar[str] = "`superweight quantize --out DIR`"
    scheme: str
    config: dict
    param_dtype: str
    dtype: str
    source_model: str
    architecture: str
    kept: list[dict]
    tied: dict[str, str]
    tensors: dict[str, dict]
    size: dict
    notes: list[str] = field(default_factory=list)
    activations: dict | None = None
    stored_dtypes: dict[str, int] = field(default_factory=dict)
    tool_version: str = __version__

    def to_dict(self) -> dict:
        d = super().to_dict()
        return {k: v for k, v in d.items() if k != "kind" and not (k == "activations" and v is None)}

    def tables(self, out: str | os.PathLike = "") -> list[Table]:
        s = self.size
        header = ["quantized weights", "bits/weight", "sparse bits/weight", "kept", "file MB", "predicted MB", "file bits/param",
                  "x float16"]
        row = [f"{s['quantized_weights']:,}", f"{s['bits_per_weight']:.4f}", f"{s['sparse_bits_per_weight']:.2e}",
               str(len(self.kept)), f"{s['file_bytes'] / 1e6:.2f}",
               f"{(s['predicted_data_bytes'] + s['header_bytes']) / 1e6:.2f}", f"{s['file_bits_per_param']:.3f}",
               f"{s['ratio_to_float16']:.3f}" if "ratio_to_float16" in s else "-"]
        tables = [Table(f"{self.scheme} -> {out}" if out else self.scheme, header, [row])]
        if self.activations:
            a = self.activations
            held = a.get("held_out_channels", {})
            tables.append(Table("activations (W8A8)", ["inputs quantized", "granularity", "held-out channels", "found on"],
                                [[f"{len(a['modules'])} modules, {a['bits']}-bit", a.get("granularity", "per_token"),
                                  f"{sum(map(len, held.values()))} in {len(held)} modules", a.get("found_on", "")]]))
        return tables


def save_quantized(
    model: nn.Module, tokenizer, result: QuantResult, out: str | os.PathLike, source: str = "",
    notes: list[str] | None = None, force: bool = False, param_dtype: torch.dtype = torch.float16,
    activations: dict | None = None, untouched_dtype: torch.dtype | None = None, embeddings: str = "float",
) -> dict:
    """Write the artifact of a model already fake-quantized by ``quantize`` (``result``); return the manifest.

    ``activations`` (a W8A8 artifact): ``{"bits": 8, "modules": [...], "held_out_channels": {...}}``,
    stored in the manifest and installed as input quantization when the artifact is loaded.
    ``untouched_dtype``: the dtype of the tensors left unquantized (None: ``stored_dtype``'s 16-bit rule);
    ``embeddings="int8"`` stores the embeddings as per-row 8-bit codes."""
    out = Path(out)
    if out.exists() and not force:
        raise SuperweightError(f"{out} already exists: pick another --out or pass --force to replace it")
    with staged_dir(out) as tmp:
        writer = ArtifactWriter(tmp, param_dtype, untouched_dtype, int8_embeddings(model, embeddings))
        writer.add_untouched(*untouched_tensors(model, set(result.tensors)))
        writer.add_quantized(result)
        return finish_artifact(writer, tmp, model, tokenizer, result.config, source, notes, activations)


def finish_artifact(writer: ArtifactWriter, tmp: Path, model: nn.Module, tokenizer, config, source: str = "",
                    notes: list[str] | None = None, activations: dict | None = None, sharded: bool = False) -> dict:
    """Write the weights file(s), config, tokenizer and manifest of an artifact into its staging folder ``tmp``
    (``model`` may be a skeleton on the meta device: only its config and parameter count are read)."""
    files = writer.write(tmp, sharded)
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    file_bytes = sum(f.stat().st_size for f in files)
    total = sum(p.numel() for p in model.parameters())
    manifest = {
        "version": MANIFEST_VERSION,
        "tool_version": __version__,
        "scheme": describe(config),
        "config": to_dict(config),
        "param_dtype": _dtype_name(writer.param_dtype),
        "dtype": _dtype_name(next(model.parameters()).dtype),
        "source_model": source,
        "architecture": type(model).__name__,
        "notes": list(notes or []),
        "kept": writer.kept,
        "tied": writer.tied,
        "tensors": writer.entries,
        "size": writer.size(file_bytes, total, sum(read_header(f).data_start for f in files)),
        "stored_dtypes": writer.stored_dtypes,
    }
    if activations:
        manifest["activations"] = activations
    Manifest.from_dict(manifest)  # the typed manifest accepts what is written
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_artifact(
    lm, config, keep=None, out: str | os.PathLike = "", force: bool = False, include: str | None = None,
    exclude: str | None = None, param_dtype: torch.dtype = torch.float16, write_back: bool = True,
    activations: dict | None = None, untouched_dtype: torch.dtype | None = None, embeddings: str = "float",
) -> dict:
    """Quantize ``lm.model`` and write its packed artifact to ``out``. ``write_back=True`` (the
    default) also leaves ``lm.model`` fake-quantized in place; ``False`` leaves its weights untouched
    and skips the write-back and the SQNR (the same file, two passes fewer per weight). ``activations``:
    a W8A8 artifact's entry (``quant.w8a8.w8a8_activations``, found before the weights change).
    ``untouched_dtype``, ``embeddings``: how the unquantized tensors are stored (``save_quantized``)."""
    if Path(out).exists() and not force:
        raise SuperweightError(f"{out} already exists: pick another --out or pass --force to replace it")
    result = quantize(lm.model, config, keep=keep, include=include,
                      exclude=DEFAULT_EXCLUDE if exclude is None else exclude, arch=lm.arch, param_dtype=param_dtype,
                      write_back=write_back)
    return save_quantized(lm.model, lm.tokenizer, result, out, source=lm.source or lm.name, notes=lm.notes,
                          force=force, param_dtype=param_dtype, activations=activations,
                          untouched_dtype=untouched_dtype, embeddings=embeddings)


# ---------------------------------------------------------------- loading


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise SuperweightError(f"{path} is not a superweight quantized artifact (no {MANIFEST}): write one with `superweight quantize --out`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SuperweightError(f"{path / MANIFEST} is corrupted ({exc}): re-export the artifact") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        got = manifest.get("version") if isinstance(manifest, dict) else None
        raise SuperweightError(f"artifact manifest version {got!r} is not {MANIFEST_VERSION}: re-export it with this version")
    return check_manifest(manifest, path)


def _layout(entry: dict) -> Layout:
    L = Layout(**entry["layout"])
    if L.numel != math.prod(entry["shape"]):
        raise ValueError(f"layout holds {L.numel} elements, shape {entry['shape']} needs {math.prod(entry['shape'])}")
    return L


def _expect(t: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {shape}")
    return t


def unpack_tensor(f, key: str, entry: dict, packed: bool = False) -> QuantizedTensor:
    """Rebuild one ``QuantizedTensor`` from an open safetensors file, checking every shape; ``packed``: its
    codes as stored (``QuantizedTensor.packed``), not unpacked."""
    L = _layout(entry)
    kind, bits = entry["kind"], int(entry["bits"])
    stored, scale, zero = handler(kind).read_packed(f.get_tensor, key, bits, L)
    codes = None if packed else handler(kind).unpack_codes(stored, bits, L.numel)
    idx, val = torch.zeros(0, dtype=torch.int64, device="cpu"), torch.zeros(0, device="cpu")
    if entry.get("sparse"):
        idx = f.get_tensor(f"{key}{SEP}sparse_idx").long()
        val = _expect(f.get_tensor(f"{key}{SEP}sparse_val"), tuple(idx.shape), f"{key} sparse values")
        if idx.numel() != entry["sparse"] or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= L.numel)):
            raise ValueError(f"{key} sparse indices are out of range")
    return QuantizedTensor(kind, bits, tuple(entry["shape"]), L, codes, scale, zero, idx, val, stored if packed else None)


def read_state_dict(path: str | os.PathLike, manifest: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dequantized weights plus untouched tensors, every quantized weight in its stored orientation."""
    return read_weights(path, manifest, dtype)[0]


def stays_packed(entry: dict) -> bool:
    """Whether a quantized tensor loads as a ``PackedLinear`` (not an 8-bit embedding, not fused experts)."""
    return not entry.get("embedding") and not entry.get("view")


def read_weights(path: str | os.PathLike, manifest: dict, dtype: torch.dtype, packed: bool = False,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """``(state, packed tensors)``: the untouched tensors and the dequantized weights by name, and with
    ``packed`` the weights that ``stays_packed`` as ``QuantizedTensor``s holding their stored codes instead."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() and not (path / INDEX).is_file():
        raise SuperweightError(f"{path / WEIGHTS} is missing: the artifact is incomplete, re-export it")
    state: dict[str, torch.Tensor] = {}
    held: dict[str, QuantizedTensor] = {}
    try:
        with _WeightFiles(open_checkpoint(path)) as f:
            for key, entry in manifest["tensors"].items():
                if packed and stays_packed(entry):
                    held[key] = unpack_tensor(f, key, entry, packed=True)
                    continue
                w = unpack_tensor(f, key, entry).dequantize(dtype)
                w = w.t().contiguous() if entry["transposed"] else w
                state[key] = w.reshape(entry["view"]) if entry.get("view") else w
            for name in f.keys():
                if SEP not in name:
                    state[name] = f.get_tensor(name)
    except SuperweightError as exc:
        raise SuperweightError(f"{path} is a corrupted artifact ({exc})") from None
    except Exception as exc:  # safetensors / torch raise many kinds on a damaged file
        raise SuperweightError(f"{path} is a corrupted artifact ({type(exc).__name__}: {exc}): re-export it") from None
    return state, held


class _WeightFiles:
    """The weights of an artifact (one file or shards) read by tensor name, like one ``safe_open``."""

    def __init__(self, ckpt) -> None:
        self.ckpt, self._open, self._stack = ckpt, {}, contextlib.ExitStack()

    def __enter__(self) -> "_WeightFiles":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self.ckpt.tensors)

    def get_tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self.ckpt.tensors.get(name)
        if info is None:
            raise ValueError(f"{name} is missing")
        if info.file not in self._open:
            self._open[info.file] = self._stack.enter_context(safe_open(str(info.file), framework="pt"))
        return self._open[info.file].get_tensor(name)


def load_quantized(
    path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | torch.device | None = "cpu",
    dequantize: bool = False, kernel: str = "auto",
):
    """Rebuild a working transformers model (and tokenizer) from an artifact: a ``LoadedModel``.

    The quantized linear layers stay packed (``quant.runtime.PackedLinear``: ``kernel`` ``auto`` runs each
    layer on the first of the native int4 kernel (CPU, float32), torch's int4 kernel (bfloat16) and the fused
    dequantize-then-matmul that fits its layout; ``native`` or ``int4`` requires that kernel for every layer,
    ``fused`` uses no kernel); 8-bit embeddings and fused MoE experts
    load dense. ``dequantize=True``: every weight dense, as a float model (what editing weights needs).
    The model then moves to ``device`` (``auto``: CUDA when available)."""
    from transformers import AutoTokenizer

    if kernel not in KERNELS:
        raise SuperweightError(f"unknown kernel {kernel!r}: one of {', '.join(KERNELS)}")
    path = Path(path)
    manifest = read_manifest(path)
    torch_dtype = parse_dtype(dtype) if dtype is not None else _DTYPES.get(manifest.get("dtype"), torch.float32)
    model = _skeleton(path, torch_dtype)
    check_against_model(manifest, model, path)
    state, held = read_weights(path, manifest, torch_dtype, packed=not dequantize)
    _assign(model, {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}, manifest, held, path)
    target = resolve_device(device)
    kernels = []
    while held:  # each layer's unpacked codes are freed once it is packed: the load holds one layer's, not all
        key, qt = held.popitem()
        kernels.append(replace_linear(model, key, qt, kernel, target).kernel)
    model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise SuperweightError(f"{path} lacks {meta[0]} (and {len(meta) - 1} more): re-export it")
    model.to(target).eval()
    if manifest.get("activations"):
        attach_activation_quant(model, manifest["activations"])
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if (path / "tokenizer_config.json").is_file() else None
    notes = list(manifest.get("notes", [])) + [f"quantized artifact: {manifest['scheme']}, {manifest['size']['bits_per_weight']:.3f} bits per quantized weight"]
    notes += _packed_notes(manifest, kernels, dequantize)
    if acts := manifest.get("activations"):
        n = sum(map(len, acts.get("held_out_channels", {}).values()))
        notes.append(f"W8A8: inputs quantized to {acts['bits']} bits per token in {len(acts['modules'])} modules"
                     + (f" and {len(acts['experts'])} experts modules" if acts.get("experts") else "")
                     + f", {n} super-activation channel{'' if n == 1 else 's'} held out")
    return LoadedModel(model, tokenizer, get_arch(model), str(path), manifest.get("source_model", ""), notes)


def _skeleton(path: Path, torch_dtype: torch.dtype) -> nn.Module:
    """The artifact's model on the meta device (no random init, no copy)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path))
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    except Exception as exc:  # transformers raises many kinds on a damaged config.json
        raise SuperweightError(f"{path} is a corrupted artifact (config: {exc}): re-export it".splitlines()[0]) from None


def _assign(model: nn.Module, state: dict, manifest: dict, held: dict, path: Path) -> None:
    """Load ``state`` into the skeleton; every weight must be there, tied to another or ``held`` packed."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # a stored tensor of another shape than the config's
        raise SuperweightError(f"{path} does not match its config ({str(exc).strip().splitlines()[-1].strip()}): re-export it") from None
    missing = [m for m in missing if m not in manifest.get("tied", {}) and m not in held]
    if missing or unexpected:
        raise SuperweightError(f"{path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}): re-export it")


def _packed_notes(manifest: dict, kernels: list[str], dequantize: bool) -> list[str]:
    if dequantize:
        return ["weights dequantized to a dense float model (dequantize=True)"]
    notes = []
    if kernels:
        notes.append(f"weights held packed: {kernels.count('native')} layers on the native int4 kernel, "
                     f"{kernels.count('int4')} on torch's int4 kernel, {kernels.count('fused')} on the fused "
                     "dequantize-then-matmul")
    experts = [k for k, e in manifest["tensors"].items() if e.get("view")]
    if experts:
        notes.append(f"{len(experts)} fused MoE experts weights loaded dense (no packed experts module)")
    return notes


register_artifact_loader(load_quantized)
