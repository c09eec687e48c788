"""The verdict's stopping rule, calibrated on every model at once: every zeroed set and null draw of
``superweight detect``'s plan scored on the whole verdict text once (the whole-text verdict), then the
rounds replayed on those NLLs under each candidate rule, with the real ``verdict.score_plan``.

    python bench/verdict_rules.py --threads 1 smollm2-135m gemma3-270m big-llama-1b
    # -> bench/results/verdict_rules.json

For each model: each set's damage (mean NLL over the base's) on the first 128, 256, ... tokens with
its plain and finite-population-corrected standard errors (how the near-line sets drift), and for
each rule the tokens it scores (a replayed judge: in memory a set continues from where it stopped and
counts only its new tokens; streamed, every round scores each prefix again and counts it) and whether
every label equals the whole-text verdict's. A replay of a prefix is the slice of the whole-text
NLLs: a causal model's NLL of a token does not depend on the tokens after it (the in-memory judge's
continued NLLs agree with them to float rounding, tests/test_verdict_cache.py). The NLLs of each model
are kept in ``--cache`` (torch files) so a rerun replays without the model.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def dump(name: str, big_dir: Path) -> dict:
    """The plan of ``superweight detect`` on ``name`` and every track's NLLs over the whole text."""
    from superweight.eval.text import load_text
    from superweight.find.verdict_rounds import plan_verdicts

    text = load_text("wiki-intros")
    if name == "big-llama-1b":  # streamed, as bench/detect.py runs it (float32 in memory did not fit)
        import detect as bench_detect
        from superweight.find.streamed import StreamedJudge, stream_detect
        from superweight.model.streamed import StreamedModel, load_tokenizer

        folder = bench_detect.big_model(big_dir)
        sm = StreamedModel(folder, "float32")
        try:
            result = stream_detect(folder, model_name=name)
            j = StreamedJudge(sm, load_tokenizer(sm.ckpt.folder), text, 1024)
            plan = plan_verdicts(j, result)
            base, *nlls = j.token_nlls([[], *[t.weights for t in plan.tracks]], j.per_pass)
        finally:
            sm.close()
    else:
        from superweight.find.loop import detect
        from superweight.find.verdict import Judge
        from superweight.model.load import load_model

        lm = load_model(name)
        result = detect(lm.model, lm.tokenizer, arch=lm.arch, model_name=name)
        j = Judge(lm.model, lm.arch, lm.tokenizer, text, 1024)
        plan = plan_verdicts(j, result)
        base, *nlls = j.token_nlls([[], *[t.weights for t in plan.tracks]], j.per_pass)
    idx = {id(t): i for i, t in enumerate(plan.tracks)}
    qidx = {id(q): i for i, q in enumerate(plan.questions)}
    return {"model": name, "tokens": j.tokens, "per_pass": j.per_pass,
            "tracks": [[[w.layer, w.row, w.col, getattr(w, "expert", None)] for w in t.weights] for t in plan.tracks],
            "questions": [(idx[id(q.a)], None if q.b is None else idx[id(q.b)], q.line, q.at_least,
                           None if q.after is None else qidx[id(q.after)]) for q in plan.questions],
            "entries": [(e.kind, idx[id(e.track)], [idx[id(n)] for n in e.nulls],
                         None if e.collapse is None else qidx[id(e.collapse)], [qidx[id(q)] for q in e.beyond])
                        for e in plan.entries],
            "base": base, "nlls": nlls}


def replay(d: dict, policy: str, full: bool = False, z: float = 4.0, fpc: bool = True) -> dict:
    """``verdict.score_plan`` on the dumped NLLs: ``policy`` memory (continue, CHUNK steps), memory-doubling
    (continue, doubling) or streamed (every prefix again, doubling, all open sets to one prefix)."""
    from superweight.find import verdict as V
    from superweight.find import verdict_rounds as R

    class Replay(V.JudgeBase):
        def __init__(self):
            self.scored, self.tokens, self.n = 0, d["tokens"], d["per_pass"]
            self.nll = {json.dumps(ws): x for ws, x in zip(d["tracks"], d["nlls"])}
            self.nll["[]"] = d["base"]

        @property
        def per_pass(self) -> int:
            return self.n

        def ends(self, scored, full=False):
            if full or policy == "streamed":
                return V.JudgeBase.ends(self, scored, full)
            if policy == "memory":
                return [min(n + V.CHUNK, self.n) for n in scored]
            return [min(max(V.CHUNK, 2 * n), self.n) for n in scored]

        def token_nlls(self, sets, upto, starts=None):
            starts = starts or [0] * len(sets)
            self.scored += sum(upto if policy == "streamed" else upto - s for s in starts)
            return [self.nll[json.dumps([list(w) for w in ws])][s:upto] for ws, s in zip(sets, starts)]

    tracks = [R.Track(ws) for ws in d["tracks"]]
    qs: list = []
    for a, b, line, at_least, after in d["questions"]:
        qs.append(R.Question(tracks[a], None if b is None else tracks[b], line, at_least, None if after is None else qs[after]))
    real_decide, real_z = R.decide, R.Z
    R.Z = z
    if not fpc:
        R.decide = lambda x, line, al, final, y=None, total=None: real_decide(x, line, al, final, y, None)
    try:
        j = Replay()
        V.score_plan(j, R.Plan([], tracks, qs), full)
    finally:
        R.decide, R.Z = real_decide, real_z
    labels = ["no question" if c is None else bool(qs[c].answer) and all(qs[q].answer for q in beyond)
              for _, _, _, c, beyond in d["entries"]]
    return {"scored_tokens": j.scored, "scored_over_text": j.scored / d["tokens"], "labels": labels,
            "track_tokens": [t.scored for t in tracks]}


def drift(d: dict) -> list[dict]:
    """Each set's damage on its first 128, 256, ... tokens: mean, plain and corrected standard errors."""
    from superweight.find.verdict_labels import CHUNK
    from superweight.find.verdict_rounds import estimate

    out = []
    for ws, x in zip(d["tracks"], d["nlls"]):
        dmg = x - d["base"]
        rows = []
        for n in [*range(CHUNK, len(dmg), CHUNK), len(dmg)]:
            mean, se = estimate(dmg[:n])
            _, se_f = estimate(dmg[:n], len(dmg))
            rows.append({"n": n, "ppl_ratio": math.exp(mean), "mean": mean, "se": se, "se_corrected": se_f})
        out.append({"weights": ws, "prefixes": rows})
    return out


RULES = {  # name: (policy, z, finite population correction)
    "memory, continued, 128-token steps, corrected bound (the rule)": ("memory", 4.0, True),
    "memory, same, plain bound": ("memory", 4.0, False),
    "memory, continued, doubling, corrected bound": ("memory-doubling", 4.0, True),
    "memory, same, Z=5": ("memory", 5.0, True),
    "memory, same, Z=6": ("memory", 6.0, True),
    "memory, same, Z=3": ("memory", 3.0, True),
    "streamed (prefixes again, doubling), corrected bound": ("streamed", 4.0, True),
    "streamed, plain bound": ("streamed", 4.0, False),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sw-verdict-rules")
    ap.add_argument("--big-dir", type=Path, default=Path(tempfile.gettempdir()) / "sw-big-llama-1b")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "verdict_rules.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from superweight.core.files import write_json_atomic

    data: dict = {}
    args.cache.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        cached = args.cache / f"{name}.pt"
        t0 = time.perf_counter()
        if cached.exists():
            d = torch.load(cached)
        else:
            d = dump(name, args.big_dir)
            torch.save(d, cached)
        whole = replay(d, "memory", full=True)
        rules = {}
        for rule, (policy, z, fpc) in RULES.items():
            r = replay(d, policy, z=z, fpc=fpc)
            rules[rule] = {**r, "labels_as_whole_text": r["labels"] == whole["labels"]}
        data = json.loads(args.out.read_text()) if args.out.exists() else {}  # read late: another run may have written
        data[name] = {"tokens": d["tokens"], "per_pass": d["per_pass"], "tracks": d["tracks"],
                      "whole_text": whole, "rules": rules, "drift": drift(d), "seconds": time.perf_counter() - t0,
                      "command": "python bench/verdict_rules.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                      "torch_threads": torch.get_num_threads()}
        write_json_atomic(args.out, data)
        print(name, {k: (v["scored_over_text"], v["labels_as_whole_text"]) for k, v in rules.items()})
    return data


if __name__ == "__main__":
    main()
