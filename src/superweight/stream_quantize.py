"""Quantize a checkpoint larger than memory into an artifact, one decoder layer at a time.

The quantizer is data-free: each weight's codes depend on that weight (and on which super weights are
kept, and, for ``--sa-weight``, on their coordinates), never on activations. So a streamed export reads
a layer (``StreamedModel.layer``), quantizes its targets with the same ``quantize`` call an in-memory
export makes (restricted to the layer: ``within``), packs them and writes them to a part file
(``export.ArtifactWriter``), then drops the layer. The parts become the shards of the artifact (one per
layer, with ``model.safetensors.index.json``), so no byte is written twice; ``sharded=False`` joins them
into one ``model.safetensors`` instead, tensor by tensor. Either way the artifact holds the in-memory
export's tensors byte for byte, and its manifest (sizes aside: each shard has a header) (tests).
Memory: the embeddings and final norm, one layer in ``dtype`` and its packed codes, the next layer
read ahead.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable

import torch

from .errors import SuperweightError
from .export import ArtifactWriter, _untouched, finish_artifact
from .files import staged_dir
from .quant.api import DEFAULT_EXCLUDE, quantize, target_weights
from .quant.config import RTN, Ternary
from .stream import StreamedModel

log = logging.getLogger(__name__)


def stream_quantize(
    path: str | os.PathLike, config: RTN | Ternary, keep: Iterable | dict | None = None, out: str | os.PathLike = "",
    include: str | None = None, exclude: str | None = DEFAULT_EXCLUDE, param_dtype: torch.dtype = torch.float16,
    dtype: str = "float32", device: str | None = None, force: bool = False, notes: list[str] | None = None,
    sharded: bool = True,
) -> dict:
    """Write the artifact of the local safetensors model at ``path`` quantized under ``config``, keeping
    ``keep`` exact, reading one decoder layer at a time; returns the manifest. ``sharded``: a file per
    layer and an index (False: one ``model.safetensors``, as the in-memory export writes, one more copy)."""
    out = Path(out)
    if out.exists() and not force:
        raise SuperweightError(f"{out} already exists: pick another --out or pass --force to replace it")
    sm = StreamedModel(path, dtype=dtype, device=device or "cpu")
    try:
        model, arch = sm.model, sm.arch
        inside = f"{arch.layers}."
        with staged_dir(out) as tmp:
            writer = ArtifactWriter(tmp, param_dtype)
            for i in range(sm.num_layers):
                prefix = f"{inside}{i}."
                with sm.layer(i):
                    result = quantize(model, config, keep, include, exclude, arch, param_dtype, write_back=False, within=prefix)
                    writer.add_quantized(result)
                    writer.add_untouched(*_untouched(model, set(result.tensors), lambda n, p=prefix: n.startswith(p)))
                writer.flush()
                log.debug("layer %d/%d quantized", i + 1, sm.num_layers)
            with sm.materialised(sm.head_names()):  # an untied output head: read now, for the file
                outside = _outside_targets(model, config, keep, include, exclude, arch, param_dtype, inside)
                if outside is not None:
                    writer.add_quantized(outside)
                skip = set(outside.tensors) if outside is not None else set()
                writer.add_untouched(*_untouched(model, skip, lambda n: not n.startswith(inside)))
            return finish_artifact(writer, tmp, model, _tokenizer(sm.ckpt.folder), config, str(path), notes,
                                   sharded=sharded)
    finally:
        sm.close()


def _outside_targets(model, config, keep, include, exclude, arch, param_dtype, inside: str):
    """The targets outside the decoder layers (an ``--include``d lm_head), quantized; None when there are none.
    Kept weights there can only come as ``{module: [indices]}`` (detection's are in the layers)."""
    layers = rf"^{re.escape(inside)}"
    exclude = f"(?:{exclude})|{layers}" if exclude else layers
    if not target_weights(model, include, exclude, arch, required=False):
        return None
    kept = {k: v for k, v in keep.items() if not k.startswith(inside)} if isinstance(keep, dict) else None
    return quantize(model, config, kept, include, exclude, arch, param_dtype, write_back=False)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # a checkpoint without a tokenizer: the artifact has none either
        return None
