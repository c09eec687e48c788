"""Where each architecture keeps its decoder layers and MLP down-projection, as data.

Coordinates are always reported in the paper's convention: ``row`` is the output (hidden)
channel and ``col`` the input (intermediate) channel of the down-projection. ``nn.Linear``
stores its weight as ``[out, in]`` so ``weight[row, col]``; GPT-2's ``Conv1D`` stores
``[in, out]`` so ``weight[col, row]``. ``ArchSpec.transposed`` records which.

To add an architecture, add one ``ArchSpec`` to ``_SPECS`` keyed by its Hugging Face class name
(``config.architectures[0]``), naming the module paths relative to the model.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.errors import SuperweightError, UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture (dotted, relative to the ``*ForCausalLM`` model)."""

    name: str
    layers: str  # the ModuleList of decoder layers
    down_proj: str  # relative to one decoder layer
    up_proj: str  # the projection that produces the down-projection's input channels
    embed: str  # token embedding
    final_norm: str  # norm applied after the last layer
    gate_proj: str | None = None  # gated MLPs: act(gate_proj(x)) * up_proj(x)
    transposed: bool = False  # True for GPT-2's Conv1D: weight is [in, out]
    fused_gate_up: bool = False  # Phi-3: gate and up in one matrix, up is the second half
    attn_out: str = "self_attn"  # the module whose output the attention adds to the residual stream
    mlp_out: str = "mlp"  # the module whose output the MLP adds (post-norm models: the post-FFN norm)
    experts: str | None = None  # MoE: the experts module holding 3-D ``down_proj`` [experts, out, in]
    shared_down: str | None = None  # MoE: the shared expert's down-projection (Qwen2-MoE, DeepSeek), a dense
    # weight with no expert index; ``down_proj`` is then that of the model's dense layers (DeepSeek's first layers)
    shared_gate: str | None = None  # a shared expert's sigmoid gate (Qwen2-MoE; DeepSeek's is ungated)
    residual_scale: str | None = None  # config attribute scaling what each sublayer adds (Granite's residual_multiplier)
    attn_alt: tuple[str, ...] = ()  # hybrids: the token mixer's other names, by layer (linear attention, convolution)
    inferred: bool = False  # read from the modules of an unregistered model (``arch_infer``), not written here

    @property
    def post_norm(self) -> bool:
        """Whether the MLP's output reaches the residual stream through a norm (Gemma-2/3, OLMo-2)."""
        return self.mlp_out.rsplit(".", 1)[-1].endswith("norm")

    @property
    def is_moe(self) -> bool:
        return self.experts is not None

    def experts_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.experts}"

    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layer_modules(model))

    def attn_module(self, block: nn.Module) -> nn.Module:
        """The module whose output the attention (a hybrid's other token mixer) adds, in one decoder layer."""
        for path in (self.attn_out, *self.attn_alt):
            if (module := submodule(block, path)) is not None:
                return module
        raise SuperweightError(f"a layer of {self.name} has none of {', '.join((self.attn_out, *self.attn_alt))}")

    def dense_path(self, model: nn.Module, layer: int) -> str | None:
        """The dense down-projection of ``layer`` relative to the layer (None: an MoE layer without a shared
        expert). A dense model's every layer; in an MoE a dense layer (DeepSeek's ``first_k_dense_replace``,
        Qwen-MoE's ``mlp_only_layers``) or a sparse layer's shared expert: read from the model, not the config."""
        block = self.layer_modules(model)[layer]
        if not self.is_moe:
            return self.down_proj
        for path in (self.down_proj, self.shared_down):
            if path and isinstance(getattr(submodule(block, path), "weight", None), torch.Tensor):
                return path
        return None

    def has_dense(self, model: nn.Module, layer: int) -> bool:
        return self.dense_path(model, layer) is not None

    def is_shared(self, model: nn.Module, layer: int) -> bool:
        """Whether ``layer``'s dense down-projection is an MoE layer's shared expert (added beside the experts)."""
        return self.is_moe and self.shared_down is not None and self.dense_path(model, layer) == self.shared_down

    def down_proj_module(self, model: nn.Module, layer: int) -> nn.Module:
        path = self.dense_path(model, layer)
        if path is None:
            raise SuperweightError(self.dense_only())
        return self.layer_modules(model)[layer].get_submodule(path)

    def dense_only(self) -> str:
        """The one-line refusal of a step that needs dense down-projections (API: ``expert_matrix``)."""
        return (f"{self.name} is a mixture of experts: each expert has its own down-projection, and this step "
                "handles dense ones only (detect, ablate, quantize and sweep handle experts)")

    def experts_module(self, model: nn.Module, layer: int) -> nn.Module | None:
        """The MoE experts module of ``layer`` (None for a dense layer, e.g. Qwen2-MoE's ``mlp_only_layers``)."""
        module = submodule(self.layer_modules(model)[layer], self.experts) if self.experts else None
        return module if isinstance(getattr(module, "down_proj", None), torch.Tensor) else None

    def expert_matrix(self, model: nn.Module, layer: int, expert: int | None) -> torch.Tensor:
        """The ``[out, in]`` down-projection of one expert (``expert=None``: the dense one), no copy."""
        if expert is None:
            return self.weight_matrix(model, layer)
        module = self.experts_module(model, layer)
        if module is None:
            raise SuperweightError(f"layer {layer} of {self.name} has no experts")
        return module.down_proj[expert]

    def weight_entry(self, model: nn.Module, layer: int, row: int, col: int, expert: int | None = None):
        """``(tensor, index)`` of one down-projection weight, for ``edits.edited_entries``."""
        if expert is None:
            return self.down_proj_module(model, layer).weight, self.index(row, col)
        return self.experts_module(model, layer).down_proj, (expert, row, col)

    def down_proj_name(self, layer: int, model: nn.Module | None = None) -> str:
        """The dense down-projection's module name; an MoE needs ``model`` to tell a dense layer from a
        shared expert (without it: the dense layers' name)."""
        path = self.down_proj if model is None else self.dense_path(model, layer)
        if path is None:
            raise SuperweightError(self.dense_only())
        return f"{self.layers}.{layer}.{path}"

    def index(self, row: int, col: int) -> tuple[int, int]:
        """Tensor index of the paper's ``[row, col]`` in the stored weight."""
        return (col, row) if self.transposed else (row, col)

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """A view of a down-projection weight as ``[out, in]`` (rows = hidden channels)."""
        return weight.t() if self.transposed else weight

    def weight_matrix(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The down-projection weight of ``layer`` as an ``[out, in]`` view (no copy)."""
        return self.as_out_in(self.down_proj_module(model, layer).weight)


def submodule(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _moe(name: str, **kw) -> ArchSpec:
    """Mixtral / Qwen-MoE / OLMoE / DeepSeek / GLM-4-MoE / ERNIE-4.5-MoE: the experts' weights are 3-D tensors of
    ``mlp.experts``. ``down_proj``: the dense layers' (``mlp.down_proj``: DeepSeek's first layers, Qwen-MoE's
    ``mlp_only_layers``); ``shared_down``: a sparse layer's shared expert (gated in Qwen2-MoE)."""
    base = dict(down_proj="mlp.down_proj", up_proj="mlp.experts", gate_proj="mlp.experts", experts="mlp.experts")
    return _llama_like(name, **{**base, **kw})


_POST_NORM = dict(attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")


def _llama_like(name: str, **kw) -> ArchSpec:
    base = dict(
        layers="model.layers",
        down_proj="mlp.down_proj",
        up_proj="mlp.up_proj",
        gate_proj="mlp.gate_proj",
        embed="model.embed_tokens",
        final_norm="model.norm",
    )
    base.update(kw)
    return ArchSpec(name=name, **base)


_SPECS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in [
        _llama_like("LlamaForCausalLM"),
        _llama_like("MistralForCausalLM"),
        _llama_like("Qwen2ForCausalLM"),
        _llama_like("Qwen3ForCausalLM"),
        _llama_like("GemmaForCausalLM"),
        _llama_like("Gemma2ForCausalLM", **_POST_NORM),
        _llama_like("Gemma3ForCausalLM", **_POST_NORM),
        _llama_like("OlmoForCausalLM"),
        _llama_like("Olmo2ForCausalLM", **_POST_NORM),
        _llama_like("Olmo3ForCausalLM", **_POST_NORM),
        _llama_like("Exaone4ForCausalLM", **_POST_NORM),
        _llama_like("StableLmForCausalLM"),
        _llama_like("SmolLM3ForCausalLM"),
        _llama_like("HeliumForCausalLM"),
        _llama_like("Ernie4_5ForCausalLM"),
        _llama_like("SeedOssForCausalLM"),
        _llama_like("HunYuanDenseV1ForCausalLM"),
        _llama_like("CohereForCausalLM"),  # parallel attention and MLP: both read the same normed input
        _llama_like("Cohere2ForCausalLM"),
        _llama_like("GraniteForCausalLM", residual_scale="residual_multiplier"),
        _llama_like("ArceeForCausalLM", gate_proj=None),  # ungated MLP (ReLU^2)
        _llama_like("ApertusForCausalLM", gate_proj=None),  # ungated MLP (xIELU)
        _llama_like("Starcoder2ForCausalLM", down_proj="mlp.c_proj", up_proj="mlp.c_fc", gate_proj=None),
        _llama_like("PhiForCausalLM", down_proj="mlp.fc2", up_proj="mlp.fc1", gate_proj=None,
                    final_norm="model.final_layernorm"),  # Phi-1/1.5/2: parallel attention and MLP
        _llama_like(
            "Phi3ForCausalLM", up_proj="mlp.gate_up_proj", gate_proj="mlp.gate_up_proj", fused_gate_up=True
        ),
        _llama_like("Glm4ForCausalLM", up_proj="mlp.gate_up_proj", gate_proj="mlp.gate_up_proj", fused_gate_up=True,
                    attn_out="post_self_attn_layernorm", mlp_out="post_mlp_layernorm"),  # sandwich norms
        _moe("MixtralForCausalLM"),
        _moe("PhimoeForCausalLM"),
        _moe("Qwen2MoeForCausalLM", shared_down="mlp.shared_expert.down_proj", shared_gate="mlp.shared_expert_gate"),
        _moe("Qwen3MoeForCausalLM"),
        _moe("OlmoeForCausalLM"),
        _moe("DeepseekV2ForCausalLM", shared_down="mlp.shared_experts.down_proj"),  # dense first layers
        _moe("DeepseekV3ForCausalLM", shared_down="mlp.shared_experts.down_proj"),  # (first_k_dense_replace)
        _moe("Glm4MoeForCausalLM", shared_down="mlp.shared_experts.down_proj"),
        _moe("Ernie4_5_MoeForCausalLM", shared_down="mlp.shared_experts.down_proj"),
        _moe("GraniteMoeForCausalLM", experts="block_sparse_moe.experts", up_proj="block_sparse_moe.experts",
             gate_proj="block_sparse_moe.experts", mlp_out="block_sparse_moe", residual_scale="residual_multiplier"),
        ArchSpec(
            name="GPTJForCausalLM",
            layers="transformer.h",
            down_proj="mlp.fc_out",
            up_proj="mlp.fc_in",
            embed="transformer.wte",
            final_norm="transformer.ln_f",
            attn_out="attn",
        ),
        ArchSpec(  # BLOOM adds the residual inside its attention and MLP: hook their last projections
            name="BloomForCausalLM",
            layers="transformer.h",
            down_proj="mlp.dense_4h_to_h",
            up_proj="mlp.dense_h_to_4h",
            embed="transformer.word_embeddings",
            final_norm="transformer.ln_f",
            attn_out="self_attention.dense",
            mlp_out="mlp.dense_4h_to_h",
        ),
        ArchSpec(
            name="GPT2LMHeadModel",
            layers="transformer.h",
            down_proj="mlp.c_proj",
            up_proj="mlp.c_fc",
            embed="transformer.wte",
            final_norm="transformer.ln_f",
            transposed=True,
            attn_out="attn",
        ),
        ArchSpec(
            name="GPTNeoXForCausalLM",
            layers="gpt_neox.layers",
            down_proj="mlp.dense_4h_to_h",
            up_proj="mlp.dense_h_to_4h",
            embed="gpt_neox.embed_in",
            final_norm="gpt_neox.final_layer_norm",
            attn_out="attention",
        ),
        ArchSpec(
            name="OPTForCausalLM",
            layers="model.decoder.layers",
            down_proj="fc2",
            up_proj="fc1",
            embed="model.decoder.embed_tokens",
            final_norm="model.decoder.final_layer_norm",
            mlp_out="fc2",
        ),
        ArchSpec(
            name="FalconForCausalLM",
            layers="transformer.h",
            down_proj="mlp.dense_4h_to_h",
            up_proj="mlp.dense_h_to_4h",
            embed="transformer.word_embeddings",
            final_norm="transformer.ln_f",
            attn_out="self_attention",
        ),
    ]
}

SUPPORTED: tuple[str, ...] = tuple(sorted(_SPECS))
MOE: tuple[str, ...] = tuple(n for n in SUPPORTED if _SPECS[n].is_moe)
DENSE: tuple[str, ...] = tuple(n for n in SUPPORTED if not _SPECS[n].is_moe)


def architecture_name(model_or_config) -> str:
    """The Hugging Face class name of a model (or of the model a config describes)."""
    config = getattr(model_or_config, "config", model_or_config)
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    if isinstance(model_or_config, nn.Module):
        return type(model_or_config).__name__
    return f"<model_type {getattr(config, 'model_type', '?')}>"


def spec_for_name(name: str) -> ArchSpec:
    """The registered spec for a class name; a helpful error (with a suggestion) otherwise."""
    if name in _SPECS:
        return _SPECS[name]
    if not name.endswith(("ForCausalLM", "LMHeadModel")):
        raise UnsupportedArchitectureError(
            f"{name} is not a causal language model: superweight analyses decoder-only "
            f"*ForCausalLM models ({', '.join(SUPPORTED)})"
        )
    guess = difflib.get_close_matches(name, SUPPORTED, n=1)
    hint = f" Did you mean {guess[0]}?" if guess else ""
    raise UnsupportedArchitectureError(
        f"unsupported architecture {name}.{hint} Supported: {', '.join(SUPPORTED)}. "
        "To add one, register an ArchSpec in superweight/model/arch.py naming its layers and down-projection."
    )


EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def expert_params(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """An MoE experts module's 3-D weights ``[experts, out, in]`` by parameter name (none for any
    other module): what the magnitude scan and the quantizer take a matrix per expert of."""
    return [(p, w) for p in EXPERT_PARAMS if isinstance(w := getattr(module, p, None), torch.Tensor) and w.dim() == 3]


def check_causal_name(name: str) -> None:
    """Refuse a class that is not a decoder-only causal LM (an unregistered causal LM passes:
    ``arch_infer.get_arch`` reads its spec from the loaded model)."""
    if name not in _SPECS and not name.endswith(("ForCausalLM", "LMHeadModel")):
        spec_for_name(name)


def check_index(spec: ArchSpec, model: nn.Module, layer: int, row: int, col: int, expert: int | None = None) -> None:
    """Raise a clear error when ``layer, row, col`` (an MoE: and ``expert``) is outside the model."""
    n = spec.num_layers(model)
    if not 0 <= layer < n:
        raise SuperweightError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})")
    if expert is None and not spec.has_dense(model, layer):
        raise SuperweightError(f"layer {layer} of {spec.name} has only experts: give each weight's expert "
                               "(detection's JSON has it: superweight detect --json)")
    if expert is not None:
        module = spec.experts_module(model, layer)
        if module is None:
            raise SuperweightError(f"layer {layer} of {spec.name} has no experts (expert {expert} was given)")
        if not 0 <= expert < module.down_proj.shape[0]:
            raise SuperweightError(f"expert {expert} is out of range: layer {layer} has {module.down_proj.shape[0]} experts")
    out_dim, in_dim = spec.expert_matrix(model, layer, expert).shape
    if not (0 <= row < out_dim and 0 <= col < in_dim):
        raise SuperweightError(
            f"[{row}, {col}] is outside layer {layer}'s down-projection of shape [{out_dim}, {in_dim}]"
        )


def checked_against(det, arch, model, name: str, origin: str | Path) -> list:
    """``check_super_weights`` against any model with an ``ArchSpec`` (a streamed one's meta skeleton too)."""
    if det.architecture != arch.name:
        raise SuperweightError(
            f"{origin} holds super weights of a {det.architecture}, but {name} is a {arch.name}: "
            f"detect them on this model (`superweight detect {name} --json sw.json`)"
        )
    for sw in det.super_weights:
        try:
            check_index(arch, model, sw.layer, sw.row, sw.col, sw.expert)
        except SuperweightError as exc:
            raise SuperweightError(f"{origin}: super weight {sw.layer}:[{sw.row}, {sw.col}]: {exc}: it is not from {name}") from None
    return list(det.super_weights)
