"""Commands that study super weights across training: train, emergence."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import typer

from ..core.errors import SuperweightError
from .app import app, console, setup_logging
from .options import QuietOpt, VerboseOpt, cli, grouped
from ..find.loop import DetectionResult
from ..train.loop import TrainConfig, train as run_train, TrainResult
from ..train.emergence import emergence as run_emergence
from ..report.emergence_plots import run_figure, write_png


def parse_coord(text: str, option: str = "--keep") -> list[int]:
    """``LAYER:ROW:COL`` -> ``[layer, row, col]``."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise SuperweightError(f"{option} {text!r}: write a down-projection coordinate as LAYER:ROW:COL, e.g. 1:57:301")
    return [int(p) for p in parts]


def keep_coords(keep: List[str], keep_file: Optional[Path]) -> list[list[int]]:
    coords = [parse_coord(k) for k in keep or []]
    if keep_file is not None:
        coords += [list(c) for c in DetectionResult.load(keep_file).coords]
    return coords


def zero_coords(zero: List[str], zero_file: Optional[Path]) -> list[list[int]]:
    """``--zero`` coordinates, plus the creating weights (role "creates") of a detection JSON."""
    coords = [parse_coord(z, "--zero") for z in zero or []]
    if zero_file is not None:
        coords += [[sw.layer, sw.row, sw.col] for sw in DetectionResult.load(zero_file).super_weights if sw.role == "creates"]
    return coords


@dataclass(frozen=True)
class Schedule:
    """The run's size and schedule: each None takes the preset's value (an option group)."""

    steps: Optional[int] = cli(typer.Option(None, "--steps", min=1))
    save_every: Optional[int] = cli(typer.Option(None, "--save-every", min=1, help="Checkpoint every N steps."))
    seed: int = cli(typer.Option(0, "--seed", help="Initialisation and data-order seed."))
    layers: Optional[int] = cli(typer.Option(None, "--layers", min=1))
    hidden: Optional[int] = cli(typer.Option(None, "--hidden", min=8))
    intermediate: Optional[int] = cli(typer.Option(None, "--intermediate", min=8))
    heads: Optional[int] = cli(typer.Option(None, "--heads", min=1))
    seq_len: Optional[int] = cli(typer.Option(None, "--seq-len", min=8))
    batch: Optional[int] = cli(typer.Option(None, "--batch", min=1))
    lr: Optional[float] = cli(typer.Option(None, "--lr"))


@dataclass(frozen=True)
class Keeping:
    """BitNet b1.58 QAT and which weights it keeps in full precision or zeroes first (an option group)."""

    bitnet: bool = cli(typer.Option(False, "--bitnet", help="BitNet b1.58 QAT: ternary weights, 8-bit activations, STE."))
    keep: List[str] = cli(typer.Option(
        None, "--keep", help="With --bitnet: a down_proj weight LAYER:ROW:COL kept in full precision (repeat)."))
    keep_file: Optional[Path] = cli(typer.Option(
        None, "--keep-file", help="With --bitnet: keep the super weights of a detection JSON."))
    keep_random: bool = cli(typer.Option(
        False, "--keep-random", help="Control: keep as many random weights of the same layers instead."))
    keep_lines: bool = cli(typer.Option(
        False, "--keep-lines", help="Keep the whole down_proj row and column of every kept weight instead."))
    zero: List[str] = cli(typer.Option(
        None, "--zero", help="Zero this down_proj weight LAYER:ROW:COL before step 1, then train on (repeat)."))
    zero_file: Optional[Path] = cli(typer.Option(
        None, "--zero-file", help="Zero the creating super weights of a detection JSON before step 1."))

    def config(self) -> dict:
        """``TrainConfig`` keywords, the combinations checked: keeping needs --bitnet, and a weight to start from."""
        coords = keep_coords(self.keep, self.keep_file)
        if (coords or self.keep_random or self.keep_lines) and not self.bitnet:
            raise SuperweightError("--keep, --keep-file, --keep-random and --keep-lines only apply with --bitnet")
        if (self.keep_random or self.keep_lines) and not coords:
            raise SuperweightError("--keep-random and --keep-lines need --keep or --keep-file: they start from those weights")
        return dict(bitnet=self.bitnet, keep=coords, keep_random=self.keep_random, keep_lines=self.keep_lines,
                    zero=zero_coords(self.zero, self.zero_file))


@app.command()
@grouped
def train(
    out: Path = typer.Option(..., "--out", help="Folder for step-NNNNNN checkpoints and train_log.json."),
    preset: str = typer.Option("cpu", "--preset", help="test (seconds), cpu (minutes on 2 cores) or gpu."),
    schedule: Schedule = Schedule(),
    text: str = typer.Option("wiki-intros", "--text", help="wiki-intros, wikitext2-train or a text file."),
    tokenizer: str = typer.Option("bpe", "--tokenizer", help="bpe (trained on the text here) or a model whose tokenizer to reuse, e.g. smollm2-135m."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    init: str = typer.Option("", "--init", help="Continue training this Llama model (e.g. smollm2-135m) instead of starting from scratch."),
    keeping: Keeping = Keeping(),
    freeze_embeddings: bool = typer.Option(False, "--freeze-embeddings", help="Do not train the (tied) embedding."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch."),
    force: bool = typer.Option(False, "--force", help="Train into an existing --out folder."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Train a small Llama-style model from scratch (transformers' LlamaForCausalLM), saving checkpoints.

    Quick start: `superweight train --out runs/s0 --steps 800 --save-every 50` (~15 min on 2 idle cores).
    BitNet QAT of SmolLM2 keeping its super weights (needs a GPU to be useful):
    `superweight detect --json sw.json && superweight train --init smollm2-135m --bitnet --keep-file sw.json --device auto --out runs/q`"""
    setup_logging(verbose, quiet)
    if out.exists() and any(out.iterdir()) and not force:
        raise SuperweightError(f"{out} is not empty: pick another --out or pass --force")
    kept = keeping.config()
    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig.preset(preset, **dataclasses.asdict(schedule), text=text, tokenizer=tokenizer, device=device,
                                init=init, freeze_embeddings=freeze_embeddings, **kept)
    result = run_train(config, out)
    last = result.evals[-1]
    console.print(
        f"trained {config.steps} steps in {result.seconds:.0f} s: held-out loss {last[1]:.3f} ({result.heldout}); "
        f"{len(result.checkpoints)} checkpoints in {out}", highlight=False,
    )


@app.command()
def emergence(
    checkpoints: List[Path] = typer.Argument(..., help="Checkpoint folders, or `superweight train --out` folders."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned result here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the four-panel PNG here."),
    text: str = typer.Option("wikitext2", "--text", help="Held-out text: wikitext2, wiki-intros or a file."),
    eval_tokens: int = typer.Option(4096, "--eval-tokens", min=16, help="Held-out tokens per loss."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Detection prompt. Default: the paper's."),
    label: str = typer.Option("", "--label", help="Name of the run in the plot."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run detection at every checkpoint: largest residual activation, its creator, and whether zeroing hurts."""
    setup_logging(verbose, quiet)

    def show(i: int, n: int, p) -> None:
        console.print(
            f"[{i}/{n}] step {p.step}: loss {p.loss:.3f} (top creator zeroed {p.loss_zero_top:.3f}); "
            f"max |h| {p.residual_max:.1f} at layer {p.residual_layer} channel {p.residual_channel}; "
            f"creator {p.top} share {p.top_share:.2f}; detected {p.detected}", highlight=False,
        )

    result = run_emergence(checkpoints, text, eval_tokens, prompt, label, progress=None if quiet else show)
    if json_path:
        result.save(json_path)
    if plot:
        write_png(run_figure(result, _train_losses(checkpoints)), plot)
    first = result.first_hurting()
    console.print(
        f"zeroing the top creator first hurts (>= 0.1 nats) at step {first.step}" if first
        else "zeroing the top creator never hurts (>= 0.1 nats) in these checkpoints", highlight=False,
    )


def _train_losses(paths: List[Path]) -> list:
    """The training-loss curve when a single `superweight train --out` folder was given."""
    if len(paths) == 1 and (paths[0] / "train_log.json").is_file():
        return TrainResult.load(paths[0] / "train_log.json").losses
    return []
