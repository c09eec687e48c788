"""A checkpoint quantized layer by layer (``stream_quantize``) gives the in-memory export's artifact:
the same manifest, the same tensors, the same bytes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import superweight as sw
from superweight.model.checkpoint import INDEX, join_safetensors, read_header
from superweight.quant.artifact import MANIFEST, WEIGHTS, export_artifact, load_quantized
from superweight.quant.api import DEFAULT_EXCLUDE
from superweight.quant.config import RTN, Ternary, ZScore
from superweight.quant.streamed import stream_quantize
from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model


def _checkpoint(arch: str, folder: Path, expert: int | None = None) -> Path:
    model = tiny_model(arch)
    plant_super_weight(model, 1, 5, 17, expert=expert)
    model.save_pretrained(folder, max_shard_size="200KB")  # several shards
    byte_tokenizer().save_pretrained(folder)
    return folder


HEADERS = ("file_bytes", "header_bytes", "file_bits_per_param", "ratio_to_float16")  # sizes that count each shard's header


def same_artifact(a: Path, b: Path, ignore: tuple[str, ...] = ("source_model",)) -> None:
    """``b`` (one file, or shards joined here) holds ``a``'s tensors byte for byte, and its manifest."""
    ma, mb = (json.loads((p / MANIFEST).read_text()) for p in (a, b))
    sharded = (b / INDEX).is_file()
    for m in (ma, mb):
        for key in ignore:
            m.pop(key)
        if sharded:
            m["size"] = {k: v for k, v in m["size"].items() if k not in HEADERS}
    assert ma == mb
    wb = b / WEIGHTS
    if sharded:
        assert not wb.exists()
        shards = sorted(set(json.loads((b / INDEX).read_text())["weight_map"].values()))
        assert len(shards) > 1
        wb = b.parent / f"{b.name}-joined.safetensors"
        join_safetensors([b / s for s in shards], wb, read_header(a / WEIGHTS).metadata)
    ha, hb = read_header(a / WEIGHTS), read_header(wb)
    assert ha.entries == hb.entries  # names, dtypes, shapes and offsets: the same layout
    assert (a / WEIGHTS).read_bytes()[ha.data_start:] == wb.read_bytes()[hb.data_start:]


CASES = [  # arch, planted expert, scheme, exclude
    ("LlamaForCausalLM", None, RTN(bits=4, group=32, search="mse", sa_weight=8.0), None),
    ("GPT2LMHeadModel", None, RTN(bits=4, group=32, search="mse", sa_weight=8.0), None),  # Conv1D: [in, out]
    ("Gemma3ForCausalLM", None, RTN(bits=3, block=1024, clip=ZScore(9.0)), None),
    ("MixtralForCausalLM", 2, RTN(bits=4, group=32, outliers=0.1), None),
    ("DeepseekV3ForCausalLM", 2, RTN(bits=4, group=32), None),  # a dense first layer, experts, a shared expert
    ("LlamaForCausalLM", None, Ternary(group=64), ""),  # nothing excluded: the untied lm_head too, after the layers
]


@pytest.mark.parametrize("arch,expert,config,exclude", CASES, ids=lambda v: getattr(v, "kind", None) or str(v))
def test_a_streamed_export_is_the_in_memory_one(arch, expert, config, exclude, tmp_path):
    folder = _checkpoint(arch, tmp_path / "m", expert)
    lm = sw.load_model(str(folder))
    keep = sw.detect(lm.model, lm.tokenizer).super_weights
    assert keep
    kw = {} if exclude is None else {"exclude": exclude}
    export_artifact(lm, config, keep, tmp_path / "mem", write_back=False, **kw)
    manifest = stream_quantize(folder, config, keep, tmp_path / "stream", **kw)
    same_artifact(tmp_path / "mem", tmp_path / "stream")
    assert manifest["kept"] and manifest["size"]["quantized_weights"] > 0
    if exclude == "":
        assert "lm_head.weight" in manifest["tensors"]
    art = load_quantized(tmp_path / "stream")
    ids = torch.randint(0, 250, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(art.model(ids).logits).all()


def test_a_single_file_streamed_export_is_the_in_memory_file(tmp_path):
    """``sharded=False`` joins the parts: the in-memory export's file and manifest, sizes included."""
    folder = _checkpoint("LlamaForCausalLM", tmp_path / "m")
    lm = sw.load_model(str(folder))
    keep = sw.detect(lm.model, lm.tokenizer).super_weights
    export_artifact(lm, RTN(bits=4, group=32), keep, tmp_path / "mem", write_back=False)
    stream_quantize(folder, RTN(bits=4, group=32), keep, tmp_path / "one", sharded=False)
    assert not (tmp_path / "one" / INDEX).exists()
    same_artifact(tmp_path / "mem", tmp_path / "one")
    # the header's metadata keys come in safetensors' hash-map order, which varies by process: compared parsed
    assert read_header(tmp_path / "mem" / WEIGHTS).metadata == read_header(tmp_path / "one" / WEIGHTS).metadata


def test_a_sharded_artifact_loads_as_the_single_file_one_and_a_lost_shard_is_a_clear_error(tmp_path):
    from superweight.core.errors import SuperweightError

    folder = _checkpoint("LlamaForCausalLM", tmp_path / "m")
    stream_quantize(folder, RTN(bits=4, group=32), [], tmp_path / "sharded")
    stream_quantize(folder, RTN(bits=4, group=32), [], tmp_path / "one", sharded=False)
    ids = torch.randint(0, 250, (1, 16))
    with torch.no_grad():
        logits = [load_quantized(tmp_path / name).model(ids).logits for name in ("sharded", "one")]
    assert torch.equal(*logits)
    index = json.loads((tmp_path / "sharded" / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(
        read_header(tmp_path / "sharded" / s).data_end - read_header(tmp_path / "sharded" / s).data_start
        for s in set(index["weight_map"].values()))
    (tmp_path / "sharded" / sorted(set(index["weight_map"].values()))[1]).unlink()
    with pytest.raises(SuperweightError, match="corrupted artifact"):
        load_quantized(tmp_path / "sharded")


def test_a_streamed_export_holds_one_layer_at_a_time(tmp_path, monkeypatch):
    """Each layer's packed tensors go to a part file before the next layer is read."""
    from superweight.quant import artifact as export

    folder = _checkpoint("LlamaForCausalLM", tmp_path / "m")
    pending_at_flush: list[int] = []
    real = export.ArtifactWriter.flush

    def flush(self):
        pending_at_flush.append(len({k.split(".")[2] for k in self._pending if k.startswith("model.layers.")}))
        real(self)

    monkeypatch.setattr(export.ArtifactWriter, "flush", flush)
    stream_quantize(folder, RTN(bits=4, group=32), [], tmp_path / "a")
    assert pending_at_flush[:4] == [1, 1, 1, 1]  # one layer's tensors per part


@pytest.mark.parametrize("arch,expert,exclude", [("LlamaForCausalLM", None, DEFAULT_EXCLUDE),
                                                ("GPT2LMHeadModel", None, DEFAULT_EXCLUDE),
                                                ("MixtralForCausalLM", 0, DEFAULT_EXCLUDE), ("LlamaForCausalLM", None, "")])
def test_streamed_w8a8_artifact_is_the_in_memory_one(arch, expert, exclude, tmp_path):
    """A W8A8 artifact: int8 weights, and the inputs' held-out channels found on calibration text in one
    streamed pass (the lm_head's through the head when it is a target; an MoE's experts' two inputs): the
    in-memory file and manifest; both load with the same activation quantization and score the same
    perplexity."""
    from superweight.eval.perplexity import evaluate_perplexity
    from superweight.eval.text import load_text
    from superweight.quant.w8a8 import w8a8_activations

    folder = _checkpoint(arch, tmp_path / "m", expert=expert)
    keep = [(1, 5, 17) if expert is None else (1, 5, 17, expert)]
    lm = sw.load_model(str(folder))
    acts = w8a8_activations(lm.model, lm.tokenizer, exclude=exclude)
    export_artifact(lm, RTN(bits=8), keep, tmp_path / "mem", exclude=exclude, write_back=False, activations=acts)
    stream_quantize(folder, RTN(bits=8), keep, tmp_path / "st", exclude=exclude, activations=True)
    same_artifact(tmp_path / "mem", tmp_path / "st")
    if expert is None:
        assert any(k.endswith("1.mlp.down_proj") or k.endswith("1.mlp.c_proj") for k in acts["held_out_channels"])
    else:  # the experts' inputs too: the planted expert's down-projection input channel held out
        assert "model.layers.1.mlp.experts" in acts["experts"]
        assert acts["held_out_channels"]["model.layers.1.mlp.experts.down_proj"] == [17]
        loaded = load_quantized(tmp_path / "st").model
        assert all("forward" in loaded.get_submodule(n).__dict__ for n in acts["experts"])
    if exclude == "":
        assert any("lm_head" in m for m in acts["modules"])
    text = load_text("wiki-intros")
    ppl = [evaluate_perplexity(load_quantized(tmp_path / n).model, lm.tokenizer, text, 64, 200).ppl for n in ("mem", "st")]
    export_artifact(lm, RTN(bits=8), keep, tmp_path / "w8", exclude=exclude, write_back=False)  # weights only
    weights_only = evaluate_perplexity(load_quantized(tmp_path / "w8").model, lm.tokenizer, text, 64, 200).ppl
    assert ppl[0] == ppl[1] != weights_only  # the inputs are quantized too


def test_a_streamed_w8a8_export_reads_each_layer_once(tmp_path, monkeypatch):
    """The calibration and the export share one pass: every decoder layer read once, a part written per layer."""
    from superweight.model.streamed import StreamedModel

    folder = _checkpoint("LlamaForCausalLM", tmp_path / "m")
    reads = []
    layer = StreamedModel.layer
    monkeypatch.setattr(StreamedModel, "layer", lambda self, i: reads.append(i) or layer(self, i))
    stream_quantize(folder, RTN(bits=8), [(1, 5, 17)], tmp_path / "a", activations=True)
    assert reads == list(range(4))
    shards = set(json.loads((tmp_path / "a" / INDEX).read_text())["weight_map"].values())
    assert len(shards) == 5  # a part per layer and the rest


def test_cli_quantize_w8a8_writes_an_artifact_with_its_activations(tmp_path, capsys):
    """``quantize --scheme w8a8``: int8 weights per tensor, the activations entry (the planted super
    activation's channel held out), shown in the table; in memory and streamed alike; ``eval`` loads it."""
    from test_bad_inputs import run_main

    folder = _checkpoint("LlamaForCausalLM", tmp_path / "m")
    manifests = {}
    for name, extra in {"mem": [], "st": ["--stream"]}.items():
        code, out, err = run_main(["quantize", str(folder), "--scheme", "w8a8", *extra, "--out", str(tmp_path / name)], capsys)
        assert code == 0, err
        assert "activations (W8A8)" in out and "held-out channels" in out
        manifests[name] = json.loads((tmp_path / name / MANIFEST).read_text())
    assert manifests["mem"]["activations"] == manifests["st"]["activations"]
    assert manifests["mem"]["activations"]["held_out_channels"]["model.layers.1.mlp.down_proj"] == [17]
    assert manifests["mem"]["config"]["bits"] == 8 and manifests["mem"]["scheme"].startswith("int8")
    code, out, err = run_main(["eval", str(tmp_path / "mem"), "--ppl", "wiki-intros", "--max-tokens", "200", "--tasks",
                               "none", "--json", str(tmp_path / "ev.json")], capsys)
    assert code == 0, err
    notes = " ".join(json.loads((tmp_path / "ev.json").read_text())["notes"])
    assert "W8A8: inputs quantized to 8 bits per token" in notes and "1 super-activation channel held out" in notes


def test_cli_quantize_streams_and_checks_the_super_weights_file(tmp_path, capsys):
    from test_bad_inputs import run_main

    folder = _checkpoint("LlamaForCausalLM", tmp_path / "m")
    code, _, err = run_main(["quantize", str(folder), "--stream", "--group", "32", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert [k["name"] for k in manifest["kept"]] == ["model.layers.1.mlp.down_proj.weight"]  # detected, streamed
    other = _checkpoint("GPT2LMHeadModel", tmp_path / "g")
    code, _, _ = run_main(["detect", str(other), "--json", str(tmp_path / "sw.json"), "--no-verdict"], capsys)
    assert code == 0
    code, _, err = run_main(["quantize", str(folder), "--stream", "--super-weights", str(tmp_path / "sw.json"),
                             "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "holds super weights of a GPT2LMHeadModel" in err and not (tmp_path / "b").exists()
    found = json.loads((tmp_path / "sw.json").read_text())  # the right architecture, an index the model lacks
    found["architecture"] = "LlamaForCausalLM"
    found["super_weights"][0]["col"] = 99999
    (tmp_path / "far.json").write_text(json.dumps(found))
    code, _, err = run_main(["quantize", str(folder), "--stream", "--super-weights", str(tmp_path / "far.json"),
                             "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "it is not from" in err and not (tmp_path / "c").exists()


def test_an_artifact_is_never_streamed(tmp_path, capsys):
    """A quantized artifact (sharded or not) loads in memory: ``--stream`` on one is a one-line refusal."""
    from test_bad_inputs import run_main

    from superweight.model.mode import choose_mode

    folder = _checkpoint("LlamaForCausalLM", tmp_path / "m")
    stream_quantize(folder, RTN(bits=4, group=32), [], tmp_path / "a")
    assert choose_mode(str(tmp_path / "a"), "float32", False, None) == "memory"
    code, _, err = run_main(["eval", str(tmp_path / "a"), "--stream", "--tasks", "none", "--ppl", "wiki-intros"], capsys)
    assert code == 2 and "quantized artifact" in err
    code, out, err = run_main(["eval", str(tmp_path / "a"), "--tasks", "none", "--ppl", "wiki-intros", "--max-tokens", "200"],
                              capsys)
    assert code == 0, err
