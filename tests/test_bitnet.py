"""BitNet b1.58 forward: exactly ternary weights x one gamma, kept weights exact, 8-bit activations,
straight-through gradients, and an artifact holding the very weights the forward used."""
from __future__ import annotations

import pytest
import torch

from superweight.train.bitnet import BitLinear, BitNetConfig, absmax_per_token, convert, export_ternary, restore, ternary_weight
from superweight.testing.synthetic import tiny_model

KEEP = [(1, 3, 5), (1, 60, 100)]


@pytest.fixture()
def model():
    m = tiny_model("LlamaForCausalLM")
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[3, 5] = 7.25  # a super-weight-like outlier
    convert(m, BitNetConfig(keep=KEEP))
    return m


def test_every_decoder_linear_is_ternary_times_one_gamma(model):
    linears = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert len(linears) == 4 * 7 and not isinstance(model.lm_head, BitLinear)
    for lin in linears:
        w = lin.effective_weight().detach()
        mask = torch.ones_like(w, dtype=torch.bool)
        mask.view(-1)[lin.keep_idx] = False
        values = w[mask].unique()
        gamma = values.abs().max()
        assert set((values / gamma).tolist()) <= {-1.0, 0.0, 1.0} and len(values) == 3
        assert gamma == lin.weight.detach().abs().mean().half().float()  # absmean, stored in float16


def test_kept_weights_are_exact_and_the_rest_is_not(model):
    down = model.model.layers[1].mlp.down_proj
    w, latent = down.effective_weight().detach(), down.weight.detach()
    assert w[3, 5] == 7.25 and w[60, 100] == latent[60, 100]
    gamma = ternary_weight(latent).abs().max()
    assert w[3, 6] in (-gamma, 0.0, gamma)


def test_activations_are_8_bit_absmax_per_token():
    x = torch.randn(3, 5, 64) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1)
    q = absmax_per_token(x)
    step = x.abs().amax(-1, keepdim=True) / 127
    codes = q / step
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127.001
    assert (q - x).abs().max() <= (step / 2 + 1e-6).max()


def test_straight_through_gradient_reaches_every_latent_weight(model):
    ids = torch.randint(0, 320, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    down = model.model.layers[1].mlp.down_proj
    assert down.weight.grad is not None and down.weight.grad.abs().sum() > 0
    assert down.weight.grad[3, 5] != 0  # the kept weight learns too


def test_checkpoint_round_trip_restores_the_ternary_forward(model, tmp_path):
    from transformers import LlamaForCausalLM

    model.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    assert restore(again)
    ids = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert not restore(tiny_model("LlamaForCausalLM"))


def test_artifact_holds_the_weights_the_forward_used(model, tmp_path, byte_tokenizer):
    from superweight.quant.artifact import load_quantized

    used = {f"{n}.weight": m.effective_weight().detach().clone() for n, m in model.named_modules() if isinstance(m, BitLinear)}
    manifest = export_ternary(model, byte_tokenizer, tmp_path / "art")
    assert manifest["size"]["bits_per_weight"] < 1.7 and len(manifest["kept"]) == 2
    state = load_quantized(tmp_path / "art", dequantize=True).model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in used.items())


def test_whole_lines_are_the_rows_and_columns_of_the_given_entries():
    from superweight.model.arch_infer import get_arch
    from superweight.train.bitnet import whole_lines

    m = tiny_model("LlamaForCausalLM")
    rows, cols = m.model.layers[1].mlp.down_proj.weight.shape
    lines = whole_lines(m, get_arch(m), [(1, 3, 5), (1, 3, 9)])
    assert len(lines) == cols + 2 * rows - 2 and len(set(lines)) == len(lines)
    assert all(layer == 1 and (row == 3 or col in (5, 9)) for layer, row, col in lines)


def test_effective_weights_show_the_forward_weights_and_restore_the_latent_ones(model):
    from superweight.train.bitnet import effective_weights

    down = model.model.layers[1].mlp.down_proj
    latent = down.weight.detach().clone()
    expected = down.effective_weight().detach().clone()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    before = model(input_ids=ids).logits
    with effective_weights(model):
        assert torch.equal(down.weight, expected) and down.weight[3, 5] == latent[3, 5]  # kept: exact
        inside = model(input_ids=ids).logits
    assert torch.equal(down.weight, latent)
    tol = 1e-5 * before.abs().max().item()  # W + (Wq - W) against Wq: float32 rounding only
    assert torch.allclose(inside, before, atol=tol, rtol=0)
