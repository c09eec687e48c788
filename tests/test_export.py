"""The packed artifact on tiny models: bitwise round trip, exact super weights, sizes, loading through
``load_model``, the CLI, and every bad input (existing folder, corrupted files, half-written output)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from superweight.core.errors import SuperweightError
from superweight.quant.artifact import MANIFEST, WEIGHTS, load_quantized, read_manifest, save_quantized
from superweight.model.load import load_model
from superweight.model.source import ModelSource, SourceKind
from superweight.quant import RTN, Ternary, ZScore, describe, quantize
from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model

PLANT = (1, 5, 17)
CONFIGS = [
    RTN(bits=4, block=1000, clip=ZScore(4)), RTN(bits=3, group=24), RTN(bits=2, per_channel=True),
    RTN(bits=8), RTN(bits=4, levels="nf4", group=32), Ternary(topk=5), Ternary(group=16),
]


def _quantized(arch: str, config, keep=(PLANT,)):
    model = tiny_model(arch, vocab=320)
    plant_super_weight(model, *PLANT, weight=2.5)
    return model, quantize(model, config, keep=list(keep))


def _as_stored(name: str, tensor: torch.Tensor, manifest: dict) -> torch.Tensor:
    """What the artifact holds of a float32 weight: a quantized one as is (the model is fake-quantized), an
    untouched one rounded to float16 (``stored_dtype``: the tiny models' values are all in its range)."""
    return tensor if name in manifest["tensors"] else tensor.to(torch.float16).to(tensor.dtype)


CASES = [("LlamaForCausalLM", c) for c in CONFIGS] + [("GPT2LMHeadModel", c) for c in CONFIGS[::3]]


@pytest.mark.parametrize("arch, config", CASES, ids=[f"{a[:4]}-{describe(c)}" for a, c in CASES])
def test_round_trip_is_bitwise_and_keeps_super_weights(tmp_path, arch, config):
    model, result = _quantized(arch, config)
    manifest = save_quantized(model, byte_tokenizer(), result, tmp_path / "art", source="tiny")
    lm = load_quantized(tmp_path / "art", dequantize=True)
    expected, got = model.state_dict(), lm.model.state_dict()
    assert set(expected) == set(got)
    for name, tensor in expected.items():
        assert torch.equal(got[name], _as_stored(name, tensor, manifest)), name
    sw = lm.arch.weight_matrix(lm.model, PLANT[0])[PLANT[1], PLANT[2]]
    assert float(sw) == 2.5 and manifest["kept"][0]["value"] == 2.5
    size = manifest["size"]
    assert abs(size["data_bytes"] - size["predicted_data_bytes"]) <= 0.02 * size["predicted_data_bytes"]
    assert size["file_bytes"] == (tmp_path / "art" / WEIGHTS).stat().st_size


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen2MoeForCausalLM"])
@pytest.mark.parametrize("config", [RTN(bits=4, group=32), RTN(bits=3, block=64, clip=ZScore(4))], ids=describe)
def test_a_mixture_of_experts_is_quantized_experts_and_all(tmp_path, arch, config):
    """Experts' 3-D weights are quantized as [experts * out, in] matrices, a super weight kept in its
    expert, and the artifact loads back bitwise with the experts in their own shape."""
    from superweight.model.arch_infer import get_arch

    model = tiny_model(arch, vocab=320)
    plant_super_weight(model, *PLANT, weight=2.5, expert=2)
    arch_spec = get_arch(model)
    before = arch_spec.expert_matrix(model, PLANT[0], 1).detach().clone()
    result = quantize(model, config, keep=[(*PLANT, 2)])
    assert not torch.equal(arch_spec.expert_matrix(model, PLANT[0], 1), before)  # the experts were quantized
    manifest = save_quantized(model, byte_tokenizer(), result, tmp_path / "art", source="tiny")
    entry = manifest["tensors"]["model.layers.1.mlp.experts.down_proj"]
    assert entry["view"] == [4, 64, 128] and entry["shape"] == [4 * 64, 128]
    assert "model.layers.1.mlp.experts.gate_up_proj" in manifest["tensors"]
    lm = load_quantized(tmp_path / "art", dequantize=True)
    expected, got = model.state_dict(), lm.model.state_dict()
    assert set(expected) == set(got)
    for name, tensor in expected.items():
        assert torch.equal(got[name], _as_stored(name, tensor, manifest)), name
    assert float(lm.arch.expert_matrix(lm.model, PLANT[0], 2)[PLANT[1], PLANT[2]]) == 2.5
    assert manifest["kept"] == [{"name": "model.layers.1.mlp.experts.down_proj", "index": (2 * 64 + 5) * 128 + 17, "value": 2.5}]


def test_a_shared_expert_weight_is_kept(tmp_path):
    model = tiny_model("Qwen2MoeForCausalLM", vocab=320)
    plant_super_weight(model, *PLANT, weight=2.5)  # the shared expert's down-projection
    result = quantize(model, RTN(bits=4, group=32), keep=[PLANT])
    assert result.kept == [{"name": "model.layers.1.mlp.shared_expert.down_proj.weight", "index": 5 * 128 + 17, "value": 2.5}]
    save_quantized(model, byte_tokenizer(), result, tmp_path / "art")
    back = load_quantized(tmp_path / "art", dequantize=True)
    assert float(back.arch.weight_matrix(back.model, PLANT[0])[PLANT[1], PLANT[2]]) == 2.5


def test_a_wrong_experts_view_is_a_clear_error(tmp_path):
    model = tiny_model("MixtralForCausalLM", vocab=320)
    save_quantized(model, byte_tokenizer(), quantize(model, RTN(bits=4, group=32)), tmp_path / "art")
    m = json.loads((tmp_path / "art" / MANIFEST).read_text())
    m["tensors"]["model.layers.0.mlp.experts.down_proj"]["view"] = [2, 64, 128]
    (tmp_path / "art" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(SuperweightError, match="'view'"):
        load_quantized(tmp_path / "art")


def test_bits_per_weight_match_the_scheme(tmp_path):
    model, result = _quantized("LlamaForCausalLM", RTN(bits=4, group=32))
    size = save_quantized(model, None, result, tmp_path / "a")["size"]
    # 4 bits of code + a float16 scale and zero point per 32 weights, + one float16 super weight
    expected = 4 + 32 / 32 + 8 * (4 + 2) / size["quantized_weights"]
    assert size["bits_per_weight"] == pytest.approx(expected, rel=1e-9)
    assert size["sparse_bits_per_weight"] < 0.001 * 10  # one weight among ~100k (tiny model)


def test_super_weight_sparse_part_costs_under_a_thousandth_of_a_bit(tmp_path):
    model = tiny_model("LlamaForCausalLM", hidden=128, intermediate=512, layers=4)
    plant_super_weight(model, *PLANT, weight=2.5)
    result = quantize(model, RTN(bits=4, block=4096), keep=[PLANT])
    size = save_quantized(model, None, result, tmp_path / "a")["size"]
    assert 0 < size["sparse_bits_per_weight"] < 0.001


def test_packed_codes_are_dense(tmp_path):
    from safetensors import safe_open

    for bits in (2, 3, 4):
        model, result = _quantized("LlamaForCausalLM", RTN(bits=bits), keep=())
        save_quantized(model, None, result, tmp_path / f"b{bits}")
        with safe_open(str(tmp_path / f"b{bits}" / WEIGHTS), "pt") as f:
            codes = f.get_tensor("model.layers.0.mlp.down_proj.weight::codes")
        assert codes.dtype == torch.uint8 and codes.numel() == 64 * 128 * bits // 8
    model, result = _quantized("LlamaForCausalLM", Ternary(), keep=())
    save_quantized(model, None, result, tmp_path / "t")
    with safe_open(str(tmp_path / "t" / WEIGHTS), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight::codes").numel() == -(-64 * 128 // 5)


def test_loaded_artifact_generates_and_loads_through_load_model(tmp_path):
    model, result = _quantized("LlamaForCausalLM", RTN(bits=4, group=32))
    save_quantized(model, byte_tokenizer(), result, tmp_path / "art", source="tiny", notes=["a caveat"])
    src = ModelSource.of(str(tmp_path / "art"))
    assert (src.kind, src.path) == (SourceKind.ARTIFACT, str(tmp_path / "art"))
    lm = load_model(str(tmp_path / "art"), dequantize=True)
    assert "a caveat" in lm.notes and any("bits per quantized weight" in n for n in lm.notes)
    ids = lm.tokenizer("hello", return_tensors="pt")["input_ids"]
    out = lm.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 5 and torch.equal(out, ref)
    manifest = read_manifest(tmp_path / "art")
    assert manifest["version"] == 1 and manifest["source_model"] == "tiny" and manifest["config"]["type"] == "RTN"
    assert manifest["tied"] == {} or all(isinstance(v, str) for v in manifest["tied"].values())


# ---------------------------------------------------------------- bad input


@pytest.fixture()
def artifact(tmp_path):
    model, result = _quantized("LlamaForCausalLM", RTN(bits=4, block=1000))
    save_quantized(model, byte_tokenizer(), result, tmp_path / "art")
    return tmp_path / "art"


def test_existing_folder_is_refused_unless_forced(artifact):
    model, result = _quantized("LlamaForCausalLM", RTN(bits=3))
    with pytest.raises(SuperweightError, match="already exists"):
        save_quantized(model, None, result, artifact)
    save_quantized(model, None, result, artifact, force=True)
    assert read_manifest(artifact)["scheme"].startswith("int3")
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["art"]  # no temp or old folder left


def test_artifact_files_get_the_mode_of_a_plain_open(artifact):
    """safetensors writes 0600; the artifact's files are 0666 minus the umask, like every other file."""
    from superweight.core.files import _umask

    want = 0o666 & ~_umask()
    assert {p.name: p.stat().st_mode & 0o777 for p in artifact.iterdir()} == {p.name: want for p in artifact.iterdir()}
    assert (artifact.stat().st_mode & 0o777) == 0o777 & ~_umask()


def test_failure_while_writing_leaves_nothing(tmp_path):
    model, result = _quantized("LlamaForCausalLM", RTN(bits=4))

    class Broken:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(SuperweightError, match="disk full"):  # an OS error while writing is a user error
        save_quantized(model, Broken(), result, tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def _rewrite(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("damage, message", [
    (lambda a: (a / MANIFEST).write_text("{not json"), "corrupted"),
    (lambda a: (a / MANIFEST).write_text(json.dumps({"version": 99})), "version"),
    (lambda a: (a / MANIFEST).unlink(), "no superweight_manifest.json"),
    (lambda a: (a / WEIGHTS).write_bytes((a / WEIGHTS).read_bytes()[:-100]), "truncated"),
    (lambda a: (a / WEIGHTS).unlink(), "missing"),
    (lambda a: _rewrite(a / WEIGHTS, lambda t: t.update({"model.layers.0.mlp.down_proj.weight::codes": torch.zeros(7, dtype=torch.uint8)})), "corrupted"),
    (lambda a: _rewrite(a / WEIGHTS, lambda t: t.pop("model.layers.2.self_attn.q_proj.weight::scale")), "corrupted"),
    (lambda a: _rewrite(a / WEIGHTS, lambda t: t.update({"model.layers.1.mlp.down_proj.weight::sparse_idx": torch.tensor([10**6], dtype=torch.int32)})), "out of range"),
])
def test_corrupted_artifact_is_a_clear_error(artifact, damage, message):
    damage(artifact)
    with pytest.raises(SuperweightError, match=message):
        load_model(str(artifact))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT, weight=2.5)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_cli_writes_an_artifact(tmp_path, tiny_folder):
    from typer.testing import CliRunner

    from superweight.cli import app

    out, runner = tmp_path / "q", CliRunner()
    res = runner.invoke(app, ["quantize", str(tiny_folder), "--scheme", "int4", "--block", "1024", "--clip-z", "4",
                              "--out", str(out), "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert manifest["kept"] and manifest["kept"][0]["value"] == 2.5  # detected, then held out
    assert "bits/weight" in res.output and load_model(str(out)).arch.name == "LlamaForCausalLM"
    res = runner.invoke(app, ["quantize", str(tiny_folder), "--scheme", "ternary", "--no-keep-super-weights", "--out", str(out), "--force"])
    assert res.exit_code == 0 and read_manifest(out)["kept"] == []
    cases = [
        (["--scheme", "int5", "--out", str(tmp_path / "x")], "unknown scheme"),
        (["--scheme", "int4", "--block", "999999", "--out", str(tmp_path / "x")], "larger than the tensor"),
        (["--scheme", "int4", "--out", str(out)], "already exists"),
        (["--scheme", "int4"], "--out"),
    ]
    for args, message in cases:
        res = runner.invoke(app, ["quantize", str(tiny_folder), *args])
        assert isinstance(res.exception, SuperweightError) and message in str(res.exception), res.output
    assert not (tmp_path / "x").exists()


def test_cli_error_exit_code(tmp_path, tiny_folder):
    proc = subprocess.run([sys.executable, "-m", "superweight", "quantize", str(tiny_folder), "--scheme", "int9",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown scheme" in proc.stderr and "Traceback" not in proc.stderr
