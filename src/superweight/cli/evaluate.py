"""Commands that measure: ablate (the paper's Table 1, Fig. 5, Fig. 6) and eval."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import SuperweightError
from ..files import check_output
from ..inputs import check_super_weights, check_text_source, read_super_weights
from .app import (
    CacheOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    LimitOpt,
    MaxTokensOpt,
    ModelArg,
    PplOpt,
    QuietOpt,
    SeqLenOpt,
    TasksOpt,
    VerboseOpt,
    app,
    console,
    detect_default,
    load_lm,
    print_notes,
    setup_logging,
)
from .console import print_ablation_table, print_stopwords, print_tables


def _eval_config(ppl: str, tasks: str, limit: Optional[int], max_tokens: Optional[int], seq_len: Optional[int], **kw):
    from ..eval.tasks import parse_tasks
    from ..experiments import AblationConfig

    ppl_source = None if ppl.lower() in ("none", "") else ppl
    check_text_source(ppl_source)  # before the model loads: a wrong --ppl costs nothing
    task_list = [] if tasks.lower() in ("none", "") else parse_tasks(tasks)
    return AblationConfig(ppl=ppl_source, tasks=task_list, limit=limit, max_tokens=max_tokens, seq_len=seq_len, **kw)


def _parse_scales(text: str) -> tuple:
    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise SuperweightError(f"--scales {text!r}: give comma-separated numbers, e.g. 0,0.5,1,2") from None


@app.command()
def ablate(
    model: str = ModelArg,
    super_weights: Optional[Path] = typer.Option(None, "--super-weights", help="A detection JSON; default: detect now."),
    ppl: str = PplOpt,
    tasks: str = TasksOpt,
    limit: Optional[int] = LimitOpt,
    max_tokens: Optional[int] = MaxTokensOpt,
    seq_len: Optional[int] = SeqLenOpt,
    top_n: int = typer.Option(7000, "--top-n", min=1, help="zero_top_non_super: how many of the largest other weights."),
    random_n: Optional[int] = typer.Option(None, "--random-n", min=1, help="zero_random: how many (default: as many as super weights)."),
    scales: str = typer.Option("0,0.2,0.5,0.8,1,1.5,2,3", "--scales", help="Super weight scales to sweep ('' for none)."),
    scale_tasks: Optional[str] = typer.Option(None, "--scale-tasks", help="Tasks for the scale sweep (default: --tasks; 'none' for PPL only)."),
    stopword_prompts: int = typer.Option(50, "--stopword-prompts", min=0, help="LAMBADA contexts for the stopword statistics."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random null baseline."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned result here."),
    dtype: str = DtypeOpt,
    cache_dir: Optional[Path] = CacheOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Prove the super weights matter: zero, scale and restore them; paper Table 1, Fig. 5 and Fig. 6."""
    from ..eval.tasks import parse_tasks
    from ..experiments import run_ablation

    setup_logging(verbose, quiet)
    sweep_tasks = None if scale_tasks is None else [] if scale_tasks.lower() == "none" else parse_tasks(scale_tasks)
    config = _eval_config(
        ppl, tasks, limit, max_tokens, seq_len, top_n=top_n, random_n=random_n, scales=_parse_scales(scales),
        scale_tasks=sweep_tasks, stopword_prompts=stopword_prompts, seed=seed,
    )
    det = read_super_weights(super_weights) if super_weights else None
    if json_path:
        check_output(json_path, "--json")
    lm = load_lm(model, dtype, cache_dir, device_map, device)
    found = check_super_weights(det, lm, super_weights) if det else detect_default(lm).super_weights
    console.print("super weights: " + ", ".join(f"{s.layer}:[{s.row}, {s.col}]" for s in found), highlight=False)
    result = run_ablation(lm, found, config)
    print_ablation_table(result)
    print_stopwords(result)
    print_notes(result.notes, shown=lm.notes)
    if json_path:
        result.save(json_path)
        console.print(f"wrote {json_path}")


@app.command("eval")
def eval_cmd(
    model: str = ModelArg,
    ppl: str = PplOpt,
    tasks: str = TasksOpt,
    limit: Optional[int] = LimitOpt,
    max_tokens: Optional[int] = MaxTokensOpt,
    seq_len: Optional[int] = SeqLenOpt,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned result here."),
    dtype: str = DtypeOpt,
    cache_dir: Optional[Path] = CacheOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Perplexity and zero-shot accuracy (lm-eval semantics, 95% bootstrap CI) of one model."""
    from ..experiments import run_eval

    setup_logging(verbose, quiet)
    config = _eval_config(ppl, tasks, limit, max_tokens, seq_len)
    if json_path:
        check_output(json_path, "--json")
    lm = load_lm(model, dtype, cache_dir, device_map, device)
    result = run_eval(lm, config)
    print_tables(result.tables())
    print_notes(result.notes, shown=lm.notes)
    if json_path:
        result.save(json_path)
        console.print(f"wrote {json_path}")
