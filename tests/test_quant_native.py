"""The native C kernels (quant/native.c): bitwise the torch reference for min/max RTN (codes and
float16 / float32 parameters: ties, signed zeros, flat groups, clip bounds, short last runs), bit
packing and the z-score sums; the same for any thread count, in the portable (no AVX2) build too;
non-finite weights and a missing compiler fall back to the torch path."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from superweight.core.errors import SuperweightError
from superweight.quant import RTN, kernels, native, quantize
from superweight.quant.config import Percentile
from superweight.quant.pack import pack_bits
from superweight.quant.primitives import _mean_std, quantize_tensor
from superweight.quant.search import UniformGrid

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here: the native kernels are off")


@pytest.fixture(autouse=True)
def _restore():
    state = dict(native._state)
    yield
    native._state.update(state)
    native.set_enabled(None)


def _torch_rtn(x2, size, bits, param_dtype, bounds):
    """The reference: the eager torch kernels (quant/kernels.py) and search.UniformGrid."""
    grid = UniformGrid(bits, param_dtype)
    lo, hi = kernels.run_range(x2, size, bounds)
    scale, zero = grid.minmax(lo, hi)
    return kernels.rtn_codes(x2, size, grid, scale, zero, bounds), scale, zero


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    rows, row_len = int(torch.randint(1, 12, (), generator=g)), int(torch.randint(1, 400, (), generator=g))
    size = int(torch.randint(1, row_len + 1, (), generator=g))
    bits = 1 + seed % 8
    x = torch.randn(rows, row_len, generator=g) * 10.0 ** float(torch.randint(-5, 3, (), generator=g))
    if seed % 3 == 0:
        x[torch.rand(x.shape, generator=g) < 0.3] = 0.0
    if seed % 4 == 0:
        x[torch.rand(x.shape, generator=g) < 0.3] = -0.0  # a -0 minimum: the stored zero is +0 either way
    if seed % 5 == 0:
        x = x.round()  # exact ties at a scale of 1
    if seed % 7 == 0:
        x[:, : max(1, row_len // 2)] = 0.37  # flat runs: scale 0 -> 1
    bounds = None
    if seed % 2:
        m = float(x.abs().mean())
        bounds = torch.tensor([-0.8 * m, 0.6 * m])
    return x, size, bits, (torch.float32 if seed % 6 == 0 else torch.float16), bounds


@pytest.mark.parametrize("seed", range(60))
def test_rtn_is_bitwise_the_torch_reference(seed):
    x, size, bits, param_dtype, bounds = _case(seed)
    got = native.rtn_minmax(x, size, 2**bits - 1, param_dtype, bounds)
    assert got is not None
    for a, b in zip(got, _torch_rtn(x, size, bits, param_dtype, bounds)):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def test_ties_round_half_to_even():
    row = torch.cat([torch.tensor([0.0, 15.0]), torch.arange(14) + 0.5])[None].repeat(1, 4)  # 64 values: vector path
    codes, scale, zero = native.rtn_minmax(row, 16, 15, torch.float16, None)
    assert float(scale[0, 0]) == 1.0 and float(zero[0, 0]) == 0.0
    assert codes[0, 2:16].tolist() == [0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14]


def test_thread_count_does_not_change_anything(monkeypatch):
    x = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(native, "PARALLEL_MIN_NUMEL", 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.rtn_minmax(x, 128, 15, torch.float16, None), native.pack_bits(x.abs().mul(7).to(torch.uint8) % 8, 3)
        torch.set_num_threads(3)
        three = native.rtn_minmax(x, 128, 15, torch.float16, None), native.pack_bits(x.abs().mul(7).to(torch.uint8) % 8, 3)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one[0], three[0])) and torch.equal(one[1], three[1])


@pytest.mark.parametrize("bits", range(1, 8))
def test_pack_bits_is_the_torch_word_packing(bits):
    for n in (0, 1, 7, 8, 9, 63, 1000, 4099):
        codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        got = native.pack_bits(codes, bits)
        native.set_enabled(False)
        want = pack_bits(codes, bits)
        native.set_enabled(None)
        assert got is not None and torch.equal(got, want), (bits, n)


def test_non_finite_weights_fall_back_to_the_torch_error():
    x = torch.randn(8, 64)
    x[2, 5] = float("nan")
    assert native.rtn_minmax(x, 32, 15, torch.float16, None) is None
    x[2, 5] = 1e6  # a float16 scale overflows
    assert native.rtn_minmax(x, 32, 15, torch.float16, None) is None
    with pytest.raises(SuperweightError, match="overflow"):
        quantize_tensor(x, RTN(bits=4, group=32))


def test_sums_are_exact_enough_and_thread_independent(monkeypatch):
    x = torch.randn(300_001, generator=torch.Generator().manual_seed(2)) * 0.02 + 0.003
    monkeypatch.setattr(native, "PARALLEL_MIN_NUMEL", 1)
    total, squares = native.sum_squares(x)
    d = x.double()
    assert math.isclose(total, float(d.sum()), rel_tol=1e-12) and math.isclose(squares, float(d.dot(d)), rel_tol=1e-12)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert native.sum_squares(x) == (total, squares)
    finally:
        torch.set_num_threads(before)
    mean, std = _mean_std(x)
    ref_std, ref_mean = torch.std_mean(d)
    assert math.isclose(mean, float(ref_mean), rel_tol=1e-9) and math.isclose(std, float(ref_std), rel_tol=1e-9)


def test_portable_build_is_bitwise_the_vector_build():
    """The scalar loops (a CPU without AVX2) give the same bytes as the AVX2 ones."""
    try:
        portable = native.load(native.FLAGS + ("-mno-avx2",))
    except Exception as exc:  # noqa: BLE001 (a compiler that lacks the flag)
        pytest.skip(f"cannot build the portable variant here: {exc}")
    fast = native.library()
    for seed in (1, 2, 5, 9, 10, 35):
        x, size, bits, param_dtype, bounds = _case(seed)
        native._state["lib"] = fast
        a = native.rtn_minmax(x, size, 2**bits - 1, param_dtype, bounds), native.sum_squares(x)
        native._state["lib"] = portable
        b = native.rtn_minmax(x, size, 2**bits - 1, param_dtype, bounds), native.sum_squares(x)
        assert all(torch.equal(_bits(p), _bits(q)) for p, q in zip(a[0], b[0]))
        assert a[1] == pytest.approx(b[1], rel=1e-12)


def test_without_a_compiler_the_quantizer_runs_in_torch(monkeypatch, caplog):
    from superweight.testing.synthetic import tiny_model

    model = tiny_model("LlamaForCausalLM")
    want = quantize(model, RTN(bits=4, group=32, clip=Percentile(99.0)), write_back=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    native._state.update(lib=None, tried=False)
    with caplog.at_level(logging.WARNING):
        got = quantize(model, RTN(bits=4, group=32, clip=Percentile(99.0)), write_back=False)
    assert native.library() is None and "native kernels are unavailable" in caplog.text
    for key, qt in want.tensors.items():
        other = got.tensors[key]
        assert torch.equal(qt.codes, other.codes) and torch.equal(qt.scale, other.scale) and torch.equal(qt.zero, other.zero)


@pytest.mark.parametrize("seed", range(0, 60, 7))
def test_dense_is_bitwise_the_torch_kernels(seed):
    x, size, bits, param_dtype, bounds = _case(seed)
    codes, scale, zero = native.rtn_minmax(x, size, 2**bits - 1, param_dtype, bounds)
    got = native.rtn_dense(codes, size, scale, zero)
    want = kernels.dense(codes, size, UniformGrid(bits, param_dtype), scale, zero)
    assert torch.equal(_bits(got), _bits(want))


def test_sqnr_sums_match_torch():
    """The native sums are float64 sums of the float32 signal and difference: within float64's
    bound of the exact ones. The torch path sums the signal in float32 (``torch.dot``, whose order
    depends on the CPU's vector width) and rounds each squared difference to float32, so its SQNR
    agrees to ``db_bound`` of the 333,000-term sum, not to the bit."""
    from superweight.quant.primitives import sqnr
    from superweight.testing.tolerance import db_bound

    x = torch.randn(1000, 333, generator=torch.Generator().manual_seed(3))
    y = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    n, eps64 = x.numel(), torch.finfo(torch.float64).eps
    signal, noise = native.sqnr_sums(x, y)
    d, e = x.double().reshape(-1), (y - x).double().reshape(-1)  # the float32 difference, then exact squares
    assert signal == pytest.approx(float(d @ d), rel=n * eps64) and noise == pytest.approx(float(e @ e), rel=n * eps64)
    got = sqnr(x, y)
    native.set_enabled(False)
    assert got == pytest.approx(sqnr(x, y), abs=db_bound(n, rel=torch.finfo(torch.float32).eps))
    assert sqnr(x, x) == float("inf")


@pytest.mark.parametrize("config", [RTN(bits=4, group=64), RTN(bits=3, block=1000), RTN(bits=4, group=48, clip=Percentile(99.0))])
def test_write_back_is_bitwise_the_dequantized_tensor(config):
    """One pass (dequantize into the weight + the SQNR sums) = dequantize, sqnr, copy; kept values exact."""
    from superweight.quant.primitives import sqnr

    w = torch.randn(96, 192, generator=torch.Generator().manual_seed(6))
    w[3, 7] = 12.0
    qt = quantize_tensor(w, config, keep=[3 * 192 + 7, 5])
    want = qt.dequantize(torch.float32)
    got = w.clone()
    db = qt.write_into(got)
    assert torch.equal(_bits(got), _bits(want)) and float(got[3, 7]) == 12.0
    assert db == pytest.approx(sqnr(w, want), abs=1e-6)


@pytest.mark.parametrize("seed", range(0, 60, 5))
def test_bfloat16_write_back_is_bitwise_dequantize_to_bfloat16(seed):
    """bfloat16 weights (big checkpoints loaded as they are stored): the one native pass rounds each
    dequantized float32 value as ``.to(torch.bfloat16)`` does (ties to even, tiny values kept), kept
    values exact, the SQNR that of the torch path (whose signal sum is float32: ``db_bound``)."""
    from superweight.quant.primitives import sqnr
    from superweight.testing.tolerance import db_bound

    x, size, bits, param_dtype, bounds = _case(seed)
    w = x.to(torch.bfloat16)
    w.view(-1)[:3] = torch.tensor([1e-39, -3e-40, 0.0]).to(torch.bfloat16)  # subnormals survive
    config = RTN(bits=max(2, bits), block=size)
    qt = quantize_tensor(w, config, keep=[0, w.numel() - 1], param_dtype=param_dtype)
    want = qt.dequantize(torch.bfloat16)
    got = w.clone()
    db = qt.write_into(got)
    assert torch.equal(_bits(got), _bits(want))
    ref = sqnr(w, want)  # torch squares the differences in float32: a subnormal one's square underflows to 0
    if math.isinf(ref):
        assert db > 300 or float(w.float().abs().max()) < 1e-30  # only subnormal differences (or signal) left
    else:
        assert db == pytest.approx(ref, abs=db_bound(w.numel(), rel=torch.finfo(torch.float32).eps))
