"""Quality, speed, memory and energy measurements, and the report that compares models.

``evaluate(model, tasks, ...)`` runs lm-evaluation-harness-compatible tasks (see ``tasks.py``
and ``perplexity.py``); ``report(models, out)`` writes the comparison page. Imports are lazy
so ``pocketlm --help`` stays fast.
"""

from __future__ import annotations

__all__ = ["TASKS", "evaluate", "report"]


def __getattr__(name):
    if name == "evaluate":
        from pocketlm.evaluate.run import evaluate

        return evaluate
    if name == "TASKS":
        from pocketlm.evaluate.tasks import TASKS

        return TASKS
    if name == "report":
        from pocketlm.evaluate.report import report

        return report
    raise AttributeError(name)
