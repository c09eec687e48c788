"""Our GGUF block parameters against llama.cpp's reference quantizer, scored in torch (no llama.cpp needed).

``bench/gguf_export.py`` scores whole GGUF files with llama.cpp's logits (llama-cpp-python). This
script measures the same comparison where llama-cpp-python is not installed: each tensor the GGUF
writer would write (``GGUFPlan.type_for``: every 2-D decoder weight in the type, llama.cpp's fallback
where a row is not whole blocks, the token embedding (tied output head) Q8_0, the super weights'
tensors F16 with ``+ overrides``) is encoded, dequantized (the values the file holds: the tests check
they read back exactly with ``gguf.quants.dequantize``) and put back into the dense float32 torch model,
whose perplexity the package's own code (``eval.perplexity``) then scores on WikiText-2 and on the
LAMBADA passages, the same token windows for every variant.

Variants (``--variants``):

- ``reference``: gguf-py's ``gguf.quants.quantize`` (llama.cpp's ``quantize_row_*_ref``: Q4_0 maps each
  block's signed absmax weight to -8), what ``llama-quantize`` writes without an importance matrix.
- ``ours``: the product's writer (``gguf_codec.encode(..., search=True)``) as it is now.
- ``mse``: the range search with a flat objective (every weight's squared error counts the same: the
  writer before this script's fix, kept so the JSON shows the cause).

Q/K are not permuted here: the rotary permutation moves whole rows and the blocks run along a row,
so each row's values are the same either way.

    OMP_NUM_THREADS=1 nice -n 10 python bench/gguf_torch.py --models smollm2-135m --types q4_0 \
        --variants reference ours mse --windows 16   # -> bench/results/gguf_torch.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from superweight.core.files import write_json_atomic  # noqa: E402
from superweight.eval.perplexity import evaluate_perplexity  # noqa: E402
from superweight.eval.text import load_text  # noqa: E402
from superweight.model.load import load_model  # noqa: E402
from superweight.quant import gguf_codec  # noqa: E402
from superweight.quant.gguf_export import EMBED_TYPE, GGUFPlan, _name_map  # noqa: E402
from gguf_export import against_reference  # noqa: E402  (bench/gguf_export.py, beside this script)

TEXTS = ("wikitext2", "lambada")


def encoder(variant: str):
    """``(weight, type) -> values`` for a variant (see the module docstring)."""
    if variant == "reference":
        return lambda w, t: gguf_codec.encode(w, t, search=False)[1] if t in gguf_codec.REFERENCE else None
    if variant == "ours":
        return lambda w, t: gguf_codec.encode(w, t, search=True)[1]
    if variant == "mse":
        return lambda w, t: gguf_codec.encode(w, t, search=True, objective="flat")[1]
    if variant.startswith("objective-"):  # the range search with another fit weight (gguf_codec.OBJECTIVES)
        return lambda w, t: gguf_codec.encode(w, t, search=True, objective=variant.split("-", 1)[1])[1]
    raise SystemExit(f"unknown variant {variant}")


def planned(lm, plan: GGUFPlan) -> list[tuple[str, str, str]]:
    """``(parameter name, GGUF name, type)`` of each 2-D weight the GGUF file holds (a tied head once)."""
    names, out, seen = _name_map(lm), [], set()
    for key, p in lm.model.named_parameters():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None or p.dim() < 2 or id(p) in seen:
            continue
        seen.add(id(p))
        out.append((key, name, plan.type_for(name, p.shape)))
    return out


def quantized_state(lm, plan: GGUFPlan, variant: str, originals: dict) -> dict:
    """Writes the variant's values into the model's parameters; returns a summary (types, error, seconds)."""
    enc, params = encoder(variant), dict(lm.model.named_parameters())
    counts, sq, n, start = {}, 0.0, 0, time.perf_counter()
    for key, name, t in planned(lm, plan):
        w = originals[key]
        values = w.clone() if t == "f32" else enc(w, t)
        if values is None:  # a k-quant the reference (gguf-py) cannot write
            raise SystemExit(f"gguf-py has no reference quantizer for {t}")
        with torch.no_grad():
            params[key].copy_(values.reshape(params[key].shape))
        counts[t] = counts.get(t, 0) + 1
        sq += float((values - w).double().square().sum())
        n += w.numel()
    return {"type_counts": counts, "weight_mse": sq / n, "encode_seconds": time.perf_counter() - start}


def run_model(model: str, args, result: dict) -> None:
    torch.set_num_threads(args.threads)
    lm = load_model(model)
    originals = {k: p.detach().clone() for k, p in lm.model.named_parameters() if p.dim() >= 2}
    overrides = {}
    if args.overrides:
        from superweight.find.loop import detect
        from superweight.quant.gguf_export import super_weight_overrides

        det = detect(lm.model, lm.tokenizer, model_name=model, arch=lm.arch)
        overrides = super_weight_overrides(lm, det.super_weights)
    texts = {t: load_text(t) for t in args.texts}
    entry = result["models"].setdefault(model, {"rows": {}})
    entry.update({"notes": lm.notes, "overrides": sorted(overrides)})
    rows = entry["rows"]

    def score(label: str, summary: dict) -> None:
        row = {**summary, "measured_with": "torch, dequantized weights (eval.perplexity)", "ppl": {}}
        for text, body in texts.items():
            start = time.perf_counter()
            r = evaluate_perplexity(lm.model, lm.tokenizer, body, seq_len=args.seq_len,
                                    max_tokens=args.seq_len * args.windows)
            row["ppl"][text] = {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "seconds": time.perf_counter() - start}
        rows[label] = row
        write_json_atomic(args.out, result)
        print(f"{model:14s} {label:32s} " + "  ".join(f"{t} {v['ppl']:.3f}" for t, v in row["ppl"].items())
              + f"  mse {summary.get('weight_mse', 0):.3e}", flush=True)

    if "float (F32)" not in rows:
        score("float (F32)", {})
    for t in args.types:
        for suffix, ovr in (("", {}), (" + overrides", overrides)):
            if suffix and (not overrides or t not in (args.override_types or args.types)):
                continue
            plan = GGUFPlan(t, search=True, embed_type=EMBED_TYPE, overrides=ovr)
            for variant in args.variants:
                label = f"{variant} {t}{suffix}"
                if label in rows and not args.rerun:
                    continue
                score(label, quantized_state(lm, plan, variant, originals))
        with torch.no_grad():  # back to the float weights for the next type
            for k, p in lm.model.named_parameters():
                if k in originals:
                    p.copy_(originals[k])
    measured = sorted({label.split()[1] for label in rows if label != "float (F32)"})  # every type in the JSON
    entry["comparison"] = compare(rows, measured)
    write_json_atomic(args.out, result)


def compare(rows: dict, types: list[str]) -> list[dict]:
    """Ours against gguf-py's reference quantizer (``gguf_export.against_reference``)."""
    return against_reference(rows, types, "reference",
                             lambda name, ours, other: {"same_types": ours["type_counts"] == other["type_counts"]})


def merge(sources: list[Path], into: Path) -> None:
    """Each model's torch rows (``sources``: this script's JSONs) into ``bench/gguf_export.py``'s JSON, under
    ``models[MODEL]["torch_dequantized"]``, beside the rows llama.cpp measured (kept as they are)."""
    result = json.loads(into.read_text())
    for src in sources:
        got = json.loads(src.read_text())
        for model, entry in got["models"].items():
            result["models"].setdefault(model, {})["torch_dequantized"] = {
                "source": str(src.relative_to(ROOT)) if src.is_absolute() and ROOT in src.parents else str(src),
                "measured_with": got["measured_with"], "seq_len": got["seq_len"], "windows": got["windows"],
                "commands": got["commands"], "ours_objective": got.get("ours_objective"), **entry}
    result["ours_rows_note"] = ("the llama.cpp-measured 'ours' rows were written by the writer of git ee56b79 (range search "
                                "with the flat squared error, gguf_codec objective 'flat'); the torch_dequantized 'ours' rows "
                                "by the writer with the gguf_codec.OBJECTIVE their ours_objective names (sigma, the default since git 8fb3af9)")
    write_json_atomic(into, result)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--types", nargs="+", default=["q4_0"])
    ap.add_argument("--variants", nargs="+", default=["reference", "ours"])
    ap.add_argument("--texts", nargs="+", default=list(TEXTS))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-overrides", dest="overrides", action="store_false")
    ap.add_argument("--override-types", nargs="+", default=None, help="the types measured + overrides (default: all)")
    ap.add_argument("--rerun", action="store_true", help="measure the --variants' rows the JSON already holds again")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gguf_torch.json")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="only copy these JSONs' models into --merge-into (bench/gguf_export.py's JSON)")
    ap.add_argument("--merge-into", type=Path, default=ROOT / "bench" / "results" / "gguf_export.json")
    args = ap.parse_args()
    if args.merge:
        return merge([p.resolve() for p in args.merge], args.merge_into)
    command = "python bench/gguf_torch.py " + " ".join(sys.argv[1:])
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"models": {}}
    if result.get("seq_len", args.seq_len) != args.seq_len or result.get("windows", args.windows) != args.windows:
        raise SystemExit(f"{args.out} was measured on other windows: pass --out NEW.json")
    result.update({"seq_len": args.seq_len, "windows": args.windows, "embedding_type": EMBED_TYPE,
                   "ours_objective": gguf_codec.OBJECTIVE,
                   "measured_with": "torch float32 model with each tensor's dequantized GGUF values (eval.perplexity)"})
    result.setdefault("commands", []).append(command)
    for model in args.models:
        run_model(model, args, result)


if __name__ == "__main__":
    main()
