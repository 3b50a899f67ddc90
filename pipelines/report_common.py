"""What every section of the run report (pipelines/report.py) shares: the step record, HTML helpers.

``Step`` is one step of the run as its ``steps/<name>.json`` says. The helpers format numbers and
durations, escape every string read from the run (``esc``), and find outputs relative to the run
directory; ``Subsets`` maps the pairs of a dataset to their queries' subsets in Arrow.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assay.curation import storage
from assay.curation.dataset import Dataset, DatasetError
from assay.curation.schema import QUERIES
from assay.pipelines import report_plots as plots

NOT_RUN = "not run yet"
#: Errors an unreadable or half-written output raises; its section says so instead of failing.
READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, DatasetError)


@dataclass
class Step:
    """One step of the run, as its ``steps/<name>.json`` says (``status`` is NOT_RUN without one)."""

    name: str
    index: int
    run: str = ""
    status: str = NOT_RUN
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    argv: list[str] = field(default_factory=list)
    error: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == "complete"


class Subsets:
    """Each pair's subset, looked up in Arrow: query id -> row of the queries table -> subset code.
    A query without a subset (or a pair whose query is missing) is in subset ""."""

    def __init__(self, ds: Dataset):
        ids, subsets = [], []
        for batch in ds.iter_batches(QUERIES, columns=["query_id", "subset"]):
            ids.append(batch.column(0))
            subsets.append(pc.fill_null(batch.column(1), ""))
        self.ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
        encoded = pc.dictionary_encode(pa.concat_arrays(subsets) if subsets else pa.array([], pa.string()))
        self.names: list[str] = [*encoded.dictionary.to_pylist(), ""]  # the last: unknown query
        self.codes = np.append(encoded.indices.to_numpy(zero_copy_only=False), len(self.names) - 1)

    def of(self, query_ids: pa.ChunkedArray) -> np.ndarray:
        """The subset code of every query id (an index into ``names``)."""
        row = pc.fill_null(pc.index_in(query_ids, value_set=self.ids), -1).to_numpy()
        return self.codes[row]  # -1, an unknown query, picks the last code


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def subset_cell(subset: str) -> str:
    return esc(subset) if subset else "<i>(no subset)</i>"


def badge(status: str) -> str:
    colour = plots.STATUS_COLOUR.get(status, plots.OTHER_STATUS)
    return f'<span class=badge style="background:{colour}">{esc(status)}</span>'


def num(v: Any, digits: int = 3) -> str:
    if v is None or isinstance(v, bool):
        return "–"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return esc(v)
    return "–" if math.isnan(f) else f"{f:.{digits}f}"


def pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "–"


def dur(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds + 0.5), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def output_path(run_dir: Any, value: str) -> Any:
    """Where a step's recorded output is: an absolute path or a URI as recorded, else under the run."""
    if storage.is_remote(value) or Path(value).is_absolute():
        return storage.path(value)
    return storage.path(run_dir) / value


def no_output(s: Step) -> str:
    if s.status == "complete":
        return "complete, but it recorded no output"
    return f"{s.status}: {s.error}" if s.error else s.status


def clip(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "\n…\n" + text[-limit // 2 :]
