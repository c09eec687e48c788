"""Emergence across seeds: run `superweight emergence` on several training runs, plot each and all,
and test whether the super activation's place is predictable from the initialisation.

    python bench/emergence_seeds.py RUN_S0 RUN_S1 RUN_S2 [--eval-tokens 4096]
        -> docs/results/emergence_s{seed}.json, docs/results/emergence_seeds.json,
           docs/emergence/run_s{seed}.png, docs/emergence/seeds.png

Predictability: for the channel c* that holds the largest residual activation at the last
checkpoint, its rank (1 = largest) among the hidden channels at initialisation (step 0) by
the RMS of its embedding column over the vocabulary, by the norm of each down-projection row of the
creator's layer, and by the step-0 max |h| over the prompt's tokens after the same layer; ties count
against the channel. The step-0 |h| is the layer's own output (before the final norm), as detection sees it.
A rank near 1 in every seed would make c* predictable, a rank
spread over 1..hidden says it is not. Stability: the first checkpoint from which the max-|h|
channel (and the top creator's coordinates) stay the same until the end.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from superweight.train.emergence import EmergenceResult, emergence  # noqa: E402
from superweight.report.emergence_plots import run_figure, seeds_figure, write_png  # noqa: E402
from superweight.core.files import write_json_atomic  # noqa: E402
from superweight.train.loop import TrainResult  # noqa: E402


def rank_of(values: torch.Tensor, index: int) -> int:
    """1 + how many entries are larger or equal (other than ``index`` itself): ties never flatter."""
    return int((values >= values[index]).sum())


def stable_from(seq: list) -> int:
    """Index of the first element from which ``seq`` is constant to the end."""
    i = len(seq) - 1
    while i > 0 and seq[i - 1] == seq[-1]:
        i -= 1
    return i


@torch.no_grad()
def init_ranks(step0: Path, channel: int, layer: int, creator_layer: int) -> dict:
    """Rank (1 = largest, ties counted as larger) of ``channel`` among the hidden channels at step 0."""
    from superweight.train.emergence import load_checkpoint

    lm = load_checkpoint(step0)
    emb = lm.model.get_input_embeddings().weight
    rows = lm.arch.weight_matrix(lm.model, creator_layer).norm(dim=1)
    ids = lm.tokenizer("Apple Inc. is a worldwide tech company.", return_tensors="pt")["input_ids"]
    seen = {}  # the layer's own output: hidden_states[-1] would be after the final norm

    def keep(_module, _inputs, output) -> None:
        seen["h"] = output[0] if isinstance(output, tuple) else output

    handle = lm.model.model.layers[layer].register_forward_hook(keep)
    try:
        lm.model(input_ids=ids)
    finally:
        handle.remove()
    hidden = seen["h"].reshape(-1, emb.shape[1]).abs().amax(0)
    return {
        "hidden": int(emb.shape[1]),
        "embedding_column_rms": rank_of(emb.pow(2).mean(0), channel),
        "creator_layer_down_proj_row_norm": rank_of(rows, channel),
        "step0_max_abs_h_after_its_layer": rank_of(hidden, channel),
    }


def summarize(run: Path, result: EmergenceResult) -> dict:
    pts = result.points
    last = pts[-1]
    channels = [p.residual_channel for p in pts]
    tops = [tuple(p.top) for p in pts]
    i_ch, i_top = stable_from(channels), stable_from(tops)
    first = result.first_hurting()
    detected = next((p for p in pts if p.detected), None)
    return {
        "run": str(run),
        "seed": json.loads((run / "train_log.json").read_text())["config"]["seed"],
        "final": {"step": last.step, "loss": last.loss, "loss_zero_top": last.loss_zero_top,
                  "loss_zero_detected": last.loss_zero_detected, "residual_max": last.residual_max,
                  "residual_median_layer_max": last.residual_median_layer_max, "massive_ratio": last.massive, "layer": last.residual_layer,
                  "channel": last.residual_channel, "token": last.residual_token, "top": last.top,
                  "top_share": last.top_share, "detected": last.detected},
        "channel_stable_from_step": pts[i_ch].step,
        "top_creator_stable_from_step": pts[i_top].step,
        "first_step_zeroing_top_hurts": first.step if first else None,
        "first_step_detected": detected.step if detected else None,
        "massive_ratio_per_step": [[p.step, p.massive] for p in pts],
        "init_ranks_of_final_channel": init_ranks(Path(pts[0].path), last.residual_channel, last.residual_layer, last.top[0]),
    }


def measure_run(run: Path, seed: int, saved: Path, eval_tokens: int, reuse: bool) -> EmergenceResult:
    """``emergence`` of every checkpoint of ``run``; with ``reuse``, checkpoints already in ``saved``
    (same folder, same eval tokens) are not measured again."""
    from superweight.train.loop import checkpoint_folders

    folders = checkpoint_folders([run])
    done = {}
    if reuse and saved.is_file():
        old = EmergenceResult.load(saved)
        done = {p.path: p for p in old.points} if old.eval_tokens == eval_tokens else {}
    todo = [f for f in folders if str(f) not in done]
    if todo:
        new = emergence(todo, eval_tokens=eval_tokens, label=f"seed {seed}")
        done.update({p.path: p for p in new.points})
    result = EmergenceResult(f"seed {seed}", "wikitext2", eval_tokens, [done[str(f)] for f in folders])
    result.save(saved)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--plots", type=Path, default=ROOT / "docs" / "emergence")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="Reuse a saved emergence_s{seed}.json covering the same checkpoints.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results, summary = [], []
    for run in args.runs:
        seed = json.loads((run / "train_log.json").read_text())["config"]["seed"]
        saved = args.results / f"emergence_s{seed}.json"
        result = measure_run(run, seed, saved, args.eval_tokens, args.reuse)
        write_png(run_figure(result, TrainResult.load(run / "train_log.json").losses), args.plots / f"run_s{seed}.png")
        results.append(result)
        summary.append(summarize(run, result))
        print(json.dumps(summary[-1]), flush=True)
    write_png(seeds_figure(results), args.plots / "seeds.png")
    write_json_atomic(args.results / "emergence_seeds.json", {
        "command": "python bench/emergence_seeds.py " + " ".join(str(r) for r in args.runs) + f" --eval-tokens {args.eval_tokens}",
        "runs": summary,
    })


if __name__ == "__main__":
    main()
