"""Quantize a checkpoint larger than memory into an artifact, one decoder layer at a time.

The quantizer is data-free: each weight's codes depend on that weight (and on which super weights are
kept, and, for ``--sa-weight``, on their coordinates), never on activations. So a streamed export reads
a layer (``StreamedModel.layer``), quantizes its targets with the same ``quantize`` call an in-memory
export makes (restricted to the layer: ``within``), packs them and writes them to a part file
(``export.ArtifactWriter``), then drops the layer. The parts become the shards of the artifact (one per
layer, with ``model.safetensors.index.json``), so no byte is written twice; ``sharded=False`` joins them
into one ``model.safetensors`` instead, tensor by tensor. Either way the artifact holds the in-memory
export's tensors byte for byte, and its manifest (sizes aside: each shard has a header) (tests).
A W8A8 artifact (``activations=True``) also needs its inputs' held-out channels, found on calibration
text in the same pass (``streamed_activations``: the calibration batches run through each layer, then
the layer is exported while still read), the in-memory entry.
Memory: the embeddings and final norm, one layer in ``dtype`` and its packed codes, the next layer
read ahead.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..core.errors import SuperweightError
from .artifact import ArtifactWriter, untouched_tensors, finish_artifact, int8_embeddings
from ..core.files import staged_dir
from .api import DEFAULT_EXCLUDE, quantize, target_weights
from .config import RTN, Ternary
from ..model.source import ModelSource
from ..model.streamed import StreamedModel, load_tokenizer, streamed
from .w8a8 import activation_spec, default_calibration, held_of, recording_inputs, w8a8_targets
from .streamed_sweep import RecordedInputs

log = logging.getLogger(__name__)


def stream_quantize(
    path: str | os.PathLike | ModelSource | StreamedModel, config: RTN | Ternary, keep: Iterable | dict | None = None, out: str | os.PathLike = "",
    include: str | None = None, exclude: str | None = DEFAULT_EXCLUDE, param_dtype: torch.dtype = torch.float16,
    dtype: str = "float32", device: str | None = None, force: bool = False, notes: list[str] | None = None,
    sharded: bool = True, activations: bool = False, untouched_dtype: torch.dtype | None = None,
    embeddings: str = "float",
) -> dict:
    """Write the artifact of the local safetensors model at ``path`` (or a ``StreamedModel`` of it) quantized under ``config``, keeping
    ``keep`` exact, reading one decoder layer at a time; returns the manifest. ``sharded``: a file per
    layer and an index (False: one ``model.safetensors``, as the in-memory export writes, one more copy).
    ``activations``: a W8A8 artifact (``config`` 8-bit; inputs quantized per token when loaded, the super
    activations' channels held out: ``streamed_activations``). ``untouched_dtype``, ``embeddings``: how the
    unquantized tensors are stored (``artifact.save_quantized``)."""
    out = Path(out)
    if out.exists() and not force:
        raise SuperweightError(f"{out} already exists: pick another --out or pass --force to replace it")
    with streamed(path, dtype, device or "cpu") as sm:
        model, arch = sm.model, sm.arch
        tokenizer = load_tokenizer(sm.ckpt.folder, required=False)  # none: the artifact has none either
        inside = f"{arch.layers}."
        with staged_dir(out) as tmp:
            writer = ArtifactWriter(tmp, param_dtype, untouched_dtype, int8_embeddings(model, embeddings))

            def export_layer(i: int) -> None:  # layer i is in memory, its weights as stored
                prefix = f"{inside}{i}."
                result = quantize(model, config, keep, include, exclude, arch, param_dtype, write_back=False, within=prefix)
                writer.add_quantized(result)
                writer.add_untouched(*untouched_tensors(model, set(result.tensors), lambda n, p=prefix: n.startswith(p)))
                log.debug("layer %d/%d quantized", i + 1, sm.num_layers)

            acts = None
            if activations:  # the calibration and the export in the same pass: each layer read once
                acts = streamed_activations(sm, tokenizer, include, exclude, each_layer=export_layer, flush=writer.flush)
            else:
                for i in range(sm.num_layers):
                    with sm.layer(i):
                        export_layer(i)
                    writer.flush()
            with sm.materialised(sm.head_names()):  # an untied output head: read now, for the file
                outside = _outside_targets(model, config, keep, include, exclude, arch, param_dtype, inside)
                if outside is not None:
                    writer.add_quantized(outside)
                skip = set(outside.tensors) if outside is not None else set()
                writer.add_untouched(*untouched_tensors(model, skip, lambda n: not n.startswith(inside)))
            return finish_artifact(writer, tmp, model, tokenizer, config, sm.source.ref, notes, acts, sharded=sharded)


def _outside_targets(model, config, keep, include, exclude, arch, param_dtype, inside: str):
    """The targets outside the decoder layers (an ``--include``d lm_head), quantized; None when there are none.
    Kept weights there can only come as ``{module: [indices]}`` (detection's are in the layers)."""
    layers = rf"^{re.escape(inside)}"
    exclude = f"(?:{exclude})|{layers}" if exclude else layers
    if not target_weights(model, include, exclude, arch, required=False):
        return None
    kept = {k: v for k, v in keep.items() if not k.startswith(inside)} if isinstance(keep, dict) else None
    return quantize(model, config, kept, include, exclude, arch, param_dtype, write_back=False)


def streamed_activations(sm: StreamedModel, tokenizer, include: str | None = None,
                         exclude: str | None = DEFAULT_EXCLUDE, ratio: float = 1000.0,
                         each_layer: Callable[[int], None] | None = None, flush: Callable[[], None] | None = None) -> dict:
    """``quant.w8a8.w8a8_activations`` of a streamed model, the same entry: the calibration batches run
    through every layer as it is read (one pass), each target module's inputs recorded meanwhile; modules
    outside the layers (an ``--include``d head) read theirs as the head runs. ``each_layer(i)`` runs once
    the batches have gone through layer ``i``, while it is still in memory (``stream_quantize`` exports it
    there), and ``flush()`` after it has been let go."""
    if tokenizer is None:
        raise SuperweightError(f"{sm.ckpt.folder} has no tokenizer: a W8A8 artifact calibrates its activations on text")
    modules, experts = w8a8_targets(sm.model, include, exclude, sm.arch)
    calib = default_calibration(tokenizer)
    if not calib:
        raise SuperweightError("the calibration text gave no tokens: a W8A8 artifact calibrates its activations on text")
    recorded = RecordedInputs(sm, {**modules, **experts}, medians=True)

    @contextlib.contextmanager
    def calibrating(i: int) -> Iterator[None]:
        with recorded(i):
            yield
        if each_layer is not None:
            each_layer(i)

    outputs = sm.last_outputs(calib, [(k, calibrating) for k in range(len(calib))],
                              after_layer=(lambda i: flush()) if flush is not None else None)
    inside = f"{sm.arch.layers}."
    with recording_inputs({n: m for n, m in modules.items() if not n.startswith(inside)}, recorded.maxima,
                          recorded.medians):
        sm.through_head(outputs, [lambda model, ids=ids: model(input_ids=ids[None].to(sm.device), use_cache=False)
                                  for ids in calib])
    return activation_spec(list(modules), held_of(recorded.maxima, recorded.medians, ratio), experts=list(experts))

