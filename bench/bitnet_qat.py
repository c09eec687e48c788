"""BitNet b1.58 QAT from scratch: float vs ternary vs ternary + kept super weights vs ternary + kept
random weights, all trained with the same seed, data order and steps. Perplexity on WikiText-2
test, the detection result of each final model, and the packed ternary artifact's size.

    python bench/bitnet_qat.py --float RUN --ternary RUN --super RUN --random RUN [--max-tokens N]
        -> docs/results/emergence_bitnet.json (artifacts under --artifacts, not committed)
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

from superweight.train.bitnet import export_ternary, kept_indices  # noqa: E402
from superweight.train.emergence import detect_checkpoint, load_checkpoint  # noqa: E402
from superweight.eval.perplexity import evaluate_perplexity  # noqa: E402
from superweight.eval.text import load_wikitext2  # noqa: E402
from superweight.core.files import write_json_atomic  # noqa: E402
from superweight.train.loop import checkpoint_folders  # noqa: E402


def evaluate(run: Path, text: str, max_tokens: int, artifacts: Path, name: str) -> dict:
    final = checkpoint_folders([run])[-1]
    config = json.loads((run / "train_log.json").read_text())["config"]
    lm = load_checkpoint(final)
    t = time.time()
    ppl = evaluate_perplexity(lm.model, lm.tokenizer, text, seq_len=lm.model.config.max_position_embeddings, max_tokens=max_tokens)
    det = detect_checkpoint(lm.model, lm.tokenizer, lm.arch)
    row = {
        "run": str(run), "checkpoint": final.name, "bitnet": config["bitnet"], "kept": config["keep"],
        "steps": config["steps"], "seed": config["seed"], "ppl": ppl.ppl, "nll": ppl.nll, "tokens": ppl.tokens,
        "eval_seconds": time.time() - t, "detected": [list(c) for c in det.coords],
        "max_residual_per_layer": [s.residual.magnitude for s in det.layers],
    }
    params = sum(p.numel() for p in lm.model.parameters())
    row["float16_bytes"] = 2 * params
    if config["bitnet"]:
        row["kept_indices"] = kept_indices(lm.model)
        manifest = export_ternary(lm.model, lm.tokenizer, artifacts / name, source=str(final), force=True)
        row["artifact_size"] = manifest["size"]
        linear = manifest["size"]["quantized_weights"]
        row["ternary_linears_float16_bytes"] = 2 * linear
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("float", "ternary", "super", "random"):
        ap.add_argument(f"--{name}", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--artifacts", type=Path, default=Path("/tmp/superweight-bitnet-artifacts"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "emergence_bitnet.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text = load_wikitext2()
    rows = {}
    for name in ("float", "ternary", "super", "random"):
        rows[name] = evaluate(getattr(args, name), text, args.max_tokens, args.artifacts, name)
        print(name, json.dumps({k: rows[name][k] for k in ("ppl", "detected", "kept")}), flush=True)
    command = "python bench/bitnet_qat.py " + " ".join(f"--{n} {getattr(args, n)}" for n in rows) + f" --max-tokens {args.max_tokens}"
    write_json_atomic(args.out, {"command": command, "text": "wikitext2 test (wiki.test.raw)", "rows": rows})


if __name__ == "__main__":
    main()
