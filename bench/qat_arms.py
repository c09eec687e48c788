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
    python bench/qat_arms.py --runs /tmp/qat2 --collect --merge docs/results/qat_arms.json
        # the runs under /tmp/qat2 added to an earlier JSON whose runs folder is gone

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


def extra_bits(arm: str, config: dict) -> int:
    """Bits stored beyond the ternary codes: a kept entry costs its FP16 value and a 32-bit index;
    kept whole rows and columns cost their FP16 values and a 32-bit index per line."""
    kept = config["keep"]
    if arm == "lines":
        rows = {(c[0], c[1]) for c in kept if sum(1 for d in kept if d[0] == c[0] and d[1] == c[1]) > 1}
        cols = {(c[0], c[2]) for c in kept if sum(1 for d in kept if d[0] == c[0] and d[2] == c[2]) > 1}
        return 16 * len(kept) + 32 * (len(rows) + len(cols))
    return (16 + 32) * len(kept)


SETUP = ("steps", "save_every", "seq_len", "batch", "lr", "warmup", "weight_decay", "grad_clip", "eval_tokens",
         "freeze_embeddings", "text", "heldout", "init", "bitnet")  # what every arm and seed must share


def load_runs(folder: Path) -> dict:
    """Every run under ``folder`` with a training log that measured at least once (finished or
    not: ``done``)."""
    runs = {}
    for path in sorted(folder.glob("*-s*/train_log.json")):
        log = TrainResult.load(path)
        if not log.measures:
            continue
        done = path.parent / "done.json"
        runs[path.parent.name] = {"config": log.config, "measures": log.measures, "losses": log.losses,
                                  "seconds": log.seconds, "done": done.is_file()}
    return runs


def last_step(run: dict) -> int:
    return max(m["step"] for m in run["measures"])


def merge_runs(fresh: dict, earlier: dict) -> tuple[dict, dict]:
    """``fresh`` runs (from --runs) together with an earlier JSON's ``runs``: of two runs with one
    name the one measured further wins (the fresh one on a tie). Returns the runs and what was
    merged: the names taken from the earlier JSON, and for each name present in both, per step both
    measured, ln perplexity of the fresh run minus the earlier one's (how far a rerun of the same
    seed and settings lands from the earlier run: 0 where the arithmetic is the same) and the
    largest activation [earlier, fresh]."""
    runs, taken, reruns = dict(fresh), [], {}
    for name, old in earlier.get("runs", {}).items():
        new = fresh.get(name)
        if new is not None:
            before = {m["step"]: m for m in old["measures"]}
            reruns[name] = {str(m["step"]): {**{k: math.log(m[k]) - math.log(before[m["step"]][k])
                                                for k in ("wikitext2_ppl", "lambada_ppl")},
                                             "residual_max": [before[m["step"]]["activation"]["residual_max"],
                                                              m["activation"]["residual_max"]]}
                            for m in new["measures"] if m["step"] in before}
        if new is None or last_step(old) > last_step(new):
            runs[name] = old
            taken.append(name)
    return dict(sorted(runs.items())), {"runs_from_earlier_json": sorted(taken), "reruns": reruns}


def check_setup(runs: dict) -> dict:
    """The settings every run shares (same tokens, steps and schedule): those of most runs; a run
    with others is an error that names it."""
    setups = {name: {k: r["config"].get(k) for k in SETUP} for name, r in runs.items()}
    if not setups:
        return {}
    common = json.loads(max((json.dumps(s) for s in setups.values()),
                            key=lambda t: sum(json.dumps(s) == t for s in setups.values())))
    odd = {name: {k: v for k, v in s.items() if v != common[k]} for name, s in setups.items() if s != common}
    if odd:
        raise SystemExit(f"runs with other settings than the rest's {common}: {odd}")
    return common


def collect(args) -> dict:
    """Every run with a training log (finished or not: ``done``), with ``--merge``'s runs where the
    runs folder lacks them or measured less far, and per measured step the arms' perplexities across
    the seeds that reached it, and their paired differences from arm (a)."""
    runs, merged = load_runs(args.runs), None
    earlier = json.loads(args.merge.read_text()) if args.merge else {}
    if args.merge:
        runs, merged = merge_runs(runs, earlier)
        merged = {"json": args.merge.name, **merged}
    setup = check_setup(runs)
    steps = sorted({m["step"] for r in runs.values() for m in r["measures"]})
    arms = {}
    for arm in ARMS:
        mine = {k: v for k, v in runs.items() if k.startswith(arm + "-")}
        if not mine:
            continue
        some = next(iter(mine.values()))
        arms[arm] = {"runs": sorted(mine), "finished": sorted(k for k, v in mine.items() if v["done"]),
                     "kept_weights": len(some["config"]["keep"]), "extra_bits": extra_bits(arm, some["config"]),
                     "by_step": {str(s): at_step(mine, s) for s in steps}}
    float_json = args.runs / "float.json"
    reference = json.loads(float_json.read_text()) if float_json.is_file() else earlier.get("float_reference")
    seeds = ",".join(str(s) for s in sorted({r["config"]["seed"] for r in runs.values()}))
    command = (f"python bench/qat_arms.py --runs DIR --arms ternary,super,random,lines --seeds {seeds} --steps 30 "
               "--every 10 --wikitext-tokens 508 --lambada 12 && python bench/qat_arms.py --runs DIR --collect")
    return {"command": command + (" --merge EARLIER.json" if args.merge else ""),
            "model": MODEL, "notes": ["SmolLM2-135M float weights are dequantized from its Q4_1 GGUF"],
            "setup": {k: setup.get(k) for k in SETUP}, "threads": 1, "merged": merged,
            "arms": arms, "paired_vs_ternary": paired_differences(runs, steps),
            "float_reference": reference, "runs": runs}


def at_step(runs: dict, step: int) -> dict:
    """Mean and 95% interval across the runs that measured ``step``."""
    ms = [m for r in runs.values() for m in r["measures"] if m["step"] == step]
    if not ms:
        return {}
    return {"wikitext2_ppl": mean_ci([m["wikitext2_ppl"] for m in ms]), "lambada_ppl": mean_ci([m["lambada_ppl"] for m in ms]),
            "residual_max": mean_ci([m["activation"]["residual_max"] for m in ms])}


def paired_differences(runs: dict, steps: list[int]) -> dict:
    """Per arm and step: ln(perplexity) minus arm (a)'s on the same seed (same tokens), in nats per
    token (negative: better than all-ternary), mean and 95% CI across seeds."""
    def value(name: str, step: int, metric: str) -> float | None:
        return next((m[metric] for m in runs.get(name, {}).get("measures", []) if m["step"] == step), None)

    out: dict = {}
    for arm in ARMS[1:]:
        for step in steps:
            for metric in ("wikitext2_ppl", "lambada_ppl"):
                pairs = [(value(f"{arm}-s{s}", step, metric), value(f"ternary-s{s}", step, metric)) for s in range(10)]
                d = [math.log(a) - math.log(b) for a, b in pairs if a is not None and b is not None]
                if d:
                    out.setdefault(arm, {}).setdefault(str(step), {})[metric] = mean_ci(d)
    return out


def markdown(result: dict) -> str:
    """The docs' table: per step and arm, mean perplexities (seeds), largest |h|, and the paired
    ln-perplexity difference from arm (a) with its 95% interval."""
    def ci(d: dict | None) -> str:
        if not d:
            return ""
        band = f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else " (1 seed)"
        return f"{d['mean']:+.3f}{band}"

    lines = ["| step | arm | seeds | WikiText-2 ppl | LAMBADA ppl | max \\|h\\| | d ln ppl WikiText-2 vs (a) | d ln ppl LAMBADA vs (a) |",
             "|---|---|---|---|---|---|---|---|"]
    steps = sorted({int(s) for a in result["arms"].values() for s, v in a["by_step"].items() if v})
    for step in steps:
        for arm, a in result["arms"].items():
            v = a["by_step"].get(str(step))
            if not v:
                continue
            d = result["paired_vs_ternary"].get(arm, {}).get(str(step), {})
            lines.append(f"| {step} | {arm} | {v['wikitext2_ppl']['n']} | {v['wikitext2_ppl']['mean']:,.0f} | "
                         f"{v['lambada_ppl']['mean']:,.0f} | {v['residual_max']['mean']:,.0f} | "
                         f"{ci(d.get('wikitext2_ppl'))} | {ci(d.get('lambada_ppl'))} |")
    return "\n".join(lines)


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
    ap.add_argument("--merge", type=Path, help="With --collect: also take this earlier JSON's runs where --runs "
                    "lacks them or measured less far (a JSON whose runs folder is gone).")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "qat_arms.json")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "qat_arms.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.collect:
        result = collect(args)
        write_json_atomic(args.out, result)
        plot(result, args.png)
        print(markdown(result))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
