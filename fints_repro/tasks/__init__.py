"""Tasks: what differs between text generation and function calling (see ``base.py``)."""

from fints_repro.tasks.base import TASKS, PairVerdict, Scores, Task, build_task

__all__ = ["TASKS", "PairVerdict", "Scores", "Task", "build_task"]
