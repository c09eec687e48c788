"""The synthetic hard cases on every architecture: is each plant as designed, is detection exact.

    python bench/detect_archs.py            # -> docs/results/detect_archs.json (~30 s on 2 CPUs)

``superweight.testing.synthetic.HARD_CASES`` (a weak spike, two creating layers, a late cancelling layer,
one column feeding three rows, a super activation off the first token, two independent ones, none)
are built for pre-norm dense models. On each of the 42 architectures (32 dense, 10 mixtures of experts;
tiny random models of their real config classes) this records whether the case can be built there
(the weak spike is sized from dense down-projection inputs, which Mixtral, Phi-MoE, Qwen3-MoE, OLMoE
and Granite-MoE lack; their plants go into expert 0, those of an MoE with a dense first layer or a
shared expert into that dense MLP), and on the 9 classes with no registered spec
(``synthetic.UNREGISTERED``: the spec read from the model), whether the plant did what the
case's answer says
(``HardCase.as_designed``: each planted weight zeroed, the residual stream read after its layer)
and whether the default method found exactly the answer's creating and cancelling weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run() -> dict:
    import superweight as sw
    from superweight.model.arch import SUPPORTED
    from superweight.testing.synthetic import HARD_CASES, UNREGISTERED, byte_tokenizer, hard_case

    tok, rows = byte_tokenizer(), []
    for arch in [*SUPPORTED, *UNREGISTERED]:
        for name in HARD_CASES:
            try:
                case = hard_case(name, arch)
            except (sw.SuperweightError, AttributeError) as exc:  # a builder that needs a dense down-projection
                rows.append({"arch": arch, "registered": arch in SUPPORTED, "case": name, "built": False, "error": f"{type(exc).__name__}: {exc}"[:200]})
                print(f"{arch:22s} {name:22s} not built: {exc}"[:120], flush=True)
                continue
            problems = case.as_designed(tok)
            result = sw.detect(case.model, tok)
            creates = sorted(s.coord for s in result.super_weights if s.role == "creates")
            cancels = sorted(s.coord for s in result.super_weights if s.role == "cancels")
            exact = creates == sorted(map(tuple, case.creates)) and cancels == sorted(map(tuple, case.cancels))
            rows.append({"arch": arch, "registered": arch in SUPPORTED, "case": name, "built": True, "as_designed": not problems, "problems": problems, "exact": exact,
                         "creates": [list(c) for c in creates], "cancels": [list(c) for c in cancels]})
            print(f"{arch:22s} {name:22s} {'as designed' if not problems else 'NOT as designed':16s} "
                  f"{'exact' if exact else 'differs'}", flush=True)
    built = [r for r in rows if r["built"]]
    designed = [r for r in built if r["as_designed"]]
    def counts(rs: list[dict]) -> dict:
        built = [r for r in rs if r["built"]]
        designed = [r for r in built if r["as_designed"]]
        return {"cases": len(rs), "built": len(built), "as_designed": len(designed),
                "exact_where_as_designed": sum(r["exact"] for r in designed),
                "exact_where_not": sum(r["exact"] for r in built if not r["as_designed"])}

    return {"rows": rows, **counts(rows), "registered": counts([r for r in rows if r["registered"]]),
            "read_from_the_model": counts([r for r in rows if not r["registered"]])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "detect_archs.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = {"command": "python bench/detect_archs.py " + " ".join(sys.argv[1:] if argv is None else argv), **run()}
    out["seconds"] = time.perf_counter() - t0
    from superweight.core.files import write_json_atomic

    write_json_atomic(args.out, out)
    print(json.dumps({k: out[k] for k in ("cases", "built", "as_designed", "exact_where_as_designed", "exact_where_not",
                                           "registered", "read_from_the_model")}))
    return out


if __name__ == "__main__":
    main()
