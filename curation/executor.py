"""Executors run a stage's per-shard tasks. Stages know nothing of executors and the reverse.

``LocalExecutor`` runs tasks in this process, one after another, with a progress bar. The Ray Data
executor (pipelines/executors.py) runs the very same task functions as a Ray Data job, locally or on
a cluster. A task is a plain dict; a task function takes it and returns a dict (counts, or a small
Arrow table such as a scan's side table). The Ray executor pickles both on their way to and from
its workers (they are the driver's own objects, never read from a file).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

from tqdm.auto import tqdm

Task = dict[str, Any]
TaskFn = Callable[[Task], dict[str, Any]]


class Executor(Protocol):
    """Runs ``fn`` over every task and returns the results in task order."""

    name: str

    def map(self, fn: TaskFn, tasks: list[Task], desc: str) -> list[dict[str, Any]]: ...


class LocalExecutor:
    """Runs tasks in this process: the default for tests and the Python API."""

    name = "local"

    def __init__(self, progress: bool | None = None):
        self.progress = sys.stderr.isatty() if progress is None else progress

    def map(self, fn: TaskFn, tasks: list[Task], desc: str) -> list[dict[str, Any]]:
        return [fn(t) for t in tqdm(tasks, desc=desc, unit="shard", disable=not self.progress or not tasks)]
