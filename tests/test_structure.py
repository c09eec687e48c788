"""One shape for every command (issue 25): the model argument is resolved once, a local checkpoint's
headers are parsed once, and one ``StreamedModel`` serves every streamed pass of a command. Counted
through the command line on a planted tiny checkpoint; plus the option groups ``@grouped`` expands."""
from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import typer
from typer.testing import CliRunner

import superweight.model.source as source_mod
import superweight.model.streamed as streamed_mod
from superweight.cli.app import app
from superweight.cli.options import ModelOptions, cli, grouped
from test_stream import planted


@pytest.fixture
def counted(monkeypatch) -> dict:
    seen = {"resolved": 0, "headers parsed": 0, "streamed models": 0}
    classify, read_headers, init = source_mod._classify, source_mod.open_checkpoint, streamed_mod.StreamedModel.__init__

    def count(key, fn):
        def wrapped(*a, **kw):
            seen[key] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(source_mod, "_classify", count("resolved", classify))
    monkeypatch.setattr(source_mod, "open_checkpoint", count("headers parsed", read_headers))
    monkeypatch.setattr(streamed_mod.StreamedModel, "__init__", count("streamed models", init))
    return seen


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shape")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return planted("LlamaForCausalLM", root / "m")


def run(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def test_detect_streamed_with_verdict_and_magnitude_scan_opens_the_model_once(folder, counted, tmp_path):
    run("detect", str(folder), "--stream", "--method", "both", "--verdict-text", str(folder.parent / "text.txt"),
        "--verdict-tokens", "64", "--json", str(tmp_path / "sw.json"))
    assert counted == {"resolved": 1, "headers parsed": 1, "streamed models": 1}


def test_detect_in_memory_resolves_once(folder, counted, tmp_path):
    run("detect", str(folder), "--no-verdict", "--json", str(tmp_path / "sw.json"))
    assert counted == {"resolved": 1, "headers parsed": 1, "streamed models": 0}


@pytest.mark.parametrize("given", [True, False], ids=["super-weights-file", "detected-now"])
def test_quantize_streamed_opens_the_model_once(folder, counted, tmp_path, given):
    extra = []
    if given:
        run("detect", str(folder), "--no-verdict", "--json", str(tmp_path / "sw.json"))
        for k in counted:
            counted[k] = 0
        extra = ["--super-weights", str(tmp_path / "sw.json")]
    run("quantize", str(folder), "--stream", "--scheme", "int8", "--out", str(tmp_path / "art"), *extra)
    assert counted == {"resolved": 1, "headers parsed": 1, "streamed models": 1}


@dataclasses.dataclass(frozen=True)
class Pair:
    a: int = cli(typer.Option(1, "--a"))
    b: Optional[str] = cli(typer.Option(None, "--b"))


def test_an_option_group_expands_into_options_and_comes_back_built():
    got = {}
    demo = typer.Typer()

    @demo.command()
    @grouped
    def cmd(x: int = typer.Option(0, "--x"), pair: Pair = Pair(), opts: ModelOptions = ModelOptions()) -> None:
        got.update(x=x, pair=pair, opts=opts)

    result = CliRunner().invoke(demo, ["--x", "3", "--b", "hi", "--dtype", "bfloat16", "--held-gb", "0.5", "-q"])
    assert result.exit_code == 0, result.output
    assert got["x"] == 3 and got["pair"] == Pair(1, "hi")
    assert got["opts"] == ModelOptions(dtype="bfloat16", held_gb=0.5, quiet=True)
    assert got["opts"].held_bytes == 1 << 29
