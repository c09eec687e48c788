"""Ternary QAT continued from SmolLM2-135M (dequantized from its Q4_1 GGUF): does keeping the super
weights in full precision help? Four arms, each on the same tokens, steps and seeds:

  ternary  (a) every decoder linear BitNet b1.58 ternary
  super    (b) ternary, detection's super weights of SmolLM2 kept in full precision
  random   (c) ternary, as many random weights of the same down-projections kept (drawn per seed)
  lines    (d) ternary, the super weights' whole down-projection rows and columns kept

At step 0 (post-training quantization, no training yet) and every --every steps: perplexity on
WikiText-2 test windows and on LAMBADA passages, the largest residual activation and its creator,
and the value the forward uses at the super weights' coordinates (``superweight.train.probe``).

    python bench/qat_arms.py --runs /tmp/qat --arms ternary,super,random,lines --seeds 0,1   # the runs
    python bench/qat_arms.py --runs /tmp/qat --collect   # -> docs/results/qat_arms.json, docs/qat_arms.png

Runs already finished under --runs are not rerun, so several processes can share the arms.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from superweight.core.files import write_json_atomic  # noqa: E402
from superweight.eval.text import load_wikitext2  # noqa: E402
from superweight.train.loop import TrainConfig, TrainResult, train  # noqa: E402
from superweight.train.probe import Probe, lambada_passages  # noqa: E402

ARMS = ("ternary", "super", "random", "lines")
MODEL = "smollm2-135m"
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # Student t, two-sided 95%, by degrees of freedom


def super_weights() -> list[list[int]]:
    """Detection's findings on SmolLM2 (trace method, no verdict needed to keep them)."""
    from superweight.find.api import find_super_weights

    result, _ = find_super_weights(MODEL, stream=False)
    return [list(c) for c in result.coords]


def arm_config(arm: str, seed: int, keep: list[list[int]], args) -> TrainConfig:
    extra = {"ternary": {}, "super": {"keep": keep}, "random": {"keep": keep, "keep_random": True},
             "lines": {"keep": keep, "keep_lines": True}}[arm]
    return TrainConfig(
        init=MODEL, tokenizer=MODEL, bitnet=True, seed=seed, steps=args.steps, save_every=args.every,
        seq_len=args.seq_len, batch=args.batch, lr=args.lr, warmup=args.warmup, eval_tokens=63,
        text="wiki-intros", heldout="wikitext2", freeze_embeddings=True, save_checkpoints=False, **extra,
    )


def make_probe(keep: list[list[int]], args) -> Probe:
    from superweight.model.load import load_model

    tokenizer = load_model(MODEL).tokenizer
    return Probe(tokenizer, load_wikitext2(), lambada_passages(args.lambada), args.wikitext_tokens, watch=keep)


def run_all(args) -> None:
    keep = super_weights()
    probe = make_probe(keep, args)
    for arm in [a for a in args.arms.split(",") if a]:
        for seed in map(int, args.seeds.split(",")):
            out = args.runs / f"{arm}-s{seed}"
            if (out / "done.json").is_file() or (out / "started").exists():
                continue
            out.mkdir(parents=True, exist_ok=True)
            (out / "started").touch()
            t = time.time()
            train(arm_config(arm, seed, keep, args), out, measure=probe)
            write_json_atomic(out / "done.json", {"seconds": time.time() - t, "keep": keep})
            print(f"{arm} seed {seed}: {time.time() - t:.0f} s", flush=True)
    if args.float_reference and not (args.runs / "float.json").is_file():
        from superweight.model.load import load_model

        lm = load_model(MODEL)
        write_json_atomic(args.runs / "float.json", probe(lm.model.eval(), lm.tokenizer, 0))


def mean_ci(values: list[float]) -> dict:
    """Mean and Student-t 95% interval across seeds."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": m, "n": len(values), "ci95": None}
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": m, "n": len(values), "ci95": [m - half, m + half]}


def extra_bits(arm: str, run: dict) -> int:
    """Bits stored beyond the ternary codes: a kept entry costs its FP16 value and a 32-bit index;
    a kept whole row or column costs its FP16 values and one 32-bit line index."""
    kept = run["config"]["keep"]
    if arm == "lines":
        lines = {(c[0], "r", c[1]) for c in run["done"]["keep"]} | {(c[0], "c", c[2]) for c in run["done"]["keep"]}
        return 16 * len(kept) + 32 * len(lines)
    return (16 + 32) * len(kept)


def collect(args) -> dict:
    runs = {}
    for path in sorted(args.runs.glob("*-s*/done.json")):
        log = TrainResult.load(path.parent / "train_log.json")
        runs[path.parent.name] = {"config": log.config, "measures": log.measures, "losses": log.losses,
                                  "seconds": log.seconds, "done": json.loads(path.read_text())}
    arms = {}
    for arm in ARMS:
        mine = {k: v for k, v in runs.items() if k.startswith(arm + "-")}
        if not mine:
            continue
        last = {k: v["measures"][-1] for k, v in mine.items()}
        first = {k: v["measures"][0] for k, v in mine.items()}
        some = next(iter(mine.values()))
        arms[arm] = {
            "seeds": sorted(v["config"]["seed"] for v in mine.values()),
            "kept_weights": len(some["config"]["keep"]), "extra_bits": extra_bits(arm, some),
            "step0_wikitext2_ppl": mean_ci([m["wikitext2_ppl"] for m in first.values()]),
            "step0_lambada_ppl": mean_ci([m["lambada_ppl"] for m in first.values()]),
            "final_wikitext2_ppl": mean_ci([m["wikitext2_ppl"] for m in last.values()]),
            "final_lambada_ppl": mean_ci([m["lambada_ppl"] for m in last.values()]),
            "final_massive": mean_ci([m["activation"]["massive"] for m in last.values()]),
        }
    diffs = paired_differences(runs)
    out = {"command": "python bench/qat_arms.py --runs DIR --arms ternary,super,random,lines --seeds 0,1 && "
                      "python bench/qat_arms.py --runs DIR --collect",
           "model": MODEL, "notes": ["SmolLM2-135M float weights are dequantized from its Q4_1 GGUF"],
           "setup": {k: some_config(runs).get(k) for k in ("steps", "save_every", "seq_len", "batch", "lr", "warmup",
                                                           "weight_decay", "freeze_embeddings", "text")},
           "threads": 1, "arms": arms, "paired_vs_ternary": diffs, "runs": runs}
    if (args.runs / "float.json").is_file():
        out["float_reference"] = json.loads((args.runs / "float.json").read_text())
    return out


def some_config(runs: dict) -> dict:
    return next(iter(runs.values()))["config"] if runs else {}


def paired_differences(runs: dict) -> dict:
    """Per arm: final perplexity minus arm (a)'s on the same seed (same tokens), mean and 95% CI."""
    out = {}
    for arm in ARMS[1:]:
        for metric in ("wikitext2_ppl", "lambada_ppl"):
            d = [runs[f"{arm}-s{s}"]["measures"][-1][metric] - runs[f"ternary-s{s}"]["measures"][-1][metric]
                 for s in range(10) if f"{arm}-s{s}" in runs and f"ternary-s{s}" in runs]
            if d:
                out.setdefault(arm, {})[metric] = mean_ci(d)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = dict(zip(ARMS, ("tab:red", "tab:blue", "tab:gray", "tab:green")))
    for name, run in result["runs"].items():
        arm = name.rsplit("-s", 1)[0]
        steps = [m["step"] for m in run["measures"]]
        kw = dict(color=colors[arm], label=arm if name.endswith("-s0") else None, marker="o", ms=3)
        axes[0].plot(steps, [m["wikitext2_ppl"] for m in run["measures"]], **kw)
        axes[1].plot(steps, [m["lambada_ppl"] for m in run["measures"]], **kw)
        axes[2].plot(steps, [m["activation"]["residual_max"] for m in run["measures"]], **kw)
    ref = result.get("float_reference")
    for ax, key in zip(axes, ("wikitext2_ppl", "lambada_ppl", None)):
        if ref:
            ax.axhline(ref[key] if key else ref["activation"]["residual_max"], color="black", ls=":", label="float SmolLM2")
        ax.set_yscale("log")
        ax.set_xlabel("QAT step")
    axes[0].set_ylabel("WikiText-2 perplexity")
    axes[1].set_ylabel("LAMBADA-passage perplexity")
    axes[2].set_ylabel("largest residual |h| (paper prompt)")
    axes[0].legend()
    fig.suptitle("Ternary QAT from SmolLM2-135M (dequantized Q4_1 GGUF): one line per arm and seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--wikitext-tokens", type=int, default=1016)
    ap.add_argument("--lambada", type=int, default=16)
    ap.add_argument("--float-reference", action="store_true", help="Also probe the float model once.")
    ap.add_argument("--collect", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "qat_arms.json")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "qat_arms.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.collect:
        result = collect(args)
        write_json_atomic(args.out, result)
        plot(result, args.png)
        print(json.dumps({"arms": result["arms"], "paired_vs_ternary": result["paired_vs_ternary"]}, indent=1))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
