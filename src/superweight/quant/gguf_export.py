"""A whole model as one GGUF file that llama.cpp runs (``superweight quantize --format gguf``).

What is written, tensor by tensor, is what ``llama-quantize --pure`` writes with ``--tensor-type``
overrides and ``--token-embedding-type``/``--output-tensor-type`` set: every 2-D decoder weight in the
chosen type (``gguf_codec``: llama.cpp's fallback where a row is not whole blocks), the tensors
holding super weights in a higher type (the bridge's ``overrides_for``, F16 by default), the token
embedding and output head in ``embed_type`` (Q8_0 by default), norms and other 1-D tensors in F32.

Where the model came from:

- a GGUF file (the built-in models, any ``.gguf``): its metadata and tokenizer are copied as they are
  (only ``general.file_type`` changes), its 1-D tensors are read from it, and its 2-D weights come
  from the loaded model, mapped back to GGUF names by gguf-py's ``TensorNameMap`` (Q/K of a Llama
  permuted back to llama.cpp's rotary layout). Any architecture llama.cpp reads this way.
- a Hugging Face folder or hub id of the Llama family (``LLAMA_FAMILY``): the metadata is written
  from ``config.json`` and the byte-level BPE tokenizer from ``tokenizer.json``, Q/K permuted exactly as
  llama.cpp's ``convert_hf_to_gguf.py`` does. Other architectures are refused with one line.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..core.errors import SuperweightError
from . import gguf_codec
from .llama_cpp import GGUF_ARCH, gguf_arch_name, overrides_for

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM")
EMBED_TYPE = "q8_0"
SUPER_WEIGHT_TYPE = "f16"
_COPY_SKIP = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


@dataclass
class GGUFPlan:
    """What each tensor becomes: ``types`` by GGUF tensor name; ``overrides`` the super weights' tensors."""

    base: str
    search: bool
    embed_type: str = EMBED_TYPE
    overrides: dict[str, str] = field(default_factory=dict)

    def type_for(self, name: str, shape: Sequence[int]) -> str:
        if len(shape) < 2:
            return "f32"
        wanted = self.overrides.get(name)
        if wanted is None:
            wanted = self.embed_type if name in ("token_embd.weight", "output.weight") else self.base
        return gguf_codec.fitting_type(wanted, int(shape[-1]))


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face rotate-half Q/K rows -> llama.cpp's interleaved rotary rows (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_rotary`` (what transformers' GGUF loader does)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _is_gguf(source: str) -> bool:
    return str(source).lower().endswith(".gguf") and Path(source).is_file()


def check_exportable(lm) -> None:
    """One line when ``lm`` cannot be written as a GGUF (before any work is done)."""
    arch = lm.arch.name
    if arch not in GGUF_ARCH:
        raise SuperweightError(f"llama.cpp has no architecture for {arch}: --format gguf covers {', '.join(sorted(GGUF_ARCH))}")
    if not _is_gguf(lm.source) and arch not in LLAMA_FAMILY:
        raise SuperweightError(f"--format gguf writes a {arch} only from a GGUF file (its metadata and tokenizer are copied); "
                               f"from a Hugging Face folder it writes {', '.join(LLAMA_FAMILY)}: convert with llama.cpp's "
                               "convert_hf_to_gguf.py first and pass that .gguf")
    if not _is_gguf(lm.source):
        _check_llama_config(lm.model.config)
        if not _bpe(lm.tokenizer)["model"].get("merges"):
            raise SuperweightError("the tokenizer's BPE has no merges, which llama.cpp's BPE needs: "
                                   "pass a model with a trained tokenizer")


def _check_llama_config(cfg) -> None:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise SuperweightError(f"rope scaling {rope.get('rope_type')!r} is not written by --format gguf: convert with "
                               "llama.cpp's convert_hf_to_gguf.py first and pass that .gguf")


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _bpe(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok = json.loads(backend.to_str()) if backend is not None else {}
    if tok.get("model", {}).get("type") != "BPE":
        raise SuperweightError("--format gguf from a Hugging Face folder needs a BPE tokenizer.json: convert with llama.cpp's "
                               "convert_hf_to_gguf.py first and pass that .gguf")
    return tok


# ---------------------------------------------------------------- the tensors, in GGUF layout


def _name_map(lm):
    import gguf

    n = lm.model.config.num_hidden_layers
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, GGUF_ARCH[lm.arch.name]), n)


def _model_tensors(lm) -> dict[str, torch.Tensor]:
    """The model's weights by GGUF name, Q/K of a Llama permuted to llama.cpp's layout."""
    cfg, names, out = lm.model.config, _name_map(lm), {}
    llama = gguf_arch_name(lm.arch.name) == "llama"
    for key, t in lm.model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        tied = name == "output.weight" and getattr(cfg, "tie_word_embeddings", False)
        if name is None or name in out or tied:
            continue  # a tied head is not stored: llama.cpp reads token_embd
        t = t.detach().float().cpu()
        if llama and name.endswith("attn_q.weight"):
            t = permute_rotary(t, cfg.num_attention_heads)
        elif llama and name.endswith("attn_k.weight"):
            t = permute_rotary(t, cfg.num_key_value_heads)
        out[name] = t
    return out


def _tensors(lm) -> Iterator[tuple[str, torch.Tensor]]:
    """``(GGUF name, float32 tensor [ne1, ne0])`` in the order the file lists them."""
    model = _model_tensors(lm)
    if not _is_gguf(lm.source):
        yield from model.items()
        return
    from gguf import GGUFReader, quants

    for t in GGUFReader(lm.source, "r").tensors:
        if len(t.shape) >= 2:
            if t.name not in model:
                raise SuperweightError(f"{lm.source}: tensor {t.name} has no weight in the loaded model: update the gguf package")
            yield t.name, model[t.name]
        else:  # norms and other 1-D tensors, as the source file holds them
            yield t.name, torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


# ---------------------------------------------------------------- metadata


def _copy_metadata(w, source: str) -> None:
    import gguf

    for key, f in gguf.GGUFReader(source, "r").fields.items():
        if key.startswith(_COPY_SKIP):
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)


def _llama_metadata(w, lm) -> None:
    cfg = lm.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokenizer_metadata(w, lm.tokenizer, cfg.vocab_size)


def tokenizer_metadata(w, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer model (vocabulary, merges, special
    tokens), padded to the embedding's ``vocab_size`` rows with unused ``[PADi]`` tokens as
    convert_hf_to_gguf.py pads it."""
    tok = _bpe(tokenizer)
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in tok.get("added_tokens", [])})
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(vocab_size, 1 + max(by_id)))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    special = {a["id"] for a in tok.get("added_tokens", [])}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 if i in by_id else 5 for i in range(len(tokens))])
    w.add_token_merges(merges)
    for setter, tid in ((w.add_bos_token_id, tokenizer.bos_token_id), (w.add_eos_token_id, tokenizer.eos_token_id),
                        (w.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            setter(tid)


def _file_type(base: str) -> int:
    import gguf

    name = {"f32": "ALL_F32", "q4_k": "MOSTLY_Q4_K_M", "q5_k": "MOSTLY_Q5_K_M"}.get(base, f"MOSTLY_{base.upper()}")
    return int(gguf.LlamaFileType[name])


# ---------------------------------------------------------------- writing


def super_weight_overrides(lm, keep: Sequence, type_name: str = SUPER_WEIGHT_TYPE) -> dict[str, str]:
    """GGUF tensor name -> type for the tensors holding ``keep``'s super weights (none: {})."""
    if not keep:
        return {}
    n = lm.model.config.num_hidden_layers
    return {o.tensor: o.type for o in overrides_for(lm.arch.name, n, keep, type_name)}


def write_gguf(lm, plan: GGUFPlan, out: Path) -> dict:
    """Write ``lm`` to ``out`` (a ``.partial`` file renamed at the end); returns a summary: bytes, types
    by tensor, the squared error of each quantized tensor."""
    import gguf

    check_exportable(lm)
    quiet = logging.getLogger("gguf")  # the writer logs every file it opens at INFO
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        return _write(lm, plan, out)
    finally:
        quiet.setLevel(level)


def _write(lm, plan: GGUFPlan, out: Path) -> dict:
    import gguf

    arch = gguf_arch_name(lm.arch.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        if _is_gguf(lm.source):
            _copy_metadata(w, lm.source)
        else:
            _llama_metadata(w, lm)
        w.add_file_type(_file_type(plan.base))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        rows = {}
        for name, t in _tensors(lm):
            rows[name] = _add_tensor(w, name, t, plan)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(out), "bytes": out.stat().st_size, "architecture": arch, "base_type": plan.base,
            "search": plan.search, "embed_type": plan.embed_type, "overrides": plan.overrides, "tensors": rows}


def _add_tensor(w, name: str, t: torch.Tensor, plan: GGUFPlan) -> dict:
    type_name = plan.type_for(name, t.shape)
    if t.dim() < 2:
        w.add_tensor(name, t.numpy().astype(np.float32))
        return {"type": "f32"}
    raw, values = gguf_codec.encode(t, type_name, plan.search)
    kw = {} if type_name in ("f32", "f16") else {"raw_dtype": gguf_codec.ggml_type(type_name)}
    w.add_tensor(name, raw, **kw)
    return {"type": type_name, "mse": float((values - t).double().square().mean())}


def export_gguf(lm, type_name: str, search: str, keep: Sequence, out: Path) -> dict:
    """``superweight quantize --format gguf``: ``type_name`` a llama.cpp type (``gguf_codec.TYPES``),
    ``search`` "mse" (our range search) or "minmax" (gguf-py's reference quantizers)."""
    base = gguf_codec.check_type(type_name)
    if search not in ("mse", "minmax"):
        raise SuperweightError(f"--search {search} does not apply to --format gguf: use mse (our range search) or minmax "
                               "(llama.cpp's reference quantizers)")
    if search == "minmax" and base not in gguf_codec.REFERENCE:
        raise SuperweightError(f"llama.cpp's reference {base} is not in gguf-py: pass --search mse (our range search)")
    check_exportable(lm)
    plan = GGUFPlan(base, search == "mse", overrides=super_weight_overrides(lm, keep))
    return write_gguf(lm, plan, out)
