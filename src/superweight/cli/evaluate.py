"""Commands that measure: ablate (the paper's Table 1, Fig. 5, Fig. 6) and eval."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from ..prove.ablate import DEFAULT_SCALES, DEFAULT_TOP_N
from ..core.errors import SuperweightError
from .inputs import check_seq_len, check_super_weights, check_super_weights_early, check_text_source, read_super_weights
from .app import check_json_out, write_json_out, app, console, detect_default, load_lm, mode_of, open_streamed, print_notes, setup_logging
from .options import DequantizeOpt, LimitOpt, MaxTokensOpt, ModelArg, ModelOptions, PplOpt, SeqLenOpt, TasksOpt, cli, grouped
from .console import print_ablation_table, print_stopwords, print_tables
from ..eval.tasks import parse_tasks
from ..prove.experiments import AblationConfig, run_ablation, run_eval
from ..core.progress import step
from ..prove.streamed import stream_eval, stream_ablation
from ..find.streamed import stream_detect
from ..model.mode import Mode
from ..model.source import ModelSource
from ..model.streamed import StreamedModel


def _items(values: Optional[List[str]]) -> list[str]:
    """Repeated option values, each possibly comma-separated, as one flat list."""
    return [s.strip() for v in values or [] for s in v.split(",") if s.strip()]


def _task_list(values: Optional[List[str]], default: Optional[list[str]]) -> Optional[list[str]]:
    """``--tasks a --tasks b,c`` -> validated names; ``none`` -> []; not given -> ``default``."""
    if not values:
        return default
    names = _items(values)
    if names in ([], ["none"]):
        return []
    return parse_tasks("all" if names == ["all"] else names)


@dataclass(frozen=True)
class Measured:
    """What ``ablate`` and ``eval`` measure: the perplexity text and its window, the tasks and how many
    items of each (an option group)."""

    ppl: str = cli(PplOpt)
    tasks: Optional[List[str]] = cli(TasksOpt)
    limit: Optional[int] = cli(LimitOpt)
    max_tokens: Optional[int] = cli(MaxTokensOpt)
    seq_len: Optional[int] = cli(SeqLenOpt)

    def config(self, **kw) -> AblationConfig:
        """The measurement's config (``kw``: the ablation's own settings); a wrong --ppl or task fails now."""
        ppl_source = None if self.ppl.lower() in ("none", "") else self.ppl
        check_text_source(ppl_source)  # before the model loads: a wrong --ppl costs nothing
        task_list = _task_list(self.tasks, parse_tasks("all"))
        return AblationConfig(ppl=ppl_source, tasks=task_list, limit=self.limit, max_tokens=self.max_tokens,
                              seq_len=self.seq_len, **kw)


def _streamed_eval(sm: StreamedModel, config):
    """``eval`` of a model streamed layer by layer (``stream_ablate.stream_eval``): the in-memory numbers."""
    with step("evaluation (streamed: every window and request batch through each layer read)"):
        return stream_eval(sm, config, model_name=sm.source.ref)


def _streamed_ablation(sm: StreamedModel, det, origin: Optional[Path], config):
    """``ablate`` of a model streamed layer by layer (``stream_ablate.stream_ablation``): detection
    streamed too unless a JSON gives the super weights."""
    detected = None
    if det is None:
        with step("detecting super weights (streamed)"):
            det = detected = stream_detect(sm, model_name=sm.source.ref)
        origin = None
    _print_found(det.super_weights)
    with step("ablation (streamed: every condition through each layer read)"):
        result = stream_ablation(sm, det, config, model_name=sm.source.ref, origin=None if origin is None else str(origin))
    return _with_notes_of(result, detected)


def _with_notes_of(result, detection):
    """The ablation's notes and, when the super weights were detected now, detection's own (the fallback's)."""
    if detection is not None:
        result.notes += [n for n in detection.notes if n not in result.notes]
    return result


def _print_found(found) -> None:
    console.print("super weights: " + ", ".join(f"{s.layer}:[{s.row}, {s.col}]" for s in found), highlight=False)


def _parse_scales(values: Optional[List[str]]) -> tuple[float, ...]:
    """``--scales 0 --scales 0.5,1`` -> (0.0, 0.5, 1.0); not given -> ``ablate.DEFAULT_SCALES``; '' -> none."""
    if values is None or values == []:
        return DEFAULT_SCALES
    try:
        return tuple(float(s) for s in _items(values))
    except ValueError:
        raise SuperweightError(f"--scales {' '.join(values)!r}: give numbers, e.g. --scales 0 --scales 0.5 or 0,0.5,1,2") from None


@app.command()
@grouped
def ablate(
    model: str = ModelArg,
    super_weights: Optional[Path] = typer.Option(None, "--super-weights", help="A detection JSON; default: detect now."),
    measured: Measured = Measured(),
    top_n: int = typer.Option(DEFAULT_TOP_N, "--top-n", min=1, help="zero_top_non_super: how many of the largest other weights."),
    random_n: Optional[int] = typer.Option(None, "--random-n", min=1, help="zero_random: how many (default: as many as super weights)."),
    scales: Optional[List[str]] = typer.Option(
        None, "--scales", help=f"Super weight scales (repeat or comma-separate; default {','.join(f'{s:g}' for s in DEFAULT_SCALES)}; '' for none).",
    ),
    scale_tasks: Optional[List[str]] = typer.Option(
        None, "--scale-tasks", help="Tasks for the scale sweep (repeat or comma-separate; default: --tasks; 'none' for PPL only).",
    ),
    stopword_prompts: int = typer.Option(50, "--stopword-prompts", min=0, help="LAMBADA contexts for the stopword statistics."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random null baseline."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned result here."),
    stream: bool = typer.Option(
        False, "--stream", help="Ablate a local safetensors model read one layer at a time, every condition through each "
        "layer read (automatic when it does not fit in memory)."
    ),
    dequantize: bool = DequantizeOpt,
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Prove the super weights matter: zero, scale and restore them; paper Table 1, Fig. 5 and Fig. 6."""
    setup_logging(opts.verbose, opts.quiet)
    sweep_tasks = _task_list(scale_tasks, None)
    config = measured.config(top_n=top_n, random_n=random_n, scales=_parse_scales(scales), scale_tasks=sweep_tasks,
                             stopword_prompts=stopword_prompts, seed=seed)
    source = ModelSource.of(model)  # resolved once: the checks, the mode and the load share it
    check_seq_len(measured.seq_len, source, opts.cache_dir)
    det = read_super_weights(super_weights) if super_weights else None
    if det is not None:  # checked against the config now, not after loading the model
        check_super_weights_early(det, source, super_weights, opts.cache_dir, to_ablate=True)
    check_json_out(json_path)
    if mode_of(source, stream, opts) is Mode.STREAM:
        with open_streamed(source, opts) as sm:
            result, shown = _streamed_ablation(sm, det, super_weights, config), []
    else:
        lm = load_lm(source, opts, dequantize)
        detected = None if det else detect_default(lm)
        found = check_super_weights(det, lm, super_weights) if det else detected.super_weights
        _print_found(found)
        result, shown = _with_notes_of(run_ablation(lm, found, config), detected), lm.notes
    print_ablation_table(result)
    print_stopwords(result)
    print_notes(result.notes, shown=shown)
    write_json_out(json_path, result.to_dict())


@app.command("eval")
@grouped
def eval_cmd(
    model: str = ModelArg,
    measured: Measured = Measured(),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned result here."),
    stream: bool = typer.Option(
        False, "--stream", help="Evaluate a local safetensors model read one layer at a time (automatic when it "
        "does not fit in memory)."
    ),
    dequantize: bool = DequantizeOpt,
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Perplexity and zero-shot accuracy (lm-eval semantics, 95% bootstrap CI) of one model."""
    setup_logging(opts.verbose, opts.quiet)
    config = measured.config()
    source = ModelSource.of(model)  # resolved once: the checks, the mode and the load share it
    check_seq_len(measured.seq_len, source, opts.cache_dir)
    check_json_out(json_path)
    if mode_of(source, stream, opts) is Mode.STREAM:
        with open_streamed(source, opts) as sm:
            result, shown = _streamed_eval(sm, config), []
    else:
        lm = load_lm(source, opts, dequantize)
        result, shown = run_eval(lm, config), lm.notes
    print_tables(result.tables())
    print_notes(result.notes, shown=shown)
    write_json_out(json_path, result.to_dict())
