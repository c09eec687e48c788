"""The fused min/max RTN kernels (quant/kernels.py): the same codes, parameters and values as the
reference search path, eager and compiled; a failing compiler falls back to eager; bit packing."""
from __future__ import annotations

import logging

import pytest
import torch

from superweight.quant import RTN, ZScore, kernels, native, quantize
from superweight.quant.config import Percentile
from superweight.quant.layout import make_layout
from superweight.quant.pack import pack_bits, unpack_bits
from superweight.quant.primitives import clip_bounds
from superweight.quant.schemes import handler
from superweight.quant.search import fit_groups

CASES = [  # (shape, config): short last groups, exact groups, the paper's block with a short last block
    ((24, 200), RTN(bits=4, group=64)),
    ((16, 256), RTN(bits=3, group=128)),
    ((40, 70), RTN(bits=4, block=1024, clip=ZScore(3))),
    ((33, 90), RTN(bits=2, group=32, clip=Percentile(99.0))),
    ((24, 200), RTN(bits=4, group=64, zero_point="int8")),
    ((24, 200), RTN(bits=3, group=48, zero_point="fix8")),
]


@pytest.fixture(autouse=True)
def _reset_compile():
    native.set_enabled(False)  # these tests are about the torch kernels; tests/test_quant_native.py about the C ones
    yield
    native.set_enabled(None)
    kernels.set_compile(None)
    kernels._state["failed"] = False


def _reference(w: torch.Tensor, config: RTN):
    """Codes and parameters through the padded reference path (``fit_groups(..., "minmax")``)."""
    layout = make_layout(tuple(w.shape), config.group, config.block)
    bounds = clip_bounds(w, config.clip)
    x = w if bounds is None else w.clamp(bounds[0], bounds[1])
    q, params = fit_groups(handler(config.kind).grid(config.bits, torch.float16), layout.padded_edge(x), None, "minmax")
    return layout, bounds, layout.unpad(q).to(torch.uint8).reshape(-1), params


def _fused(w: torch.Tensor, config: RTN, layout, bounds):
    h = handler(config.kind)
    codes, scale, zero = h.quantize(w, layout, config, None, torch.float16, bounds)
    return codes, scale, zero, h.dense(codes, scale, zero, config.bits, layout)


def _per_element_dense(config: RTN, layout, codes, scale, zero) -> torch.Tensor:
    grid = handler(config.kind).grid(config.bits, scale.dtype)
    return layout.per_element(lambda q, *p: grid.levels_(q, p), codes.float(), scale, zero)


@pytest.mark.parametrize("shape,config", CASES)
def test_eager_kernels_match_the_reference_path(shape, config):
    kernels.set_compile(False)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    w[1, 3] = 9.0  # an outlier, clipped where the config clips
    layout, bounds, ref_codes, (ref_scale, ref_zero) = _reference(w, config)
    codes, scale, zero, dense = _fused(w, config, layout, bounds)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    assert torch.equal(dense, _per_element_dense(config, layout, codes, scale, zero))


def test_exact_ties_round_half_to_even():
    """A group spanning [0, 15] at 4 bits has scale 1 and zero 0 exactly: x = k + 0.5 is a tie."""
    kernels.set_compile(False)
    row = torch.cat([torch.tensor([0.0, 15.0]), torch.arange(14) + 0.5])
    layout = make_layout((1, 16), group=16)
    codes, scale, zero, _ = _fused(row[None], RTN(bits=4, group=16), layout, None)
    assert float(scale) == 1.0 and float(zero) == 0.0
    assert codes[2:].tolist() == torch.round(torch.arange(14) + 0.5).to(torch.uint8).tolist()  # 0, 2, 2, 4, ...


def _compile_or_skip() -> None:
    """Force compiling on; skip when this machine cannot compile (no C++ compiler or Python headers)."""
    kernels.set_compile(True)
    kernels.run(kernels.run_range, 1, torch.randn(4, 8), 4, None)
    if kernels.compile_failed():
        pytest.skip("torch.compile cannot build kernels here (no C++ compiler or Python headers): eager path only")


@pytest.mark.slow
def test_compiled_kernels_are_bitwise_the_eager_ones():
    """One small compile per kernel (~10-30 s on a 2-core CPU): codes, parameters and dequantized
    values equal bit for bit, a short last group, a clipped block and exact ties included."""
    _compile_or_skip()
    shape, config = (24, 200), RTN(bits=4, group=64)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    w[0, :16] = torch.cat([torch.tensor([0.0, 15.0]), torch.arange(14) + 0.5])  # ties in the first group
    w[0, 16:64] = 7.0
    layout, bounds, ref_codes, (ref_scale, ref_zero) = _reference(w, config)
    codes, scale, zero, dense = _fused(w, config, layout, bounds)
    assert not kernels.compile_failed()
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    kernels.set_compile(False)
    assert torch.equal(dense, _fused(w, config, layout, bounds)[3])


def test_a_failing_compiler_falls_back_to_eager_once(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(kernels, "_state", {"force": True, "failed": False, "compiled": {}})
    w = torch.randn(8, 100)
    with caplog.at_level(logging.WARNING, logger="superweight.quant.kernels"):
        lo, hi = kernels.run(kernels.run_range, w.numel(), w, 32, None)
        kernels.run(kernels.run_range, w.numel(), w, 32, None)
    assert kernels.compile_failed() and not kernels.wants_compile(10**9)
    assert torch.equal(lo[:, 0], w[:, :32].amin(-1))  # eager ran: runs of 32, 32, 32 and 4
    assert torch.equal(hi[:, 3], w[:, 96:].amax(-1))
    assert sum("torch.compile is unavailable" in r.message for r in caplog.records) == 1


def test_an_error_of_the_inputs_is_not_blamed_on_the_compiler(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {"force": True, "failed": False, "compiled": {}})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    with pytest.raises(IndexError):
        kernels.run(kernels.run_range, 10, torch.randn(3), 2, None)  # a 1-D tensor: [:, ...] fails eagerly too
    assert not kernels.compile_failed()


def test_compile_switch_and_environment(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {"force": None, "failed": False, "compiled": {}})
    monkeypatch.delenv("SUPERWEIGHT_COMPILE", raising=False)
    assert not kernels.wants_compile(10) and kernels.wants_compile(kernels.COMPILE_MIN_NUMEL)
    monkeypatch.setenv("SUPERWEIGHT_COMPILE", "1")
    assert kernels.wants_compile(10)
    monkeypatch.setenv("SUPERWEIGHT_COMPILE", "0")
    assert not kernels.wants_compile(10**12)
    kernels.set_compile(True)
    assert kernels.wants_compile(10)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 64, 1001, 4096])
def test_pack_bits_is_the_lsb_first_bit_stream(bits, n):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n * bits))
    stream = ((codes.long()[:, None] >> torch.arange(bits)) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).view(-1, 8)
    expected = (stream << torch.arange(8)).sum(1).to(torch.uint8)
    assert torch.equal(pack_bits(codes, bits), expected)
    assert torch.equal(pack_bits(torch.cat([codes[:1], codes])[1:], bits), expected)  # a view with an offset
    assert torch.equal(unpack_bits(expected, bits, n), codes)


def _use_native(on: bool) -> None:
    """The API tests below run with the native kernels (``quant/native.py``) on and off."""
    native.set_enabled(None if on else False)
    if on and native.library() is None:
        pytest.skip("no C compiler here: the native kernels are off")


@pytest.mark.parametrize("native_on", [False, True])
def test_write_back_false_leaves_the_weights_and_gives_the_same_codes(native_on):
    from superweight.testing.synthetic import tiny_model

    _use_native(native_on)
    model = tiny_model("LlamaForCausalLM")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dry = quantize(model, RTN(bits=4, group=32), write_back=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and not dry.sqnr_db
    wet = quantize(model, RTN(bits=4, group=32))
    assert all((qt.packed is not None) == native_on for qt in dry.tensors.values())  # one native pass: packed codes
    for key, qt in dry.tensors.items():
        other = wet.tensors[key]
        assert torch.equal(qt.codes, other.codes) and torch.equal(qt.scale, other.scale) and torch.equal(qt.zero, other.zero)


def _tiny_lm():
    from superweight.model.arch_infer import get_arch
    from superweight.model.loaded import LoadedModel
    from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model

    model = tiny_model("LlamaForCausalLM", vocab=320)
    plant_super_weight(model, 1, 5, 17, weight=2.5)
    return LoadedModel(model, byte_tokenizer(), get_arch(model), "tiny", "tiny")


@pytest.mark.parametrize("native_on", [False, True])
@pytest.mark.parametrize("config", [RTN(bits=4, block=1000, clip=ZScore(4)), RTN(bits=3, group=24), RTN(bits=4, group=20)])
def test_artifact_written_without_write_back_loads_as_the_fake_quantized_model(tmp_path, config, native_on):
    from superweight.quant.artifact import export_artifact, load_quantized

    _use_native(native_on)
    lm = _tiny_lm()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    export_artifact(lm, config, keep=[(1, 5, 17)], out=tmp_path / "a", write_back=False,
                    untouched_dtype=torch.float32)  # the untouched tensors as they are, for the bitwise check
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())  # untouched
    quantize(lm.model, config, keep=[(1, 5, 17)])  # the fake-quantized model of the same config
    got = load_quantized(tmp_path / "a", dequantize=True).model.state_dict()
    assert set(got) == set(before)
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("native_on", [False, True])
def test_cli_artifact_is_the_fake_quantized_model(tmp_path, native_on):
    from typer.testing import CliRunner

    from superweight.cli import app
    from superweight.quant.artifact import load_quantized

    _use_native(native_on)
    lm = _tiny_lm()
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    res = CliRunner().invoke(app, ["quantize", str(tmp_path / "m"), "--scheme", "int3", "--group", "24",
                                   "--no-keep-super-weights", "--untouched-dtype", "float32", "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    quantize(lm.model, RTN(bits=3, group=24))
    got = load_quantized(tmp_path / "q", dequantize=True).model.state_dict()
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(got[name], tensor), name


def test_z_score_bounds_match_std_mean():
    w = torch.randn(300, 70, generator=torch.Generator().manual_seed(3)) * 0.02 + 0.001
    lo, hi = clip_bounds(w, ZScore(9)).tolist()
    std, mean = (float(v) for v in torch.std_mean(w.double()))
    assert lo == pytest.approx(mean - 9 * std, rel=1e-6) and hi == pytest.approx(mean + 9 * std, rel=1e-6)
    one = clip_bounds(torch.tensor([[0.5]]), ZScore(3)).tolist()
    assert one == [0.5, 0.5]
