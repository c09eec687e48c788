"""Progress bars appear only on a terminal and never with --quiet."""
from __future__ import annotations

import sys

from superweight.core import progress


class _Tty:
    def __init__(self, stream):
        self.stream = stream

    def isatty(self) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_no_bar_when_stdout_is_not_a_terminal():
    items = [1, 2, 3]
    assert progress.bar(items, "x") is items  # pytest captures stdout: not a terminal
    with progress.counter(3, "x") as tick:
        tick()


def test_bar_on_a_terminal_unless_quiet(monkeypatch):
    monkeypatch.setattr(sys, "stdout", _Tty(sys.stdout))
    monkeypatch.setattr(sys, "stderr", _Tty(sys.stderr))
    monkeypatch.delenv("SUPERWEIGHT_PROGRESS", raising=False)
    wrapped = progress.bar([1, 2], "x")
    from tqdm import tqdm

    assert isinstance(wrapped, tqdm) and list(wrapped) == [1, 2]
    try:
        progress.configure(quiet=True)
        assert not progress.enabled()
    finally:
        progress.configure(quiet=False)
    monkeypatch.setenv("SUPERWEIGHT_PROGRESS", "0")
    assert not progress.enabled()


def test_a_streamed_pass_shows_its_layer_beside_the_running_step(monkeypatch, tmp_path):
    """``note`` updates the innermost spinner (nothing without one); ``StreamedModel.layer`` notes each layer
    it reads, so ``detect --stream`` on a big model says how far its pass is."""
    monkeypatch.setattr(progress, "enabled", lambda: True)
    progress.note("nowhere")  # no spinner: nothing happens
    with progress.step("outer"):
        with progress.step("detecting"):
            progress.note("layer 3/80")
            assert progress._running[-1][0].status == "detecting: layer 3/80"
        assert progress._running[-1][0].status == "outer"
    assert progress._running == []

    from test_stream import planted

    from superweight.find.streamed import stream_detect

    seen = []
    monkeypatch.setattr(progress, "note", seen.append)
    stream_detect(planted("LlamaForCausalLM", tmp_path / "m"), model_name="m")
    assert "layer 1/4" in seen and "layer 4/4" in seen
