"""Detection cost on SmolLM2-135M: one detection iteration / one plain forward, cached / first load.

    python bench/detect.py                      # writes bench/results/detect.json

* ``iteration_ratio``: median time of one iteration of the default detection method
  (``run_detection`` with ``max_iter=1``: trace hooks, forward, super activation search,
  attribution of every rise and fall, rank of each weight found) over the median time of one plain
  ``model(**inputs, use_cache=False)`` on the same encoded prompt. ``paper_iteration_ratio``: the
  same for ``--method paper``.
* ``verdict``: the verdict's extra evaluations, reported apart: how many forward passes it runs
  over its scored text and its time in forwards-equivalent (its time / one plain forward).
  The two are timed alternately, ``--reps`` times each, after a warm-up; the JSON also has the
  median of the per-pair ratios (steadier on a shared machine). Target <= 1.10.
* ``--verdict-cost MODEL`` (smollm2-135m, gemma3-270m, or big-llama-1b: a random 7B-width Llama of
  5 layers, 1.27B parameters, bfloat16 on disk, with one planted super weight, written by
  ``make_big_model.py``): detect + verdict as ``superweight detect`` runs them, in memory (the big
  one streamed layer by layer: in float32 it did not fit beside the shared machine's other work). ``scored_tokens``: every token the verdict
  ran through the model's head, summed over its rounds, the base, each zeroed set and each null draw
  (a set re-scored on a longer prefix counts its tokens again), over ``text_tokens``;
  ``detect_verdict_over_forward``: detect + verdict time over one plain forward over the verdict
  text; each verdict's label and the tokens it was scored on. Written into
  ``results/detect_verdict.json`` under ``--phase`` (before / after the early-stopping verdict).
* ``load_ratio``: ``load_model("smollm2-135m")`` from a cache folder that already holds the
  converted safetensors, over the first load into a fresh empty cache folder (GGUF
  dequantization + save). Target <= 0.2. Each load runs in its own process, which imports the
  same modules before the clock starts; the whole process time is reported as well.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TARGET_ITER, TARGET_LOAD = 1.10, 0.2


def load_child(cache: str) -> None:
    """In a fresh process: time load_model into ``cache``; print one JSON line."""
    # Imports are not load time (they took ~10 s of a 13 s cached load on the loaded machine):
    # both loads import the same modules before the clock starts; process_s includes them.
    import gguf  # noqa: F401
    import transformers.integrations.ggml  # noqa: F401
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    from superweight.model.load import load_model

    t0 = time.perf_counter()
    lm = load_model("smollm2-135m", cache_dir=cache)
    print(json.dumps({"load_s": time.perf_counter() - t0, "params": sum(p.numel() for p in lm.model.parameters())}))


def timed_load(cache: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--load-child", cache], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"load failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def bench_loads() -> dict:
    with tempfile.TemporaryDirectory(prefix="sw-cache-") as cache:
        first = timed_load(cache)
        cached = timed_load(cache)
    return {"first_load": first, "cached_load": cached, "load_ratio": cached["load_s"] / first["load_s"],
            "load_ratio_process": cached["process_s"] / first["process_s"]}


def bench_iteration(reps: int) -> dict:
    import torch

    from superweight.find.loop import DEFAULT_PROMPT, run_detection
    from superweight.find.runner import encode_prompt
    from superweight.model.load import load_model
    from superweight.find.runner import InMemoryRunner

    lm = load_model("smollm2-135m")
    inputs = encode_prompt(lm.tokenizer, DEFAULT_PROMPT)
    runner = InMemoryRunner(lm.model, lm.arch)

    def forward() -> None:
        with torch.no_grad():
            lm.model(**inputs, use_cache=False)

    fns = {"forward": forward, "iteration": lambda: run_detection(runner, [inputs], "trace", max_iter=1),
           "paper_iteration": lambda: run_detection(runner, [inputs], "paper", max_iter=1)}
    for fn in list(fns.values()) * 2:
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(i / f for i, f in zip(times["iteration"], times["forward"]))
    found = run_detection(runner, [inputs], "trace", max_iter=1)[0].found
    return {"tokens": int(inputs["input_ids"].shape[-1]), "reps": reps, "forward_s": med["forward"],
            "iteration_s": med["iteration"], "iteration_ratio": med["iteration"] / med["forward"],
            "iteration_ratio_paired_median": paired, "paper_iteration_ratio": med["paper_iteration"] / med["forward"],
            "torch_threads": torch.get_num_threads(), "found_first_iteration": [list(s.key) for s in found],
            "verdict": bench_verdict(lm, med["forward"]), "notes": lm.notes}


def bench_verdict(lm, forward_s: float, tokens: int = 1024) -> dict:
    """One verdict on the default method's full result, in forwards-equivalent of the prompt."""
    from superweight.find.loop import detect
    from superweight.eval.text import load_text
    from superweight.find.verdict import judge

    result = detect(lm.model, lm.tokenizer, arch=lm.arch)
    t0 = time.perf_counter()
    forwards = judge(lm.model, lm.arch, lm.tokenizer, result, load_text("wiki-intros"), tokens)
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "text_forwards": forwards, "seconds": seconds,
            "forwards_equivalent": seconds / forward_s, "findings": len(result.super_weights)}


BIG = "big-llama-1b"  # the synthetic >= 1B Llama (bench/make_big_model.py, 1.27B), built once under --big-dir


def big_model(folder: Path) -> Path:
    """A random 7B-width Llama of 5 layers (1.27B parameters, bfloat16 on disk) with one planted super
    weight (layer 2, row 3968, col 7003): written once by ``bench/make_big_model.py``, then reused."""
    if not (folder / "superweight_planted.json").exists():
        sys.path.insert(0, str(ROOT))
        import make_big_model

        make_big_model.main(["--size-gb", "2.2", "--out", str(folder)])
    return folder


def cost_figures(j, forwards: list[float], t0: float, t1: float, t2: float) -> dict:
    """The judge's tokens over its text, and detect (t0-t1) + verdict (t1-t2) over the median forward
    (None with no forward timed: ``--reps 0``)."""
    forward_s = statistics.median(forwards) if forwards else None
    return {"text_tokens": j.tokens, "windows": len(j.spans), "tokens_per_pass": j.per_pass, "scored_tokens": j.scored,
            "scored_over_text": j.scored / j.tokens, "forward_s": forward_s, "forwards_s": forwards, "detect_s": t1 - t0,
            "verdict_s": t2 - t1, "detect_verdict_over_forward": (t2 - t0) / forward_s if forward_s else None}


def verdict_rows(result) -> dict:
    """Each verdict (label, ratio, the tokens it was scored on) and each weight's label."""
    return {"verdicts": [{"target": v.target, "weights": v.weights, "label": v.label, "ppl_ratio": v.ppl_ratio,
                          "null_ppl_ratios": v.null_ppl_ratios, "tokens": getattr(v, "scored", v.tokens),
                          "null_tokens": getattr(v, "null_scored", [v.tokens] * len(v.null_ppl_ratios))}
                         for v in result.verdicts],
            "labels": {str(sw.key): sw.verdict for sw in result.super_weights}}


def bench_verdict_cost(name: str, big_dir: Path, reps: int = 3) -> dict:
    """Detect + verdict on ``name`` as ``superweight detect`` runs them (default method, wiki-intros,
    1,024 tokens): the tokens the verdict scored (base, every zeroed set and null draw) over its text
    length, each verdict's label and tokens, and detect + verdict time over one plain forward over the
    verdict text (the median of ``reps``: one before detect, the others after the verdict)."""
    import torch

    from superweight.eval.perplexity import perplexity_windows
    from superweight.eval.text import load_text
    from superweight.find.loop import detect
    from superweight.find.verdict import Judge, judge_with
    from superweight.model.load import load_model

    if name == BIG:
        return bench_streamed_verdict_cost(big_model(big_dir), reps)
    lm = load_model(name)
    text = load_text("wiki-intros")
    stream, spans, _, _ = perplexity_windows(lm.model, lm.tokenizer, text, max_tokens=1024)
    ids = stream[: spans[0][1]].unsqueeze(0)  # the verdict's first (here: only) window

    def forward() -> float:
        with torch.no_grad():
            f0 = time.perf_counter()
            lm.model(input_ids=ids, use_cache=False)
            return time.perf_counter() - f0

    forwards = [forward()]  # one before detect, the rest after the verdict (the load moves on a shared machine)
    t0 = time.perf_counter()
    result = detect(lm.model, lm.tokenizer, arch=lm.arch, model_name=name)
    t1 = time.perf_counter()
    j = Judge(lm.model, lm.arch, lm.tokenizer, text, 1024)  # the code before the rounds scored its base here
    judge_with(j, result)
    t2 = time.perf_counter()
    forwards += [forward() for _ in range(reps - 1)]
    return {"model": name, "params": sum(p.numel() for p in lm.model.parameters()), "dtype": str(lm.model.dtype),
            **cost_figures(j, forwards, t0, t1, t2),
            **verdict_rows(result), "notes": lm.notes}


def bench_streamed_verdict_cost(folder: Path, reps: int = 3) -> dict:
    """``bench_verdict_cost`` of a checkpoint read layer by layer (``detect --stream``: what a model that
    does not fit in memory gets; this 1.27B one, 5.4 GB in float32, did not on the shared machine):
    detection streamed, then the streamed judge; the baseline is one streamed pass over the verdict
    text (every layer read, the head applied)."""
    from superweight.eval.perplexity import perplexity_windows
    from superweight.eval.streamed import window_nlls
    from superweight.eval.text import load_text
    from superweight.find.streamed import StreamedJudge, stream_detect
    from superweight.find.verdict import judge_with
    from superweight.model.streamed import StreamedModel, load_tokenizer

    text = load_text("wiki-intros")
    sm = StreamedModel(folder, "float32")
    try:
        tok = load_tokenizer(sm.ckpt.folder)
        stream, spans, _, _ = perplexity_windows(sm.model, tok, text, max_tokens=1024)
        window = [(stream[b:e], f - b) for b, e, f in spans]

        def forward() -> float:
            f0 = time.perf_counter()
            window_nlls(sm, window, [[]])
            return time.perf_counter() - f0

        forwards = [forward()] if reps else []
        t0 = time.perf_counter()
        result = stream_detect(folder, model_name=BIG)
        t1 = time.perf_counter()
        j = StreamedJudge(sm, tok, text, 1024)
        judge_with(j, result)
        t2 = time.perf_counter()
        forwards += [forward() for _ in range(reps - 1)]
    finally:
        sm.close()
    return {"model": BIG, "streamed": True, "params": sum(p.numel() for p in sm.model.parameters()), "dtype": "torch.float32",
            **cost_figures(j, forwards, t0, t1, t2),
            **verdict_rows(result)}


def write_verdict_cost(out: Path, phase: str, name: str, entry: dict, command: str) -> None:
    """Merge one model's figures into ``out`` under ``phase`` (before / after)."""
    from superweight.core.files import write_json_atomic

    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault(phase, {})[name] = {**entry, "command": command, "torch_threads": __import__("torch").get_num_threads(),
                                       "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]}}
    write_json_atomic(out, data)


def summarize(out: Path) -> dict:
    """``summary`` of ``out`` from its phases: each model's tokens over the text and detect + verdict over
    one forward in each phase, and whether every phase gave every finding the same label."""
    from superweight.core.files import write_json_atomic

    data = json.loads(out.read_text())
    phases = [k for k, v in data.items() if k not in ("code", "summary") and isinstance(v, dict)]
    summary = {}
    for name in sorted({m for ph in phases for m in data[ph]}):
        rows = {ph: data[ph][name] for ph in phases if name in data[ph]}
        summary[name] = {**{ph: {k: r.get(k) for k in ("scored_tokens", "scored_over_text", "detect_verdict_over_forward")}
                            for ph, r in rows.items()},
                         "labels_unchanged": len({json.dumps(r["labels"], sort_keys=True) for r in rows.values()}) == 1}
    data["summary"] = summary
    write_json_atomic(out, data)
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "detect.json")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--skip-loads", action="store_true", help="only the iteration / forward ratio")
    ap.add_argument("--load-child", help=argparse.SUPPRESS)
    ap.add_argument("--verdict-cost", metavar="MODEL", help=f"only the verdict's cost on MODEL (smollm2-135m, gemma3-270m, {BIG})")
    ap.add_argument("--phase", default="after", help="the key the verdict cost is written under (before / after)")
    ap.add_argument("--verdict-out", type=Path, default=ROOT / "results" / "detect_verdict.json")
    ap.add_argument("--verdict-reps", type=int, default=3, help="plain forwards timed for the verdict cost (0: none, no wall ratio)")
    ap.add_argument("--big-dir", type=Path, default=Path(tempfile.gettempdir()) / "sw-big-llama-1b")
    ap.add_argument("--summary", action="store_true", help="only write the summary of --verdict-out from its phases")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.load_child:
        load_child(args.load_child)
        return {}
    command = "python bench/detect.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.summary:
        summary = summarize(args.verdict_out)
        print(json.dumps(summary, indent=1))
        return summary
    if args.verdict_cost:
        entry = bench_verdict_cost(args.verdict_cost, args.big_dir, args.verdict_reps)
        write_verdict_cost(args.verdict_out, args.phase, args.verdict_cost, entry, command)
        print(json.dumps({k: entry[k] for k in ("scored_over_text", "detect_verdict_over_forward", "labels")}, indent=1))
        return entry
    result = {**bench_iteration(args.reps), **({} if args.skip_loads else bench_loads())}
    result["targets"] = {"iteration_ratio": TARGET_ITER, "load_ratio": TARGET_LOAD}
    result["machine"] = {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]}
    result["command"] = "python bench/detect.py " + " ".join(argv if argv is not None else sys.argv[1:])
    from superweight.core.files import write_json_atomic

    write_json_atomic(args.out, result)
    keys = ("forward_s", "iteration_s", "iteration_ratio", "iteration_ratio_paired_median", "load_ratio")
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=1))
    return result


if __name__ == "__main__":
    main()
