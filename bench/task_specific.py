"""Are super weights task-specific or model-specific? (SEED-NOTES' open question, on the real models.)

    python bench/task_specific.py            # -> docs/results/task_specific.json (~5 min on 2 CPUs)

For each real model of the dev set (SmolLM2-135M and Gemma-3-270M, float weights dequantized from
their GGUF files), the default detection runs separately on inputs of ten kinds: the first documents of
seven zero-shot tasks (their prompt as the model sees it: PIQA, ARC-Easy/Challenge, HellaSwag,
WinoGrande, SciQ, LAMBADA), Wikipedia introductions, Python source (the standard library's) and the
paper's prompt. Per input it records the creating weights found, the super activations' (channel,
token), and per kind how many inputs found exactly the weights the paper's prompt finds. Inputs are
cut to ``--max-chars`` characters so that every kind is read at a comparable length.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("smollm2-135m", "gemma3-270m")
CODE_MODULES = ("json.decoder", "textwrap", "heapq", "bisect", "fractions", "statistics", "difflib", "shlex")


def inputs(per_kind: int, max_chars: int) -> dict[str, list[str]]:
    """The texts of each kind, ``per_kind`` of them, each cut to ``max_chars``."""
    import importlib

    from superweight.find.loop import DEFAULT_PROMPT
    from superweight.eval.tasks import TASK_NAMES, load_items
    from superweight.eval.text import load_wiki_intros

    out: dict[str, list[str]] = {"paper prompt": [DEFAULT_PROMPT]}
    for task in TASK_NAMES:
        items = load_items(task, limit=per_kind)
        out[task] = [(it.contexts[0] + it.continuations[it.gold])[-max_chars:] for it in items]
    paragraphs = [p for p in load_wiki_intros().split("\n\n") if len(p) > 200]
    out["wikipedia"] = [p[:max_chars] for p in paragraphs[:per_kind]]
    out["python code"] = [inspect.getsource(importlib.import_module(m))[:max_chars] for m in CODE_MODULES[:per_kind]]
    return out


def run_model(name: str, texts: dict[str, list[str]]) -> dict:
    import superweight as sw

    lm = sw.load_model(name)
    reference = sw.detect(lm.model, lm.tokenizer, texts["paper prompt"], arch=lm.arch)
    ref_weights = sorted(list(s.key) for s in reference.super_weights if s.role == "creates")
    ref_channels = sorted({a.channel for a in reference.activations})
    kinds = {}
    for kind, prompts in texts.items():
        t0 = time.perf_counter()
        result = sw.detect(lm.model, lm.tokenizer, prompts, arch=lm.arch)
        per = []
        for i in range(len(prompts)):
            acts = [a for a in result.activations if a.prompt == i]
            ids = lm.tokenizer(prompts[i])["input_ids"]
            per.append({
                "first_token": lm.tokenizer.convert_ids_to_tokens(ids[0]),
                "creates": [list(k) for k in sorted({tuple(k) for k in result.per_prompt[i]}
                                                    & {s.key for s in result.super_weights if s.role == "creates"})],
                "activations": sorted([a.channel, a.token] for a in acts),
                "tokens": len(ids),
            })
        same = sum(p["creates"] == ref_weights for p in per)
        channels = sorted({c for p in per for c, _ in p["activations"]})
        kinds[kind] = {
            "inputs": len(prompts), "same_weights_as_paper_prompt": same, "per_input": per,
            "channels_seen": channels, "on_token_0": sum(all(t == 0 for _, t in p["activations"]) and bool(p["activations"]) for p in per),
            "weights_any_input": sorted({tuple(w) for p in per for w in p["creates"]}),
            "first_tokens": sorted({p["first_token"] for p in per}),
            "seconds": time.perf_counter() - t0,
        }
        print(f"{name:14s} {kind:14s} same weights {same}/{len(prompts)}  channels {channels}", flush=True)
    return {"model": name, "notes": lm.notes, "paper_prompt_weights": ref_weights, "paper_prompt_channels": ref_channels,
            "kinds": kinds}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-kind", type=int, default=6, help="inputs of each kind (default 6)")
    ap.add_argument("--max-chars", type=int, default=600, help="characters of each input (default 600)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "task_specific.json")
    args = ap.parse_args(argv)
    texts = inputs(args.per_kind, args.max_chars)
    t0 = time.perf_counter()
    out = {"command": "python bench/task_specific.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "per_kind": args.per_kind, "max_chars": args.max_chars,
           "models": [run_model(m, texts) for m in args.models.split(",")]}
    out["seconds"] = time.perf_counter() - t0
    from superweight.core.files import write_json_atomic

    write_json_atomic(args.out, out)
    for m in out["models"]:
        total = sum(k["inputs"] for k in m["kinds"].values())
        same = sum(k["same_weights_as_paper_prompt"] for k in m["kinds"].values())
        print(json.dumps({"model": m["model"], "inputs": total, "same_weights_as_paper_prompt": same}))
    return out


if __name__ == "__main__":
    main()
