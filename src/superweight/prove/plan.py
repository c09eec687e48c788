"""What an ablation or an evaluation is about to do, and how long the rest will take.

``plan_line`` says it before the work starts: conditions x tokens x tasks. ``Estimate`` turns the
time of the first condition (or the first stage of an evaluation) into the time left, in proportion
to the tokens each remaining piece scores (perplexity tokens plus the tasks' request tokens).
"""
from __future__ import annotations

import logging
from typing import Sequence

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """``42 s``, ``7.5 min`` or ``1.3 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def work_line(ppl_tokens: int, ppl: str | None, tasks: dict, limit: int | None) -> str:
    """``20,000 tokens of wikitext2 x 6 tasks (at most 100 items each, 81,000 request tokens)``."""
    parts = [f"{ppl_tokens:,} tokens of {ppl}"] if ppl else []
    if tasks:
        items = f"at most {limit} items each" if limit else "all items"
        parts.append(f"{len(tasks)} task(s) ({', '.join(tasks)}; {items}, {sum(t.tokens for t in tasks.values()):,} request tokens)")
    return " x ".join(parts) or "nothing to score"


def plan_line(conditions: int, copied: int, work: str, extra: str = "") -> str:
    """The ablation's plan: how many conditions, how many are copies, what each scores."""
    runs = f"{conditions} conditions" + (f" ({copied} copied from another, not run)" if copied else "")
    return f"plan: {runs} x {work}{extra}"


class Estimate:
    """Logs, once, the time left after the first piece of work, by the units (tokens) left."""

    def __init__(self, units: Sequence[int], what: str = "condition"):
        self.units, self.what, self.said = list(units), what, False

    def first(self, name: str, seconds: float) -> str | None:
        """After the first piece (``units[0]``): ``name took 200 s; the 9 conditions left: about 31 min``."""
        if self.said or len(self.units) < 2 or self.units[0] <= 0:
            return None
        self.said = True
        left = seconds * sum(self.units[1:]) / self.units[0]
        line = f"{name} took {duration(seconds)}; the {len(self.units) - 1} {self.what}(s) left: about {duration(left)}"
        log.info("%s", line)
        return line
