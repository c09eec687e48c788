"""The paper's importance experiments (Table 1, Fig. 5, Fig. 6) as one typed run.

``run_ablation`` evaluates the model under each condition, always restoring the weights:

- ``original``: the unmodified model;
- ``zero_super_weights``: the super weights set to 0;
- ``zero_top_non_super``: the ``top_n`` (7000) largest-|w| entries of the super weight layers'
  down-projections set to 0, the super weights kept (the paper's control);
- ``restore_super_activation``: super weights zeroed, the super activation written back where
  it first appears (see ``ablate.restored_super_activation`` for the exact rule);
- ``zero_random``: ``random_n`` random entries of the same matrices set to 0 (a null baseline;
  default: as many as there are super weights, the matched control);
- ``scale_<s>``: the super weights multiplied by ``s`` (Fig. 6). ``scale_1`` leaves the weights
  bitwise unchanged and ``scale_0`` equals ``zero_super_weights``, so those two reuse the
  measured result instead of running again (their ``same_as`` field says so).

Each condition gets a perplexity (strided windows over ``ppl``) and the zero-shot tasks; the
stopword block compares ``original`` with ``zero_super_weights`` (Fig. 5).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Sequence

from ..core.version import __version__
from .ablate import (
    DEFAULT_SCALES, DEFAULT_TOP_N, random_coords, restored_super_activation, scaled_weights, sw_layers,
    top_magnitude_coords, weight_item, zeroed_entries,
)
from ..core.coords import Coord, as_key, as_keys, as_coords
from ..core.errors import SuperweightError
from ..core import progress
from ..core.progress import step
from ..eval.perplexity import default_seq_len, evaluate_perplexity, perplexity_windows
from ..eval.stopwords import SEASON_PROMPT, lambada_prompts, stopword_stats, top_next_tokens
from ..eval.tasks import PreparedTask, TaskResult, average_accuracy, evaluate_prepared, parse_tasks, prepare_task
from ..eval.text import load_text
from ..core.results import Table, Versioned, num
from .plan import Estimate, plan_line, work_line

log = logging.getLogger(__name__)

RESULT_VERSION = 1
SCALE_PREFIX = "scale_"


@dataclass
class AblationConfig(Versioned):
    """What to measure. ``None`` for ``ppl`` skips perplexity; an empty ``tasks`` skips the tasks."""

    KIND: ClassVar[str] = "ablation config"

    ppl: str | None = "wikitext2"
    tasks: list[str] = field(default_factory=lambda: parse_tasks(None))
    limit: int | None = 100
    max_tokens: int | None = 20000
    seq_len: int | None = None
    top_n: int = DEFAULT_TOP_N
    random_n: int | None = None  # None: as many as there are super weights
    scales: tuple[float, ...] = DEFAULT_SCALES
    scale_tasks: list[str] | None = None  # tasks for the scale_<s> conditions; None: same as tasks
    stopword_prompts: int = 50
    seed: int = 0

    @classmethod
    def _decode(cls, d: dict) -> dict[str, Any]:
        out = super()._decode(d)
        out["scales"] = tuple(out.get("scales", DEFAULT_SCALES))
        return out


def _tasks_of(d: dict | None) -> dict[str, TaskResult]:
    return {t: r if isinstance(r, TaskResult) else TaskResult.from_dict(r) for t, r in (d or {}).items()}


@dataclass
class ConditionResult(Versioned):
    """One condition's perplexity and zero-shot results."""

    KIND: ClassVar[str] = "ablation condition"
    description: str
    weights_changed: int
    ppl: float | None = None
    ppl_tokens: int | None = None
    avg_acc: float | None = None
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    seconds: float = 0.0
    same_as: str | None = None

    def to_dict(self) -> dict:
        body = {k: v for k, v in super().to_dict().items() if v is not None}
        return {k: v for k, v in body.items() if k not in ("kind", "version", "tool_version")}

    @classmethod
    def check_version(cls, d: dict, source: str = "") -> None:
        """Conditions live inside an ablation file, which carries the version."""

    @classmethod
    def _decode(cls, d: dict) -> dict[str, Any]:
        return {**super()._decode(d), "tasks": _tasks_of(d.get("tasks"))}

    def accuracy(self, task: str) -> float | None:
        r = self.tasks.get(task)
        return None if r is None else r.acc


@dataclass
class AblationResult(Versioned):
    """The paper's importance experiments on one model: every condition, the stopwords, the top-5."""

    KIND: ClassVar[str] = "ablation"
    VERSION: ClassVar[int] = RESULT_VERSION
    WRITER: ClassVar[str] = "`superweight ablate --json PATH`"
    model: str
    architecture: str
    super_weights: list[dict]
    config: AblationConfig
    conditions: dict[str, ConditionResult]
    stopwords: dict | None = None
    top5: dict | None = None
    notes: list[str] = field(default_factory=list)
    tool_version: str = __version__

    @classmethod
    def _decode(cls, d: dict) -> dict[str, Any]:
        out = super()._decode(d)
        if not isinstance(d.get("conditions"), dict) or not d["conditions"]:
            raise ValueError("no 'conditions'")
        out["config"] = AblationConfig.from_dict({**d.get("config", {}), "version": AblationConfig.VERSION})
        out["conditions"] = {n: ConditionResult.from_dict(c) for n, c in d["conditions"].items()}
        return out

    @property
    def coords(self) -> list[Coord]:
        return as_coords(self.super_weights)

    @property
    def scales(self) -> list[tuple[float, str]]:
        """(scale, condition name) of the ``scale_<s>`` conditions, by scale."""
        return sorted((float(n[len(SCALE_PREFIX):]), n) for n in self.conditions if n.startswith(SCALE_PREFIX))

    @property
    def edits(self) -> list[str]:
        """The conditions that are not part of the scale sweep, in run order."""
        return [n for n in self.conditions if not n.startswith(SCALE_PREFIX)]

    @property
    def task_names(self) -> list[str]:
        return list(dict.fromkeys(t for c in self.conditions.values() for t in c.tasks))

    def tables(self) -> list[Table]:
        """The paper's Table 1 shape (every condition), then the season prompt's top-5."""
        return [ablation_table(self)] + ([top5_table(self.top5)] if self.top5 else [])


def _task_cell(r: TaskResult | None) -> str:
    return "-" if r is None else f"{100 * r.acc:.1f} [{100 * r.ci[0]:.0f}-{100 * r.ci[1]:.0f}]"


def ablation_table(result: AblationResult) -> Table:
    tasks = result.task_names
    lam = ["lambada ppl"] if "lambada" in tasks else []
    rows = []
    for name, c in result.conditions.items():
        row = [name, str(c.weights_changed), num(c.ppl), num(c.avg_acc and 100 * c.avg_acc, "{:.1f}")]
        row += [_task_cell(c.tasks.get(t)) for t in tasks]
        rows.append(row + ([num(getattr(c.tasks.get("lambada"), "ppl", None))] if lam else []))
    title = f"Super weight ablation of {result.model} (paper Table 1 shape; accuracy % [95% CI])"
    return Table(title, ["condition", "weights", "ppl", "mean acc", *tasks, *lam], rows)


def top5_table(top: dict) -> Table:
    """The paper's "Summer is hot. Winter is" example: top next tokens with and without the SWs."""
    pairs = list(zip(top["original"], top["zero_super_weights"]))
    rows = [[str(i + 1), f"{a[0]!r} {a[1]:.1%}", f"{b[0]!r} {b[1]:.1%}"] for i, (a, b) in enumerate(pairs)]
    return Table(f"Next token after {top.get('prompt', '')!r}", ["rank", "original", "super weights zeroed"], rows)


# ---------------------------------------------------------------- evaluation under one condition


@dataclass
class Workload:
    """The text and tokenized tasks, prepared once and evaluated under every condition."""

    text: str | None
    tasks: dict[str, PreparedTask]
    ppl_tokens: int = 0  # the tokens perplexity scores

    def units(self, tasks: Sequence[str] | None = None) -> int:
        """Tokens one evaluation scores: perplexity's and the tasks' requests (all, or ``tasks``)."""
        names = self.tasks if tasks is None else [t for t in tasks if t in self.tasks]
        return self.ppl_tokens + sum(self.tasks[t].tokens for t in names)

    def line(self, config: AblationConfig) -> str:
        return work_line(self.ppl_tokens, config.ppl, self.tasks, config.limit)


def prepare_workload(model, tokenizer, config: AblationConfig) -> Workload:
    text = load_text(config.ppl) if config.ppl else None
    max_len = default_seq_len(model, tokenizer)  # lm-eval truncates to the model length
    tasks = {t: prepare_task(tokenizer, t, config.limit, max_len) for t in config.tasks}
    tokens = 0
    if text is not None:
        _, spans, _, _ = perplexity_windows(model, tokenizer, text, config.seq_len, config.max_tokens)
        tokens = sum(e - f for _, e, f in spans)
    return Workload(text, tasks, tokens)


def evaluate_condition(
    model, tokenizer, work: Workload, config: AblationConfig, tasks: Sequence[str] | None = None, where: str = "",
    estimate: Estimate | None = None,
) -> tuple[float | None, int | None, dict[str, TaskResult], float | None]:
    """(ppl, tokens scored, {task: metrics}, mean acc) of the model as it is now; ``where`` prefixes
    each stage's progress note (the condition); ``estimate`` hears of the first stage's time."""
    ppl = tokens = None
    start = time.perf_counter()
    if work.text is not None:
        progress.note(f"{where}perplexity ({work.ppl_tokens:,} tokens)")
        r = evaluate_perplexity(model, tokenizer, work.text, seq_len=config.seq_len, max_tokens=config.max_tokens)
        ppl, tokens = r.ppl, r.tokens
        if estimate:
            estimate.first("perplexity", time.perf_counter() - start)
    names = list(work.tasks) if tasks is None else [t for t in tasks if t in work.tasks]
    results = {}
    for i, t in enumerate(names, 1):
        progress.note(f"{where}task {i}/{len(names)}: {t} ({len(work.tasks[t].items)} items)")
        results[t] = evaluate_prepared(model, work.tasks[t])
        if estimate:
            estimate.first(t, time.perf_counter() - start)
    avg = average_accuracy(results) if results else None
    return ppl, tokens, results, avg


# ---------------------------------------------------------------- the conditions


@dataclass
class Condition:
    """One way of changing the model: ``apply(coords)`` is a context manager that makes the change."""

    name: str
    description: str
    apply: Callable[[list], contextlib.AbstractContextManager]
    coords: list
    same_as: str | None = None
    scale: bool = False

    @property
    def weights_changed(self) -> int:
        return len(self.coords)

    def edit(self) -> contextlib.AbstractContextManager:
        return self.apply(self.coords)

    def task_names(self, config: AblationConfig) -> list[str]:
        """The tasks this condition scores: a scale condition those of ``scale_tasks`` when given."""
        if self.scale and config.scale_tasks is not None:
            return [t for t in config.scale_tasks if t in config.tasks]
        return list(config.tasks)

    def edit_layer(self, layer: int) -> contextlib.AbstractContextManager:
        """The change restricted to one decoder layer (streaming: entered while that layer is read)."""
        mine = [c for c in self.coords if as_key(c)[0].layer == layer]
        return self.apply(mine) if mine else contextlib.nullcontext()


def build_conditions(model, arch, coords: list, config: AblationConfig) -> list[Condition]:
    """Every condition of the ablation. The null baselines are drawn from the super weights' layers
    (their values are read now: streamed, those layers must be materialised)."""
    layers = sw_layers(coords)
    k = len(coords)
    top = top_magnitude_coords(model, arch, layers, config.top_n, exclude=coords)
    rand = random_coords(model, arch, layers, config.random_n or k, exclude=coords, seed=config.seed)
    where = f"layer(s) {', '.join(map(str, layers))} down_proj"

    def zero(cs: list):
        return zeroed_entries(model, arch, cs)

    conds = [
        Condition("original", "unmodified model", lambda cs: contextlib.nullcontext(), []),
        Condition("zero_super_weights", f"the {k} super weight(s) set to 0", zero, coords),
        Condition("zero_top_non_super", f"the {len(top)} largest-|w| other entries of {where} set to 0, super weights kept",
                  zero, top),
        Condition("restore_super_activation", "super weights zeroed, super activation written back where it first appears",
                  lambda cs: restored_super_activation(model, arch, cs), coords),
        Condition("zero_random", f"{len(rand)} random entries of {where} set to 0 (seed {config.seed})", zero, rand),
    ]
    for s in config.scales:
        same = "original" if s == 1 else "zero_super_weights" if s == 0 else None
        conds.append(Condition(scale_name(s), f"super weights x {s:g}", lambda cs, s=s: scaled_weights(model, arch, cs, s),
                               coords, same_as=same, scale=True))
    return conds


def scale_name(s: float) -> str:
    return f"{SCALE_PREFIX}{s:g}"


def super_weight_dicts(super_weights) -> list[dict]:
    out = []
    for sw in super_weights:
        if isinstance(sw, dict):
            out.append(sw)
        elif hasattr(sw, "__dataclass_fields__"):
            out.append(asdict(sw))
        else:
            (layer, row, col), expert = as_key(sw)
            out.append({"layer": layer, "row": row, "col": col} | ({} if expert is None else {"expert": expert}))
    return out


def configured(config: AblationConfig | None, overrides: dict) -> AblationConfig:
    """``config`` (default ``AblationConfig()``) with the keyword overrides set."""
    config = config or AblationConfig()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def ablation_inputs(super_weights, config: AblationConfig | None, overrides: dict) -> tuple[AblationConfig, list, list]:
    """(config with the overrides set, the super weights as given, their coords with any expert kept)."""
    config = configured(config, overrides)
    sws = getattr(super_weights, "super_weights", super_weights)
    coords = [weight_item(c, e) for c, e in as_keys(sws)]  # an MoE weight keeps its expert
    if not coords:
        raise SuperweightError("no super weights to ablate: detection found none (try `superweight detect -v`)")
    return config, sws, coords


def run_ablation(loaded, super_weights, config: AblationConfig | None = None, **overrides) -> AblationResult:
    """Evaluate ``loaded`` (a ``LoadedModel``) under every condition; weights restored after each.

    ``super_weights``: a ``DetectionResult``, or SuperWeight objects / dicts / (layer, row, col).
    Keyword overrides set ``AblationConfig`` fields (e.g. ``limit=20``).
    """
    config, sws, coords = ablation_inputs(super_weights, config, overrides)
    model, tokenizer, arch = loaded.model, loaded.tokenizer, loaded.arch
    work = prepare_workload(model, tokenizer, config)
    conds = build_conditions(model, arch, coords, config)
    ran = [c for c in conds if not (c.same_as and any(d.name == c.same_as for d in conds[:conds.index(c)]))]
    stopwords = f", then the stopword statistics on {config.stopword_prompts} prompts" if config.stopword_prompts else ""
    log.info("%s", plan_line(len(conds), len(conds) - len(ran), work.line(config), stopwords))
    estimate = Estimate([work.units(c.task_names(config)) for c in ran])
    conditions: dict[str, ConditionResult] = {}
    with step("ablation"):
        for i, cond in enumerate(conds, 1):
            conditions[cond.name] = run_condition(model, tokenizer, work, config, cond, conditions,
                                                  f"condition {i}/{len(conds)} ({cond.name}): ")
            if cond is ran[0]:
                estimate.first(cond.name, conditions[cond.name].seconds)
        progress.note("stopword statistics")
        stop, top5 = stopword_block(model, tokenizer, arch, coords, config)
    return AblationResult(
        model=loaded.name, architecture=arch.name, super_weights=super_weight_dicts(sws), config=config,
        conditions=conditions, stopwords=stop, top5=top5, notes=list(loaded.notes),
    )


def run_condition(
    model, tokenizer, work: Workload, config: AblationConfig, cond: Condition, done: dict[str, ConditionResult],
    where: str = "",
) -> ConditionResult:
    if cond.same_as and cond.same_as in done:
        return copied_result(cond, done[cond.same_as], config)
    start = time.perf_counter()
    with cond.edit():
        ppl, tokens, task_results, avg = evaluate_condition(model, tokenizer, work, config, cond.task_names(config), where)
    seconds = time.perf_counter() - start
    log.info("%s: ppl %s, mean acc %s (%.0f s)", cond.name, _fmt(ppl), _fmt(avg), seconds)
    return ConditionResult(cond.description, cond.weights_changed, ppl, tokens, avg, task_results, seconds)


def copied_result(cond: Condition, base: ConditionResult, config: AblationConfig) -> ConditionResult:
    """The result of a condition that changes the model as ``base``'s did (a scale of 0 or 1)."""
    tasks, avg = base.tasks, base.avg_acc
    if cond.scale and config.scale_tasks is not None:
        tasks = {t: v for t, v in base.tasks.items() if t in config.scale_tasks}
        avg = _mean_acc(tasks)
    return ConditionResult(cond.description, cond.weights_changed, base.ppl, base.ppl_tokens, avg, dict(tasks),
                           same_as=cond.same_as)


def stopword_result(prompts: int, before: dict | None, after: dict | None, top_before: list, top_after: list) -> tuple[dict | None, dict]:
    """The ablation file's ``stopwords`` and ``top5`` entries."""
    stop = {"prompts": prompts, "source": "lambada", "original": before, "zero_super_weights": after} if prompts else None
    top5 = {"prompt": SEASON_PROMPT, "original": [list(t) for t in top_before],
            "zero_super_weights": [list(t) for t in top_after]}
    return stop, top5


def _mean_acc(tasks: dict[str, TaskResult]) -> float | None:
    return sum(v.acc for v in tasks.values()) / len(tasks) if tasks else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def stopword_block(model, tokenizer, arch, coords, config: AblationConfig) -> tuple[dict | None, dict]:
    """Stopword statistics and the season prompt's top-5, with and without the super weights."""
    prompts, targets = lambada_prompts(config.stopword_prompts) if config.stopword_prompts else ([], [])
    before_top = top_next_tokens(model, tokenizer, SEASON_PROMPT)
    before = stopword_stats(model, tokenizer, prompts, targets).to_dict() if prompts else None
    with zeroed_entries(model, arch, coords):
        after_top = top_next_tokens(model, tokenizer, SEASON_PROMPT)
        after = stopword_stats(model, tokenizer, prompts, targets).to_dict() if prompts else None
    return stopword_result(len(prompts), before, after, before_top, after_top)


# ---------------------------------------------------------------- one model, no ablation


@dataclass
class EvalResult(Versioned):
    """Perplexity and zero-shot accuracy of one model as it is."""

    KIND: ClassVar[str] = "evaluation"
    VERSION: ClassVar[int] = RESULT_VERSION
    WRITER: ClassVar[str] = "`superweight eval --json PATH`"
    model: str
    config: AblationConfig
    ppl: float | None
    ppl_tokens: int | None
    avg_acc: float | None
    tasks: dict[str, TaskResult]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tool_version: str = __version__

    @classmethod
    def _decode(cls, d: dict) -> dict[str, Any]:
        out = super()._decode(d)
        out["config"] = AblationConfig.from_dict({**d.get("config", {}), "version": AblationConfig.VERSION})
        return {**out, "tasks": _tasks_of(d.get("tasks"))}

    def tables(self) -> list[Table]:
        rows = [[f"PPL ({self.config.ppl})", num(self.ppl), "", f"{self.ppl_tokens} tokens"]] if self.ppl is not None else []
        for t, r in self.tasks.items():
            rows.append([f"{t} acc", f"{100 * r.acc:.1f}", f"{100 * r.ci[0]:.1f}-{100 * r.ci[1]:.1f}", str(r.n)])
            if r.acc_norm is not None and r.acc_norm_ci:
                lo, hi = r.acc_norm_ci
                rows.append([f"{t} acc_norm", f"{100 * r.acc_norm:.1f}", f"{100 * lo:.1f}-{100 * hi:.1f}", str(r.n)])
            if r.ppl is not None and r.ppl_ci:
                rows.append([f"{t} ppl", num(r.ppl), f"{r.ppl_ci[0]:.4g}-{r.ppl_ci[1]:.4g}", str(r.n)])
        if self.avg_acc is not None:
            rows.append(["avg acc", f"{100 * self.avg_acc:.1f}", "", ""])
        return [Table(f"Evaluation of {self.model}", ["metric", "value", "95% CI", "n"], rows)]


def run_eval(loaded, config: AblationConfig | None = None, **overrides) -> EvalResult:
    """Perplexity and zero-shot tasks of ``loaded`` as it is (e.g. a quantized artifact)."""
    config = configured(config, overrides)
    start = time.perf_counter()
    work = prepare_workload(loaded.model, loaded.tokenizer, config)
    log.info("plan: %s", work.line(config))
    stages = ([work.ppl_tokens] if work.text is not None else []) + [t.tokens for t in work.tasks.values()]
    with step("evaluation"):
        ppl, tokens, tasks, avg = evaluate_condition(loaded.model, loaded.tokenizer, work, config,
                                                     estimate=Estimate(stages, "stage"))
    return EvalResult(loaded.name, config, ppl, tokens, avg, tasks, list(loaded.notes), time.perf_counter() - start)
