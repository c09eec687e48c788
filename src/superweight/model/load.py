"""Load a causal LM from a hub id, a local folder, a ``.gguf`` file or a built-in name.

GGUF files are dequantized by transformers (slow, ~15-30 s for 135M parameters), so the
converted model is cached as safetensors in a user cache folder keyed by the file's SHA-256;
later loads read the cache. ``SUPERWEIGHT_CACHE`` or ``cache_dir=`` moves the cache.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import re
from typing import Callable, Iterator
from pathlib import Path

import torch

from .arch import SUPPORTED, architecture_name, check_causal_name
from .arch_infer import get_arch, inferred_note, candidate_specs
from .source import DEFAULT_MODEL, BUILTIN_MODELS, ModelSource, SourceKind
from ..core.errors import SuperweightError
from ..core.files import check_output, default_cache_dir, staged_dir, write_text_atomic
from .loaded import LoadedModel, parse_dtype
from ..core import progress
from ..core.progress import step
from . import hub
from .device import device_map_for

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- file checks


# GGUF architectures transformers converts but superweight cannot study: no decoder MLP down-projection
_NOT_DECODER_GGUF = {"mamba": "a state-space model (Mamba)", "t5": "an encoder-decoder (T5)",
                     "umt5": "an encoder-decoder (UMT5)"}


@dataclasses.dataclass
class GGUFInfo:
    """What a GGUF header says: its architecture, its file type (``general.file_type``, e.g.
    ``Q4_K_M``) and each tensor's name and type."""

    architecture: str
    file_type: str | None
    tensors: list[tuple[str, str]]


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def check_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Open a GGUF file with the gguf reader: its header, or a clear error when the file is corrupted
    or holds a model transformers cannot convert (or superweight cannot study)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
        tensors = [(t.name, t.tensor_type.name) for t in reader.tensors]
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
        arch, ftype = _field(reader, "general.architecture"), _field(reader, "general.file_type")
    except Exception as exc:  # the reader raises many kinds on a bad file
        raise SuperweightError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it may be truncated: re-download it"
        ) from None
    if end > os.path.getsize(path):
        raise SuperweightError(f"{path} is truncated: re-download it")
    _check_gguf_architecture(path, arch)
    try:
        name = gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else None
    except ValueError:
        name = None
    return GGUFInfo(str(arch), name, tensors)


def _check_gguf_architecture(path, arch) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch in _NOT_DECODER_GGUF:
        raise SuperweightError(f"{path} is a GGUF of {_NOT_DECODER_GGUF[arch]}, which has no super weights in the "
                               "paper's sense (a decoder MLP's down-projection): pass a decoder-only transformer")
    readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer", *_NOT_DECODER_GGUF})
    if arch not in readable:
        raise SuperweightError(f"{path} is a GGUF of a {arch!r} model, which transformers cannot convert (it reads "
                               f"{', '.join(readable)}): pass the model's Hugging Face folder or hub id instead")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The file's SHA-256, hashed once per process while its size and time stamp stay the same."""
    st = os.stat(path)
    return _sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- loaders


def _check_causal_config(folder_or_id: str, **kw) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder_or_id, **kw)
    except Exception as exc:
        raise SuperweightError(f"cannot read the config of {folder_or_id}: {exc}".splitlines()[0]) from None
    name = architecture_name(config)
    check_causal_name(name)
    if name not in SUPPORTED:  # read its structure from an empty skeleton before any weight is loaded

        candidate_specs(_skeleton(config))
    return name


def _skeleton(config):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise SuperweightError(f"transformers cannot build {architecture_name(config)} from its config: {exc}".splitlines()[0]) from None


def config_skeleton(name: str | ModelSource, cache_dir: str | os.PathLike | None = None):
    """An empty (meta-device) model of ``name`` built from its config alone, no weight read, for the
    checks that need only shapes (layer, row, column and expert ranges) before the weights load: a
    folder's or an artifact's ``config.json``, a GGUF's converted copy in the cache or else its header,
    a hub id already in the hub cache. None when the config cannot be read that way (the load then
    reports why)."""
    from transformers import AutoConfig

    src = ModelSource.of(name)
    kind, where = src.kind, src.path
    kw: dict = {}
    if kind is SourceKind.GGUF:
        cache = gguf_cache_folder(where, Path(cache_dir) if cache_dir else default_cache_dir())
        if (cache / "config.json").is_file():
            where = str(cache)
        else:
            where, kw = os.path.dirname(where) or ".", {"gguf_file": os.path.basename(where)}
    elif kind is SourceKind.HUB:
        if not hub.cached(where):
            return None
        kw = {"local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(where, **kw)
    except Exception:  # noqa: BLE001 (the load itself says what is wrong with the model)
        return None
    return _skeleton(config)


def _from_pretrained(where: str, dtype: torch.dtype, device_map: str | None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    what = os.path.join(where, kw["gguf_file"]) if "gguf_file" in kw else where
    try:  # the tokenizer first: it is quick, and a folder without one fails before the weights load
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    except Exception as exc:
        raise SuperweightError(
            f"cannot read the tokenizer of {what} ({_first_line(exc)}): a model folder needs its tokenizer files "
            "(tokenizer.json, or tokenizer.model / vocab files, with tokenizer_config.json): copy them from the model's release"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, device_map=device_map, **kw)
    except SuperweightError:
        raise
    except Exception as exc:
        raise SuperweightError(f"cannot load {what}: {_first_line(exc)}") from None
    model.eval()
    return model, tokenizer


def _first_line(exc: Exception) -> str:
    """An exception as one line: its message's first line ended by ":" cut off, with the type when the
    message alone says little (a KeyError's is just the key)."""
    text = str(exc).strip()
    first = text.splitlines()[0].rstrip(": ") if text else ""
    if isinstance(exc, (KeyError, IndexError, AttributeError)) or len(first) < 20:
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return first


def hub_options(repo_id: str) -> dict:
    """``from_pretrained`` options for a hub id; fails fast (no retries) when it cannot be fetched.

    A cached model loads from the cache (``local_files_only`` when the hub is not usable); an
    uncached one needs the hub: offline or unreachable, that is a one-line error at once.
    """
    reason = hub.unavailable_reason()
    if reason is None:
        return {}
    if hub.cached(repo_id):
        return {"local_files_only": True}
    raise SuperweightError(
        f"no such file or folder: {repo_id}, and it cannot be fetched as a hub id: {reason}: "
        f"pass a local model folder, a .gguf file or a built-in name ({', '.join(BUILTIN_MODELS)})"
    )


@contextlib.contextmanager
def _gguf_bar() -> Iterator[None]:
    """transformers draws its GGUF conversion bar with tqdm itself: show it only where our bars
    show (a terminal, no --quiet, SUPERWEIGHT_PROGRESS unset)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if progress.enabled() or original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def gguf_cache_folder(path: str, cache_dir: Path) -> Path:
    return cache_dir / "gguf" / f"{Path(path).stem}-{file_sha256(path)[:16]}"


def _convert_gguf(path: str, target: Path) -> None:
    """Dequantize a GGUF with transformers and save it as a plain safetensors model folder."""
    from safetensors.torch import save_model

    folder, filename = os.path.dirname(path) or ".", os.path.basename(path)
    log.info("converting %s (first load only; cached in %s)", filename, target)
    with _gguf_bar():
        model, tokenizer = _from_pretrained(folder, torch.float32, None, gguf_file=filename)
    get_arch(model)
    with staged_dir(target) as tmp:  # a concurrent conversion of the same file is replaced, not an error
        model.config.architectures = [type(model).__name__]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.to_json_file(tmp / "config.json")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def _bits(qtype: str) -> int:
    """The bits per weight a quantization type's name says (Q4_K: 4, IQ3_S: 3, Q8_0: 8)."""
    m = re.search(r"(\d+)", qtype)
    return int(m.group(1)) if m else 16


def _roles(tensors: list[tuple[str, str]]) -> str:
    """Which quantized tensors have which type, by role (``ffn_down: Q4_K in 9 layers, Q6_K in 9``)."""
    by_role: dict[str, collections.Counter] = {}
    for name, qtype in tensors:
        if qtype not in _FLOAT_TYPES:
            role = name.split(".")[2] if name.startswith("blk.") else name.removesuffix(".weight")
            by_role.setdefault(role, collections.Counter())[qtype] += 1
    uniform: dict[str, list[str]] = {}
    mixed = []
    for role, counts in by_role.items():
        if len(counts) == 1:
            uniform.setdefault(next(iter(counts)), []).append(role)
        else:
            mixed.append(f"{role}: " + ", ".join(f"{t} in {n} layers" for t, n in counts.most_common()))
    return "; ".join([*mixed, *(f"{', '.join(roles)}: {t}" for t, roles in uniform.items())])


def gguf_note(info: GGUFInfo) -> str:
    """The note every result of a GGUF model carries: which quantization its float weights went through."""
    quantized = [t for _, t in info.tensors if t not in _FLOAT_TYPES]
    if not quantized:
        return "loaded from a GGUF file with float weights"
    main = info.file_type or collections.Counter(quantized).most_common(1)[0][0]
    low, high = min(map(_bits, quantized)), max(map(_bits, quantized))
    bits = f"{low}-bit" if low == high else f"{low}- to {high}-bit"
    return (f"float weights were dequantized from a {main} GGUF ({_roles(info.tensors)}): every baseline here is that "
            f"of an already {bits}-quantized model, not of the original release")


def _gguf_note_cached(path: str, cache: Path) -> str:
    """Convert the GGUF into ``cache`` on first use; its note, stored beside the converted model.

    Parsing the GGUF's metadata (tens of thousands of vocabulary strings) costs more than loading
    the cached model, so it runs once; the cache is keyed by the file's hash, so a changed or
    truncated file gets a new folder and is checked again.
    """
    note_file = cache / "superweight_note.v2.txt"  # v2: the tensor types by role (v1 named the commonest type only)
    if note_file.is_file() and (cache / "model.safetensors").is_file():
        return note_file.read_text().strip()
    if not (cache / "model.safetensors").is_file():  # a cache that cannot be written fails now, not after converting
        check_output(cache, "the GGUF cache (--cache-dir or SUPERWEIGHT_CACHE)", folder=True)
    note = gguf_note(check_gguf(path))
    if not (cache / "model.safetensors").is_file():
        with step(f"converting {Path(path).name} (first load only)"):
            _convert_gguf(path, cache)
    try:
        write_text_atomic(note_file, note + "\n")
    except (OSError, SuperweightError):  # a read-only cache of an earlier conversion: the note is computed again next time
        pass
    return note


_ARTIFACT_LOADERS: list[Callable] = []  # set by superweight.quant.artifact, the layer that knows the format


def register_artifact_loader(loader: Callable) -> None:
    """How a quantized artifact folder loads (``quant.artifact`` registers ``load_quantized`` on import):
    the model layer recognises an artifact, the quant layer above it reads one."""
    _ARTIFACT_LOADERS[:] = [loader]


def _artifact_loader() -> Callable:
    """The registered loader; ``import superweight`` (the parent of every module) imports ``quant.artifact``."""
    return _ARTIFACT_LOADERS[0]


def load_model(
    name: str | ModelSource = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    cache_dir: str | os.PathLike | None = None,
    device_map: str | None = None,
    device: str | torch.device | None = None,
    dequantize: bool = False,
) -> LoadedModel:
    """Load ``name`` (built-in name, ``.gguf`` file, model folder or hub id) for analysis.

    A quantized artifact keeps its weights packed, or with ``dequantize`` loads as a dense float model.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) puts the whole model there; ``device_map``
    lets accelerate place the layers instead (GPUs, CPU, disk). Neither: the CPU.
    """
    torch_dtype = parse_dtype(dtype)
    device_map = device_map_for(device, device_map)
    src = ModelSource.of(name)
    kind, where, name = src.kind, src.path, src.ref
    if kind is SourceKind.ARTIFACT:
        return _artifact_loader()(where, dtype=torch_dtype, device=device_map or "cpu", dequantize=dequantize)
    notes: list[str] = []
    if kind is SourceKind.GGUF:
        cache = gguf_cache_folder(where, Path(cache_dir) if cache_dir else default_cache_dir())
        notes.append(_gguf_note_cached(where, cache))
        source, where = where, str(cache)
    else:
        source = where
        if src.local_safetensors and any(k.endswith("::codes") for k in src.checkpoint.tensors):
            raise SuperweightError(
                f"{where} holds packed quantized weights but no superweight_manifest.json: "
                "the artifact is damaged, re-export it with `superweight quantize --out`"
            )
        hub_kw = hub_options(where) if kind is SourceKind.HUB else {}
        _check_causal_config(where, **hub_kw)
    with step(f"loading {name}"):
        model, tokenizer = _from_pretrained(where, torch_dtype, device_map, **(hub_kw if kind is SourceKind.HUB else {}))
    arch = get_arch(model)
    if arch.inferred:
        notes.append(inferred_note(arch))
    return LoadedModel(model, tokenizer, arch, name, source, notes)
