"""An ``ArchSpec`` for a causal LM no spec was written for, read from its modules and then checked.

Structure first (``candidate_specs``): the decoder layers are the ``ModuleList`` with one entry per
hidden layer; in a layer, the MLP is a pair of projections ``hidden -> I -> hidden`` outside the
attention (the down-projection reads what its sibling wrote), an MoE's experts a module holding a 3-D
``down_proj`` ``[experts, hidden, I]``; post-norm models name a norm after the MLP
(``post_feedforward_layernorm``, ``post_mlp_layernorm``). Then numbers (``infer_spec``): on a few
tokens, every layer's change of the residual stream must be what the attention and the MLP hooks saw
(``h_out - h_in = attn + mlp``). A structure that reads right but adds differently (BLOOM adds the
residual inside its MLP) fails there, and the model is refused with the measured mismatch instead of
being analysed wrongly.
"""
from __future__ import annotations

import inspect
import re
import weakref
from dataclasses import replace

import torch
from torch import nn

from .arch import SUPPORTED, ArchSpec, architecture_name, check_causal_name, spec_for_name
from .capture import TraceCapture
from ..core.errors import UnsupportedArchitectureError

_ATTN = re.compile(r"(^|_)(self_)?(attn|attention|self_attention|linear_attn|conv|mixer)$")
_POST_MLP = re.compile(r"^post_(feedforward|mlp|ffn)_?(layer)?norm$")
_POST_ATTN = re.compile(r"^post_(self_)?(attn|attention)_?(layer)?norm$")
_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm")
TOLERANCE = 1e-3  # share of a layer's change left unexplained beyond the model's own rounding

_INFERRED: "weakref.WeakKeyDictionary[nn.Module, ArchSpec]" = weakref.WeakKeyDictionary()


def get_arch(model_or_config) -> ArchSpec:
    """The ``ArchSpec`` of a loaded model (or a config): the registered one (``arch.spec_for_name``); a
    model of an unregistered causal-LM class gets one read from its modules and checked on a forward
    pass (``infer_spec``), or a one-line refusal."""
    name = architecture_name(model_or_config)
    if name in SUPPORTED or not isinstance(model_or_config, nn.Module):
        return spec_for_name(name)
    check_causal_name(name)
    if model_or_config not in _INFERRED:
        _INFERRED[model_or_config] = replace(infer_spec(model_or_config), inferred=True)
    return _INFERRED[model_or_config]


def _config_int(config, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int):
            return v
    return None


def _dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in, out, transposed) of a 2-D projection: ``nn.Linear`` or GPT-2's ``Conv1D`` (``[in, out]``)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not isinstance(module, nn.Module):
        return None
    if type(module).__name__ == "Conv1D":
        return w.shape[0], w.shape[1], True
    if isinstance(module, nn.Linear) or hasattr(module, "in_features"):
        return w.shape[1], w.shape[0], False
    return None


def _outside_attention(name: str) -> bool:
    return not any(_ATTN.search(part) for part in name.split("."))


def _mlp_pairs(block: nn.Module, hidden: int) -> list[tuple[str, str, str | None, bool, bool]]:
    """Every ``(down, up, gate, fused, transposed)`` of ``block``: a projection to ``hidden`` outside the
    attention whose sibling projects ``hidden`` to its input width (``2x`` for fused gate and up)."""
    mods = dict(block.named_modules())
    out = []
    for name, mod in mods.items():
        d = _dims(mod)
        if not name or d is None or d[1] != hidden or not _outside_attention(name):
            continue
        width = d[0]
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        siblings = [(n, _dims(m)) for n, m in mods.items()
                    if n != name and (n.rsplit(".", 1)[0] if "." in n else "") == parent and _dims(m) is not None]
        ups = [n for n, sd in siblings if sd[0] == hidden and sd[1] == width]
        fused = [n for n, sd in siblings if sd[0] == hidden and sd[1] == 2 * width]
        if fused and not ups:
            out.append((name, fused[0], fused[0], True, d[2]))
        elif ups:
            gate = next((n for n in ups if re.search(r"gate|w1$", n.rsplit(".", 1)[-1])), None)
            up = next((n for n in ups if n != gate), None)
            if up is not None:
                out.append((name, up, gate if len(ups) > 1 else None, False, d[2]))
    return out


def _experts(block: nn.Module, hidden: int) -> str | None:
    """The path of a module holding 3-D ``down_proj [experts, hidden, I]`` (transformers' experts layout)."""
    for name, mod in block.named_modules():
        w = getattr(mod, "down_proj", None)
        if name and isinstance(w, torch.Tensor) and w.dim() == 3:
            if w.shape[1] != hidden or not isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor):
                raise UnsupportedArchitectureError(
                    f"its experts ({name}) are not stored as [experts, hidden, intermediate] with a fused gate_up_proj")
            params = inspect.signature(type(mod).forward).parameters
            if not {"top_k_index", "top_k_weights"} <= set(params):
                raise UnsupportedArchitectureError(
                    f"its experts ({name}) are not called with the routing (top_k_index, top_k_weights), which "
                    "attribution reads")
            return name
    return None


def _name_of(model: nn.Module, target: nn.Module | None) -> str:
    return next((n for n, m in model.named_modules() if m is target), "") if target is not None else ""


def _layers(model: nn.Module) -> str:
    n = _config_int(getattr(model, "config", None), "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and name]
    if not lists:
        raise UnsupportedArchitectureError(f"no list of {n} decoder layers found")
    return min(lists, key=lambda s: s.count("."))


def _child(block: nn.Module, pattern: re.Pattern) -> str | None:
    return next((n for n, _ in block.named_children() if pattern.search(n)), None)


def infer_spec(model: nn.Module):
    """The ``ArchSpec`` of an unregistered model, from its modules: the first candidate that adds up on a
    forward pass (``candidate_specs``, ``unexplained_share`` within ``TOLERANCE``); on the meta device
    (streaming) the only one."""
    specs = candidate_specs(model)
    if next(model.parameters()).device.type == "meta":  # streamed: no weights to check a choice on
        if len(specs) > 1:
            raise UnsupportedArchitectureError(
                f"{specs[0].name} has no registered spec and its modules allow {len(specs)} readings, which only a "
                "forward pass tells apart: detect it without --stream, or register an ArchSpec in superweight/model/arch.py")
        return specs[0]
    shares = []
    for spec in specs:
        share = unexplained_share(model, spec)
        if share <= TOLERANCE:
            return spec
        shares.append(share)
    raise UnsupportedArchitectureError(
        f"{specs[0].name} has no registered spec, and none read from its modules adds up: {min(shares):.1%} of a layer's "
        f"change of the residual stream is not the attention's plus the MLP's (allowed {TOLERANCE:.1%}); register an "
        "ArchSpec in superweight/model/arch.py")


def inferred_note(spec: ArchSpec) -> str:
    """One line telling a user which modules an inferred spec hooks (shown with results, kept in their JSON)."""
    parts = [f"layers {spec.layers}", f"down-projection {spec.down_proj}" + (f" / shared {spec.shared_down}" if spec.shared_down else "")]
    if spec.experts:
        parts.append(f"experts {spec.experts}")
    parts += [f"attention {'|'.join((spec.attn_out, *spec.attn_alt))}", f"MLP output {spec.mlp_out}"]
    return (f"{spec.name} has no registered spec: read from its modules ({', '.join(parts)}); its hooks add up to "
            "every layer's change of the residual stream on a forward pass")


def candidate_specs(model: nn.Module) -> list:
    """The specs the modules allow, most likely first (structure only; the post-attention norm of a
    sandwich-norm model, say, has two candidates: GLM-4 names its pre-MLP norm post_attention_layernorm).
    Raises ``UnsupportedArchitectureError`` saying what was not found."""
    name = architecture_name(model)
    config = getattr(model, "config", None)
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    try:
        if hidden is None:
            raise UnsupportedArchitectureError("its config names no hidden size (hidden_size, n_embd, d_model)")
        layers = _layers(model)
        blocks = list(model.get_submodule(layers))
        experts = [_experts(b, hidden) for b in blocks]
        pairs = [_mlp_pairs(b, hidden) for b in blocks]
        expert_path = next((e for e in experts if e), None)
        dense = [p[0] for p, e in zip(pairs, experts) if p and not e]  # a dense layer's MLP
        shared = [p[0] for p, e in zip(pairs, experts) if p and e]  # an MoE layer's shared expert
        if not dense and not shared and expert_path is None:
            raise UnsupportedArchitectureError("no MLP (a hidden -> I -> hidden pair of projections) in its layers")
        if any(not p and not e for p, e in zip(pairs, experts)):
            raise UnsupportedArchitectureError("some layer has neither an MLP nor experts")
        attn_names = sorted({n for b in blocks for n, _ in b.named_children() if _ATTN.search(n)})
        if not attn_names:
            raise UnsupportedArchitectureError("no attention (or other token mixer) module in its layers")
        mlp_out = _child(blocks[0], _POST_MLP)
        post_attn = [n for n, _ in blocks[0].named_children() if _POST_ATTN.search(n)] if mlp_out else []
        ref = (dense or shared)[0] if (dense or shared) else None
        gate = next((n for n, m in blocks[0].named_modules() if n.endswith("shared_expert_gate") and _dims(m)), None)
        embed = _name_of(model, model.get_input_embeddings())
        base = layers.rsplit(".", 1)[0] if "." in layers else ""
        parent = model.get_submodule(base) if base else model
        norm = next((f"{base}.{n}" if base else n for n, _ in parent.named_children() if n in _NORM_NAMES), "")
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{name} has no registered spec and its structure was not recognised: {exc}; "
                                           "register an ArchSpec in superweight/model/arch.py") from None
    common = dict(name=name, layers=layers, embed=embed, final_norm=norm,
                  residual_scale="residual_multiplier" if hasattr(config, "residual_multiplier") else None)
    mixers = [dict(attn_out=n, attn_alt=()) for n in post_attn] or [dict(attn_out=attn_names[0], attn_alt=tuple(attn_names[1:]))]
    if expert_path is not None:
        mlp_parent = expert_path.rsplit(".", 1)[0]
        return [ArchSpec(**common, **mixer,
            down_proj=dense[0][0] if dense else f"{mlp_parent}.down_proj",
            up_proj=expert_path, gate_proj=expert_path, experts=expert_path,
            shared_down=shared[0][0] if shared else None, shared_gate=gate,
            mlp_out=mlp_out or mlp_parent) for mixer in mixers]
    down, up, gate_proj, fused, transposed = ref
    return [ArchSpec(**common, **mixer, down_proj=down, up_proj=up, gate_proj=gate_proj, fused_gate_up=fused,
                     transposed=transposed, mlp_out=mlp_out or (down.rsplit(".", 1)[0] if "." in down else down))
            for mixer in mixers]


def unexplained_share(model: nn.Module, spec, tokens: int = 12) -> float:
    """The largest share of a layer's change of the residual stream that the spec's attention and MLP
    hooks do not account for, over a forward pass on ``tokens`` fixed token ids (0: all of it is theirs;
    near 1 or more: a reading that does not add up). What the model's own rounding can leave is not counted:
    ``2 eps (|h_in| + |attn| + |mlp| + |h_out|)`` per element, eps of the stream's dtype (a bfloat16 super
    activation of 24,000 is stored to +-64, more than some layers' whole change)."""
    vocab = _config_int(model.config, "vocab_size") or 256
    device = next(model.parameters()).device
    ids = (torch.arange(tokens, device=device) * 7919 + 13) % max(vocab - 1, 1)
    with TraceCapture(model, spec) as cap, torch.no_grad():
        model(input_ids=ids[None], use_cache=False)
    eps = torch.finfo(next(model.parameters()).dtype).eps  # of the weights' dtype, which the stream is computed in
    worst = 0.0
    for tr in cap.as_list():
        if tr.h_in is None or tr.h_out is None or tr.attn is None or tr.mlp is None:
            return float("inf")
        h_in, h_out, attn, mlp = (t.float() for t in (tr.h_in, tr.h_out, tr.attn, tr.mlp))
        delta = h_out - h_in
        left = delta - tr.scale * (attn + mlp)
        rounding = 2 * eps * (h_in.abs() + tr.scale * (attn.abs() + mlp.abs()) + h_out.abs())
        worst = max(worst, float((left.abs() - rounding).clamp_min(0).max() / delta.abs().max().clamp_min(1e-12)))
    return worst
