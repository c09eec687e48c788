"""Predict the super weights from the weights alone (``superweight.find.predict``) and score every
predictor against detection's findings on SmolLM2-135M and Gemma-3-270M (float weights dequantized
from their GGUF files), for two target sets: the creating weights (role "creates") and every finding.

Targets are the trace method's findings in docs/results/detect_devset.json (bench/detect_devset.py).

    python bench/predict.py   # -> docs/results/predict.json, docs/predict.png
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from superweight.core.files import write_json_atomic  # noqa: E402
from superweight.find.predict import predict  # noqa: E402
from superweight.model.load import load_model  # noqa: E402

MODELS = ("smollm2-135m", "gemma3-270m")
TOP_STORED = 20  # each ranking's best entries kept in the JSON


def findings(devset: Path) -> dict[str, dict]:
    """Per model: the trace method's findings and the load notes (dequantized from GGUF)."""
    out = {}
    for row in json.loads(devset.read_text())["real"]:
        trace = row["trace"]
        trace = ast.literal_eval(trace) if isinstance(trace, str) else trace  # stored as a repr in that file
        out[row["model"]] = {"super_weights": trace["super_weights"], "notes": row.get("notes", [])}
    return out


def one_model(name: str, found: dict) -> dict:
    lm = load_model(name)
    sws = found["super_weights"]
    creators = [[s["layer"], s["row"], s["col"]] for s in sws if s["role"] == "creates"]
    every = [[s["layer"], s["row"], s["col"]] for s in sws]
    t = time.time()
    sets = {}
    for label, targets in (("creators", creators), ("all_findings", every)):
        sets[label] = predict(lm.model, lm.arch, targets, name=name, top_k=1000).to_dict()
        for r in sets[label]["rankings"]:
            r["top"] = r["top"][:TOP_STORED]  # precision/recall used all 1,000
    return {"model": name, "notes": list(dict.fromkeys([*lm.notes, *found["notes"]])), "layers": lm.arch.num_layers(lm.model),
            "seconds": time.time() - t, "targets": sets}


def summary(models: list[dict]) -> list[dict]:
    rows = []
    for m in models:
        for label, pred in m["targets"].items():
            for r in pred["rankings"]:
                rows.append({"model": m["model"], "targets": label, "predictor": r["predictor"],
                             "best_rank": min(r["target_ranks"]), "median_rank": sorted(r["target_ranks"])[len(r["target_ranks"]) // 2],
                             "recall@10": r["recall"]["10"], "recall@100": r["recall"]["100"],
                             "recall@1000": r["recall"]["1000"], "precision@10": r["precision"]["10"]})
    return rows


def plot(models: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5))
    for ax, m in zip(axes, models):
        pred = m["targets"]["creators"]
        names = [r["predictor"] for r in pred["rankings"]]
        for i, r in enumerate(pred["rankings"]):
            ax.scatter([i] * len(r["target_ranks"]), r["target_ranks"], color="tab:blue", s=14)
        ax.set_yscale("log")
        ax.axhline(10, color="gray", ls=":")
        ax.axhline(1000, color="gray", ls="--")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
        ax.set_ylabel("rank (1 = top score)")
        ax.set_title(f"{m['model']}: {len(pred['targets'])} creating weights among {pred['entries']:,} entries")
    fig.suptitle("Weight-only predictors: where detection's creating weights rank (1 = top; lines at 10 and 1000)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devset", type=Path, default=ROOT / "docs" / "results" / "detect_devset.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "predict.json")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "predict.png")
    ap.add_argument("--plot-only", action="store_true", help="Redraw the PNG from the JSON at --out.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.plot_only:
        plot(json.loads(args.out.read_text())["models"], args.png)
        return
    found = findings(args.devset)
    models = [one_model(name, found[name]) for name in MODELS]
    result = {"command": "python bench/predict.py", "targets_from": "docs/results/detect_devset.json (trace method)",
              "summary": summary(models), "models": models}
    write_json_atomic(args.out, result)
    plot(models, args.png)
    for row in result["summary"]:
        print(row)


if __name__ == "__main__":
    main()
