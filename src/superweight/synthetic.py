"""Tiny random models of every supported architecture, with a super weight planted on demand.

Used by the tests and the benchmarks: the planted coordinates are the known answer that
detection must find. A super weight needs a large input on its column, so ``plant_super_weight``
also points the column's up (and gate) projection along one direction of the hidden state,
which makes that intermediate channel spike on the tokens that face that direction, exactly the
mechanism the paper describes (``Y[t, j] ~ X[t, k] * W[j, k]``).
"""
from __future__ import annotations

import torch
from torch import nn

from .arch import ArchSpec, get_arch
from .edits import HookSet

TINY = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=320, positions=256)


def _llama_kw(t: dict) -> dict:
    return dict(
        hidden_size=t["hidden"], intermediate_size=t["intermediate"], num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"], vocab_size=t["vocab"],
        max_position_embeddings=t["positions"],
    )


def tiny_config(arch_name: str, **overrides):
    """A small config of the real config class of ``arch_name`` (an HF class name)."""
    import transformers as tf

    t = {**TINY, **overrides}
    llama = _llama_kw(t)
    head_dim = t["hidden"] // t["heads"]
    builders = {
        "LlamaForCausalLM": lambda: tf.LlamaConfig(**llama),
        "MistralForCausalLM": lambda: tf.MistralConfig(**llama, sliding_window=None),
        "Qwen2ForCausalLM": lambda: tf.Qwen2Config(**llama),
        "Qwen3ForCausalLM": lambda: tf.Qwen3Config(**llama, head_dim=head_dim),
        "GemmaForCausalLM": lambda: tf.GemmaConfig(**llama, head_dim=head_dim),
        "Gemma2ForCausalLM": lambda: tf.Gemma2Config(**llama, head_dim=head_dim),
        "Gemma3ForCausalLM": lambda: tf.Gemma3TextConfig(**llama, head_dim=head_dim),
        "OlmoForCausalLM": lambda: tf.OlmoConfig(**llama),
        "Olmo2ForCausalLM": lambda: tf.Olmo2Config(**llama),
        "Phi3ForCausalLM": lambda: tf.Phi3Config(**llama, pad_token_id=0),
        "GPT2LMHeadModel": lambda: tf.GPT2Config(
            n_embd=t["hidden"], n_inner=t["intermediate"], n_layer=t["layers"], n_head=t["heads"],
            vocab_size=t["vocab"], n_positions=t["positions"],
        ),
        "GPTNeoXForCausalLM": lambda: tf.GPTNeoXConfig(
            hidden_size=t["hidden"], intermediate_size=t["intermediate"], num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"], vocab_size=t["vocab"], max_position_embeddings=t["positions"],
        ),
        "OPTForCausalLM": lambda: tf.OPTConfig(
            hidden_size=t["hidden"], ffn_dim=t["intermediate"], num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"], vocab_size=t["vocab"], max_position_embeddings=t["positions"],
            word_embed_proj_dim=t["hidden"],
        ),
        "FalconForCausalLM": lambda: tf.FalconConfig(
            hidden_size=t["hidden"], ffn_hidden_size=t["intermediate"], num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"], vocab_size=t["vocab"],
        ),
    }
    config = builders[arch_name]()
    config.architectures = [arch_name]
    return config


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


def _mlp_input(model: nn.Module, module: nn.Module, tokens: int = 48, seed: int = 0) -> torch.Tensor:
    """The input rows ``module`` sees for a fixed random token sequence: ``[tokens, hidden]``."""
    seen = []
    with HookSet() as hooks:
        hooks.pre(module, lambda m, args: seen.append(args[0].detach()))
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
        model(input_ids=ids, use_cache=False)
    return seen[0].reshape(-1, seen[0].shape[-1]).float()


@torch.no_grad()
def plant_super_weight(
    model: nn.Module, layer: int, row: int, col: int, weight: float = 2.0, spread: float | None = None,
    arch: ArchSpec | None = None, seed: int = 1234,
) -> None:
    """Make ``[row, col]`` of ``layer``'s down-projection a super weight.

    The up (and gate) projection of intermediate channel ``col`` is pointed along a fixed unit
    direction ``v`` and scaled so that ``v . h`` has root mean square ``spread`` over the hidden
    states ``h`` the MLP sees (measured on random tokens). That channel then spikes to hundreds
    on whichever tokens face ``v``, and the down-projection weight ``[row, col]`` is ``weight``.
    """
    arch = arch or get_arch(model)
    block = arch.layer_modules(model)[layer]
    up = block.get_submodule(arch.up_proj)
    hidden, inter = arch.weight_matrix(model, layer).shape
    gated = arch.gate_proj is not None
    v = _direction(hidden, seed)
    spread = spread if spread is not None else (30.0 if gated else 200.0)
    projected = _mlp_input(model, up) @ v
    sign = 1.0 if float(projected.mean()) >= 0 else -1.0  # face the common component, if any
    v = (sign * spread / float(projected.pow(2).mean().sqrt())) * v
    v = v.to(up.weight.dtype)
    if gated and not arch.fused_gate_up:
        gate = block.get_submodule(arch.gate_proj)
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
    arch.down_proj_module(model, layer).weight[arch.index(row, col)] = weight
