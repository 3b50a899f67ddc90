"""The truth: which documents really match a query, kept beside the datasets and never inside one.

Real data labels one positive per query and leaves the other matching documents unlabelled; the
judge exists for them. To measure how often that happens, and how well the judge finds them, one
needs a *truth*: a table of (query, document) pairs whose relevance is known. It lives in its own
file, not in a dataset's pairs, because the pairs are what training reads
(``training.data.TrainingData.load`` reads only the datasets a config names, and a truth file is not
a dataset). Evaluation (``assay eval --truth``) and judge quality (``assay judge --truth``) read it.

A truth file is Parquet (one file or a folder of ``*.parquet``), JSONL or CSV, with the columns::

    query_id   string, required
    doc_id     string, required
    relevant   boolean (or 0/1), optional

It comes in two kinds, told apart by the ``relevant`` column:

- **complete** (no ``relevant`` column, every row a match): for each query it names, its rows are
  *all* the documents that match it; any other document is not a match. The bundled easy-vqa
  example writes this kind (``OUT/truth/<split>.parquet``).
- **labelled sample** (a ``relevant`` column): each row says whether that one pair matches, and the
  pairs it does not name are unknown; e.g. a few hundred mined pairs judged by hand.

``Truth.relevant(query_id, doc_id)`` answers True, False or None (unknown). Ids are the dataset's
own: a truth written for a raw dataset still holds for what validate, dedup and filter make of it,
since those stages keep ids (rows they drop are simply absent and never looked up).

Memory: the truth is held as Python sets of ids (~100 bytes a pair); it is meant for labelled
samples and example-sized data, not for a billion pairs.

Example::

    write_truth("data/truth.parquet", [("q-1", "d-7"), ("q-1", "d-9")])   # complete: q-1 matches d-7, d-9
    truth = read_truth("data/truth.parquet")
    truth.relevant("q-1", "d-9"), truth.relevant("q-1", "d-2"), truth.relevant("q-2", "d-2")
    # (True, False, None)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assay.curation.dataset import atomic_write_parquet

TRUTH_COLUMNS = ("query_id", "doc_id")
RELEVANT = "relevant"
#: Where an ingest that writes splits (``OUT/train``, ``OUT/test``) puts their truth: ``OUT/truth/<split>.parquet``.
TRUTH_DIR = "truth"


def split_truth_path(out: str | os.PathLike, split: str) -> Path:
    """``OUT/truth/<split>.parquet``: the truth of the split dataset ``OUT/<split>``."""
    return Path(out) / TRUTH_DIR / f"{split}.parquet"


def split_truth_ref(split: str) -> str:
    """The same file as the split's manifest names it (``extra.truth``, relative to the split)."""
    return f"../{TRUTH_DIR}/{split}.parquet"


class TruthError(ValueError):
    """A truth file that cannot be read; the message names the file and what to fix."""


@dataclass(frozen=True)
class Truth:
    """Known relevance of (query, doc) pairs; see the module docstring for the two kinds."""

    source: str
    complete: bool
    matches: dict[str, frozenset[str]] = field(default_factory=dict)
    non_matches: dict[str, frozenset[str]] = field(default_factory=dict)  # a labelled sample's "no" rows

    def relevant(self, query_id: str, doc_id: str) -> bool | None:
        """True (a match), False (not a match) or None (the truth does not know this pair)."""
        docs = self.matches.get(query_id)
        if docs is not None and doc_id in docs:
            return True
        if self.complete:
            return False if docs is not None else None
        return False if doc_id in self.non_matches.get(query_id, ()) else None

    @property
    def queries(self) -> set[str]:
        """The queries the truth says anything about."""
        return set(self.matches) | set(self.non_matches)

    def describe(self) -> dict[str, object]:
        """A small summary for metrics files and manifests."""
        return {
            "path": self.source,
            "kind": "complete" if self.complete else "labelled sample",
            "queries": len(self.queries),
            "matches": sum(len(v) for v in self.matches.values()),
            "non_matches": sum(len(v) for v in self.non_matches.values()),
        }


def read_truth(path: str | os.PathLike) -> Truth:
    """Read a truth file (Parquet file or folder, ``.jsonl``, ``.csv``); ``TruthError`` says what is wrong."""
    path = Path(path)
    table = _read_table(path)
    missing = [c for c in TRUTH_COLUMNS if c not in table.column_names]
    if missing:
        raise TruthError(
            f"truth {path}: no column {', '.join(missing)} (has: {', '.join(table.column_names) or 'none'}); "
            "a truth lists query_id, doc_id and optionally relevant"
        )
    cols = {}
    for c in TRUTH_COLUMNS:
        col = table.column(c)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise TruthError(f"truth {path}: column {c} holds {col.type}, expected string ids")
        if col.null_count:
            row = pc.index(pc.is_null(col), True).as_py()
            raise TruthError(f"truth {path}: row {row} has no {c}; every row needs a query_id and a doc_id")
        cols[c] = col.to_pylist()
    complete = RELEVANT not in table.column_names
    flags = [True] * table.num_rows if complete else _flags(table.column(RELEVANT), path)
    seen: dict[tuple[str, str], bool] = {}
    for i, (q, d, flag) in enumerate(zip(cols["query_id"], cols["doc_id"], flags, strict=True)):
        if seen.setdefault((q, d), flag) != flag:
            raise TruthError(
                f"truth {path}: the pair ({q}, {d}) is listed as relevant and as not relevant (row {i}); "
                "keep one row per pair"
            )
    matches: dict[str, set[str]] = {}
    non_matches: dict[str, set[str]] = {}
    for (q, d), flag in seen.items():
        (matches if flag else non_matches).setdefault(q, set()).add(d)
    return Truth(
        source=str(path),
        complete=complete,
        matches={q: frozenset(v) for q, v in matches.items()},
        non_matches={q: frozenset(v) for q, v in non_matches.items()},
    )


def write_truth(
    path: str | os.PathLike,
    pairs: Iterable[tuple[str, str]],
    relevant: Iterable[bool] | None = None,
) -> Path:
    """Write (query_id, doc_id) pairs as a truth file, atomically: a complete truth (every pair a
    match) without ``relevant``, a labelled sample with it. Rows are sorted, so the bytes depend only
    on the pairs."""
    pairs = list(pairs)
    flags = None if relevant is None else list(relevant)
    order = sorted(range(len(pairs)), key=lambda i: pairs[i])
    columns = {
        "query_id": pa.array([pairs[i][0] for i in order], pa.string()),
        "doc_id": pa.array([pairs[i][1] for i in order], pa.string()),
    }
    if flags is not None:
        if len(flags) != len(pairs):
            raise ValueError(f"{len(flags)} relevant flags for {len(pairs)} pairs")
        columns[RELEVANT] = pa.array([bool(flags[i]) for i in order], pa.bool_())
    path = Path(path)
    atomic_write_parquet(path, pa.table(columns))
    return path


def _read_table(path: Path) -> pa.Table:
    if not path.exists():
        raise TruthError(f"truth {path} does not exist")
    try:
        if path.is_dir() or path.suffix == ".parquet":
            return pq.read_table(path)
        if path.suffix in (".jsonl", ".json"):
            import pyarrow.json as pj

            return pj.read_json(path)
        if path.suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise TruthError(f"truth {path}: cannot read it: {e}") from e
    raise TruthError(f"truth {path}: unknown format; give a .parquet file or folder, a .jsonl or a .csv file")


def _flags(col: pa.ChunkedArray, path: Path) -> list[bool]:
    if col.null_count:
        row = pc.index(pc.is_null(col), True).as_py()
        raise TruthError(f"truth {path}: row {row} has no {RELEVANT} value; write true or false")
    if pa.types.is_boolean(col.type):
        return col.to_pylist()
    if pa.types.is_integer(col.type):
        values = col.to_pylist()
        bad = next((i for i, v in enumerate(values) if v not in (0, 1)), None)
        if bad is None:
            return [v == 1 for v in values]
        raise TruthError(f"truth {path}: row {bad} has {RELEVANT} = {values[bad]}; use true/false or 1/0")
    raise TruthError(f"truth {path}: column {RELEVANT} holds {col.type}; use true/false or 1/0")
