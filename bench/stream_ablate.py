"""``ablate --stream`` against the in-memory ablation, on the real models.

    python bench/stream_ablate.py        # -> bench/results/stream_ablate.json (~12 min on 2 CPUs)

For each real model of the dev set (float weights dequantized from GGUF files: every baseline is that
of an already-quantized model), the default detection's super weights are ablated in memory
(``experiments.run_ablation``) and then streamed from the safetensors copy the first load wrote
(``stream_ablate.stream_ablation``): every condition's perplexity (the default eight scales included)
on the first ``--tokens`` tokens of WikiText-2 (the offline Wikipedia introductions without
``../shared``), the zero-shot ``--tasks`` on their first ``--limit`` documents (every condition but the
scales), and the stopword shift on 50 LAMBADA contexts. Records whether every perplexity, every task
result and the stopword statistics are the same numbers, the largest stopword-probability difference,
both wall times and the passes the streamed run made over the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

from streamed_pair import command, in_memory_and_streamed, perplexity_text, task_list, task_options, write_results

ROOT = Path(__file__).resolve().parent
MODELS = ("smollm2-135m", "gemma3-270m")


def run(name: str, tokens: int, text: str, tasks: list[str], limit: int) -> dict:
    import superweight as sw
    from superweight.prove.experiments import AblationConfig, run_ablation
    from superweight.prove.streamed import stream_ablation

    lm = sw.load_model(name)
    found = sw.detect(lm.model, lm.tokenizer, arch=lm.arch).super_weights

    def config() -> AblationConfig:
        return AblationConfig(ppl=text, tasks=tasks, limit=limit, scale_tasks=[], max_tokens=tokens)

    mem, streamed, times = in_memory_and_streamed(lm, lambda: run_ablation(lm, found, config()),
                                                  lambda folder: stream_ablation(folder, found, config()))
    ppl = {n: [mem.conditions[n].ppl, c.ppl] for n, c in streamed.conditions.items()}
    stop = max(abs(mem.stopwords[c][k] - streamed.stopwords[c][k])
               for c in ("original", "zero_super_weights") for k in ("stopword_prob", "other_prob", "target_prob"))
    return {"model": name, "notes": lm.notes + streamed.notes, "super_weights": [[s.layer, s.row, s.col] for s in found],
            "tokens": mem.conditions["original"].ppl_tokens, "same_ppl": all(a == b for a, b in ppl.values()),
            "same_tasks": all(c.tasks == mem.conditions[n].tasks for n, c in streamed.conditions.items()),
            "same_stopwords": (streamed.stopwords, streamed.top5) == (mem.stopwords, mem.top5),
            "ppl_in_memory_and_streamed": ppl, "max_abs_stopword_prob_difference": stop,
            "accuracy_streamed": {n: {t: r.acc for t, r in c.tasks.items()} for n, c in streamed.conditions.items()
                                  if c.tasks},
            "stopwords": streamed.stopwords, "top5": streamed.top5,
            **times}


def main(argv: list[str] | None = None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    task_options(ap, limit=40)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "stream_ablate.json")
    args = ap.parse_args(argv)
    tasks = task_list(args.tasks)
    text = perplexity_text()
    out = {"command": command("stream_ablate.py", argv), "text": text, "tasks": tasks, "limit": args.limit,
           "models": [run(m, args.tokens, text, tasks, args.limit) for m in MODELS]}
    return write_results(args.out, out, ("model", "same_ppl", "same_tasks", "same_stopwords", "in_memory_s", "streamed_s"))


if __name__ == "__main__":
    main()
