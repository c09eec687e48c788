"""Re-emergence: zero SmolLM2-135M's super weights (detection's creating weights; float weights
dequantized from its Q4_1 GGUF) and continue float training. Does the super activation come back,
through the same coordinate, another weight of the same channel, or another channel; after how
many steps; what happens to perplexity? A control run continues training without zeroing, on the
same tokens, steps and seed.

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


def came_back(measures: list[dict], channel: int, level: float) -> int | None:
    """The first step at which the channel's largest |h| reaches ``level`` again."""
    for m in measures:
        if m["step"] > 0 and m["channels"][0][0] >= level and m["activation"]["residual_channel"] == channel:
            return m["step"]
    return None


def collect(args) -> dict:
    runs = {}
    for name in RUNS:
        path = args.runs / name
        if (path / "done.json").is_file():
            log = TrainResult.load(path / "train_log.json")
            runs[name] = {"config": log.config, "measures": log.measures, "losses": log.losses, "seconds": log.seconds,
                          "done": json.loads((path / "done.json").read_text())}
    summary = {}
    if "zeroed" in runs and "control" in runs:
        z, c = runs["zeroed"]["measures"], runs["control"]["measures"]
        channel = runs["zeroed"]["done"]["channels"][0]
        original = c[0]["channels"][0][0]
        summary = {
            "channel": channel, "original_channel_peak": original,
            "zeroed_channel_peak": [[m["step"], m["channels"][0][0]] for m in z],
            "control_channel_peak": [[m["step"], m["channels"][0][0]] for m in c],
            "zeroed_top_creator": [[m["step"], m["activation"]["top"], m["activation"]["top_share"]] for m in z],
            "zeroed_values": [[m["step"], m["watched"]] for m in z],
            "half_back_at_step": came_back(z, channel, original / 2),
            "wikitext2_ppl": {"zeroed": [[m["step"], m["wikitext2_ppl"]] for m in z],
                              "control": [[m["step"], m["wikitext2_ppl"]] for m in c]},
            "lambada_ppl": {"zeroed": [[m["step"], m["lambada_ppl"]] for m in z],
                            "control": [[m["step"], m["lambada_ppl"]] for m in c]},
        }
    return {"command": "python bench/reemergence.py --runs DIR && python bench/reemergence.py --runs DIR --collect",
            "model": MODEL, "notes": ["SmolLM2-135M float weights are dequantized from its Q4_1 GGUF"],
            "threads": 1, "summary": summary, "runs": runs}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, color in zip(RUNS, ("tab:red", "tab:blue")):
        run = result["runs"].get(name)
        if not run:
            continue
        ms = run["measures"]
        steps = [m["step"] for m in ms]
        axes[0].plot(steps, [m["channels"][0][0] for m in ms], color=color, marker="o", label=name)
        axes[1].plot(steps, [m["wikitext2_ppl"] for m in ms], color=color, marker="o", label=name)
        axes[2].plot(steps, [m["lambada_ppl"] for m in ms], color=color, marker="o", label=name)
    channel = result["summary"].get("channel", "?")
    axes[0].set_ylabel(f"largest |h| of channel {channel} (paper prompt)")
    axes[1].set_ylabel("WikiText-2 perplexity")
    axes[2].set_ylabel("LAMBADA-passage perplexity")
    for ax in axes:
        ax.set_xlabel("float training step")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle("SmolLM2-135M (dequantized Q4_1 GGUF): super weights zeroed, then trained on, vs not zeroed")
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
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "reemergence.json")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "reemergence.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.collect:
        result = collect(args)
        write_json_atomic(args.out, result)
        plot(result, args.png)
        print(json.dumps(result["summary"], indent=1))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
