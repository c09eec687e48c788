"""Artifacts loaded packed (``quant.runtime.PackedLinear``) against the same artifacts loaded dense.

Bounds (``u``: unit roundoff, 2^-24 for float32, 2^-8 for bfloat16):
- the fused dequantize-then-matmul computes in float32 what the dense model computes, in another order:
  ``max |logits - dense logits| <= u32 * K * L * max |dense logits|`` (K the widest reduction, L layers);
- the native int4 kernel computes in float32, per group ``scale * sum q x + zero * sum x``: one layer within
  ``2 u32 * K * (|x| @ (|W| + 15 |s| + |z|)^T)``, the model within the fused path's bound;
- one int4-kernel layer rounds its input, scale and shifted zero point (``z + 8 s``) and its output to
  bfloat16 and accumulates in float32: ``|y - y_dense| <= 4 u16 * (|x| @ (|W| + 8|s| + |z + 8 s|)^T)``;
  through the model: ``max |logits - dense logits| <= 16 u16 * L * max |dense logits|``.
"""
from __future__ import annotations

import pytest
import torch

from superweight.core.errors import SuperweightError
from superweight.quant import RTN, Ternary, ZScore, native, quantize
from superweight.quant.artifact import load_quantized, save_quantized
from superweight.quant.layout import make_layout
from superweight.quant.primitives import quantize_tensor
from superweight.quant.runtime import PackedLinear, packed_bytes
from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model

PLANT = (1, 5, 17)
U32, U16 = 2.0**-24, 2.0**-8
SCHEMES = [
    RTN(bits=4, group=32), RTN(bits=3, group=24), RTN(bits=4, block=1000, clip=ZScore(4)), RTN(bits=8),
    RTN(bits=4, levels="nf4", group=32), Ternary(group=16), RTN(bits=4, group=32, zero_point="int8"),
    RTN(bits=2, per_channel=True), RTN(bits=4, group=32, outliers=0.5), RTN(bits=4, group=64, zero_point="fix8", outliers=0.5),
]
CASES = [("LlamaForCausalLM", c) for c in SCHEMES] + [
    (a, c) for a in ("Gemma3ForCausalLM", "GPT2LMHeadModel", "MixtralForCausalLM") for c in SCHEMES[:2] + SCHEMES[5:6]]


def _artifact(tmp_path, arch: str, config):
    model = tiny_model(arch, vocab=320)
    moe = arch == "MixtralForCausalLM"
    plant_super_weight(model, *PLANT, weight=2.5, **({"expert": 1} if moe else {}))
    save_quantized(model, byte_tokenizer(), quantize(model, config, keep=[(*PLANT, 1) if moe else PLANT]), tmp_path / "a")
    return tmp_path / "a", model


def _auto_kernels(config) -> set[str]:
    if not (config.kind.startswith("rtn") and config.bits == 4 and config.group):
        return {"fused"}
    return {"native"} if config.group % 64 == 0 and native.library() is not None else {"int4"}


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch, config", CASES, ids=[f"{a[:5]}-{c.kind}{getattr(c, 'bits', '')}-{i}" for i, (a, c) in enumerate(CASES)])
def test_packed_logits_are_the_dequantized_ones(tmp_path, arch, config):
    folder, model = _artifact(tmp_path, arch, config)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    dense = load_quantized(folder, dequantize=True).model
    ref = _logits(dense, ids)
    fused = load_quantized(folder, kernel="fused")
    layers = model.config.num_hidden_layers
    width = max(m.in_features for m in fused.model.modules() if isinstance(m, PackedLinear))
    assert not any(isinstance(m, torch.nn.Linear) and "layers" in n for n, m in fused.model.named_modules())
    assert (_logits(fused.model, ids) - ref).abs().max() <= U32 * width * layers * ref.abs().max()
    auto = load_quantized(folder)
    kernels = {m.kernel for m in auto.model.modules() if isinstance(m, PackedLinear)}
    assert kernels == _auto_kernels(config)
    bound = U32 * width * layers if kernels != {"int4"} else 16 * U16 * layers
    assert (_logits(auto.model, ids) - ref).abs().max() <= bound * ref.abs().max()
    short = ids[:1, :8]  # 8 rows: the native kernel reads the codes (and adds the sparse part) itself
    ref_short = _logits(dense, short)
    assert (_logits(auto.model, short) - ref_short).abs().max() <= bound * ref_short.abs().max()
    assert packed_bytes(auto.model) < packed_bytes(dense)
    if arch == "MixtralForCausalLM":
        assert any("experts weights loaded dense" in n for n in auto.notes)


@pytest.mark.parametrize("in_features", [128, 80])  # 80: a short last group, padded for the kernel
def test_one_int4_kernel_layer_within_its_bfloat16_bound(in_features):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, in_features, generator=g) * 0.05 + 0.01
    w[5, 17] = 3.0  # a super weight, held out exact
    qt = quantize_tensor(w, RTN(bits=4, group=32), keep=[5 * in_features + 17])
    layer = PackedLinear(qt, bias=torch.randn(48, generator=g))
    assert layer.kernel == "int4" and layer.padded == (96 if in_features == 80 else 128)
    x = torch.randn(3, 7, in_features, generator=g)
    w_hat = qt.dequantize()
    ref = x @ w_hat.t() + layer.bias
    L = make_layout(tuple(w.shape), group=32)
    s = L.unpad(qt.scale.float().repeat_interleave(32, 1).reshape(48, -1, 32))
    z8 = L.unpad((qt.zero.float() + 8 * qt.scale.float()).repeat_interleave(32, 1).reshape(48, -1, 32))
    bound = 4 * U16 * (x.abs() @ (w_hat.abs() + 8 * s.abs() + z8.abs()).t() + layer.bias.abs())
    with torch.no_grad():
        got = layer(x)
    assert ((got - ref).abs() <= bound).all()


@pytest.mark.parametrize("rows", [1, 3, 40])  # up to NATIVE_DECODE_ROWS the codes are read straight; beyond, dequantized
@pytest.mark.parametrize("zero_point", ["float", "fix8"])
def test_one_native_layer_within_its_float32_bound(rows, zero_point):
    if native.library() is None:
        pytest.skip("no native library (no C compiler, or SUPERWEIGHT_NATIVE=0): layers run torch's int4 kernel")
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 192, generator=g) * 0.05 - 0.01
    w[7, 100] = 4.0
    qt = quantize_tensor(w, RTN(bits=4, group=128, zero_point=zero_point), keep=[7 * 192 + 100])  # a short last group of 64
    layer = PackedLinear(qt, bias=None)
    assert layer.kernel == "native" and layer.native_codes.numel() * 4 * 2 == w.numel()
    x = torch.randn(rows, 192, generator=g)
    w_hat = qt.dequantize()
    L = make_layout(tuple(w.shape), group=128)
    s = L.unpad(layer.native_scale.repeat_interleave(128, 1).reshape(96, -1, 128))
    z = L.unpad(layer.native_zero.repeat_interleave(128, 1).reshape(96, -1, 128))
    bound = 2 * U32 * 192 * (x.abs() @ (w_hat.abs() + 15 * s.abs() + z.abs()).t())
    with torch.no_grad():
        got = layer(x)
    assert ((got - x @ w_hat.t()).abs() <= bound).all()


def test_native_dequantization_is_bitwise_the_artifacts():
    if native.library() is None:
        pytest.skip("no native library (no C compiler, or SUPERWEIGHT_NATIVE=0)")
    w = torch.randn(48, 320, generator=torch.Generator().manual_seed(3))
    qt = quantize_tensor(w, RTN(bits=4, group=64, zero_point="int8"))
    layer = PackedLinear(qt, bias=None, kernel="native")
    dense = native.int4_dense(layer.native_codes, layer.native_scale, layer.native_zero, 64, 8, 48)
    assert torch.equal(dense, qt.dequantize()[8:48])


def test_the_sparse_part_adds_the_exact_super_weight():
    w = torch.zeros(40, 64)
    w[3, 9] = 100.0
    qt = quantize_tensor(w, RTN(bits=3, group=16), keep=[3 * 64 + 9])
    layer = PackedLinear(qt, None, kernel="fused")
    x = torch.zeros(1, 64)
    x[0, 9] = 1.0
    assert float(layer(x)[0, 3]) == 100.0 and layer.sparse_delta.numel() == 1


def test_w8a8_artifact_loads_packed_with_its_input_quantization(tmp_path):
    model = tiny_model("LlamaForCausalLM", vocab=320)
    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    save_quantized(model, byte_tokenizer(), quantize(model, RTN(bits=8)), tmp_path / "w",
                   activations={"bits": 8, "modules": modules, "held_out_channels": {}})
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    packed, dense = load_quantized(tmp_path / "w"), load_quantized(tmp_path / "w", dequantize=True)
    assert all(packed.model.get_submodule(n)._forward_pre_hooks for n in modules)
    ref = _logits(dense.model, ids)
    # both quantize each input to 8 bits per token: a float32 difference may move one input by one step (1/127)
    assert (_logits(packed.model, ids) - ref).abs().max() <= 2.0**-6 * dense.model.config.num_hidden_layers * ref.abs().max()


def test_kernel_choice_errors_are_one_line(tmp_path):
    folder, _ = _artifact(tmp_path, "LlamaForCausalLM", RTN(bits=3, group=32))
    with pytest.raises(SuperweightError, match="the int4 kernel cannot run int3") as exc:
        load_quantized(folder, kernel="int4")
    assert "\n" not in str(exc.value)
    with pytest.raises(SuperweightError, match="the native kernel cannot run int3"):
        load_quantized(folder, kernel="native")
    with pytest.raises(SuperweightError, match="unknown kernel"):
        load_quantized(folder, kernel="marlin")
    lm = load_quantized(folder)
    layer = lm.model.model.layers[0].mlp.down_proj
    assert not hasattr(layer, "weight")
    with pytest.raises(SuperweightError, match="--dequantize"):
        lm.arch.weight_matrix(lm.model, 1)


def test_cli_ablate_on_a_packed_artifact_asks_for_dequantize(tmp_path):
    import subprocess
    import sys

    folder, _ = _artifact(tmp_path, "LlamaForCausalLM", RTN(bits=4, group=32))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    base = [sys.executable, "-m", "superweight", "ablate", str(folder), "--ppl", str(text), "--tasks", "", "--scales", "0"]
    proc = subprocess.run(base, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "--dequantize" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run([*base, "--dequantize"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
