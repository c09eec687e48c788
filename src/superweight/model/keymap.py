"""Which checkpoint keys hold each model tensor, as ``from_pretrained`` maps them.

transformers renames legacy keys (GPT-NeoX's ``embed_out``, a missing base-model prefix,
Mixtral's ``block_sparse_moe``) and, since version 5, *converts* some: a mixture of experts is
stored one expert at a time (``mlp.experts.3.down_proj.weight``) but lives in the model as one 3-D
tensor (``mlp.experts.down_proj``), built on load by stacking (and concatenating gate and up).
``checkpoint_keys`` gives, per model tensor, either its one key or a ``Fused``: the keys and the
converter's own operations that build it, so a streamed layer is bitwise what ``from_pretrained``
loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint
from ..core.errors import SuperweightError


@dataclass
class Fused:
    """A model tensor transformers builds from several checkpoint tensors (``converter``, a
    ``WeightConverter``): ``parts`` maps each of its source patterns to the keys it matched, in the
    order loading collects them."""

    name: str
    converter: Any
    parts: dict[str, list[str]] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [k for keys in self.parts.values() for k in keys]

    def build(self, tensors: dict[str, torch.Tensor], config=None) -> torch.Tensor:
        """The model tensor from its parts (``tensors``: checkpoint key -> tensor), by the
        converter's operations, as ``from_pretrained`` runs them."""
        c = self.converter
        collected: dict = {p: [tensors[k] for k in keys] for p, keys in self.parts.items()}
        try:
            for op in c.operations:
                collected = op.convert(collected, source_patterns=c.source_patterns, target_patterns=c.target_patterns,
                                       full_layer_name=self.name, config=config, model=None, missing_keys=None)
        except Exception as exc:
            raise SuperweightError(
                f"cannot stream {self.name}: transformers' conversion of its {len(self.keys)} stored tensors failed "
                f"({type(exc).__name__}: {exc}); load the model without --stream".splitlines()[0]
            ) from None
        if len(collected) != 1:
            raise SuperweightError(f"cannot stream {self.name}: its conversion gives {len(collected)} tensors, not one; "
                                   "load the model without --stream")
        return next(iter(collected.values()))


def checkpoint_keys(model: nn.Module, ckpt: Checkpoint) -> tuple[dict[str, str], dict[str, Fused]]:
    """(model tensor name -> checkpoint key, model tensor name -> ``Fused``) with transformers' own
    renamings and converters, as ``from_pretrained`` applies them."""
    try:  # transformers >= 5
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:
        prefix = model.base_model_prefix + "."
        own = set(model.state_dict())
        return {(k if k in own or prefix + k not in own else prefix + k): k for k in ckpt.tensors}, {}

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    names: dict[str, str] = {}
    fused: dict[str, Fused] = {}
    for key in sorted(ckpt.tensors, key=dot_natural_key):  # loading's order: experts 0, 1, ..., 10
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if pattern is None:
            names.setdefault(name, key)
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        entry = fused.setdefault(name, Fused(name, converter, {p: [] for p in converter.source_patterns}))
        entry.parts[pattern].append(key)
    return names, fused


def tied_names(names: dict[str, str], aliases: dict[str, list[str]]) -> dict[str, str]:
    """``names`` (model name -> checkpoint key) with every name of a tied parameter pointing at the
    key stored under any of them: a tied checkpoint may store the embedding as ``lm_head.weight``
    (superweight's own GGUF conversions do) instead of ``model.embed_tokens.weight``."""
    out = dict(names)
    for tied in aliases.values():
        stored = next((names[n] for n in tied if n in names), None)
        for n in tied if stored else ():
            out.setdefault(n, stored)
    return out
