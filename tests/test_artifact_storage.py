"""How an artifact stores the tensors it does not quantize: 16-bit by default (bfloat16 beyond float16's
range), float32 when asked, 8-bit per-row embeddings as an option; its size as a ratio to float16."""
from __future__ import annotations

import torch
from safetensors import safe_open

from superweight.core.errors import SuperweightError
from superweight.quant import RTN, quantize
from superweight.quant.artifact import WEIGHTS, load_quantized, read_manifest, save_quantized
from superweight.testing.synthetic import byte_tokenizer, tiny_config, tiny_model

import pytest


def _tied_llama():
    import transformers as tf

    config = tiny_config("LlamaForCausalLM", vocab=320)
    config.tie_word_embeddings = True  # SmolLM2's case: lm_head is the embedding
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def _saved(tmp_path, name="art", arch="LlamaForCausalLM", **kw):
    model = _tied_llama() if arch == "LlamaForCausalLM" else tiny_model(arch, vocab=320)
    result = quantize(model, RTN(bits=4, group=32))
    manifest = save_quantized(model, byte_tokenizer(), result, tmp_path / name, **kw)
    return model, manifest, tmp_path / name


def _stored(folder) -> dict[str, torch.dtype]:
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_untouched_tensors_are_stored_in_float16_and_the_ratio_is_recorded(tmp_path):
    model, manifest, folder = _saved(tmp_path)
    stored = _stored(folder)
    assert stored["model.embed_tokens.weight"] == "F16" and stored["model.norm.weight"] == "F16"
    assert "lm_head.weight" not in stored and manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    size = manifest["size"]
    params = sum(p.numel() for p in model.parameters())
    assert size["float16_bytes"] == 2 * params and size["ratio_to_float16"] == size["file_bytes"] / (2 * params)
    assert manifest["stored_dtypes"] == {"float16": sum(p.numel() for n, p in model.named_parameters()
                                                        if n not in manifest["tensors"])}


def test_a_value_beyond_float16_is_stored_in_bfloat16_and_float32_when_asked(tmp_path):
    model = tiny_model("LlamaForCausalLM", vocab=320)
    with torch.no_grad():
        model.model.norm.weight[3] = 1e6
    result = quantize(model, RTN(bits=4, group=32))
    save_quantized(model, None, result, tmp_path / "a")
    assert _stored(tmp_path / "a")["model.norm.weight"] == "BF16"
    save_quantized(model, None, result, tmp_path / "b", untouched_dtype=torch.float32)
    got = load_quantized(tmp_path / "b", dequantize=True).model
    assert torch.equal(got.model.norm.weight, model.model.norm.weight)
    assert torch.equal(got.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_int8_embeddings_are_per_row_codes_within_half_a_step(tmp_path):
    model, float_manifest, _ = _saved(tmp_path, "f")
    _, manifest, folder = _saved(tmp_path, "q", embeddings="int8")
    entry = manifest["tensors"]["model.embed_tokens.weight"]
    assert entry["embedding"] and entry["bits"] == 8 and entry["layout"]["rows"] == 320
    assert "lm_head.weight" not in manifest["tensors"] and manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert manifest["size"]["file_bytes"] < float_manifest["size"]["file_bytes"]
    assert manifest["size"]["quantized_weights"] == float_manifest["size"]["quantized_weights"]  # embeddings apart
    w = model.model.embed_tokens.weight.detach()
    got = load_quantized(folder, dequantize=True).model.model.embed_tokens.weight.detach()
    step = (w.amax(1) - w.amin(1)) / 255
    assert ((got - w).abs() <= step[:, None] * (0.5 + 1e-3) + 1e-6).all()
    assert read_manifest(folder)["stored_dtypes"]["int8"] == w.numel()


def test_gpt2_int8_embeddings_load(tmp_path):
    _, manifest, folder = _saved(tmp_path, arch="GPT2LMHeadModel", embeddings="int8")
    assert manifest["tensors"]["transformer.wte.weight"]["embedding"]
    lm = load_quantized(folder)
    assert lm.model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_bad_embeddings_choice_is_one_line(tmp_path):
    with pytest.raises(SuperweightError, match="embeddings must be 'float' or 'int8'"):
        _saved(tmp_path, embeddings="int4")
    assert not (tmp_path / "art").exists()


def test_cli_embeddings_option_and_its_bad_values(tmp_path):
    from typer.testing import CliRunner

    from superweight.cli import app

    folder = tmp_path / "tiny"
    _tied_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    runner, out = CliRunner(), tmp_path / "q"
    res = runner.invoke(app, ["quantize", str(folder), "--scheme", "int4", "--group", "32", "--no-keep-super-weights",
                              "--embeddings", "int8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "x float16" in res.output and read_manifest(out)["tensors"]["model.embed_tokens.weight"]["embedding"]
    for args, message in [(["--embeddings", "int4"], "bad --embeddings"), (["--untouched-dtype", "int8"], "bad --untouched-dtype")]:
        res = runner.invoke(app, ["quantize", str(folder), "--out", str(tmp_path / "x"), *args])
        assert isinstance(res.exception, SuperweightError) and message in str(res.exception), res.output
    assert not (tmp_path / "x").exists()
