"""Perplexity loop cost: ``evaluate_perplexity`` tokens/s over a plain transformers loop's.

    python bench/eval.py                      # writes bench/results/eval.json

The baseline is the loop every tutorial writes: for each window, ``model(input_ids,
labels=input_ids).loss`` (transformers' own shift-and-cross-entropy), over exactly the windows
``evaluate_perplexity`` scores (non-overlapping ``--seq-len`` windows of the first ``--tokens``
WikiText-2 tokens, or the wiki-intros text when WikiText-2 is absent). The two are timed
alternately, ``--reps`` times each, after a warm-up; ``ratio`` = our tokens/s / the baseline's
(median times). Target >= 0.95. Both perplexities are reported: they must agree.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.95


def plain_loop(model, ids: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """(perplexity, tokens scored) of the textbook loop over the same non-overlapping windows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), seq_len):
            window = ids[begin : begin + seq_len].unsqueeze(0)
            if window.shape[1] < 2:
                break
            loss = model(input_ids=window, labels=window, use_cache=False).loss
            total += float(loss) * (window.shape[1] - 1)
            count += window.shape[1] - 1
    return math.exp(total / count), count


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "eval.json")
    args = parser.parse_args()

    from superweight.eval import evaluate_perplexity, load_text
    from superweight.eval.perplexity import tokenize_stream
    from superweight.eval.text import wikitext_candidates
    from superweight.model.load import load_model

    lm = load_model(args.model)
    source = "wikitext2" if any(p.is_file() for p in wikitext_candidates()) else "wiki-intros"
    text = load_text(source)
    ids = tokenize_stream(lm.tokenizer, text, args.tokens)
    ours = lambda: evaluate_perplexity(lm.model, lm.tokenizer, text, seq_len=args.seq_len, max_tokens=args.tokens)  # noqa: E731
    plain = lambda: plain_loop(lm.model, ids, args.seq_len)  # noqa: E731
    plain()  # warm-up
    ours_s, plain_s = [], []
    for _ in range(args.reps):
        t, r = timed(ours)
        ours_s.append(t)
        t, (plain_ppl, plain_tokens) = timed(plain)
        plain_s.append(t)
    ours_tps = r.tokens / statistics.median(ours_s)
    plain_tps = plain_tokens / statistics.median(plain_s)
    result = {
        "version": 1,
        "command": f"python bench/eval.py --tokens {args.tokens} --seq-len {args.seq_len} --reps {args.reps}",
        "model": args.model,
        "notes": lm.notes,
        "text": source,
        "seq_len": args.seq_len,
        "tokens_scored": r.tokens,
        "windows": r.windows,
        "threads": torch.get_num_threads(),
        "ours_s": ours_s,
        "plain_s": plain_s,
        "ours_tokens_per_s": ours_tps,
        "plain_tokens_per_s": plain_tps,
        "ratio": ours_tps / plain_tps,
        "target": TARGET,
        "pass": ours_tps / plain_tps >= TARGET,
        "ppl_ours": r.ppl,
        "ppl_plain": plain_ppl,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"ratio {result['ratio']:.3f} (ours {ours_tps:.0f} tok/s, plain {plain_tps:.0f} tok/s; "
          f"ppl {r.ppl:.4f} vs {plain_ppl:.4f}) -> {args.out}")


if __name__ == "__main__":
    main()
