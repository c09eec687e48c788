"""``quantize --scheme w8a8`` on the real models: the artifact a user gets, in memory and streamed.

    python bench/w8a8_artifact.py        # -> bench/results/w8a8_artifact.json (~5 min on 2 CPUs)

For each real model of the dev set (float weights dequantized from GGUF files: every baseline is that
of an already-quantized model), with the default detection's super weights kept: the W8A8 artifact
(int8 weights per tensor, 8-bit per-token inputs with the super activations' channels held out, found
on 4 x 256 tokens of wiki-intros) written in memory (``export_artifact(..., activations=w8a8_activations(...))``)
and streamed (``stream_quantize(..., activations=True)``), whether the two are the same bytes and
manifest, and the perplexity on the first ``--tokens`` tokens of WikiText-2 (the offline Wikipedia
introductions without ``../shared``) of: the model, the int8 weight-only artifact (the same weights,
inputs unquantized), the W8A8 artifact, and the W8A8 artifact with no channel held out (its hooks
quantizing every input channel), all loaded back from disk.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODELS = ("smollm2-135m", "gemma3-270m")


def _same(a: Path, b: Path) -> bool:
    sys.path.insert(0, str(ROOT.parent / "tests"))
    from test_stream_quantize import same_artifact

    try:
        same_artifact(a, b, ignore=("source_model", "notes"))
        return True
    except AssertionError:
        return False


def run(name: str, text_name: str, tokens: int, seq_len: int) -> dict:
    import superweight as sw
    from superweight.eval.perplexity import evaluate_perplexity
    from superweight.eval.text import load_text
    from superweight.quant.artifact import MANIFEST, export_artifact, load_quantized
    from superweight.core.files import default_cache_dir
    from superweight.model.load import gguf_cache_folder
    from superweight.quant.config import RTN
    from superweight.quant.w8a8 import w8a8_activations
    from superweight.quant.streamed import stream_quantize

    lm = sw.load_model(name)
    keep = sw.detect(lm.model, lm.tokenizer, arch=lm.arch).super_weights
    text = load_text(text_name)

    def ppl(model) -> float:
        return evaluate_perplexity(model, lm.tokenizer, text, seq_len, tokens).ppl

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        acts = w8a8_activations(lm.model, lm.tokenizer)
        export_artifact(lm, RTN(bits=8), keep, tmp / "w8a8", write_back=False, activations=acts)
        export_artifact(lm, RTN(bits=8), keep, tmp / "w8", write_back=False)
        export_artifact(lm, RTN(bits=8), keep, tmp / "w8a8-none", write_back=False,
                        activations={**acts, "held_out_channels": {}})
        stream_quantize(gguf_cache_folder(lm.source, default_cache_dir()), RTN(bits=8), keep, tmp / "stream",
                        activations=True)
        manifest = json.loads((tmp / "w8a8" / MANIFEST).read_text())
        row = {"model": name, "notes": lm.notes, "super_weights": [[s.layer, s.row, s.col] for s in keep],
               "held_out_channels": acts["held_out_channels"], "bits_per_weight": manifest["size"]["bits_per_weight"],
               "streamed_same": _same(tmp / "w8a8", tmp / "stream"), "ppl": {"model": ppl(lm.model)}}
        for label, folder in (("int8 weights only", "w8"), ("W8A8, super activations held out", "w8a8"),
                              ("W8A8, nothing held out", "w8a8-none")):
            row["ppl"][label] = ppl(load_quantized(tmp / folder).model)
    return row


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from superweight.eval.text import wikitext_candidates
    from superweight.core.files import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "w8a8_artifact.json")
    args = ap.parse_args(argv)
    text = "wikitext2" if any(p.is_file() for p in wikitext_candidates()) else "wiki-intros"
    out = {"command": "python bench/w8a8_artifact.py " + " ".join(sys.argv[1:] if argv is None else argv), "text": text,
           "tokens": args.tokens, "seq_len": args.seq_len,
           "models": [run(m, text, args.tokens, args.seq_len) for m in MODELS]}
    write_json_atomic(args.out, out)
    print(json.dumps([{k: m[k] for k in ("model", "streamed_same", "ppl")} for m in out["models"]], indent=1))
    return out


if __name__ == "__main__":
    main()
