"""Every ablation restores the weights bitwise; the conditions do what they say (tiny models)."""
from __future__ import annotations

import json

import pytest
import torch

from superweight.prove.ablate import (
    DEFAULT_SCALES, random_coords, restored_super_activation, scaled_weights, top_magnitude_coords, zeroed_entries,
    zeroed_weights,
)
from superweight.model.arch_infer import get_arch
from superweight.core.coords import as_keys
from superweight.core.errors import SuperweightError
from superweight.testing.synthetic import plant_super_weight, tiny_model

SW = [(1, 7, 21)]
ARCHS = ["LlamaForCausalLM", "GPT2LMHeadModel"]  # nn.Linear and GPT-2's transposed Conv1D


def planted(arch_name: str, **kw):
    model = tiny_model(arch_name)
    plant_super_weight(model, *SW[0], **kw)
    return model, get_arch(model)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise(model, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def ids() -> torch.Tensor:
    return torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))


def editors(model, arch):
    top = top_magnitude_coords(model, arch, [1], 50, exclude=SW)
    rand = random_coords(model, arch, [1], 5, exclude=SW)
    yield "zero", lambda: zeroed_weights(model, arch, SW)
    yield "zero_entries", lambda: zeroed_entries(model, arch, SW + top)
    yield "restore", lambda: restored_super_activation(model, arch, SW)
    yield "random", lambda: zeroed_entries(model, arch, rand)
    for s in DEFAULT_SCALES:
        yield f"scale_{s}", lambda s=s: scaled_weights(model, arch, SW, s)


@pytest.mark.parametrize("arch_name", ARCHS)
def test_every_ablation_restores_bitwise(arch_name):
    model, arch = planted(arch_name)
    before = snapshot(model)
    clean = model(input_ids=ids()).logits
    for name, edit in editors(model, arch):
        with edit():
            model(input_ids=ids())
        assert_bitwise(model, before)
        with pytest.raises(RuntimeError), edit():  # an error inside the block restores too
            raise RuntimeError(name)
        assert_bitwise(model, before)
    assert torch.equal(model(input_ids=ids()).logits, clean)  # hooks are gone as well


def test_zeroed_entries_zero_exactly_those():
    model, arch = planted("GPT2LMHeadModel")
    coords = SW + [(0, 3, 4), (1, 2, 9), (1, 2, 9)]
    before = arch.weight_matrix(model, 1).detach().clone()
    with zeroed_entries(model, arch, coords) as n:
        assert n == 3
        m0, m1 = arch.weight_matrix(model, 0), arch.weight_matrix(model, 1)
        assert m0[3, 4] == 0 and m1[2, 9] == 0 and m1[7, 21] == 0
        assert int((m1 != before).sum()) == int(before[2, 9] != 0) + int(before[7, 21] != 0)  # nothing else


def test_top_magnitude_coords_skip_the_super_weight():
    model, arch = planted("LlamaForCausalLM")
    top = top_magnitude_coords(model, arch, [0, 1], 20, exclude=SW)
    assert len(top) == 20 and SW[0] not in top
    values = torch.cat([arch.weight_matrix(model, layer).detach().abs().flatten() for layer in (0, 1)])
    expected = values.sort(descending=True).values[1:21]  # the planted weight is the largest
    got = torch.tensor([float(arch.weight_matrix(model, l)[r, c].detach().abs()) for l, r, c in top])
    assert torch.equal(got, expected)


def test_random_coords_are_distinct_and_in_the_layers():
    model, arch = planted("LlamaForCausalLM")
    coords = random_coords(model, arch, [1, 2], 200, exclude=SW, seed=3)
    assert len(set(coords)) == 200 and SW[0] not in coords
    assert {layer for layer, _, _ in coords} <= {1, 2}
    assert coords == random_coords(model, arch, [1, 2], 200, exclude=SW, seed=3)


def seen_by(model, module, pick):
    """``pick(args, output)`` of ``module``'s call in one forward pass, seen after any earlier hook."""
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(pick(a, o)))
    try:
        with torch.no_grad():
            model(input_ids=ids())
    finally:
        handle.remove()
    return seen[0]


def down_proj_run(model, arch, layer: int, col: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input column ``col``, output) of ``layer``'s down-projection."""
    return seen_by(model, arch.down_proj_module(model, layer), lambda a, o: (a[0][0, :, col].detach(), o[0].detach().clone()))


@pytest.mark.parametrize("arch_name", ARCHS)
def test_restore_writes_back_the_super_activation_only(arch_name):
    # a plant by input spread (not the realistic ratio) spikes on some of the random tokens, not all
    model, arch = planted(arch_name, spread={"LlamaForCausalLM": 30.0, "GPT2LMHeadModel": 200.0}[arch_name])
    layer, row, col = SW[0]
    x, clean = down_proj_run(model, arch, layer, col)
    with zeroed_weights(model, arch, SW):
        _, zeroed = down_proj_run(model, arch, layer, col)
    with restored_super_activation(model, arch, SW):
        _, restored = down_proj_run(model, arch, layer, col)
    spike = x.abs() >= 50
    assert spike.any() and not spike.all(), "the planted weight must make a super activation on some tokens"
    assert torch.allclose(restored[spike, row], clean[spike, row], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(zeroed[spike, row], clean[spike, row], rtol=1e-2)
    assert torch.equal(restored[~spike, row], zeroed[~spike, row])


MOE_SW = [(1, 7, 21, 2)]  # (layer, row, col, expert)


@pytest.mark.parametrize("arch_name", ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "DeepseekV3ForCausalLM"])
def test_every_ablation_of_an_expert_weight_restores_bitwise(arch_name):
    model = tiny_model(arch_name)
    plant_super_weight(model, *MOE_SW[0][:3], expert=2)
    arch = get_arch(model)
    before, clean = snapshot(model), model(input_ids=ids()).logits
    top = top_magnitude_coords(model, arch, [1], 50, exclude=MOE_SW)
    rand = random_coords(model, arch, [1], 5, exclude=MOE_SW)
    assert MOE_SW[0] not in top + rand
    shared = {None} if arch.has_dense(model, 1) else set()  # a shared expert (Qwen2-MoE, DeepSeek): a weight with no expert
    assert {e for _, e in as_keys(rand + top)} <= {0, 1, 2, 3} | shared
    with zeroed_entries(model, arch, MOE_SW + top) as n:
        assert n == 51 and float(arch.expert_matrix(model, 1, 2)[7, 21]) == 0.0
        assert all(float(arch.expert_matrix(model, c.layer, e)[c.row, c.col]) == 0.0 for c, e in as_keys(top))
    for edit in (lambda: zeroed_weights(model, arch, MOE_SW), lambda: scaled_weights(model, arch, MOE_SW, 2.0),
                 lambda: restored_super_activation(model, arch, MOE_SW), lambda: zeroed_entries(model, arch, rand)):
        with edit():
            model(input_ids=ids())
        assert_bitwise(model, before)
    assert torch.equal(model(input_ids=ids()).logits, clean)
    if not arch.has_dense(model, 1):  # (with a shared expert, no expert means the shared expert)
        with pytest.raises(SuperweightError, match="give each weight's expert"):
            with zeroed_weights(model, arch, [MOE_SW[0][:3]]):
                pass
    with pytest.raises(SuperweightError, match="expert 9 is out of range"):
        with zeroed_weights(model, arch, [(1, 7, 21, 9)]):
            pass


def experts_run(model, arch, layer: int) -> torch.Tensor:
    return seen_by(model, arch.experts_module(model, layer), lambda a, o: o.detach().clone())


def test_restore_writes_back_an_expert_weights_term():
    """With the floor at 0 every token routed to the expert gets its term back: the experts' output
    at the weight's row is the clean one again (to rounding); the other rows are the zeroed run's."""
    model = tiny_model("MixtralForCausalLM")
    plant_super_weight(model, *MOE_SW[0][:3], expert=2)
    arch = get_arch(model)
    layer, row = MOE_SW[0][0], MOE_SW[0][1]
    clean = experts_run(model, arch, layer)
    with zeroed_weights(model, arch, MOE_SW):
        zeroed = experts_run(model, arch, layer)
    with restored_super_activation(model, arch, MOE_SW, floor=0.0):
        restored = experts_run(model, arch, layer)
    assert not torch.allclose(zeroed[:, row], clean[:, row], rtol=1e-3)
    assert torch.allclose(restored[:, row], clean[:, row], rtol=1e-5, atol=1e-5)
    others = [r for r in range(clean.shape[1]) if r != row]
    assert torch.equal(restored[:, others], zeroed[:, others])


def test_restore_writes_back_a_shared_expert_weights_term():
    """Qwen2-MoE's shared expert: the hook on its down-projection adds x[col] * w before the block's
    sigmoid gate scales it, so the gated output is the clean one again."""
    model = tiny_model("Qwen2MoeForCausalLM")
    plant_super_weight(model, *SW[0])  # expert None: the shared expert
    arch = get_arch(model)
    layer, row = SW[0][0], SW[0][1]

    def mlp_out() -> torch.Tensor:  # the MoE block's output: experts + sigmoid(gate) * shared expert
        return seen_by(model, arch.layer_modules(model)[layer].get_submodule(arch.mlp_out), lambda a, o: o.detach().clone())

    clean = mlp_out()
    with zeroed_weights(model, arch, SW):
        zeroed = mlp_out()
    with restored_super_activation(model, arch, SW, floor=0.0):
        restored = mlp_out()
    assert not torch.allclose(zeroed[..., row], clean[..., row], rtol=1e-3)
    assert torch.allclose(restored[..., row], clean[..., row], rtol=1e-5, atol=1e-5)


def test_ablate_and_eval_commands_on_a_tiny_model(tmp_path, byte_tokenizer):
    """The CLI end to end on a saved tiny Llama with a planted super weight (no real model)."""
    from typer.testing import CliRunner

    from superweight.cli import app
    from superweight.find.loop import detect

    model, arch = planted("LlamaForCausalLM")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    found = detect(model, byte_tokenizer, "Apple Inc. is a worldwide tech company.", arch=arch)
    assert SW[0] in found.coords
    found.save(tmp_path / "sw.json")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    out = tmp_path / "ablate.json"
    args = ["ablate", str(folder), "--super-weights", str(tmp_path / "sw.json"), "--ppl", str(text),
            "--tasks", "winogrande", "--tasks", "piqa", "--limit", "2", "--seq-len", "64", "--top-n", "30",
            "--scales", "0", "--scales", "1,2",
            "--stopword-prompts", "2", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert list(data["conditions"]) == [
        "original", "zero_super_weights", "zero_top_non_super", "restore_super_activation", "zero_random",
        "scale_0", "scale_1", "scale_2",
    ]
    for cond in data["conditions"].values():
        assert cond["ppl"] > 0 and set(cond["tasks"]) == {"winogrande", "piqa"}
        for r in cond["tasks"].values():
            assert r["n"] == 2 and r["ci"][0] <= r["acc"] <= r["ci"][1]
    assert data["conditions"]["scale_1"]["same_as"] == "original"
    assert data["conditions"]["zero_top_non_super"]["weights_changed"] == 30
    assert set(data["stopwords"]) >= {"original", "zero_super_weights"} and len(data["top5"]["original"]) == 5
    result = CliRunner().invoke(app, ["eval", str(folder), "--ppl", str(text), "--tasks", "lambada", "--limit", "2",
                                      "--seq-len", "64", "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["tasks"]["lambada"]["n"] == 2
