"""Executors run a stage's per-shard tasks. Stages know nothing of executors and the reverse.

``LocalExecutor`` runs tasks in this process, one after another, with a progress bar. The Ray Data
executor (pipelines/executors.py) runs the very same task functions as a Ray Data job, locally or on
a cluster. A task is a plain dict; a task function takes it and returns a small dict of counts.
Tasks and results cross process boundaries as JSON, so a table inside one travels as text
(``pack_table`` / ``unpack_table``).
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Callable
from typing import Any, Protocol

import pyarrow as pa
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


def pack_table(table: pa.Table) -> str:
    """An Arrow table as text that a JSON task or result can carry (Arrow IPC, lz4, base64)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
        w.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode("ascii")


def unpack_table(text: str) -> pa.Table:
    """The table ``pack_table`` packed, exactly."""
    return pa.ipc.open_stream(pa.py_buffer(base64.b64decode(text))).read_all()
