"""``eval --stream`` against the in-memory ``eval``, on the real models.

    python bench/stream_eval.py        # -> bench/results/stream_eval.json (~4 min on 2 CPUs)

For each real model of the dev set (float weights dequantized from GGUF files: every baseline is that
of an already-quantized model): perplexity on the first ``--tokens`` tokens of the offline Wikipedia
introductions and the zero-shot ``--tasks`` on their first ``--limit`` documents, in memory
(``experiments.run_eval``) and streamed from the safetensors copy the first load wrote
(``stream_ablate.stream_eval``: every window and request batch through each layer read). Records
whether perplexity and every task result are the same numbers, and both wall times.
"""
from __future__ import annotations

from pathlib import Path

from streamed_pair import command, in_memory_and_streamed, task_list, task_options, write_results

ROOT = Path(__file__).resolve().parent
MODELS = ("smollm2-135m", "gemma3-270m")


def run(name: str, tokens: int, tasks: list[str], limit: int) -> dict:
    import superweight as sw
    from superweight.prove.experiments import AblationConfig, run_eval
    from superweight.prove.streamed import stream_eval

    lm = sw.load_model(name)

    def config() -> AblationConfig:
        return AblationConfig(ppl="wiki-intros", tasks=tasks, limit=limit, max_tokens=tokens)

    mem, streamed, times = in_memory_and_streamed(lm, lambda: run_eval(lm, config()),
                                                  lambda folder: stream_eval(folder, config()))
    return {"model": name, "notes": lm.notes + streamed.notes, "tokens": streamed.ppl_tokens,
            "ppl_in_memory_and_streamed": [mem.ppl, streamed.ppl], "same_ppl": mem.ppl == streamed.ppl,
            "same_tasks": mem.tasks == streamed.tasks,
            "accuracy": {t: r.acc for t, r in streamed.tasks.items()},
            **times}


def main(argv: list[str] | None = None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    task_options(ap, limit=100)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "stream_eval.json")
    args = ap.parse_args(argv)
    tasks = task_list(args.tasks)
    out = {"command": command("stream_eval.py", argv), "text": "wiki-intros", "tasks": tasks, "limit": args.limit,
           "models": [run(m, args.tokens, tasks, args.limit) for m in MODELS]}
    return write_results(args.out, out, ("model", "same_ppl", "same_tasks", "ppl_in_memory_and_streamed", "in_memory_s",
                                         "streamed_s"))


if __name__ == "__main__":
    main()
