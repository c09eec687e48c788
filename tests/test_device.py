"""Device plumbing without a GPU: --device on every command, device resolution, the read-ahead
reader (bit for bit, errors surface in the caller), and bench/device_check.py's CPU rehearsal."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer

from superweight.model.checkpoint import open_checkpoint
from superweight.model.device import device_map_for, input_device, resolve_device
from superweight.core.errors import SuperweightError
from superweight.model.prefetch import LayerPrefetcher, read_host
from superweight.model.streamed import StreamedModel
from superweight.find.streamed import stream_detect
from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PLANT = (1, 7, 33)
MODEL_COMMANDS = ("detect", "verify", "llama-cpp-overrides", "ablate", "eval", "quantize", "report")


def test_every_command_that_loads_a_model_takes_device_and_device_map():
    from superweight.cli import app

    group = typer.main.get_command(app)
    loading = {name for name, cmd in group.commands.items() if any(p.name in ("model", "source") for p in cmd.params)}
    assert set(MODEL_COMMANDS) <= loading
    for name in loading:
        opts = {o for p in group.commands[name].params for o in getattr(p, "opts", [])}
        assert {"--device", "--device-map"} <= opts, name


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(SuperweightError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(SuperweightError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(SuperweightError, match="unsupported device"):
        resolve_device("meta")


def test_resolve_device_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(SuperweightError, match="only 2 CUDA"):
        resolve_device("cuda:2")


def test_device_map_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_map_for(None, None) is None
    assert device_map_for("cpu", None) is None  # transformers' default placement
    assert device_map_for("auto", None) == "cuda"
    assert device_map_for("auto", "auto") == "auto"  # --device-map alone: accelerate places the layers
    with pytest.raises(SuperweightError, match="pass one of them"):
        device_map_for("cpu", "cuda")


def test_input_device_is_the_embeddings():
    model = tiny_model("GPT2LMHeadModel")
    assert input_device(model) == torch.device("cpu")
    model.get_input_embeddings().weight = torch.nn.Parameter(torch.empty(3, 4, device="meta"))
    assert input_device(model) == next(model.parameters()).device  # a meta embedding: fall back


def test_cli_device_cuda_without_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "superweight", "detect", str(tmp_path), "--device", "cuda"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--device cpu" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    out = tmp_path_factory.mktemp("m")
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="60KB")  # stored bf16, read as float32
    byte_tokenizer().save_pretrained(out)
    return out


def test_read_host_equals_safetensors_bit_for_bit(folder):
    from safetensors import safe_open

    ckpt = open_checkpoint(folder)
    wanted = {k: (info, torch.float32) for k, info in ckpt.tensors.items()}
    got = read_host(wanted, torch.device("cpu"))
    for key, info in ckpt.tensors.items():
        with safe_open(str(info.file), framework="pt") as f:
            expected = f.get_tensor(key).to(torch.float32)
        assert got[key].dtype == torch.float32 and torch.equal(got[key], expected), key


def test_prefetcher_reads_ahead_and_raises_in_the_caller(folder, tmp_path):
    ckpt = open_checkpoint(folder)
    key, info = next(iter(ckpt.tensors.items()))
    wanted = {key: (info, torch.float32)}
    pf = LayerPrefetcher(torch.device("cpu"))
    pf.start(5, wanted)
    assert pf.pending(5) and not pf.pending(6)
    assert torch.equal(pf.take(5, wanted)[key], read_host(wanted, torch.device("cpu"))[key])
    assert not pf.pending(5)
    cut = tmp_path / info.file.name
    cut.write_bytes(info.file.read_bytes()[: info.offset + 2])  # the tensor's bytes are missing
    broken = {key: (type(info)(cut, info.dtype, info.shape, info.offset), torch.float32)}
    pf.start(1, broken)
    with pytest.raises(SuperweightError, match="truncated"):
        pf.take(1, broken)
    pf.close()


def test_streaming_prefetches_the_next_layer_and_agrees_without_it(folder):
    sm = StreamedModel(folder, "float32", device="cpu")
    with sm.layer(0):
        assert sm._prefetcher.pending(1)
    sm.close()
    with_prefetch = stream_detect(folder, model_name="m", device="cpu")
    with StreamedModel(folder, "float32", device="cpu", prefetch=False) as sm:
        without = stream_detect(sm, model_name="m", device="cpu")
    assert PLANT in with_prefetch.coords
    assert with_prefetch.to_dict() == without.to_dict()


def test_load_model_and_artifact_onto_the_cpu(folder, tmp_path):
    import superweight as sw
    from superweight.quant.artifact import export_artifact, load_quantized
    from superweight.quant.config import scheme_config

    lm = sw.load_model(str(folder), device="cpu")
    assert {p.device.type for p in lm.model.parameters()} == {"cpu"}
    export_artifact(lm, scheme_config("int4", group=32), keep=[PLANT], out=tmp_path / "a")
    back = load_quantized(tmp_path / "a", device="auto")
    assert {p.device.type for p in back.model.parameters()} == {resolve_device("auto").type}


def test_device_check_cpu_rehearsal(tmp_path):
    """bench/device_check.py on the CPU: three architectures, every command, and part 2 on a tiny planted
    checkpoint (the GPU run makes a 7B-width one), so that the script cannot rot between GPU runs; with
    ``--strays``, any tensor superweight makes without a device lands on meta and fails its step."""
    sys.path.insert(0, str(ROOT / "bench"))
    import device_check

    big = tmp_path / "big"
    model = tiny_model("LlamaForCausalLM", layers=3)
    plant_super_weight(model, *PLANT)
    model.to(torch.bfloat16).save_pretrained(big, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(big)
    (big / "superweight_planted.json").write_text('{"layer": 1, "row": 7, "col": 33, "method": "trace"}')
    out = tmp_path / "device.json"
    archs = "LlamaForCausalLM,MixtralForCausalLM,GPT2LMHeadModel"  # dense, experts, Conv1D
    code = device_check.main(["--device", "cpu", "--archs", archs, "--big-model", str(big), "--strays",
                              "--tasks", "none", "--reps", "2", "--out", str(out), "--workdir", str(tmp_path / "w")])
    import json

    report = json.loads(out.read_text())
    assert code == 0, report["failed"]
    # every tensor superweight made on the way named its device (a stray would sit on the CPU beside a GPU model)
    assert report["strays"] == []
    names = {s["step"] for s in report["steps"]}
    assert {"cli: superweight quantize --device cpu", "big: streamed detection finds the plant"} <= names
    assert all(report["ratios"][k] > 0 for k in device_check.RATIOS)


def test_strays_on_meta_moves_only_the_named_code_and_fails_a_mix(tmp_path):
    """A tensor made without a device by code under the prefix goes to meta (and fails when mixed with
    the model's tensors); the same call elsewhere, or with a device, is left alone."""
    from superweight.model.device import StraysOnMeta

    mine = tmp_path / "mine.py"
    mine.write_text("import torch\n"
                    "def stray(): return torch.zeros(3)\n"
                    "def named(): return torch.zeros(3, device='cpu')\n")
    other = tmp_path / "other_skip.py"
    other.write_text("import torch\ndef made(): return torch.ones(2)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import mine as m
        import other_skip as o
    finally:
        sys.path.remove(str(tmp_path))
    with StraysOnMeta(str(mine), skip=("_skip.py",)) as strays:
        assert m.stray().is_meta and m.named().device.type == "cpu" and o.made().device.type == "cpu"
        assert torch.zeros(1).device.type == "cpu"  # this file is not under the prefix
        with pytest.raises(RuntimeError, match="meta"):
            torch.ones(3) + m.stray()
    assert [(line, fn) for _, line, fn in strays.hits] == [(2, "zeros"), (2, "zeros")]
    assert torch.zeros(1).device.type == "cpu"  # the mode ends with the block
