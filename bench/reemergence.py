"""Re-emergence: zero SmolLM2-135M's super weights (detection's creating weights; float weights
dequantized from its Q4_1 GGUF) and continue float training. Does the super activation come back,
through the same coordinate, another weight of the same channel, or another channel; after how
many steps; what happens to perplexity? A control run continues training without zeroing, on the
same tokens, steps and seed (not run in the committed result, for lack of CPU: the not-zeroed
model's own probe at step 0, ``--reference``, is the comparison).

At step 0 and every --every steps (``superweight.train.probe``, whose activation fields are
``superweight.train.emergence.activation_state``, the per-checkpoint measurement of
``superweight emergence``, run on the model in training instead of on saved checkpoints): WikiText-2
and LAMBADA-passage perplexity, the largest residual activation and its top creator, the values of
the zeroed coordinates, and the largest |h| of the super activation's channel over layers and tokens.

    python bench/reemergence.py --runs /tmp/reemerge            # both runs
    python bench/reemergence.py --runs /tmp/reemerge --collect  # -> docs/results/reemergence.json, docs/reemergence.png
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

from superweight.core.files import write_json_atomic  # noqa: E402
from superweight.eval.text import load_wikitext2  # noqa: E402
from superweight.train.loop import TrainConfig, TrainResult, train  # noqa: E402
from superweight.train.probe import Probe, lambada_passages  # noqa: E402

MODEL = "smollm2-135m"
RUNS = ("zeroed", "control")


def findings() -> tuple[list[list[int]], list[list[int]]]:
    """(creating weights, every finding) of detection on SmolLM2."""
    from superweight.find.api import find_super_weights

    result, _ = find_super_weights(MODEL, stream=False)
    every = [[sw.layer, sw.row, sw.col] for sw in result.super_weights]
    return [[sw.layer, sw.row, sw.col] for sw in result.super_weights if sw.role == "creates"], every


def run_all(args) -> None:
    from superweight.model.load import load_model

    creators, every = findings()
    channels = sorted({c[1] for c in every})
    probe = Probe(load_model(MODEL).tokenizer, load_wikitext2(), lambada_passages(args.lambada), args.wikitext_tokens,
                  watch=every, channels=channels)
    for name in RUNS:
        out = args.runs / name
        if (out / "done.json").is_file() or (out / "started").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        (out / "started").touch()
        t = time.time()
        config = TrainConfig(
            init=MODEL, tokenizer=MODEL, seed=args.seed, steps=args.steps, save_every=args.every, seq_len=args.seq_len,
            batch=args.batch, lr=args.lr, warmup=args.warmup, eval_tokens=63, text="wiki-intros", heldout="wikitext2",
            freeze_embeddings=True, save_checkpoints=False, zero=creators if name == "zeroed" else [],
        )
        train(config, out, measure=probe)
        write_json_atomic(out / "done.json", {"seconds": time.time() - t, "zeroed": config.zero, "watched": every,
                                              "channels": channels})
        print(f"{name}: {time.time() - t:.0f} s", flush=True)


def span_peak(measure: dict, first: int, last: int) -> float:
    """The largest residual |h| after layers ``first``..``last`` (any channel)."""
    return max(measure["activation"]["residual_per_layer"][first : last + 1])


def collect(args) -> dict:
    runs = {}
    for name in RUNS:
        path = args.runs / name
        if (path / "done.json").is_file():
            log = TrainResult.load(path / "train_log.json")
            runs[name] = {"config": log.config, "measures": log.measures, "losses": log.losses, "seconds": log.seconds,
                          "done": json.loads((path / "done.json").read_text())}
    reference = json.loads(args.reference.read_text()) if args.reference.is_file() else None
    summary = {}
    if "zeroed" in runs and reference:
        z = runs["zeroed"]["measures"]
        zeroed = runs["zeroed"]["done"]["zeroed"]
        per_layer = reference["activation"]["residual_per_layer"]
        span = [i for i, v in enumerate(per_layer) if v >= max(per_layer) / 2]  # where the original lives
        first, last = span[0], span[-1]
        original = span_peak(reference, first, last)
        summary = {
            "channel": runs["zeroed"]["done"]["channels"][0], "zeroed": zeroed, "span": [first, last],
            "original": {"span_peak": original, "residual_max": reference["activation"]["residual_max"],
                         "residual_layer": reference["activation"]["residual_layer"], "residual_channel": reference["activation"]["residual_channel"],
                         "wikitext2_ppl": reference["wikitext2_ppl"], "lambada_ppl": reference["lambada_ppl"]},
            "span_peak": [[m["step"], span_peak(m, first, last)] for m in z],
            "channel_peak": [[m["step"], *m["channels"][0]] for m in z],
            "top_creator": [[m["step"], m["activation"]["top"], m["activation"]["top_share"], m["activation"]["top_output"]] for m in z],
            "zeroed_values": [[m["step"], m["watched"]] for m in z],
            "half_back_at_step": next((m["step"] for m in z if m["step"] > 0 and span_peak(m, first, last) >= original / 2), None),
            "wikitext2_ppl": [[m["step"], m["wikitext2_ppl"]] for m in z],
            "lambada_ppl": [[m["step"], m["lambada_ppl"]] for m in z],
        }
    return {"command": "python bench/reemergence.py --runs DIR && python bench/reemergence.py --runs DIR --collect",
            "model": MODEL, "notes": ["SmolLM2-135M float weights are dequantized from its Q4_1 GGUF"],
            "reference": str(args.reference), "threads": 1, "summary": summary, "runs": runs}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    steps = [p[0] for p in s["span_peak"]]
    first, last = s["span"]
    axes[0].plot(steps, [p[1] for p in s["span_peak"]], "o-", color="tab:red", label=f"max |h| after layers {first}-{last}")
    axes[0].plot(steps, [p[1] for p in s["channel_peak"]], "s--", color="tab:orange", label=f"max |h| of channel {s['channel']}, any layer")
    axes[0].axhline(s["original"]["span_peak"], color="black", ls=":", label="not zeroed (step 0)")
    axes[0].set_ylabel("residual |h| (paper prompt)")
    for ax, key in ((axes[1], "wikitext2_ppl"), (axes[2], "lambada_ppl")):
        ax.plot(steps, [p[1] for p in s[key]], "o-", color="tab:red", label="creators zeroed, then trained")
        ax.axhline(s["original"][key], color="black", ls=":", label="not zeroed (step 0)")
        ax.set_ylabel(key.replace("_ppl", " perplexity").replace("wikitext2", "WikiText-2").replace("lambada", "LAMBADA-passage"))
    for ax in axes:
        ax.set_xlabel("float training step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M (dequantized Q4_1 GGUF): its creating super weights zeroed, then trained on")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--wikitext-tokens", type=int, default=508)
    ap.add_argument("--lambada", type=int, default=12)
    ap.add_argument("--collect", action="store_true")
    ap.add_argument("--reference", type=Path, default=None,
                    help="The not-zeroed model's probe at the same settings (bench/qat_arms.py --float-reference "
                         "writes it); default RUNS/float.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "reemergence.json")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "reemergence.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.reference = args.reference or args.runs / "float.json"
    if args.collect:
        result = collect(args)
        write_json_atomic(args.out, result)
        plot(result, args.png)
        print(json.dumps(result["summary"], indent=1))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
