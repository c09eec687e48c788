"""Quantization primitives: RTN / NF4 / ternary codes, layouts with tails, packing, clipping, configs,
the model-level verb and the W8A8 simulation on tiny models."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from superweight.core.errors import SuperweightError
from superweight.quant import (
    NF4_LEVELS, RTN, W8A8, Layout, Percentile, Ternary, ZScore, clip_tensor, fake_quantize, from_dict,
    holdout_quantize, make_layout, pack_bits, pack_ternary, packed_bytes, quantize, quantize_per_token,
    quantize_tensor, scheme_config, simulate_w8a8, sqnr, target_modules, to_dict, unpack_bits, unpack_ternary,
)
from superweight.testing.synthetic import plant_super_weight, tiny_model

SETTINGS = settings(max_examples=60, deadline=None)


def _tensor(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


shapes = st.tuples(st.integers(1, 37), st.integers(1, 53))


@st.composite
def rtn_cases(draw):
    out, inp = draw(shapes)
    kind = draw(st.sampled_from(["tensor", "channel", "group", "block"]))
    cfg = dict(bits=draw(st.integers(2, 8)))
    if kind == "channel":
        cfg["per_channel"] = True
    elif kind == "group":
        cfg["group"] = draw(st.integers(1, inp))
    elif kind == "block":
        cfg["block"] = draw(st.integers(1, out * inp))
    return (out, inp), RTN(**cfg), draw(st.integers(0, 10_000)), draw(st.sampled_from([1e-3, 1.0, 300.0]))


# ---------------------------------------------------------------- RTN properties


@SETTINGS
@given(rtn_cases())
def test_rtn_codes_in_range_and_error_within_half_a_step(case):
    shape, cfg, seed, scale = case
    w = _tensor(shape, seed, scale)
    qt = quantize_tensor(w, cfg)
    assert qt.codes.dtype == torch.uint8 and qt.codes.numel() == w.numel()
    assert int(qt.codes.max()) <= 2**cfg.bits - 1
    step = qt.layout.per_element(lambda v, s: v * 0 + s, torch.zeros(w.numel()), qt.scale.float()).reshape(shape)
    err = (qt.dequantize() - w).abs()
    assert bool((err <= step / 2 * (1 + 1e-4) + 1e-6 * w.abs().max()).all())


@SETTINGS
@given(rtn_cases(), st.data())
def test_kept_indices_are_exact_and_take_part_in_quantization(case, data):
    shape, cfg, seed, scale = case
    w = _tensor(shape, seed, scale)
    keep = data.draw(st.lists(st.integers(0, w.numel() - 1), max_size=3))
    qt = quantize_tensor(w, cfg, keep)
    out = qt.dequantize()
    assert torch.equal(out.view(-1)[keep], w.view(-1)[keep])
    assert torch.equal(qt.codes, quantize_tensor(w, cfg).codes)  # the kept values still set the range


def test_block_tail_has_its_own_range():
    w = _tensor((37, 53), 0)  # 1961 elements: 19 blocks of 100, a tail of 61
    w.view(-1)[1950] = 50.0  # an outlier in the tail only
    qt = quantize_tensor(w, RTN(bits=4, block=100))
    assert qt.layout == Layout(1, 1961, 100) and qt.scale.shape == (1, 20)
    tail = w.view(-1)[1900:]
    assert float(qt.scale[0, -1]) == pytest.approx(float(tail.max() - tail.min()) / 15, rel=1e-3)
    assert float(qt.scale[0, 0]) < 1.0  # the outlier did not leak into the full blocks
    head = w.view(-1)[:100]
    assert float(qt.zero[0, 0]) == pytest.approx(float(head.min()), abs=1e-3)


def test_group_tail_along_the_input_dimension():
    w = _tensor((4, 10), 1)
    qt = quantize_tensor(w, RTN(bits=3, group=4))  # runs 4, 4, 2 per row
    assert qt.scale.shape == (4, 3)
    for r in range(4):
        tail = w[r, 8:]
        assert float(qt.zero[r, 2]) == pytest.approx(float(tail.min()), abs=2e-3)


def test_granularities_order_by_error():
    w = _tensor((64, 256), 2)
    w[3, 7] = 40.0
    errs = {k: sqnr(w, fake_quantize(w, RTN(bits=4, **kw))) for k, kw in
            {"tensor": {}, "channel": {"per_channel": True}, "group": {"group": 32}, "block": {"block": 1024}}.items()}
    assert errs["group"] > errs["channel"] > errs["tensor"] and errs["block"] > errs["tensor"]


def test_constant_and_zero_tensors():
    for w in (torch.zeros(5, 7), torch.full((5, 7), 0.37)):
        out = fake_quantize(w, RTN(bits=2, group=3))
        assert (out - w).abs().max() < 1e-3


def test_sqnr():
    x = torch.ones(100)
    assert sqnr(x, x) == float("inf")
    assert sqnr(x, x * 1.1) == pytest.approx(20.0)


# ---------------------------------------------------------------- NF4 and ternary


@SETTINGS
@given(shapes, st.integers(0, 1000), st.integers(1, 64))
def test_nf4_codes_and_error(shape, seed, group):
    w = _tensor(shape, seed)
    g = min(group, shape[1])
    qt = quantize_tensor(w, RTN(bits=4, levels="nf4", group=g))
    assert int(qt.codes.max()) <= 15
    half_gap = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()) / 2
    scale = qt.layout.per_element(lambda v, s: v * 0 + s, torch.zeros(w.numel()), qt.scale.float()).reshape(shape)
    assert bool(((qt.dequantize() - w).abs() <= half_gap * scale * (1 + 1e-4) + 1e-6).all())


@SETTINGS
@given(shapes, st.integers(0, 1000), st.integers(0, 5), st.booleans())
def test_ternary_absmean(shape, seed, topk, grouped):
    w = _tensor(shape, seed)
    cfg = Ternary(group=min(8, shape[1]) if grouped else None, topk=topk)
    qt = quantize_tensor(w, cfg)
    assert set(qt.codes.unique().tolist()) <= {0, 1, 2}
    if not grouped:
        gamma = w.abs().mean()
        assert float(qt.scale) == pytest.approx(float(gamma), rel=1e-3)
        expected = (w / (qt.scale.float() + cfg.eps)).round().clamp(-1, 1) * qt.scale.float()
        out = qt.dequantize()
        mask = torch.ones(w.numel(), dtype=torch.bool)
        mask[qt.sparse_idx] = False
        assert torch.equal(out.view(-1)[mask], expected.view(-1)[mask])
    top = w.abs().view(-1).topk(min(topk, w.numel())).indices
    assert set(top.tolist()) == set(qt.sparse_idx.tolist())


# ---------------------------------------------------------------- packing


@SETTINGS
@given(st.integers(1, 8), st.integers(0, 300), st.integers(0, 1000))
def test_pack_bits_round_trip_and_density(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == packed_bytes(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@SETTINGS
@given(st.integers(0, 300), st.integers(0, 1000))
def test_pack_ternary_round_trip(n, seed):
    codes = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    packed = pack_ternary(codes)
    assert packed.numel() == -(-n // 5) and (n == 0 or int(packed.max()) <= 242)
    assert torch.equal(unpack_ternary(packed, n), codes)


def test_int4_is_two_codes_per_byte_low_nibble_first():
    assert pack_bits(torch.tensor([1, 2, 15], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F]
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]


def test_unpack_rejects_wrong_sizes():
    with pytest.raises(SuperweightError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 10)
    with pytest.raises(SuperweightError):
        unpack_ternary(torch.full((1,), 250, dtype=torch.uint8), 5)


# ---------------------------------------------------------------- clipping and hold-out


def test_clip_zscore_and_percentile():
    w = _tensor((50, 50), 3)
    w[0, 0] = 100.0
    z = clip_tensor(w, ZScore(3))
    std, mean = torch.std_mean(w)
    assert float(z.max()) == pytest.approx(float(mean + 3 * std), rel=1e-5)
    p = clip_tensor(w, Percentile(99.0))
    assert float(p.abs().max()) < 100.0 and (p.abs() >= float(p.abs().max())).sum() >= 25
    assert torch.equal(clip_tensor(w, None), w)


def test_clip_plus_holdout_beats_naive_with_a_super_weight():
    w = _tensor((128, 512), 4) * 0.02
    w[7, 11] = 3.0
    naive = fake_quantize(w, RTN(bits=4, block=4096))
    clipped = fake_quantize(w, RTN(bits=4, block=4096, clip=ZScore(6)), keep=[7 * 512 + 11])
    assert clipped[7, 11] == w[7, 11]
    assert sqnr(w, clipped) > sqnr(w, naive) + 3


def test_activation_holdout_restores_the_spike_and_helps():
    x = _tensor((6, 64), 5)
    x[0, 9] = 3000.0
    mask = x.abs() > 1000
    held = holdout_quantize(x, mask)
    assert held[0, 9] == x[0, 9]
    naive = quantize_per_token(x)
    assert (held[0] - x[0]).abs().max() < (naive[0] - x[0]).abs().max() / 10


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("cfg", [
    RTN(), RTN(bits=3, block=128 * 128, clip=ZScore(9)), RTN(bits=4, group=64, clip=Percentile(99.9), levels="nf4"),
    RTN(bits=2, per_channel=True, oversize="tensor"), Ternary(group=128, topk=64), W8A8("smoothquant", alpha=0.85),
])
def test_configs_round_trip_through_versioned_json(cfg):
    data = json.loads(json.dumps(to_dict(cfg)))
    assert data["version"] == 1 and data["type"] == type(cfg).__name__
    assert from_dict(data) == cfg


@pytest.mark.parametrize("make, message", [
    (lambda: RTN(bits=1), "bits must be"), (lambda: RTN(bits=9), "bits must be"),
    (lambda: RTN(group=8, block=64), "pick one"), (lambda: RTN(block=0), "positive"),
    (lambda: RTN(bits=3, levels="nf4"), "NF4"), (lambda: scheme_config("int5"), "unknown scheme"),
    (lambda: scheme_config("int44"), "Did you mean int4"), (lambda: from_dict({"version": 2, "type": "RTN"}), "version"),
    (lambda: from_dict({"version": 1, "type": "GPTQ"}), "unknown quantization config"),
    (lambda: make_layout((4, 8), block=33), "larger than the tensor"),
    (lambda: make_layout((4, 8), group=9), "larger than the input"), (lambda: W8A8("gptq"), "W8A8 method"),
    (lambda: quantize_tensor(torch.zeros(2, 2), RTN(), keep=[4]), "outside the tensor"),
])
def test_bad_input_is_a_clear_error(make, message):
    with pytest.raises(SuperweightError, match=message):
        make()


def test_oversize_tensor_falls_back_per_tensor_only_when_asked():
    assert make_layout((4, 8), block=33, oversize="tensor") == Layout(1, 32, 32)


# ---------------------------------------------------------------- model level


def test_quantize_verb_targets_keeps_and_skips():
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, 1, 5, 17, weight=2.0)
    embed = model.model.embed_tokens.weight.clone()
    head = model.lm_head.weight.clone()
    res = quantize(model, RTN(bits=4, block=1024, clip=ZScore(4)), keep=[(1, 5, 17)])
    assert "lm_head.weight" not in res.tensors and len(res.tensors) == 4 * 7
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, head)
    assert float(model.model.layers[1].mlp.down_proj.weight[5, 17]) == 2.0
    assert res.kept == [{"name": "model.layers.1.mlp.down_proj.weight", "index": 5 * 128 + 17, "value": 2.0}]
    only = target_modules(model, include=r"mlp\.down_proj")
    assert sorted(only) == [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    with pytest.raises(SuperweightError, match="not quantized"):
        quantize(model, RTN(), keep=[(1, 5, 17)], include="q_proj")
    with pytest.raises(SuperweightError, match="no linear module"):
        quantize(model, RTN(), include="nothing-matches")
    with pytest.raises(SuperweightError, match="simulate_w8a8"):
        quantize(model, W8A8())


def test_w8a8_simulation_restores_weights_and_removes_hooks():
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, 1, 5, 17, weight=2.0)
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids).logits
        outs = {}
        for method in ("naive", "holdout", "smoothquant"):
            with simulate_w8a8(model, W8A8(method, holdout_ratio=20.0), calib=[ids[0]]) as stats:
                outs[method] = model(ids).logits
            assert stats.calls == 4 * 7
        after = model(ids).logits
    assert torch.equal(after, ref)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(not m._forward_pre_hooks for m in model.modules())
    for method, out in outs.items():
        assert bool(torch.isfinite(out).all()) and float((out - ref).abs().max()) > 0, method
    assert float((outs["naive"] - ref).abs().max()) < float(ref.abs().max())
    assert stats.to_dict()["method"] == "smoothquant"
    with pytest.raises(ValueError, match="calibration"):
        with simulate_w8a8(model, W8A8("smoothquant")):
            pass


def test_w8a8_holdout_catches_the_planted_spike():
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, 1, 5, 17, weight=2.0)
    ids = torch.randint(0, 320, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), simulate_w8a8(model, W8A8("holdout", holdout_ratio=50.0)) as stats:
        model(ids)
    assert stats.held_out.get("model.layers.1.mlp.down_proj", 0) >= 1
