"""Streaming detection (layer by layer from safetensors shards) equals in-memory detection."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import superweight as sw
from superweight.model.arch import MOE
from superweight.model.checkpoint import open_checkpoint
from superweight.core.errors import SuperweightError
from superweight.find.magnitude import magnitude_scan
from superweight.model.mode import MemoryPlan, choose_mode, memory_plan
from superweight.eval.streamed import window_nlls
from superweight.find.magnitude import stream_magnitude_scan
from superweight.model.streamed import StreamedModel
from superweight.find.streamed import stream_detect
from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model

PLANT = (1, 7, 33)
PROMPTS = ["Apple Inc. is a worldwide tech company.", "Paris is the capital of France."]
# Llama-like (rotary, GQA), GPT-2 (learned positions, Conv1D, tied head), GPT-NeoX (partial rotary,
# legacy `embed_out` key), Gemma2 (per-layer sliding / full masks), Falcon (layers return tuples).
ARCHS = ["LlamaForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "Gemma2ForCausalLM", "FalconForCausalLM"]


def save_sharded(model, folder: Path, shard: str = "60KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    byte_tokenizer().save_pretrained(folder)
    return folder


def planted(arch: str, folder: Path, *plants, **overrides) -> Path:
    model = tiny_model(arch, **overrides)
    for i, p in enumerate(plants or [PLANT]):
        plant_super_weight(model, *p, seed=1234 + i)
    return save_sharded(model, folder)


def in_memory(folder: Path, dtype: str = "float32", **kw) -> sw.DetectionResult:
    lm = sw.load_model(str(folder), dtype=dtype)
    return sw.detect(lm.model, lm.tokenizer, model_name="m", **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_equals_in_memory_bit_for_bit(arch, tmp_path):
    folder = planted(arch, tmp_path / arch)
    assert len(open_checkpoint(folder).files) > 3  # really sharded
    expected = in_memory(folder, prompts=PROMPTS)
    got = stream_detect(folder, PROMPTS, model_name="m")
    assert got.coords == [PLANT]
    assert got.to_dict() == expected.to_dict()


@pytest.mark.parametrize("method", ["trace", "paper"])
def test_second_iteration_restreams_from_the_zeroed_layer_and_agrees(method, tmp_path):
    from superweight.find.streamed import StreamedRunner
    from superweight.find.loop import assemble, run_detection
    from superweight.find.runner import encode_prompt

    folder = tmp_path / "m"
    model = tiny_model("GPT2LMHeadModel", layers=6)
    plant_super_weight(model, *PLANT)
    plant_super_weight(model, 3, 20, 90, seed=7)
    save_sharded(model, folder)
    expected = in_memory(folder, method=method)
    assert set(expected.coords) == {PLANT, (3, 20, 90)}
    sm = StreamedModel(folder)
    runner = StreamedRunner(sm)
    enc = [encode_prompt(byte_tokenizer(), p) for p in PROMPTS[:1]]
    states = run_detection(runner, enc, method)
    got = assemble(states, runner, PROMPTS[:1], "m", method, None, None)
    assert got.to_dict() == in_memory(folder, prompts=PROMPTS[:1], method=method).to_dict()
    # the first pass reads every layer; each rerun starts at the layer of the weights it zeroed
    assert runner.passes == states[0].iterations
    assert runner.layers_read < 6 * runner.passes


def test_streaming_reads_each_layer_once_per_iteration_for_all_prompts(tmp_path):
    from superweight.find.streamed import StreamedRunner
    from superweight.find.loop import run_detection
    from superweight.find.runner import encode_prompt

    folder = planted("LlamaForCausalLM", tmp_path / "m")
    runner = StreamedRunner(StreamedModel(folder))
    enc = [encode_prompt(byte_tokenizer(), p) for p in PROMPTS]
    states = run_detection(runner, enc)
    assert states[0].found[0].coord == PLANT
    assert runner.passes == 2 and runner.layers_read == 4 + 3  # the rerun starts at layer 1


def _speculating_runner(folder: Path, method: str, guess=None):
    from superweight.find.loop import propose
    from superweight.find.streamed import StreamedRunner

    guess = guess or (lambda r, traces, ws, proposed: propose(method, r, traces, ws, proposed))
    return StreamedRunner(StreamedModel(folder), guess)


def _streamed(runner, method: str, prompts=PROMPTS):
    from superweight.find.loop import assemble, run_detection
    from superweight.find.runner import encode_prompt

    states = run_detection(runner, [encode_prompt(byte_tokenizer(), p) for p in prompts], method)
    return states, assemble(states, runner, list(prompts), "m", method, None, None)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel"])
@pytest.mark.parametrize("method", ["trace", "paper"])
def test_speculation_reads_the_checkpoint_once(arch, method, tmp_path):
    """The second iteration's traces come from the first pass's speculative branch: one pass, each
    layer read once, and the result still bitwise the in-memory one."""
    folder = planted(arch, tmp_path / "m")
    runner = _speculating_runner(folder, method)
    states, got = _streamed(runner, method)
    assert got.coords == [PLANT] and states[0].iterations == 2
    assert runner.passes == 1 and runner.layers_read == 4
    assert got.to_dict() == in_memory(folder, prompts=PROMPTS, method=method).to_dict()


def test_a_wrong_guess_costs_a_pass_not_a_result(tmp_path):
    """A proposal the step does not make (here a made-up weight of layer 0) is never used."""
    from superweight.find.loop import SuperWeight

    folder = planted("LlamaForCausalLM", tmp_path / "m")
    fake = SuperWeight(layer=0, row=1, col=2, module="", value=0.0, magnitude_rank=0, input_value=0.0,
                       output_value=0.0, share=0.0, token=0, iteration=0)
    runner = _speculating_runner(folder, "trace", lambda r, traces, ws, proposed: [fake] if len(traces) == 1 and not proposed else [])
    _, got = _streamed(runner, "trace")
    assert runner.passes == 2 and got.to_dict() == in_memory(folder, prompts=PROMPTS).to_dict()


def _two_plants(folder: Path) -> Path:
    model = tiny_model("GPT2LMHeadModel", layers=6)
    plant_super_weight(model, *PLANT)
    plant_super_weight(model, 3, 20, 90, seed=7)
    return save_sharded(model, folder)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])
@pytest.mark.parametrize("method", ["trace", "paper"])
def test_a_chain_of_guesses_reads_the_checkpoint_once(method, prompts, tmp_path):
    """Weights in two layers: the paper's method takes three iterations (one weight each, then none),
    served by a chain of two branches; the trace method two. Either way one pass, bitwise equal."""
    folder = _two_plants(tmp_path / "m")
    runner = _speculating_runner(folder, method)
    states, got = _streamed(runner, method, prompts)
    assert got.to_dict() == in_memory(folder, prompts=prompts, method=method).to_dict()
    assert set(got.coords) == {PLANT, (3, 20, 90)}
    assert [s.iterations for s in states] == [3 if method == "paper" else 2] * len(prompts)
    assert runner.passes == 1 and runner.layers_read == 6


def test_a_wrong_guess_deep_in_the_chain_costs_a_pass_not_a_result(tmp_path):
    """The chain's first level is right, its second carries a made-up weight: the third iteration is
    not served (a second pass, from the layer that differs) and the result is still the in-memory one."""
    from superweight.find.loop import SuperWeight, propose

    folder = _two_plants(tmp_path / "m")
    fake = SuperWeight(layer=5, row=1, col=2, module="", value=0.0, magnitude_rank=0, input_value=0.0,
                       output_value=0.0, share=0.0, token=0, iteration=0)

    def guess(r, traces, zeroing, proposed):
        real = propose("paper", r, traces, zeroing, proposed)
        return real + [fake] if len(zeroing) == 1 and len(traces) == 6 and proposed else real

    runner = _speculating_runner(folder, "paper", guess)
    states, got = _streamed(runner, "paper", PROMPTS[:1])
    assert got.to_dict() == in_memory(folder, prompts=PROMPTS[:1], method="paper").to_dict()
    assert states[0].iterations == 3 and runner.passes == 2 and runner.layers_read == 6 + 3


@pytest.mark.parametrize("arch", MOE)
def test_a_mixture_of_experts_streams_bit_for_bit(arch, tmp_path):
    """Checkpoints store experts one by one; transformers stacks them on load (a converter):
    streaming runs the same converter per layer, so the result is bitwise the in-memory one.
    (Granite-MoE stores each layer's experts as one 3-D tensor under other names: renamed, not stacked.)"""
    model = tiny_model(arch, experts=12)  # 12 experts: stacked 0, 1, ..., 11, not 0, 1, 10, 11, 2, ...
    plant_super_weight(model, *PLANT, expert=11)
    folder = save_sharded(model, tmp_path / arch)
    stored = open_checkpoint(folder).tensors
    if arch == "GraniteMoeForCausalLM":
        assert "model.layers.1.block_sparse_moe.output_linear.weight" in stored
    else:
        assert any(".experts.11." in k for k in stored)  # stored one by one
    runner = _speculating_runner(folder, "trace")
    _, got = _streamed(runner, "trace")
    assert got.keys == [(*PLANT, 11)]
    assert got.to_dict() == in_memory(folder, prompts=PROMPTS).to_dict()
    assert runner.passes == 1  # the second iteration served by the branch, experts and all
    loaded = sw.load_model(str(folder)).model.state_dict()
    sm = StreamedModel(folder, prefetch=False)
    names = [n for n in sm.layer_names(1) if ".experts." in n]
    assert names
    with sm.layer(1):
        streamed = dict(sm.model.named_parameters())
        for n in names:
            assert torch.equal(streamed[n], loaded[n]), n


@pytest.mark.parametrize("arch,layer", [("Qwen2MoeForCausalLM", 1), ("DeepseekV3ForCausalLM", 1), ("DeepseekV3ForCausalLM", 0)])
def test_a_shared_expert_or_dense_layer_weight_streams_bit_for_bit(arch, layer, tmp_path):
    """Qwen2-MoE's and DeepSeek's shared experts; DeepSeek's first layer is dense: read from the
    streamed skeleton which down-projection a layer has."""
    model = tiny_model(arch)
    plant_super_weight(model, layer, *PLANT[1:])  # no expert: the shared one, or the dense layer's
    folder = save_sharded(model, tmp_path / "m")
    runner = _speculating_runner(folder, "trace")
    _, got = _streamed(runner, "trace")
    assert got.keys == [(layer, *PLANT[1:])] and runner.passes == 1
    assert got.to_dict() == in_memory(folder, prompts=PROMPTS).to_dict()


def test_outside_a_pass_detection_reads_only_the_down_projection(tmp_path):
    """Ranking and a weight's value need a layer's down-projection only: not the attention's bytes."""
    from superweight.find.streamed import StreamedRunner

    folder = planted("LlamaForCausalLM", tmp_path / "m")
    runner = StreamedRunner(StreamedModel(folder, prefetch=False))
    read: list[str] = []
    real = runner.sm._wanted
    runner.sm._wanted = lambda names: (read.extend(names), real(names))[1]
    with runner.layer(1):
        assert float(runner.arch.weight_matrix(runner.model, 1)[7, 33]) != 0.0
    assert read == ["model.layers.1.mlp.down_proj.weight"]


def test_a_tied_embedding_stored_as_lm_head_streams(tmp_path):
    """superweight's own GGUF conversions store a tied embedding under ``lm_head.weight`` only."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    plant_super_weight(model, *PLANT)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    got = stream_detect(folder, PROMPTS, model_name="m")
    assert got.coords == [PLANT] and got.to_dict() == in_memory(folder, prompts=PROMPTS).to_dict()


def test_streaming_bfloat16_equals_in_memory_bfloat16(tmp_path):
    folder = planted("LlamaForCausalLM", tmp_path / "m")
    assert stream_detect(folder, model_name="m", dtype="bfloat16").to_dict() == in_memory(folder, "bfloat16").to_dict()


def test_no_plant_finds_nothing(tmp_path):
    folder = save_sharded(tiny_model("GPTNeoXForCausalLM"), tmp_path / "m")
    assert stream_detect(folder).super_weights == []


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "GPTNeoXForCausalLM"])
@pytest.mark.parametrize("scope", ["down_proj", "all_linear"])
def test_streaming_magnitude_scan_equals_in_memory(arch, scope, tmp_path):
    folder = planted(arch, tmp_path / "m")
    lm = sw.load_model(str(folder))
    expected = magnitude_scan(lm.model, lm.arch, scope=scope, super_weights=[PLANT]).to_dict()
    assert stream_magnitude_scan(folder, scope=scope, super_weights=[PLANT]).to_dict() == expected


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen2MoeForCausalLM"])
@pytest.mark.parametrize("scope", ["down_proj", "all_linear"])
def test_magnitude_scan_of_experts_in_memory_and_streamed(arch, scope, tmp_path):
    """Each expert's down-projection is a matrix of the scan (and, for all_linear, its gate/up), named
    as detection names its weights; the planted expert weight ranks first, and streaming agrees."""
    model = tiny_model(arch)
    plant_super_weight(model, *PLANT, expert=2)
    folder = save_sharded(model, tmp_path / "m")
    lm = sw.load_model(str(folder))
    found = sw.detect(lm.model, lm.tokenizer)
    expected = magnitude_scan(lm.model, lm.arch, scope=scope, super_weights=found)
    [ranked] = expected.super_weights
    assert (ranked.layer, ranked.row, ranked.col, ranked.expert) == (*PLANT, 2) and ranked.rank_in_flagged == 1
    assert expected.top[0]["module"] == "model.layers.1.mlp.experts.down_proj[2]"
    experts = 4 * lm.arch.num_layers(lm.model)
    assert sum("experts.down_proj[" in m.module for m in expected.matrices) == experts
    assert sum("experts.gate_up_proj[" in m.module for m in expected.matrices) == (experts if scope == "all_linear" else 0)
    assert stream_magnitude_scan(folder, scope=scope, super_weights=found).to_dict() == expected.to_dict()


def test_layers_are_freed_after_streaming(tmp_path):
    sm = StreamedModel(planted("LlamaForCausalLM", tmp_path / "m"))
    with sm.layer(2):
        assert not sm.layers[2].mlp.down_proj.weight.is_meta
    assert all(p.is_meta for p in sm.layers.parameters())
    assert not sm.model.model.embed_tokens.weight.is_meta


# ---------------------------------------------------------------- bad checkpoints


@pytest.fixture
def sharded(tmp_path) -> Path:
    return planted("LlamaForCausalLM", tmp_path / "m")


def test_missing_shard_is_a_clear_error(sharded):
    victim = sorted(sharded.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(SuperweightError, match=f"shard {victim.name} .* is missing"):
        stream_detect(sharded)


def test_truncated_shard_is_a_clear_error(sharded):
    victim = sorted(sharded.glob("*.safetensors"))[2]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(SuperweightError, match="truncated"):
        stream_detect(sharded)


def test_inconsistent_index_is_a_clear_error(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(SuperweightError, match="inconsistent"):
        stream_detect(sharded)


def test_tensor_missing_from_index_is_a_clear_error(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.3.mlp.down_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(SuperweightError, match="no tensor model.layers.3.mlp.down_proj.weight"):
        StreamedModel(sharded)


def test_config_that_does_not_match_the_shards_is_a_clear_error(sharded):
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (sharded / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SuperweightError, match="do not belong together"):
        StreamedModel(sharded)


# ---------------------------------------------------------------- which mode


def _plan(monkeypatch, in_memory: int, streaming: int, available: int) -> None:
    monkeypatch.setattr("superweight.model.mode.memory_plan",
                        lambda path, dtype: MemoryPlan(in_memory, streaming, available, 10**12))


def test_memory_plan_sizes_from_headers(sharded):
    plan = memory_plan(sharded, "float32")
    assert plan.in_memory == open_checkpoint(sharded).nbytes  # saved in float32
    assert plan.streaming < plan.in_memory + 600 * 2**20 and plan.available > 0
    assert memory_plan(sharded, "bfloat16").in_memory == plan.in_memory // 2


def test_mode_is_automatic_with_a_log_line(sharded, monkeypatch, caplog):
    _plan(monkeypatch, 10 * 2**30, 2**30, 4 * 2**30)
    with caplog.at_level(logging.INFO, logger="superweight.model.mode"):
        assert choose_mode(str(sharded), "float32", False, None) == "stream"
    assert "streaming it layer by layer" in caplog.text
    _plan(monkeypatch, 2**30, 2**29, 4 * 2**30)
    assert choose_mode(str(sharded), "float32", False, None) == "memory"
    assert choose_mode("smollm2-135m", "float32", False, None) == "memory"


def test_not_enough_memory_names_the_mode_that_fits(sharded, monkeypatch):
    _plan(monkeypatch, 10 * 2**30, 3 * 2**30, 2**30)
    with pytest.raises(SuperweightError, match="in memory needs 10.0 GiB, streaming about 3.0 GiB"):
        choose_mode(str(sharded), "float32", False, None)
    with pytest.raises(SuperweightError, match="not enough memory to stream.*device-map auto"):
        choose_mode(str(sharded), "float32", True, None)


def test_stream_refuses_gguf_and_hub_ids():
    with pytest.raises(SuperweightError, match="--stream reads a local safetensors"):
        choose_mode("some-org/some-model", "float32", True, None)


def test_not_enough_disk_for_a_gguf_conversion_says_where(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 4096)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(SuperweightError, match=r"writes up to .* has 0.0 GiB free: pass --cache-dir"):
        choose_mode(str(gguf), "float32", False, None, tmp_path / "cache")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 10**12))
    assert choose_mode(str(gguf), "float32", False, None, tmp_path / "cache") == "memory"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "superweight", *args], capture_output=True, text=True, timeout=300)


def test_cli_stream_and_device_map(sharded, tmp_path):
    out = tmp_path / "sw.json"
    proc = run_cli("detect", str(sharded), "--stream", "--method", "both", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert [(s["layer"], s["row"], s["col"]) for s in doc["super_weights"]] == [PLANT]
    assert doc["magnitude"]["super_weights"][0]["rank_in_matrix"] == 1
    proc = run_cli("detect", str(sharded), "--device-map", "cpu", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["super_weights"][0]["layer"] == PLANT[0]


def test_cli_truncated_shard_exits_2(sharded):
    victim = sorted(sharded.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    proc = run_cli("detect", str(sharded), "--stream")
    assert proc.returncode == 2 and "truncated" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- peak memory


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from superweight.find.streamed import stream_detect

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    stream_detect(sys.argv[1])  # warm-up on a small copy: lazy imports, allocator arenas
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = status("VmRSS")
    result = stream_detect(sys.argv[2])
    print(json.dumps({"before": before, "peak": status("VmHWM"), "coords": result.coords}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_streaming_peak_memory_is_bounded_by_the_largest_layer(tmp_path):
    """Peak RSS growth stays under 3 layers + 32 MiB on a checkpoint more than 3x that size: the layer
    running, its materialised copy, and the next one the read-ahead thread holds (docs/scale.md)."""
    dims = dict(hidden=512, intermediate=2048, layers=16)
    small = save_sharded(tiny_model("LlamaForCausalLM", **{**dims, "layers": 2}), tmp_path / "small", "8MB")
    big_model = tiny_model("LlamaForCausalLM", **dims)
    plant_super_weight(big_model, *PLANT)
    big = save_sharded(big_model, tmp_path / "big", "20MB")
    del big_model
    ckpt = open_checkpoint(big)
    layer_bytes = max(
        sum(t.nbytes for k, t in ckpt.tensors.items() if k.startswith(f"model.layers.{i}.")) for i in range(16)
    )
    bound = 3 * layer_bytes + 32 * 2**20  # measured: 43-66 MiB with the read-ahead thread (15 MiB layers)
    assert ckpt.nbytes > 3 * bound  # holding the whole model would break the bound
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(small), str(big)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [tuple(c) for c in out["coords"]] == [PLANT]
    assert out["peak"] - out["before"] < bound, (out, layer_bytes, ckpt.nbytes)


def test_find_super_weights_is_the_same_in_memory_and_streamed(tmp_path):
    """One library call, both modes: the same coordinates from the same detection loop."""
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    folder = save_sharded(model, tmp_path / "m", "1MB")
    in_memory, _ = sw.find_super_weights(folder, stream=False)
    streamed, mag = sw.find_super_weights(folder, sw.FindConfig(method="both"), stream=True)
    assert in_memory.coords == streamed.coords == [PLANT]
    assert mag is not None and streamed.magnitude == mag.to_dict()
    with pytest.raises(sw.SuperweightError, match="unknown method"):
        sw.FindConfig(method="fast")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma2ForCausalLM", "MixtralForCausalLM", "GPT2LMHeadModel"])
def test_the_streamed_verdict_is_the_in_memory_one(arch, tmp_path):
    """Every zeroed set's NLL in one pass over the layers, the head applied by the model's own forward
    (Gemma-2's logit softcapping included): the same verdicts, labels, null draws and numbers."""
    from superweight.eval.text import load_text
    from superweight.find.verdict import judge

    folder = planted(arch, tmp_path / arch)  # Mixtral: in expert 0
    text = load_text("wiki-intros")
    lm = sw.load_model(str(folder))
    mem = sw.detect(lm.model, lm.tokenizer)
    judge(lm.model, lm.arch, lm.tokenizer, mem, text, 256)
    streamed = stream_detect(folder, verdict_text=text, verdict_tokens=256)
    assert mem.verdicts and [v.to_dict() for v in streamed.verdicts] == [v.to_dict() for v in mem.verdicts]
    assert [s.verdict for s in streamed.super_weights] == [s.verdict for s in mem.super_weights]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma2ForCausalLM", "GPT2LMHeadModel"])
def test_streamed_perplexity_is_the_in_memory_one(arch, tmp_path):
    """Overlapping windows through ``StreamedModel.window_nlls`` (what ``eval --stream`` and the streamed
    ablation score): ``evaluate_perplexity``'s result."""
    from superweight.eval.perplexity import evaluate_perplexity, perplexity_result, perplexity_windows
    from superweight.eval.text import load_text
    from superweight.model.streamed import StreamedModel

    folder = planted(arch, tmp_path / arch)
    text = load_text("wiki-intros")
    lm = sw.load_model(str(folder))
    mem = evaluate_perplexity(lm.model, lm.tokenizer, text, seq_len=128, max_tokens=1000, stride=96)  # overlapping windows
    sm = StreamedModel(folder)
    try:
        ids, spans, seq_len, stride = perplexity_windows(sm.model, lm.tokenizer, text, 128, 1000, 96)
        nlls = window_nlls(sm, [(ids[b:e], f - b) for b, e, f in spans], [[]])
    finally:
        sm.close()
    assert perplexity_result([n for n, in nlls], spans, seq_len, stride).to_dict() == mem.to_dict()


def test_cli_eval_streams_perplexity_and_tasks(tmp_path, capsys):
    """``eval --stream`` writes the in-memory command's numbers, zero-shot tasks included."""
    from test_bad_inputs import run_main

    folder = planted("LlamaForCausalLM", tmp_path / "m")
    runs = {}
    for name, extra in {"memory": [], "stream": ["--stream"]}.items():
        out = tmp_path / f"{name}.json"
        code, _, err = run_main(["eval", str(folder), *extra, "--ppl", "wiki-intros", "--max-tokens", "600",
                                 "--tasks", "piqa", "--limit", "3", "--json", str(out)], capsys)
        assert code == 0, err
        runs[name] = json.loads(out.read_text())
    assert runs["stream"]["ppl"] > 1 and runs["stream"]["tasks"]["piqa"]["n"] == 3
    assert {k: runs["stream"][k] for k in ("ppl", "ppl_tokens", "tasks", "avg_acc")} == \
        {k: runs["memory"][k] for k in ("ppl", "ppl_tokens", "tasks", "avg_acc")}
    assert "streamed" in " ".join(runs["stream"]["notes"])
