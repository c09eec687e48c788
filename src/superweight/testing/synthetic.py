"""Tiny random models of every supported architecture, with a super weight planted on demand.

Used by the tests and the benchmarks: the planted coordinates are the known answer that
detection must find. A super weight needs a large input on its column, so ``plant_super_weight``
also points the column's up (and gate) projection along one direction of the hidden state,
which makes that intermediate channel spike on the tokens that face that direction, exactly the
mechanism the paper describes (``Y[t, j] ~ X[t, k] * W[j, k]``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..model.arch import ArchSpec
from ..model.arch_infer import get_arch
from ..model.edits import HookSet
from ..model.capture import TraceCapture
from ..prove.ablate import zeroed_weights
from ..find.loop import DEFAULT_PROMPT
from ..find.runner import encode_prompt
from ..find.trace import TraceRule

TINY = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=320, positions=256, experts=4)


def _llama_kw(t: dict) -> dict:
    return dict(
        hidden_size=t["hidden"], intermediate_size=t["intermediate"], num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"], vocab_size=t["vocab"],
        max_position_embeddings=t["positions"],
    )


def _families(t: dict) -> dict[str, dict]:
    """The keyword groups the Llama-like tiny configs are built from (``_LLAMA_LIKE``)."""
    head_dim, experts, inter = t["hidden"] // t["heads"], t["experts"], t["intermediate"]
    return {
        "head_dim": dict(head_dim=head_dim),
        "pad": dict(pad_token_id=0),
        "no_window": dict(sliding_window=None),
        "moe": dict(num_local_experts=experts, num_experts_per_tok=2),
        "olmoe": dict(num_experts=experts, num_experts_per_tok=2),
        "qwen_moe": dict(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=inter),
        "shared_expert": dict(shared_expert_intermediate_size=inter),
        # DeepSeek-style MoE: layer 0 dense (first_k_dense_replace), a shared expert beside the routed ones
        "deepseek": dict(n_routed_experts=experts, num_experts_per_tok=2, moe_intermediate_size=inter,
                         first_k_dense_replace=1, n_group=1, topk_group=1, n_shared_experts=1),
        "mla": dict(q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=head_dim),
        "ernie_moe": dict(moe_num_experts=experts, moe_k=2, moe_intermediate_size=inter, moe_layer_start_index=1,
                          moe_num_shared_experts=1),
        "granite": dict(residual_multiplier=0.22, embedding_multiplier=12.0, attention_multiplier=1.0 / head_dim,
                        logits_scaling=8.0),
        "ministral": dict(sliding_window=64, layer_types=["full_attention"] * t["layers"]),
        "llama4": dict(intermediate_size_mlp=inter, num_local_experts=experts),
    }


# architecture -> (its transformers config class, the ``_families`` added to the Llama keywords)
_LLAMA_LIKE: dict[str, tuple[str, tuple[str, ...]]] = {
    "LlamaForCausalLM": ("LlamaConfig", ()),
    "MistralForCausalLM": ("MistralConfig", ("no_window",)),
    "Qwen2ForCausalLM": ("Qwen2Config", ()),
    "Qwen3ForCausalLM": ("Qwen3Config", ("head_dim",)),
    "GemmaForCausalLM": ("GemmaConfig", ("head_dim",)),
    "Gemma2ForCausalLM": ("Gemma2Config", ("head_dim",)),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", ("head_dim",)),
    "OlmoForCausalLM": ("OlmoConfig", ()),
    "Olmo2ForCausalLM": ("Olmo2Config", ()),
    "Phi3ForCausalLM": ("Phi3Config", ("pad",)),
    "MixtralForCausalLM": ("MixtralConfig", ("moe",)),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", ("qwen_moe", "shared_expert")),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", ("qwen_moe", "head_dim")),
    "OlmoeForCausalLM": ("OlmoeConfig", ("olmoe",)),
    "PhimoeForCausalLM": ("PhimoeConfig", ("moe",)),
    "GraniteMoeForCausalLM": ("GraniteMoeConfig", ("moe", "granite")),
    "DeepseekV2ForCausalLM": ("DeepseekV2Config", ("deepseek", "mla")),
    "DeepseekV3ForCausalLM": ("DeepseekV3Config", ("deepseek", "mla")),
    "Glm4MoeForCausalLM": ("Glm4MoeConfig", ("deepseek", "pad")),
    "Ernie4_5_MoeForCausalLM": ("Ernie4_5_MoeConfig", ("ernie_moe",)),
    "Olmo3ForCausalLM": ("Olmo3Config", ()),
    "Exaone4ForCausalLM": ("Exaone4Config", ()),
    "StableLmForCausalLM": ("StableLmConfig", ()),
    "SmolLM3ForCausalLM": ("SmolLM3Config", ("pad",)),
    "HeliumForCausalLM": ("HeliumConfig", ("head_dim",)),
    "Ernie4_5ForCausalLM": ("Ernie4_5Config", ()),
    "SeedOssForCausalLM": ("SeedOssConfig", ()),
    "HunYuanDenseV1ForCausalLM": ("HunYuanDenseV1Config", ("head_dim",)),
    "CohereForCausalLM": ("CohereConfig", ()),
    "Cohere2ForCausalLM": ("Cohere2Config", ()),
    "GraniteForCausalLM": ("GraniteConfig", ("granite",)),
    "ArceeForCausalLM": ("ArceeConfig", ()),
    "ApertusForCausalLM": ("ApertusConfig", ()),
    "Starcoder2ForCausalLM": ("Starcoder2Config", ()),
    "PhiForCausalLM": ("PhiConfig", ()),
    "Glm4ForCausalLM": ("Glm4Config", ("pad",)),
    # no ArchSpec registered for these: their spec is read from their modules (``arch_infer``)
    "GlmForCausalLM": ("GlmConfig", ("pad",)),
    "NemotronForCausalLM": ("NemotronConfig", ()),
    "MinistralForCausalLM": ("MinistralConfig", ("head_dim", "ministral")),
    "PersimmonForCausalLM": ("PersimmonConfig", ()),
    "Lfm2ForCausalLM": ("Lfm2Config", ()),
    "Qwen3NextForCausalLM": ("Qwen3NextConfig", ("head_dim",)),
    "Llama4ForCausalLM": ("Llama4TextConfig", ("head_dim", "llama4")),  # experts stored [experts, in, out]: refused, not guessed
}


def _gpt2_kw(t: dict) -> dict:
    return dict(n_embd=t["hidden"], n_inner=t["intermediate"], n_layer=t["layers"], n_head=t["heads"], vocab_size=t["vocab"])


def _neox_kw(t: dict) -> dict:
    return dict(hidden_size=t["hidden"], num_hidden_layers=t["layers"], num_attention_heads=t["heads"], vocab_size=t["vocab"])


# architecture -> (its transformers config class, its keywords from the sizes): the ones with their own names
_OWN_NAMES: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "GPTJForCausalLM": ("GPTJConfig", lambda t: {**_gpt2_kw(t), "n_positions": t["positions"],
                                                 "rotary_dim": t["hidden"] // t["heads"] // 2}),
    "BloomForCausalLM": ("BloomConfig", lambda t: dict(hidden_size=t["hidden"], n_layer=t["layers"], n_head=t["heads"],
                                                       vocab_size=t["vocab"])),
    "GPTNeoForCausalLM": ("GPTNeoConfig", lambda t: dict(
        hidden_size=t["hidden"], intermediate_size=t["intermediate"], num_layers=t["layers"], num_heads=t["heads"],
        vocab_size=t["vocab"], attention_types=[[["global", "local"], t["layers"] // 2]])),
    "GPTBigCodeForCausalLM": ("GPTBigCodeConfig", _gpt2_kw),
    "CodeGenForCausalLM": ("CodeGenConfig", lambda t: {**_gpt2_kw(t), "rotary_dim": t["hidden"] // t["heads"] // 2}),
    "GPT2LMHeadModel": ("GPT2Config", lambda t: {**_gpt2_kw(t), "n_positions": t["positions"]}),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", lambda t: {**_neox_kw(t), "intermediate_size": t["intermediate"],
                                                       "max_position_embeddings": t["positions"]}),
    "OPTForCausalLM": ("OPTConfig", lambda t: {**_neox_kw(t), "ffn_dim": t["intermediate"],
                                               "max_position_embeddings": t["positions"], "word_embed_proj_dim": t["hidden"]}),
    "FalconForCausalLM": ("FalconConfig", lambda t: {**_neox_kw(t), "ffn_hidden_size": t["intermediate"]}),
}


def tiny_config(arch_name: str, **overrides):
    """A small config of the real config class of ``arch_name`` (an HF class name)."""
    import transformers as tf

    t = {**TINY, **overrides}
    if arch_name in _LLAMA_LIKE:
        name, parts = _LLAMA_LIKE[arch_name]
        families = _families(t)
        kwargs = _llama_kw(t)
        for part in parts:
            kwargs.update(families[part])
    else:
        name, build = _OWN_NAMES[arch_name]
        kwargs = build(t)
    config = getattr(tf, name)(**kwargs)
    config.architectures = [arch_name]
    return config


# Classes with no registered ArchSpec that tiny_config builds: the spec is read from the model (``arch_infer``);
# Llama-4's is refused (its experts' layout), the others found.
UNREGISTERED = ("GlmForCausalLM", "NemotronForCausalLM", "MinistralForCausalLM", "PersimmonForCausalLM", "Lfm2ForCausalLM",
                "Qwen3NextForCausalLM", "GPTNeoForCausalLM", "GPTBigCodeForCausalLM", "CodeGenForCausalLM")


def tiny_model(arch_name: str, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised tiny ``arch_name`` model in eval mode (float32)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = getattr(tf, arch_name)(tiny_config(arch_name, **overrides))
    return model.eval()


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _direction(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=g)
    return v / v.norm()


def _mlp_input(model: nn.Module, module: nn.Module, block: nn.Module, tokens: int = 48, seed: int = 0) -> tuple[torch.Tensor, float]:
    """The input rows ``module`` sees for a fixed random token sequence ``[tokens, hidden]``, and the
    median |h| of ``block``'s output (the residual stream after the layer) on the same tokens."""
    seen, after = [], []

    def take(m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    with HookSet() as hooks:
        hooks.pre(module, take, with_kwargs=True)
        hooks.forward(block, lambda m, a, out: after.append((out[0] if isinstance(out, tuple) else out).detach()))
        model(input_ids=_calibration_ids(model, tokens, seed), use_cache=False)
    return seen[0].reshape(-1, seen[0].shape[-1]).float(), float(after[0].abs().median())


CALIBRATION_TEXT = (  # the prompts the tests and the paper use, so the plant is sized where it is looked for
    "Apple Inc. is a worldwide tech company. The cat sat on the mat and looked around. Paris is the capital of France."
)


def _calibration_ids(model: nn.Module, tokens: int, seed: int) -> torch.Tensor:
    """Byte tokens of ``CALIBRATION_TEXT`` (vocabularies of at least 257), else random tokens."""
    if model.config.vocab_size >= 257:
        return torch.tensor([byte_tokenizer()(CALIBRATION_TEXT)["input_ids"]])
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)


# A planted super activation is this many times the median |h| of its layer: SmolLM2-135M's
# reaches 12,600x, Gemma-3-270M's 6,900x and 8,500x (docs/detect.md).
REALISTIC_RATIO = 8000.0


def _input_scale(projected: torch.Tensor, spread: float | None, gated: bool, target_x: float, exact: bool = False) -> float:
    """Factor on the unit direction: RMS ``spread`` when given, else the peak input ``target_x``
    (``silu(a) * a ~ a**2`` through a gated MLP, ``a`` through GELU / ReLU)."""
    if spread is not None:
        return spread / float(projected.pow(2).mean().sqrt())
    peak = target_x ** 0.5 if gated else target_x
    return peak / float(projected.abs().max() if exact else projected.abs().quantile(0.9))


@torch.no_grad()
def plant_super_weight(
    model: nn.Module, layer: int, row: int, col: int, weight: float = 2.0, spread: float | None = None,
    arch: ArchSpec | None = None, seed: int = 1234, ratio: float = REALISTIC_RATIO,
    direction: torch.Tensor | None = None, expert: int | None = None, peak_input: float | None = None,
    min_input: float = 300.0,
) -> float:
    """Make ``[row, col]`` of ``layer``'s down-projection (of ``expert``, for MoE; with ``expert``
    None, of an MoE's shared expert where it has one, else of expert 0) a super weight.

    The up (and gate) projection of intermediate channel ``col`` is pointed along a unit direction
    ``v`` of the MLP's input (``direction``, else a fixed random one) and scaled so that the super
    activation ``weight * X[t, col]`` is ``ratio`` times the layer's median |h| on the tokens that
    face ``v`` most (or, with ``spread``, so that ``v . h`` has that root mean square). For an MoE
    layer the router is also pointed along ``v``, so those tokens go to ``expert``. Returns the
    peak input it aimed at.
    """
    arch = arch or get_arch(model)
    block = arch.layer_modules(model)[layer]
    mlp = _moe_dense_mlp(model, arch, layer, expert)
    up = block.get_submodule(f"{mlp}.up_proj" if mlp else arch.up_proj)
    gated = arch.gate_proj is not None
    square = gated or _quadratic(block)  # X grows as (v . h)^2: aim at its square root
    hidden = model.config.hidden_size
    v = direction.float() / direction.float().norm() if direction is not None else _direction(hidden, seed)
    inputs, median = _mlp_input(model, up, block)
    projected = inputs @ v
    sign = 1.0 if float(projected.mean()) >= 0 else -1.0  # face the common component, if any
    target_x = peak_input or max(ratio * median / abs(weight), min_input)  # a spike in X (SmolLM2's: 2,996)
    v = (sign * _input_scale(projected, spread, square, target_x, peak_input is not None)) * v
    for _ in range(4):  # the MLP's nonlinearity and the norms bend the aim: measure and correct
        _write_plant(model, arch, layer, block, up, v, row, col, weight, gated, expert)
        if peak_input or spread:
            break
        _, _, peak = _layer_peak(model, up, block, row)
        factor = ratio / max(peak, 1e-6)
        if abs(factor - 1) < 0.1:
            break
        if arch.post_norm:  # post-norm: the post-FFN norm's gain on the row sets the size
            _scale_gain(block.get_submodule(arch.mlp_out), row, factor)
        else:
            v = v * (factor ** 0.5 if square else factor)
    return target_x


# The median |h| of a real model's residual stream (its super activation's peak over its ratio,
# docs/detect.md): SmolLM2-135M 24,058 / 12,600 = 1.9, Gemma-3-270M 41,944 / 8,500 = 4.9. A tiny
# model initialised at std 0.02 runs near 0.02, so a super activation of a few hundred times its
# median stays under detection's absolute floor (20) there, unlike in a real model.
REAL_MEDIAN = 2.0


@torch.no_grad()
def real_scale(model: nn.Module, median: float = REAL_MEDIAN) -> float:
    """Scale the input embeddings so that the median |h| after layer 0 is ``median``, as in a real
    model; returns the factor. Call it before planting (the plant is sized against that median)."""
    block = get_arch(model).layer_modules(model)[0]
    _, now = _mlp_input(model, block, block)  # the block's own input: any MLP kind (dense first layers of MoEs)
    factor = median / max(now, 1e-12)
    model.get_input_embeddings().weight.mul_(factor)
    return factor


def _quadratic(block: nn.Module) -> bool:
    """Whether an ungated MLP's activation grows as x^2 for large x (Arcee's ReLU^2, Apertus' xIELU), measured."""
    act = next((m for name, m in block.named_modules() if name.endswith(("act_fn", "act", "activation_fn"))), None)
    if act is None:
        return False
    with torch.no_grad():
        big = act(torch.tensor([100.0, 200.0]))
    return float(big[1] / big[0]) > 3.0


def _layer_peak(model, up, block, row: int) -> tuple[torch.Tensor, float, float]:
    """On the random tokens: MLP inputs, median |h| after the layer, and max |h[:, row]| / that median."""
    after = []
    with HookSet() as hooks:
        hooks.forward(block, lambda m, a, out: after.append((out[0] if isinstance(out, tuple) else out).detach()))
        inputs, median = _mlp_input(model, up, block)
    return inputs, median, float(after[0][..., row].abs().max()) / median


def _scale_gain(norm: nn.Module, row: int, factor: float) -> None:
    """Multiply a norm's effective gain on ``row`` (Gemma's norms multiply by ``1 + weight``)."""
    offset = 1.0 if type(norm).__name__.startswith("Gemma") else 0.0
    norm.weight[row] = (float(norm.weight[row]) + offset) * factor - offset


def _moe_dense_mlp(model, arch: ArchSpec, layer: int, expert: int | None) -> str | None:
    """Where a plant with no expert goes in an MoE layer: its dense MLP (a dense layer's, a shared expert's)
    by path; None: into the experts (expert 0), or a dense model (the spec's own paths)."""
    if not arch.is_moe or expert is not None or not arch.has_dense(model, layer):
        return None
    return arch.dense_path(model, layer).rsplit(".", 1)[0]


def _write_plant(model, arch, layer, block, up, v, row, col, weight, gated, expert) -> None:
    mlp = _moe_dense_mlp(model, arch, layer, expert)
    if arch.is_moe and not mlp:
        _plant_expert(block, arch, v, row, col, weight, expert or 0)
        return
    v = v.to(up.weight.dtype)
    inter = arch.weight_matrix(model, layer).shape[1]
    if arch.shared_gate and arch.is_shared(model, layer):  # its sigmoid gate open (~1) on the tokens that face v
        block.get_submodule(arch.shared_gate).weight[0] = v / v.norm() * 50.0
    if gated and not arch.fused_gate_up:
        gate = block.get_submodule(f"{mlp}.gate_proj" if mlp else arch.gate_proj)
        gate.weight[col] = v
        if getattr(gate, "bias", None) is not None:
            gate.bias[col] = 0.0
    for r in [col, inter + col] if arch.fused_gate_up else [col]:
        if arch.transposed:
            up.weight[:, r] = v
        else:
            up.weight[r] = v
        if getattr(up, "bias", None) is not None:
            up.bias[r] = 0.0
    down = arch.weight_matrix(model, layer)
    down[:, col] *= 1e-3  # the column feeds the planted row (its other entries would lift every channel)
    down[row, col] = weight


def _plant_expert(block: nn.Module, arch: ArchSpec, v: torch.Tensor, row: int, col: int, weight: float, expert: int) -> None:
    experts = block.get_submodule(arch.experts)
    inter = experts.down_proj.shape[-1]
    experts.gate_up_proj[expert, col] = v
    experts.gate_up_proj[expert, inter + col] = v
    experts.down_proj[expert, :, col] *= 1e-3
    experts.down_proj[expert, row, col] = weight
    moe = block.get_submodule(arch.experts.rsplit(".", 1)[0])
    router = getattr(moe, "gate", None) or moe.router  # Mixtral, Qwen, DeepSeek: gate; Phi-MoE, Granite-MoE: router
    router.weight[expert] = v / v.norm() * 50.0  # tokens facing v are routed to this expert first


# ---------------------------------------------------------------- hard cases for detection


@dataclass
class HardCase:
    """A tiny model with a known answer: the weights that create and cancel its super activations."""

    name: str
    model: nn.Module
    creates: list[tuple]  # (layer, row, col) of every creating weight
    cancels: list[tuple] = field(default_factory=list)  # (layer, row, col) of every cancelling weight
    activations: int = 1  # how many super activations
    first_token: bool | None = None  # whether they sit on the first token (None: wherever the direction falls)
    note: str = ""

    def as_designed(self, tokenizer, prompt: str | None = None) -> list[str]:
        """Where the plant did not do what the answer says, measured by zeroing each planted weight
        on ``prompt`` (detection's default) and reading the residual stream after its layer, in the
        trace rule's terms: a creating weight must carry at least a tenth (``TraceRule.rise``) of a
        peak of at least 20 (``floor``) on its row, a cancelling one must have removed at least a
        tenth. Empty: the answer holds. (The builders aim at pre-norm models; a post-norm model's
        FFN norm bounds what one weight adds, so some of its plants fall short.)"""
        arch, rule = get_arch(self.model), TraceRule()
        enc = encode_prompt(tokenizer, prompt or DEFAULT_PROMPT)

        def peak(layer: int, row: int, zeroed=()) -> float:
            with zeroed_weights(self.model, arch, zeroed), TraceCapture(self.model, arch, layers=[layer]) as cap, torch.no_grad():
                self.model(**enc, use_cache=False)
            return float(cap.as_list()[0].h_out[:, row].abs().max())

        def planted(layer: int, row: int, col: int) -> tuple:  # an MoE without a dense MLP: expert 0 (plant_super_weight's)
            return (layer, row, col) if arch.has_dense(self.model, layer) else (layer, row, col, 0)

        problems = []
        for layer, row, col in self.creates:
            clean, without = peak(layer, row), peak(layer, row, [planted(layer, row, col)])
            if clean < rule.floor or clean - without < rule.rise * clean:
                problems.append(f"creates {layer}:[{row}, {col}]: |h| {clean:.4g} after layer {layer}, {without:.4g} without it")
        for layer, row, col in self.cancels:
            clean, without = peak(layer, row), peak(layer, row, [planted(layer, row, col)])
            if without - clean < rule.rise * without:
                problems.append(f"cancels {layer}:[{row}, {col}]: |h| {clean:.4g} after layer {layer}, {without:.4g} without it")
        return problems


def _unit(dim: int, channel: int) -> torch.Tensor:
    v = torch.zeros(dim)
    v[channel] = 1.0
    return v


def _down_input_maxima(model: nn.Module) -> list[float]:
    arch = get_arch(model)
    ids = _calibration_ids(model, 48, 0)
    with TraceCapture(model, arch) as cap, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return [float(t.x.abs().max()) for t in cap.as_list()]


def _median_after(model: nn.Module, layer: int, row: int) -> tuple[float, float]:
    """Median |h| after ``layer`` on the random tokens, and max |h[:, row]| over that median."""
    arch = get_arch(model)
    block = arch.layer_modules(model)[layer]
    _, median, ratio = _layer_peak(model, block.get_submodule(arch.up_proj), block, row)
    return median, ratio


def _weak_spike(model: nn.Module) -> HardCase:
    """The issue's model A: the input is only ~15x the other layers' median input maximum."""
    import statistics

    x = 15.0 * statistics.median(_down_input_maxima(model))
    median, _ = _median_after(model, 1, 5)
    plant_super_weight(model, 1, 5, 17, weight=REALISTIC_RATIO * median / x, min_input=0.0)  # the input ends near x
    return HardCase("weak_spike", model, [(1, 5, 17)], note=f"input {x:.3g} = 15x the median layer's max input")


def _two_layers(model: nn.Module) -> HardCase:
    """The issue's model B: layers 1 and 2 build it together (layer 2 reads it and adds to it)."""
    plant_super_weight(model, 1, 5, 17, ratio=4000)
    plant_super_weight(model, 2, 5, 40, ratio=10000, direction=_unit(model.config.hidden_size, 5))
    return HardCase("two_layers", model, [(1, 5, 17), (2, 5, 40)], note="layer 2 reads the activation and adds to it")


def _late_cancel(model: nn.Module) -> HardCase:
    plant_super_weight(model, 1, 5, 17)
    median, ratio = _median_after(model, 4, 5)
    plant_super_weight(model, 5, 5, 60, weight=-2.0, peak_input=0.7 * ratio * median / 2.0,
                       direction=_unit(model.config.hidden_size, 5))
    return HardCase("late_cancel", model, [(1, 5, 17)], [(5, 5, 60)], note="layer 5 of 6 removes ~70% of it")


def _one_column_three_rows(model: nn.Module) -> HardCase:
    plant_super_weight(model, 1, 5, 17)
    arch = get_arch(model)
    down = arch.expert_matrix(model, 1, None if arch.has_dense(model, 1) else 0)  # an MoE's: where the plant went
    down[9, 17], down[30, 17] = -0.8 * down[5, 17], 1.2 * down[5, 17]
    return HardCase("one_column_three_rows", model, [(1, 5, 17), (1, 9, 17), (1, 30, 17)], activations=3,
                    note="Phi-3's pattern: one intermediate channel feeds three hidden channels")


def _other_token(model: nn.Module) -> HardCase:
    token = byte_tokenizer().convert_tokens_to_ids("w")  # the 'w' of "worldwide" in the paper's prompt
    plant_super_weight(model, 1, 5, 17, direction=model.get_input_embeddings().weight[token].detach().clone())
    return HardCase("other_token", model, [(1, 5, 17)], first_token=False, note="the tokens 'w' face the direction")


def _two_independent(model: nn.Module) -> HardCase:
    plant_super_weight(model, 1, 5, 17)
    plant_super_weight(model, 2, 9, 40, seed=7)
    return HardCase("two_independent", model, [(1, 5, 17), (2, 9, 40)], activations=2)


HARD_CASES = {
    "weak_spike": (_weak_spike, 4), "two_layers": (_two_layers, 4), "late_cancel": (_late_cancel, 6),
    "one_column_three_rows": (_one_column_three_rows, 4), "other_token": (_other_token, 4),
    "two_independent": (_two_independent, 4), "none": (lambda m: HardCase("none", m, [], activations=0), 4),
}


@torch.no_grad()
def hard_case(name: str, arch_name: str = "LlamaForCausalLM") -> HardCase:
    """One of ``HARD_CASES`` on a tiny ``arch_name`` model (the dev set's synthetic half)."""
    build, layers = HARD_CASES[name]
    return build(tiny_model(arch_name, layers=layers))
