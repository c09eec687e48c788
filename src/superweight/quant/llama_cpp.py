"""llama.cpp bridge: ``--tensor-type`` arguments that keep super-weight tensors at a higher type.

``llama-quantize`` accepts ``--tensor-type PATTERN=TYPE`` (repeatable; or one such item per
line in ``--tensor-type-file``). PATTERN is a regular expression searched in the GGUF tensor name
(``blk.11.ffn_down.weight``); TYPE is a ggml type name (``f16``, ``q8_0``, ...). We anchor and
escape the pattern (``^blk\\.11\\.ffn_down\\.weight$``) so it selects exactly one tensor.

Hugging Face module names become GGUF tensor names through gguf-py's own ``TensorNameMap`` for
the llama.cpp architecture of the model (the table below: Hugging Face class -> gguf
``MODEL_ARCH``, as llama.cpp's ``convert_hf_to_gguf.py`` registers them). llama.cpp keeps the
Hugging Face layer numbering (``model.layers.11`` -> ``blk.11``) and the down-projection's
row/column layout, so only the tensor name changes.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

from ..model.arch import spec_for_name, architecture_name
from ..core.errors import SuperweightError
from ..core.coords import as_keys
from ..model.source import ModelSource, SourceKind
from ..model.edits import edited_weights

# Hugging Face class name -> gguf.MODEL_ARCH member (convert_hf_to_gguf.py registers Mistral as LLAMA).
GGUF_ARCH: dict[str, str] = {
    "LlamaForCausalLM": "LLAMA",
    "MistralForCausalLM": "LLAMA",
    "Qwen2ForCausalLM": "QWEN2",
    "Qwen3ForCausalLM": "QWEN3",
    "GemmaForCausalLM": "GEMMA",
    "Gemma2ForCausalLM": "GEMMA2",
    "Gemma3ForCausalLM": "GEMMA3",
    "OlmoForCausalLM": "OLMO",
    "Olmo2ForCausalLM": "OLMO2",
    "Phi3ForCausalLM": "PHI3",
    "GPT2LMHeadModel": "GPT2",
    "GPTNeoXForCausalLM": "GPTNEOX",
    "FalconForCausalLM": "FALCON",
    "MixtralForCausalLM": "LLAMA",  # llama.cpp converts Mixtral as a LLAMA with experts (ffn_down_exps)
    "Qwen2MoeForCausalLM": "QWEN2MOE",
    "Qwen3MoeForCausalLM": "QWEN3MOE",
    "OlmoeForCausalLM": "OLMOE",
    "Olmo3ForCausalLM": "OLMO2",  # convert_hf_to_gguf.py converts OLMo-3 as OLMo-2
    "Exaone4ForCausalLM": "EXAONE4",
    "StableLmForCausalLM": "STABLELM",
    "SmolLM3ForCausalLM": "SMOLLM3",
    "Ernie4_5ForCausalLM": "ERNIE4_5",
    "SeedOssForCausalLM": "SEED_OSS",
    "HunYuanDenseV1ForCausalLM": "HUNYUAN_DENSE",
    "CohereForCausalLM": "COMMAND_R",
    "Cohere2ForCausalLM": "COHERE2",
    "GraniteForCausalLM": "GRANITE",
    "ArceeForCausalLM": "ARCEE",
    "ApertusForCausalLM": "APERTUS",
    "Starcoder2ForCausalLM": "STARCODER2",
    "PhiForCausalLM": "PHI2",
    "Glm4ForCausalLM": "GLM4",
    "GPTJForCausalLM": "GPTJ",
    "BloomForCausalLM": "BLOOM",
    "PhimoeForCausalLM": "PHIMOE",
    "DeepseekV2ForCausalLM": "DEEPSEEK2",
    "DeepseekV3ForCausalLM": "DEEPSEEK2",  # llama.cpp converts DeepSeek-V3 (and Kimi-K2) as DEEPSEEK2
    "Glm4MoeForCausalLM": "GLM4_MOE",
    "Ernie4_5_MoeForCausalLM": "ERNIE4_5_MOE",
}
DEFAULT_TYPE = "f16"


@dataclass
class TensorOverride:
    tensor: str  # GGUF tensor name, e.g. blk.11.ffn_down.weight
    type: str  # ggml type name, e.g. f16
    hf_module: str  # e.g. model.layers.11.mlp.down_proj
    super_weights: list[list[int]] = field(default_factory=list)  # [layer, row, col(, expert)] it holds

    @property
    def pattern(self) -> str:
        return f"^{re.escape(self.tensor)}$"

    @property
    def argument(self) -> str:
        return f"{self.pattern}={self.type}"

    def to_dict(self) -> dict:
        return {**asdict(self), "argument": self.argument}


def ggml_type_name(name: str) -> str:
    """A ggml type name as llama-quantize spells it (case-insensitive check against gguf-py)."""
    from gguf import GGMLQuantizationType

    known = {t.name.lower() for t in GGMLQuantizationType}
    if name.lower() not in known:
        raise SuperweightError(f"unknown ggml type {name!r}: use e.g. f16, bf16, q8_0, q6_k ({', '.join(sorted(known))})")
    return name.lower()


def _check_bridged(architecture: str) -> None:
    if architecture not in GGUF_ARCH:
        raise SuperweightError(
            f"llama.cpp has no architecture for {architecture}: the bridge covers {', '.join(sorted(GGUF_ARCH))}"
        )


def gguf_tensor_name(architecture: str, hf_module: str, num_layers: int) -> str:
    """The GGUF base name (``blk.11.ffn_down``) of a Hugging Face module of ``architecture``."""
    import gguf

    _check_bridged(architecture)
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, GGUF_ARCH[architecture]), num_layers)
    name = name_map.get_name(hf_module)
    if name is None:
        raise SuperweightError(f"gguf-py has no GGUF name for {hf_module} in {architecture}: update the gguf package")
    return name


def _dense_module(spec, layer: int, item) -> str:
    """The dense down-projection holding a weight with no expert. An MoE's is a dense layer's or a shared
    expert's, which only the model tells: detection's weights name it (``module``); a bare coordinate
    means the shared expert where the architecture has one."""
    if not spec.is_moe:
        return spec.down_proj_name(layer)
    if getattr(item, "module", ""):
        return item.module
    if spec.shared_down is None:
        raise SuperweightError(f"{spec.name} is a mixture of experts: give each weight's expert "
                               "(pass detection's JSON, which has it)")
    return f"{spec.layers}.{layer}.{spec.shared_down}"


def overrides_for(
    architecture: str, num_layers: int | None, coords: Sequence, type_name: str = DEFAULT_TYPE
) -> list[TensorOverride]:
    """One override per down-projection tensor holding a super weight, by layer: ``coords`` are
    ``(layer, row, col)``, or for a mixture of experts ``(layer, row, col, expert)`` / ``SuperWeight``s
    (llama.cpp stores a layer's experts as one tensor, ``blk.L.ffn_down_exps``: the override keeps
    every expert of that layer; Qwen2-MoE's shared expert is ``blk.L.ffn_down_shexp``).

    ``num_layers`` bounds-checks the layers; None (catalog entries) trusts them.
    """
    _check_bridged(architecture)
    spec = spec_for_name(architecture)
    type_name = ggml_type_name(type_name)
    items = list(getattr(coords, "super_weights", coords) or [])
    keys = as_keys(items)
    num_layers = num_layers or 1 + max(c.layer for c, _ in keys)
    by_module: dict[str, tuple[int, list[list[int]]]] = {}
    for item, ((layer, row, col), expert) in zip(items, keys):
        if not 0 <= layer < num_layers:
            raise SuperweightError(f"layer {layer} is outside the model's {num_layers} layers")
        module = f"{spec.experts_name(layer)}.down_proj" if expert is not None else _dense_module(spec, layer, item)
        held = [layer, row, col] + ([] if expert is None else [expert])
        by_module.setdefault(module, (layer, []))[1].append(held)
    out = []
    for module, (layer, held) in sorted(by_module.items(), key=lambda kv: (kv[1][0], kv[0])):
        tensor = gguf_tensor_name(architecture, module, num_layers) + ".weight"
        out.append(TensorOverride(tensor, type_name, module, held))
    return out


# Characters that need no quoting in a shell word and survive an unquoted ``$(...)`` unchanged
# (no blanks, quotes, globs or other specials; ``$`` is only special when a name follows it).
_BARE_WORD = re.compile(r"^[A-Za-z0-9_.,:=+^\\-]+\$?=[a-z0-9_]+$")


def shell_args(overrides: Sequence[TensorOverride]) -> str:
    """``--tensor-type ^blk\\.11\\.ffn_down\\.weight$=f16 ...``: no quote characters, so it works both
    pasted and as ``llama-quantize $(superweight llama-cpp-overrides sw.json) ...`` (a shell does not
    remove quotes from a command substitution). An argument that would need quoting is refused."""
    for o in overrides:
        if not _BARE_WORD.match(o.argument):
            raise SuperweightError(
                f"{o.argument!r} would need shell quoting: use --format file with llama-quantize --tensor-type-file"
            )
    return " ".join(f"--tensor-type {o.argument}" for o in overrides)


def gguf_arch_name(architecture: str) -> str:
    """llama.cpp's name (``llama``) of a Hugging Face class name."""
    import gguf

    if architecture not in GGUF_ARCH:
        raise SuperweightError(
            f"llama.cpp has no architecture for {architecture}: the bridge covers {', '.join(sorted(GGUF_ARCH))}"
        )
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, GGUF_ARCH[architecture])]


def model_identity(model: str | ModelSource) -> tuple[str, int]:
    """``(llama.cpp architecture name, layer count)`` of a model argument, read from its metadata
    only (a GGUF header or a config.json): no weights are loaded."""
    src = ModelSource.of(model)
    where = src.path
    if src.kind is SourceKind.GGUF:
        from gguf import GGUFReader

        try:
            reader = GGUFReader(where, "r")
            arch = reader.fields["general.architecture"].contents()
            return str(arch), int(reader.fields[f"{arch}.block_count"].contents())
        except Exception as exc:  # the reader raises many kinds on a bad file
            raise SuperweightError(f"{where}: no architecture in its GGUF metadata ({type(exc).__name__}: {exc})") from None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(where)
    except Exception as exc:
        raise SuperweightError(f"cannot read the config of {src.ref}: {exc}".splitlines()[0]) from None
    return gguf_arch_name(architecture_name(config)), int(config.num_hidden_layers)


def check_model_matches(architecture: str, num_layers: int | None, model: str, origin: str) -> None:
    """Refuse coordinates of ``architecture`` (from ``origin``) for a ``model`` of another one."""
    arch, layers = model_identity(model)
    if gguf_arch_name(architecture) != arch:
        raise SuperweightError(f"{origin} is for a {architecture} ({gguf_arch_name(architecture)}), but {model} is a {arch} model: "
                               "detect the super weights of this model")
    if num_layers and num_layers != layers:
        raise SuperweightError(f"{origin} is for a model of {num_layers} layers, but {model} has {layers}: "
                               "detect the super weights of this model")


def tensor_type_file(overrides: Sequence[TensorOverride]) -> str:
    """The same, one item per line, for ``llama-quantize --tensor-type-file FILE``."""
    return "".join(f"{o.argument}\n" for o in overrides)


# ---------------------------------------------------------------- what llama-quantize would do


def _ggml_type(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[ggml_type_name(name).upper()]


def roundtrip(weight, type_name: str):
    """``weight`` ([out, in]) quantized and dequantized by gguf-py's reference code for ``type_name``.

    llama.cpp quantizes each row (the input dimension, GGUF's ne0) in blocks (32 for q4_0/q8_0).
    Raises ``SuperweightError`` for types gguf-py cannot quantize (the k-quants, i-quants).
    """
    import torch
    from gguf import quants

    t = _ggml_type(type_name)
    w = weight.detach().float().cpu().numpy()
    try:
        q = quants.dequantize(quants.quantize(w, t), t)
    except (NotImplementedError, quants.QuantError) as exc:
        raise SuperweightError(
            f"gguf-py cannot quantize {tuple(w.shape)} to {type_name} ({type(exc).__name__}): "
            "use q4_0, q4_1, q5_0, q5_1, q8_0, f16 or bf16 on rows that are a multiple of 32"
        ) from None
    return torch.from_numpy(q.reshape(w.shape)).to(device=weight.device, dtype=weight.dtype)


@contextlib.contextmanager
def simulated_quantize(model, architecture: str, base_type: str, overrides: Sequence[TensorOverride] = ()) -> Iterator[int]:
    """Inside the block, every decoder-layer ``nn.Linear`` weight holds what ``llama-quantize --pure``
    with ``base_type`` and these ``--tensor-type`` overrides would store (embeddings and the output
    head stay float). Yields the number of weights changed; the originals are restored on exit.
    """
    import torch
    from torch import nn

    spec = spec_for_name(architecture)
    types = {o.hf_module: o.type for o in overrides}
    linears = {name: m for name, m in spec.layer_modules(model).named_modules(prefix=spec.layers) if isinstance(m, nn.Linear)}
    with edited_weights(m.weight for m in linears.values()):
        with torch.no_grad():
            for name, module in linears.items():
                module.weight.copy_(roundtrip(module.weight, types.get(name, base_type)))
        yield sum(m.weight.numel() for m in linears.values())
