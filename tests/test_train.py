"""superweight train: a tiny run writes loadable checkpoints and a loss curve, reproducibly."""
from __future__ import annotations

import json

import pytest
import torch

from superweight.core.errors import SuperweightError
from superweight.train.loop import TrainConfig, TrainResult, checkpoint_folders, lr_at, train

SENTENCES = [
    "The river flows past the old mill and into the valley.",
    "Apple Inc. is a worldwide tech company based in California.",
    "In 1901 the city opened its first public library.",
    "Winter is cold and summer is hot in the northern hills.",
]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(SENTENCES[i % 4] + f" Item {i}." for i in range(400)))
    return path


def tiny(text_file, **kw) -> TrainConfig:
    return TrainConfig.preset("test", text=str(text_file), heldout="split", eval_tokens=64, **kw)


@pytest.fixture(scope="module")
def run(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, train(tiny(text_file), out)


def test_tiny_run_writes_checkpoints(run):
    out, result = run
    assert [c for c in result.checkpoints] == ["step-000000", "step-000002", "step-000004"]
    assert [s for s, _ in result.losses] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)
    assert result.heldout == "last 5% of the training text"
    state = json.loads((out / "step-000004" / "train_state.json").read_text())
    assert state["step"] == 4 and state["config"]["seed"] == 0
    assert TrainResult.load(out / "train_log.json").evals == result.evals


def test_checkpoints_load_with_the_tool(run):
    from superweight import load_model

    out, _ = run
    lm = load_model(str(out / "step-000004"))
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.arch.name == "LlamaForCausalLM"
    ids = lm.tokenizer("Apple Inc.")["input_ids"]
    assert ids[0] == lm.tokenizer.bos_token_id  # samples and prompts start with BOS
    start = load_model(str(out / "step-000000")).model.get_input_embeddings()
    assert start.padding_idx is None and start.weight[ids[0]].abs().sum() > 0  # BOS is trainable from step 0
    assert checkpoint_folders([out]) == [out / f"step-00000{i}" for i in (0, 2, 4)]


def test_same_seed_same_weights_other_seed_differs(run, text_file, tmp_path):
    from safetensors.torch import load_file

    out, _ = run
    again = train(tiny(text_file, steps=2, save_every=2), tmp_path / "a")
    other = train(tiny(text_file, steps=2, save_every=2, seed=1), tmp_path / "b")
    first = load_file(out / "step-000002" / "model.safetensors")
    assert again.losses == run[1].losses[:2]  # same data order
    same = load_file(tmp_path / "a" / "step-000002" / "model.safetensors")
    diff = load_file(tmp_path / "b" / "step-000002" / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(first[key], same[key]) and not torch.equal(first[key], diff[key])
    assert other.losses != again.losses


def test_schedule_warms_up_then_decays():
    c = TrainConfig(steps=100, warmup=10, lr=1.0)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(99, c) == pytest.approx(0.1, abs=1e-3) and lr_at(50, c) < 1.0


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(SuperweightError, match="preset"):
        TrainConfig.preset("huge")
    with pytest.raises(SuperweightError, match="neither a checkpoint"):
        checkpoint_folders([tmp_path])


def test_continued_bitnet_training_from_a_checkpoint(run, text_file, tmp_path):
    from superweight.train.bitnet import BitLinear
    from superweight.train.emergence import load_checkpoint

    out, _ = run
    result = train(tiny(text_file, steps=2, save_every=2, init=str(out / "step-000004"), bitnet=True, keep=[[0, 1, 2]]), tmp_path / "q")
    assert result.evals[0][1] == pytest.approx(run[1].evals[-1][1], rel=0.2)  # starts from the trained model, not from scratch
    lm = load_checkpoint(tmp_path / "q" / "step-000002")
    down = lm.model.model.layers[0].mlp.down_proj
    assert isinstance(down, BitLinear) and down.keep_idx.tolist() == [1 * 64 + 2]


def _down(model, layer: int = 1):
    return model.model.layers[layer].mlp.down_proj.weight


def test_zero_then_train_zeroes_first_and_lets_training_move_the_weight(text_file, tmp_path):
    def value(model, tokenizer, step):
        return {"w": float(_down(model).detach()[3, 5])}

    zeroed = train(tiny(text_file, steps=2, save_every=1, zero=[[1, 3, 5]], save_checkpoints=False), tmp_path / "z",
                   measure=value)
    plain = train(tiny(text_file, steps=2, save_every=1, save_checkpoints=False), tmp_path / "p", measure=value)
    assert [m["step"] for m in zeroed.measures] == [0, 1, 2]
    assert zeroed.measures[0]["w"] == 0.0 and plain.measures[0]["w"] != 0.0  # same seed: only the zeroing differs
    assert zeroed.measures[-1]["w"] != 0.0  # not frozen: the gradient moves it from step 1
    assert not list((tmp_path / "z").glob("step-*")) and (tmp_path / "z" / "train_log.json").is_file()


def test_frozen_embedding_does_not_move(run, text_file, tmp_path):
    out, _ = run
    seen = []

    def embedding(model, tokenizer, step):
        seen.append((model.get_input_embeddings().weight.detach().clone(), _down(model).detach().clone()))
        return {}

    train(tiny(text_file, steps=2, save_every=2, init=str(out / "step-000004"), freeze_embeddings=True,
               save_checkpoints=False), tmp_path / "f", measure=embedding)
    assert torch.equal(seen[0][0], seen[-1][0]) and not torch.equal(seen[0][1], seen[-1][1])


def test_keep_lines_keeps_the_whole_row_and_column(text_file, tmp_path):
    from superweight.train.emergence import load_checkpoint

    result = train(tiny(text_file, steps=1, save_every=1, bitnet=True, keep=[[1, 3, 5]], keep_lines=True), tmp_path / "l")
    kept = {tuple(c) for c in result.config["keep"]}
    rows, cols = 32, 64  # the test preset's down_proj: [hidden, intermediate]
    assert len(kept) == rows + cols - 1 and (1, 3, 5) in kept
    assert all(layer == 1 and (row == 3 or col == 5) for layer, row, col in kept)
    down = load_checkpoint(tmp_path / "l" / "step-000001").model.model.layers[1].mlp.down_proj
    assert down.keep_idx.numel() == rows + cols - 1


def test_keep_random_draws_as_many_weights_of_the_same_layers_per_seed(text_file, tmp_path):
    keep = [[1, 3, 5], [1, 4, 6]]
    draws = [train(tiny(text_file, steps=1, save_every=1, bitnet=True, keep=keep, keep_random=True, seed=s,
                        save_checkpoints=False), tmp_path / f"r{s}").config["keep"] for s in (0, 1)]
    for drawn in draws:
        assert len(drawn) == 2 and all(c[0] == 1 and c not in keep for c in drawn)
    assert draws[0] != draws[1]
    with pytest.raises(SuperweightError, match="exclude each other"):
        train(tiny(text_file, steps=1, bitnet=True, keep=keep, keep_random=True, keep_lines=True), tmp_path / "x")


def test_cli_zero_then_train_and_keep_lines(text_file, tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from superweight.cli import app

    base = ["train", "--preset", "test", "--text", str(text_file), "--steps", "1", "--save-every", "1"]
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "z"), "--zero", "1:3:5", "--freeze-embeddings"])
    assert result.exit_code == 0, result.output
    state = json.loads((tmp_path / "z" / "step-000000" / "train_state.json").read_text())
    assert state["config"]["zero"] == [[1, 3, 5]] and state["config"]["freeze_embeddings"]
    weights = load_file(tmp_path / "z" / "step-000000" / "model.safetensors")
    assert float(weights["model.layers.1.mlp.down_proj.weight"][3, 5]) == 0.0
    bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "l"), "--keep-lines", "--keep", "1:3:5"])
    assert isinstance(bad.exception, SuperweightError) and "only apply with --bitnet" in str(bad.exception)
    bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "x"), "--zero", "1:3"])
    assert isinstance(bad.exception, SuperweightError) and "--zero '1:3'" in str(bad.exception)
