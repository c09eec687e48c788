"""The outlier-aware quantizer: range search never worse than min/max RTN on any group, held-out values
exact and out of their group's range, the int8 zero point, vectorised packing against a reference bit
stream, the scheme handler registry, artifacts of the new schemes, and a tiny model end to end."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from superweight.model.arch_infer import get_arch
from superweight.core.errors import SuperweightError
from superweight.quant.artifact import MANIFEST, WEIGHTS, load_quantized, save_quantized
from superweight.quant import RTN, make_layout, pack_bits, quantize, quantize_tensor, unpack_bits
from superweight.quant.primitives import outlier_count
from superweight.quant.schemes import handler, kinds
from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def groups(draw):
    """A weight matrix with heavy-tailed rows (a few planted outliers), and a group size."""
    out, inp = draw(st.integers(1, 12)), draw(st.integers(2, 70))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    w = torch.randn(out, inp, generator=g) * draw(st.sampled_from([1e-3, 0.05, 1.0]))
    for i in torch.randperm(w.numel(), generator=g)[: draw(st.integers(0, 4))].tolist():  # distinct: no value hit twice
        w.view(-1)[i] *= draw(st.sampled_from([5.0, 30.0, -50.0]))  # (hit thrice, one overflowed float16 scales)
    return w, draw(st.integers(2, inp)), draw(st.integers(2, 4))


def _group_sse(w: torch.Tensor, w_hat: torch.Tensor, group: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error per (row, group), float64, optionally over ``mask`` only."""
    layout = make_layout(tuple(w.shape), group=group)
    d = (w.double() - w_hat.double()) ** 2
    if mask is not None:
        d = d * mask
    return layout.padded(d.float().double(), 0.0).sum(-1)


@SETTINGS
@given(groups(), st.sampled_from(["float", "int8", "fix8"]))
def test_range_search_is_never_worse_than_minmax_on_any_group(case, zero_point):
    w, group, bits = case
    base = quantize_tensor(w, RTN(bits=bits, group=group, zero_point=zero_point)).dequantize()
    best = quantize_tensor(w, RTN(bits=bits, group=group, zero_point=zero_point, search="mse")).dequantize()
    err_base, err_best = _group_sse(w, base, group), _group_sse(w, best, group)
    assert bool((err_best <= err_base).all()), (err_best - err_base).max()


@SETTINGS
@given(groups(), st.sampled_from(["float", "fix8"]))
def test_hqq_search_keeps_the_minmax_step_and_moves_only_the_zero(case, zero_point):
    """HQQ's solver: every group's step is its min/max step (only the zero point moves)."""
    w, group, bits = case
    base = quantize_tensor(w, RTN(bits=bits, group=group, zero_point=zero_point))
    hqq = quantize_tensor(w, RTN(bits=bits, group=group, zero_point=zero_point, search="hqq"))
    lo = base.layout.padded_edge(w.float()).amin(-1)
    hi = base.layout.padded_edge(w.float()).amax(-1)
    step = ((hi - lo) / (2**bits - 1)).to(torch.float16).float()
    live = step >= torch.finfo(torch.float16).tiny  # below it float16 keeps no relative precision
    assert torch.allclose(hqq.scale.float()[live], step[live], rtol=2**-9)


def test_hqq_search_reproduces_values_on_an_integer_zero_grid():
    """At 4 bits hqq starts from an integer zero point: weights that lie on such a grid come back exactly."""
    q = torch.tensor([[0, 15, 3, 7, 9, 1, 12, 4], [2, 0, 15, 5, 5, 8, 11, 14]], dtype=torch.float32)
    w = (q - torch.tensor([[6.0], [9.0]])) * 0.125  # zero points 6 and 9 steps, step 1/8 (float16-exact)
    got = quantize_tensor(w, RTN(bits=4, group=8, search="hqq")).dequantize()
    assert torch.equal(got, w)


def test_hqq_search_matches_hqq_itself():
    """Against hqq's own code (its default 4-bit config: optimize, round_zero, axis 1) on a heavy-tailed
    matrix: float32 parameters, the same codes but for float rounding at a few ties."""
    hqq_quantize = pytest.importorskip("hqq.core.quantize", reason="hqq is not installed (DISABLE_CUDA=1 pip install hqq)")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.05
    w.view(-1)[::997] *= 20.0
    w_q, meta = hqq_quantize.Quantizer.quantize(w, nbits=4, group_size=64, optimize=True, round_zero=True, axis=1,
                                                bitpack=False, device="cpu")
    theirs = ((w_q.float() - meta["zero"]) * meta["scale"]).reshape(w.shape)
    ours = quantize_tensor(w, RTN(bits=4, group=64, search="hqq"), param_dtype=torch.float32).dequantize()
    step = float(meta["scale"].max())
    assert float((ours - theirs).abs().gt(1e-5).float().mean()) < 1e-3
    assert float((ours - theirs).abs().max()) <= step * 1.01


@SETTINGS
@given(groups())
def test_nf4_scale_search_is_never_worse_than_absmax(case):
    w, group, _ = case
    base = quantize_tensor(w, RTN(bits=4, group=group, levels="nf4")).dequantize()
    best = quantize_tensor(w, RTN(bits=4, group=group, levels="nf4", search="mse")).dequantize()
    assert bool((_group_sse(w, best, group) <= _group_sse(w, base, group)).all())


@SETTINGS
@given(groups(), st.sampled_from([0.5, 2.0, 6.0]), st.sampled_from(["minmax", "mse", "hqq"]))
def test_held_out_values_are_exact_and_leave_the_range(case, budget, search):
    w, group, bits = case
    keep = [0, w.numel() - 1]
    cfg = RTN(bits=bits, group=group, search=search, zero_point="int8", outliers=budget)
    qt = quantize_tensor(w, cfg, keep=keep)
    assert qt.sparse_idx.numel() == len(keep) + min(outlier_count(w.numel(), budget, 4), w.numel() - len(keep))
    others = torch.ones(w.numel(), dtype=torch.bool)
    others[qt.sparse_idx] = False
    if others.any() and qt.sparse_idx.numel() > len(keep):  # the held-out outliers are the largest of the rest
        held_mags = w.reshape(-1).abs()[[i for i in qt.sparse_idx.tolist() if i not in keep]]
        assert float(held_mags.min()) >= float(w.reshape(-1).abs()[others].max())
    got = qt.dequantize().reshape(-1)
    assert torch.equal(got[qt.sparse_idx], w.reshape(-1)[qt.sparse_idx])  # bit for bit
    if search in ("minmax", "hqq"):  # the step comes from the range of what is not held out
        held = torch.zeros(w.numel(), dtype=torch.bool)
        held[qt.sparse_idx] = True
        rest = qt.layout.padded(torch.where(held, torch.nan, w.reshape(-1)), torch.nan)
        lo = torch.where(rest.isnan(), torch.inf, rest).amin(-1)
        hi = torch.where(rest.isnan(), -torch.inf, rest).amax(-1)
        live = torch.isfinite(lo) & (hi > lo)
        bound = (hi - lo)[live] / (2**bits - 1) * (1 + 2**-9) + 1e-7
        assert bool((qt.scale.float()[live] <= bound).all())


def test_int8_zero_point_is_an_integer_and_saves_a_byte_per_group():
    w = torch.randn(8, 64)
    qt = quantize_tensor(w, RTN(bits=4, group=32, zero_point="int8"))
    assert qt.kind == "rtn_z8" and qt.zero.dtype == torch.int8
    h = handler("rtn_z8")
    assert h.param_bytes(qt.layout, 2) == 8 * 2 * 3 and handler("rtn").param_bytes(qt.layout, 2) == 8 * 2 * 4
    levels = (qt.codes.float().reshape(8, 2, 32) - qt.zero.float().unsqueeze(-1)) * qt.scale.float().unsqueeze(-1)
    assert torch.equal(qt.dequantize().reshape(8, 2, 32), levels)


def test_registry_names_every_kind_and_refuses_an_unknown_one():
    assert set(kinds()) >= {"rtn", "rtn_z8", "rtn_zf8", "nf4", "ternary"}
    with pytest.raises(SuperweightError, match="did you mean rtn_z8"):
        handler("rtn_z9")


def _reference_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The LSB-first bit stream, one bit at a time (the definition the packers must match)."""
    stream = [(int(c) >> b) & 1 for c in codes.tolist() for b in range(bits)]
    stream += [0] * ((-len(stream)) % 8)
    return torch.tensor([sum(stream[i + b] << b for b in range(8)) for i in range(0, len(stream), 8)], dtype=torch.uint8)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 8), st.integers(0, 70), st.integers(0, 1000))
def test_vectorised_packing_is_the_lsb_first_stream(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert torch.equal(packed, _reference_stream(codes, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


# ---------------------------------------------------------------- artifacts and models

PLANT = (1, 5, 17)
NEW = [
    RTN(bits=4, group=32, search="mse", zero_point="int8", outliers=0.1, sa_weight=16.0),
    RTN(bits=3, group=24, search="mse"),
    RTN(bits=2, group=16, zero_point="int8"),
    RTN(bits=4, group=32, search="hqq", zero_point="fix8", outliers=0.1),
    RTN(bits=4, group=32, levels="nf4", search="mse", outliers=0.05),
]


@pytest.mark.parametrize("config", NEW, ids=lambda c: c.kind + "-" + c.search)
def test_new_schemes_round_trip_bitwise_with_predicted_size(tmp_path, config):
    model = tiny_model("LlamaForCausalLM", vocab=320)
    plant_super_weight(model, *PLANT, weight=2.5)
    result = quantize(model, config, keep=[PLANT])
    manifest = save_quantized(model, byte_tokenizer(), result, tmp_path / "art", source="tiny", untouched_dtype=torch.float32)
    lm = load_quantized(tmp_path / "art", dequantize=True)
    expected, got = model.state_dict(), lm.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert float(lm.arch.weight_matrix(lm.model, PLANT[0])[PLANT[1], PLANT[2]]) == 2.5
    size = manifest["size"]
    assert abs(size["data_bytes"] - size["predicted_data_bytes"]) <= 0.02 * size["predicted_data_bytes"]
    if config.outliers:
        assert size["sparse_bits_per_weight"] <= config.outliers + 1e-3


def test_damaged_int8_zero_points_are_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("LlamaForCausalLM", vocab=320)
    save_quantized(model, None, quantize(model, RTN(bits=4, group=32, zero_point="int8")), tmp_path / "art")
    tensors = load_file(str(tmp_path / "art" / WEIGHTS))
    key = next(k for k in tensors if k.endswith("::zero"))
    tensors[key] = tensors[key].to(torch.float16)  # the right shape, the wrong type
    save_file(tensors, str(tmp_path / "art" / WEIGHTS))
    with pytest.raises(SuperweightError) as err:
        load_quantized(tmp_path / "art")
    assert "corrupted" in str(err.value) and "\n" not in str(err.value)
    manifest = json.loads((tmp_path / "art" / MANIFEST).read_text())
    assert manifest["tensors"][key.split("::")[0]]["kind"] == "rtn_z8"


def test_tiny_model_end_to_end_outlier_aware_beats_rtn_on_output_error():
    """Planted super weight: the outlier-aware scheme keeps it exactly, and the quantized model's
    logits stay closer to the float model's than min/max RTN's at the same group size."""
    model = tiny_model("LlamaForCausalLM", vocab=320, hidden=64, intermediate=256)
    plant_super_weight(model, *PLANT, weight=4.0)
    ids = torch.randint(0, 320, (1, 48), generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids).logits
        errs = {}
        for name, cfg in {"rtn": RTN(bits=3, group=32),
                          "best": RTN(bits=3, group=32, search="mse", zero_point="int8", outliers=0.1, sa_weight=16.0)}.items():
            model.load_state_dict(state)
            result = quantize(model, cfg, keep=[PLANT] if name == "best" else None)
            errs[name] = float((model(ids).logits - ref).pow(2).mean())
            if name == "best":
                down = model.model.layers[PLANT[0]].mlp.down_proj.weight
                assert float(down[PLANT[1], PLANT[2]]) == 4.0 and result.kept[0]["value"] == 4.0
    assert errs["best"] < errs["rtn"]


def test_sa_fit_weights_mark_the_columns_that_read_the_super_activation():
    from superweight.model.arch_infer import get_arch
    from superweight.quant.api import sa_fit_weights, target_modules

    model = tiny_model("LlamaForCausalLM", vocab=320)
    modules = target_modules(model)
    care = sa_fit_weights(model, modules, [PLANT], 16.0, get_arch(model))
    down = care["model.layers.1.mlp.down_proj"]
    assert bool((down[:, PLANT[2]] == 16).all()) and int((down == 16).sum()) == down.shape[0]
    q1 = care["model.layers.1.self_attn.q_proj"]
    assert bool((q1[:, PLANT[1]] == 16).all())
    assert "model.layers.0.self_attn.q_proj" not in care  # before the super weight's layer
    assert not any("o_proj" in k for k in care)  # o_proj is not fed by a norm


def test_bad_options_are_one_line_errors():
    for make, match in [(lambda: RTN(search="lp"), "search"), (lambda: RTN(levels="nf4", search="hqq"), "NF4"),
                        (lambda: RTN(zero_point="int4"), "zero_point"),
                        (lambda: RTN(levels="nf4", zero_point="int8"), "NF4"), (lambda: RTN(outliers=-1), "outliers"),
                        (lambda: RTN(sa_weight=0.5), "sa_weight")]:
        with pytest.raises(SuperweightError, match=match):
            make()


def test_w8a8_artifact_records_held_channels_loads_and_runs(tmp_path):
    from superweight.quant import W8A8, simulate_w8a8
    from superweight.quant.w8a8 import held_channels

    model = tiny_model("LlamaForCausalLM", vocab=320)
    plant_super_weight(model, *PLANT, weight=8.0)
    calib = [torch.randint(0, 320, (32,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    held = held_channels(model, calib, ratio=50.0)
    assert PLANT[2] in held.get("model.layers.1.mlp.down_proj", []), held  # the super activation's input channel
    modules = list(target_names(model))
    with torch.no_grad():
        ref = model(calib[0].reshape(1, -1)).logits
    result = quantize(model, RTN(bits=8))
    manifest = save_quantized(model, byte_tokenizer(), result, tmp_path / "w8a8",
                              activations={"bits": 8, "modules": modules, "held_out_channels": held})
    lm = load_quantized(tmp_path / "w8a8")
    assert manifest["activations"]["held_out_channels"] == held
    with torch.no_grad():
        out = lm.model(calib[0].reshape(1, -1)).logits
        hooks = sum(len(lm.model.get_submodule(n)._forward_pre_hooks) for n in modules)
    assert hooks == len(modules) and torch.isfinite(out).all()
    assert float((out - ref).pow(2).mean()) < 0.05 * float(ref.pow(2).mean())  # W8A8 is close to the float model
    with simulate_w8a8(model, W8A8("smoothquant", weights="channel", symmetric=True), calib):
        assert torch.isfinite(model(calib[0].reshape(1, -1)).logits).all()


def target_names(model):
    from superweight.quant import target_modules

    return target_modules(model)


def test_cli_writes_the_outlier_aware_scheme(tmp_path):
    from typer.testing import CliRunner

    from superweight.cli import app

    folder = tmp_path / "tiny"
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT, weight=2.5)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out, runner = tmp_path / "q", CliRunner()
    res = runner.invoke(app, ["quantize", str(folder), "--scheme", "int4", "--group", "32", "--search", "mse",
                              "--zero-point", "int8", "--outliers", "0.1", "--sa-weight", "16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["config"]["search"] == "mse" and manifest["scheme"].endswith("sa-weight=16")
    assert {e["kind"] for e in manifest["tensors"].values()} == {"rtn_z8"}
    res = runner.invoke(app, ["quantize", str(folder), "--scheme", "ternary", "--search", "mse", "--out", str(tmp_path / "t")])
    assert isinstance(res.exception, SuperweightError) and "apply to int" in str(res.exception)


def _experts_bound(experts, hs: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per output, the most two float32 evaluations of the eager experts loop (gate/up product, SiLU
    times up, down product, weighted sum over the top-k) can differ, in float64: each product's
    ``matmul_bound``, carried through SiLU (slope at most 1.1) and the product, a few units in the
    last place for SiLU's own rounding, then the weighted sum's ``sum_bound``."""
    from superweight.testing.tolerance import EPS32, matmul_bound, sum_bound

    assert type(experts.act_fn).__name__ in ("SiLU", "SiLUActivation"), experts.act_fn  # the slope below is SiLU's
    bound, mag = torch.zeros(hs.shape, dtype=torch.float64), torch.zeros(hs.shape, dtype=torch.float64)
    x = hs.double()
    with torch.no_grad():
        for e in idx.unique().tolist():
            tok, slot = torch.where(idx == e)
            gate_up, down, route = experts.gate_up_proj[e].double(), experts.down_proj[e].double(), w[tok, slot, None].double().abs()
            gate, up = (x[tok] @ gate_up.T).chunk(2, dim=-1)
            d_gate, d_up = matmul_bound(x[tok], gate_up).chunk(2, dim=-1)
            act = torch.nn.functional.silu(gate)
            h = act * up
            d_h = 1.1 * d_gate * up.abs() + act.abs() * d_up + 4 * EPS32 * h.abs()
            y = (h @ down.T).abs()
            bound.index_add_(0, tok, route * (d_h @ down.abs().T + matmul_bound(h, down) + EPS32 * y))
            mag.index_add_(0, tok, route * y)
    return bound + sum_bound(idx.shape[1], mag)


@pytest.mark.parametrize("arch_name", ["MixtralForCausalLM", "DeepseekV3ForCausalLM"])
def test_w8a8_simulates_an_moes_experts_and_restores_them(arch_name):
    """The experts' 3-D weights are 8-bit per expert matrix and both of their inputs (the routed hidden
    states, each expert's act(gate) * up) 8-bit per token; a planted expert super weight's input is held
    out. Its forward is transformers' eager loop: with no quantization it is the module's own to float32
    rounding (``_experts_bound``: the two may multiply in other orders, by CPU and thread count)."""
    from superweight.quant import W8A8, simulate_w8a8
    from superweight.quant.w8a8 import experts_forward

    model = tiny_model(arch_name)
    plant_super_weight(model, 1, 5, 17, expert=2)
    arch = get_arch(model)
    experts = arch.experts_module(model, 1)
    hs, idx, w = torch.randn(24, 64), torch.randint(0, 4, (24, 2)), torch.rand(24, 2)
    with torch.no_grad():
        got, want = experts_forward(experts, lambda x: x, lambda x: x)(hs, idx, w), experts(hs, idx, w)
    assert ((got - want).abs().double() <= _experts_bound(experts, hs, idx, w)).all()
    ids = torch.randint(0, 300, (1, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        clean = model(ids).logits
        with simulate_w8a8(model, W8A8("holdout")) as stats:
            simulated = model(ids).logits
    layers_with_experts = sum(arch.experts_module(model, i) is not None for i in range(arch.num_layers(model)))
    assert stats.experts == 4 * layers_with_experts
    assert "model.layers.1.mlp.experts.down_proj" in stats.held_out  # the planted expert's spiking input
    assert not torch.equal(simulated, clean)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and "forward" not in experts.__dict__
    with torch.no_grad():
        assert torch.equal(model(ids).logits, clean)
    with simulate_w8a8(model, W8A8("naive"), exclude=r"lm_head|experts") as stats:
        assert stats.experts == 0
