"""Evaluation: perplexity over a text stream, zero-shot tasks, stopword probabilities."""
from .perplexity import PerplexityResult, evaluate_perplexity
from .tasks import TASK_NAMES, TaskResult, evaluate_task, evaluate_tasks
from .text import load_text

__all__ = [
    "PerplexityResult", "evaluate_perplexity", "load_text", "TASK_NAMES", "TaskResult", "evaluate_task",
    "evaluate_tasks",
]
