"""Pass 1 of evaluation (``training.evaluate``): the ids, subsets and labels of a dataset as integers.

``build_index(ds, truth)`` reads only the id, subset, task and label columns: query and doc ids go
into dicts (numbered in table order, the first row of an id wins), and the pairs become three flat
integer arrays sorted by query (about 9 bytes a pair). Which row groups hold which subset is kept
too, so pass 2 reads only the row groups of the subset it scores.

**Truth** (``curation.truth``). Without one, a query's relevant docs are its ``positive`` pairs and
its ``false_negative`` pairs are left out (the judge says they match; gold does not). With one,
*where the truth speaks it decides, where it is silent the labels do*:

- a pair the truth calls a match is a positive (added when no pair names it: a matching doc the
  labels left out, e.g. one of the captions subset's unlabelled matches);
- a pair the truth calls no match is a negative, whatever its label (a labelled positive or a
  judged false negative included);
- for a *complete* truth, every doc of a query it names is either a match or not, so that query's
  pairs not among its matches become negatives; a labelled sample leaves its other pairs alone.

Truth rows naming a query or doc the dataset does not hold are skipped and counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from assay.curation import storage
from assay.curation.dataset import Dataset
from assay.curation.schema import CORPUS, NULL_KEY, PAIRS, QUERIES
from assay.curation.truth import Truth

#: Pair labels that make a doc a candidate for its query (positives aside).
NEGATIVE_LABELS = ("negative", "hard_negative")


def subset_key(v: str | None) -> str:
    return NULL_KEY if v is None else v


#: Pair label codes in the compact pair index (other labels are ignored).
POS, NEG, FN = 0, 1, 2
_LABEL_CODE = {"positive": POS, "false_negative": FN} | dict.fromkeys(NEGATIVE_LABELS, NEG)


@dataclass
class Units:
    """Where one table's rows of each subset live: (shard, row group) units, by subset."""

    units: list[tuple[str, int]] = field(default_factory=list)
    by_subset: dict[str, list[int]] = field(default_factory=dict)

    def of(self, subsets: Iterable[str]) -> list[tuple[str, int]]:
        return [self.units[u] for u in sorted({u for s in subsets for u in self.by_subset.get(s, [])})]


@dataclass
class Index:
    """What pass 1 learns, as ids and integers only (no text, no images).

    Docs are numbered in corpus order (first row of an id wins); pairs are held as three flat arrays
    sorted by query number, ``pair_offsets[q]:pair_offsets[q + 1]`` being query ``q``'s pairs."""

    queries: Units
    corpus: Units
    query_number: dict[str, int]
    queries_of: dict[str, list[str]]
    tasks: dict[str, Counter]
    doc_number: dict[str, int]
    doc_subset: np.ndarray  # subset code of each doc number
    subset_code: dict[str, int]
    pair_offsets: np.ndarray
    pair_doc: np.ndarray
    pair_label: np.ndarray
    counts: Counter


def scan_ids(ds: Dataset, table: str, columns: list[str], on_row: Callable[[str, list[Any]], None]) -> Units:
    """Read ``columns`` (the first is the subset) of ``table`` row group by row group, recording
    which units hold which subsets; ``on_row(subset, other_values)`` for every row."""
    info = Units()
    for name in ds.shards(table):
        pf = storage.parquet_file(ds.shard_path(table, name))
        for rg in range(pf.num_row_groups):
            unit = len(info.units)
            info.units.append((name, rg))
            for batch in pf.iter_batches(batch_size=65536, row_groups=[rg], columns=columns):
                cols = [batch.column(i).to_pylist() for i in range(len(columns))]
                for s, *rest in zip(*cols, strict=True):
                    s = subset_key(s)
                    units = info.by_subset.setdefault(s, [])
                    if not units or units[-1] != unit:
                        units.append(unit)
                    on_row(s, rest)
    return info


def build_index(ds: Dataset, truth: Truth | None = None) -> Index:
    counts: Counter = Counter()
    query_number: dict[str, int] = {}
    queries_of: dict[str, list[str]] = {}
    tasks: dict[str, Counter] = {}

    def on_query(s: str, values: list[Any]) -> None:
        qid, t = values
        if qid is None:
            counts["queries_without_id"] += 1
        elif qid in query_number:
            counts["duplicate_query_ids"] += 1
        else:
            query_number[qid] = len(query_number)
            queries_of.setdefault(s, []).append(qid)
            tasks.setdefault(s, Counter())[subset_key(t)] += 1

    queries = scan_ids(ds, QUERIES, ["subset", "query_id", "task"], on_query)

    doc_number: dict[str, int] = {}
    subset_code: dict[str, int] = {}
    doc_subset: list[int] = []

    def on_doc(s: str, values: list[Any]) -> None:
        (did,) = values
        if did is None:
            counts["docs_without_id"] += 1
        elif did in doc_number:
            counts["duplicate_doc_ids"] += 1
        else:
            doc_number[did] = len(doc_number)
            doc_subset.append(subset_code.setdefault(s, len(subset_code)))

    corpus = scan_ids(ds, CORPUS, ["subset", "doc_id"], on_doc)

    qs, ds_, ls = [], [], []
    for batch in ds.iter_batches(PAIRS, columns=["query_id", "doc_id", "label"], batch_size=65536):
        n = len(batch)
        q = np.fromiter((query_number.get(x, -1) for x in batch.column(0).to_pylist()), np.int64, n)
        d = np.fromiter((doc_number.get(x, -1) for x in batch.column(1).to_pylist()), np.int64, n)
        lab = np.fromiter((_LABEL_CODE.get(x, -1) for x in batch.column(2).to_pylist()), np.int8, n)
        counts["pairs_without_query"] += int((q < 0).sum())
        counts["missing_docs"] += int(((q >= 0) & (d < 0)).sum())
        counts["pairs_ignored"] += int(((q >= 0) & (d >= 0) & (lab < 0)).sum())
        keep = (q >= 0) & (d >= 0) & (lab >= 0)
        qs.append(q[keep])
        ds_.append(d[keep])
        ls.append(lab[keep])
    q = np.concatenate(qs) if qs else np.zeros(0, np.int64)
    d = np.concatenate(ds_) if ds_ else np.zeros(0, np.int64)
    lab = np.concatenate(ls) if ls else np.zeros(0, np.int8)
    if truth is not None:
        q, d, lab = apply_truth(truth, q, d, lab, query_number, doc_number, counts)
    order = np.argsort(q, kind="stable")
    return Index(
        queries=queries,
        corpus=corpus,
        query_number=query_number,
        queries_of=queries_of,
        tasks=tasks,
        doc_number=doc_number,
        doc_subset=np.array(doc_subset, dtype=np.int32),
        subset_code=subset_code,
        pair_offsets=np.searchsorted(q[order], np.arange(len(query_number) + 1)),
        pair_doc=d[order],
        pair_label=lab[order],
        counts=counts,
    )


def apply_truth(
    truth: Truth,
    q: np.ndarray,
    d: np.ndarray,
    lab: np.ndarray,
    query_number: dict[str, int],
    doc_number: dict[str, int],
    counts: Counter,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs (query numbers, doc numbers, label codes) as the truth has them; see the module
    docstring. Counts: ``truth_queries`` (queries of the dataset the truth names),
    ``truth_matches_unlabelled`` (matches no positive pair named), ``truth_labels_overruled``
    (positive or false_negative pairs the truth says do not match), ``truth_pairs_not_in_dataset``."""
    n_docs = max(len(doc_number), 1)

    def keys(by_query: dict[str, frozenset[str]]) -> np.ndarray:
        out = []
        for qid, docs in by_query.items():
            qn = query_number.get(qid)
            for did in docs:
                dn = doc_number.get(did)
                if qn is None or dn is None:
                    counts["truth_pairs_not_in_dataset"] += 1
                else:
                    out.append(qn * n_docs + dn)
        return np.unique(np.array(out, dtype=np.int64))

    match, no_match = keys(truth.matches), keys(truth.non_matches)
    named = np.zeros(len(query_number) + 1, dtype=bool)
    named[np.array([query_number[x] for x in truth.queries if x in query_number], dtype=np.int64)] = True
    counts["truth_queries"] += int(named.sum())
    key = q * n_docs + d
    is_match, is_no_match = np.isin(key, match), np.isin(key, no_match)
    if truth.complete:
        is_no_match |= named[q] & ~is_match
    overruled = is_no_match & (lab != NEG)
    counts["truth_labels_overruled"] += int(overruled.sum())
    lab = lab.copy()
    lab[is_no_match] = NEG
    known_positive = np.unique(key[is_match & (lab == POS)])
    lab[is_match] = POS
    counts["truth_matches_unlabelled"] += int(len(match) - len(known_positive))
    extra = np.setdiff1d(match, key)  # matches no pair names: they join as positives
    return (
        np.concatenate([q, extra // n_docs]),
        np.concatenate([d, extra % n_docs]),
        np.concatenate([lab, np.full(len(extra), POS, np.int8)]),
    )
