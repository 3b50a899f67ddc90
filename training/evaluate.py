"""Evaluation of an embedder on an assay dataset: the MMEB protocol, plus retrieval metrics.

``evaluate(dataset, encode_queries, encode_candidates)`` scores every query of the dataset against
its candidate set and returns a metrics dict (``write_metrics`` puts it in a JSON file). The two
encoders take a list of row dicts and return one embedding per row (numpy or torch, ``(n, dim)``);
embeddings are assumed L2-normalised, and the score of a (query, doc) pair is their dot product.

Rows handed to the encoders are the table rows as dicts: queries ``query_id, subset, task,
instruction, text, image``; corpus ``doc_id, subset, instruction, text, image``. An ``image`` cell is
passed as ``{"bytes": ..., "path": ...}`` with its bytes unchanged and its path, when it has one,
made absolute against ``Dataset.data_root``; the encoder reads the file (inline bytes win, the
Hugging Face convention). Nothing here decodes or holds images beyond one batch of rows.

The protocol (MMEB, per subset):

- **Positives** of a query are the docs its pairs label ``positive`` that exist in the corpus. A query
  with none is skipped and counted in ``queries_without_positive``.
- **False negatives** (``false_negative``: judged relevant though not gold) are neither positives nor
  negatives: they are removed from that query's candidate set and from its retrieval ranking, so a
  correct-but-unlabelled doc neither helps nor hurts the score. A doc labelled both positive and
  false_negative for the same query counts as positive.
- **Candidate set for P@1**: with ``candidate_set='pairs'`` (the default), the docs the query's pairs
  name (positives, negatives and hard negatives, found in the corpus) when at least one of them is
  a negative; otherwise, and always with ``candidate_set='subset'``, every corpus doc of the query's subset
  (plus the query's positives, wherever they live). P@1 = the top-ranked candidate is a positive.
- **Retrieval subsets** (task ``retrieval`` or ``visdoc``): Recall@k (fraction of the query's
  positives in the top k, averaged over queries) and nDCG@10 (binary relevance, ideal DCG over
  ``min(#positives, 10)``), ranking against the whole subset corpus (plus the query's positives,
  minus its false negatives).
- **Ties** are broken deterministically by corpus order: of two docs with the same score, the one
  that comes first in the corpus (shard order, then row order) ranks higher. (A constant encoder
  therefore scores whatever the corpus order gives, not zero.)
- **Truth** (``truth=``, ``assay eval --truth``; ``curation.truth``): real data labels one positive
  per query and leaves other matching docs unlabelled, so a model that ranks an unlabelled match
  first loses P@1 for being right. Given a truth, relevance comes from it wherever it knows the
  pair: every matching doc counts as a positive (labelled or not), a doc it calls no match counts
  as a negative (even one labelled positive or false_negative); where it is silent the labels
  decide as above (``training.evaluate_index``). ``positives_per_query`` shows what was counted,
  ``settings.truth`` which truth, and ``counts.truth_*`` what it changed.
- Pairs with a label outside positive/negative/hard_negative/false_negative (or none) are ignored
  (counted in ``pairs_ignored``); pairs naming a doc absent from the corpus are counted in
  ``missing_docs``; pairs naming an unknown query in ``pairs_without_query``. A duplicated id keeps
  its first row.

Averages follow MMEB: P@1 per subset over its queries, per meta-task as the mean over its subsets,
and ``overall.p_at_1`` as the mean over all subsets (``overall.p_at_1_micro`` is the mean over
queries). Subsets with no scorable query report ``p_at_1: None`` and are left out of the averages.

Memory: a first pass (``training.evaluate_index``) reads only the id, subset, task and label
columns, keeping the query and doc ids (in dicts) and the pairs as flat integer arrays (about 9
bytes a pair); then (``training.evaluate_subset``), subset by subset, the docs that subset needs
are encoded once in batches of ``batch_size`` (only the Parquet row groups holding them are read)
and cached by doc_id for that subset only, and its queries are streamed and scored in batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from assay.curation import storage
from assay.curation.dataset import Dataset, atomic_write_json
from assay.curation.truth import Truth, read_truth
from assay.training.evaluate_index import NEGATIVE_LABELS, NULL_KEY, build_index, subset_key
from assay.training.evaluate_subset import NDCG_AT, Encoder, SubsetSums, evaluate_subset

__all__ = ["NEGATIVE_LABELS", "NULL_KEY", "RETRIEVAL_TASKS", "evaluate", "write_metrics"]

#: Meta-tasks that also get Recall@k and nDCG@10 against the whole subset corpus.
RETRIEVAL_TASKS = ("retrieval", "visdoc")


def evaluate(
    dataset: Dataset | str | os.PathLike,
    encode_queries: Encoder,
    encode_candidates: Encoder,
    *,
    batch_size: int = 64,
    ks: Iterable[int] = (1, 5, 10),
    candidate_set: str = "pairs",
    subsets: Iterable[str] | None = None,
    retrieval_tasks: Iterable[str] = RETRIEVAL_TASKS,
    progress: bool = False,
    max_queries_per_subset: int | None = None,
    truth: Truth | str | os.PathLike | None = None,
) -> dict[str, Any]:
    """P@1 per subset and meta-task (MMEB), Recall@k and nDCG@10 for retrieval subsets.

    ``dataset`` is a Dataset (or its path). ``encode_queries`` / ``encode_candidates`` map a list of
    row dicts (at most ``batch_size``) to an ``(n, dim)`` array or tensor of L2-normalised embeddings.
    ``candidate_set``: ``'pairs'`` (each query against the docs its pairs name, when one is a negative;
    else its whole subset) or ``'subset'`` (every query against its whole subset corpus).
    ``ks``: the cut-offs of Recall@k. ``subsets`` restricts the evaluation to those subsets;
    ``retrieval_tasks`` names the tasks that get Recall@k and nDCG@10. ``max_queries_per_subset``
    scores only the first N queries of each subset (dataset order), against the full candidate
    sets: a quicker, deterministic estimate. ``truth`` (a ``curation.truth.Truth`` or its file)
    decides relevance where it knows it: every matching doc counts as relevant, labelled or not.
    See the module docstring.

    Returns ``{"overall", "per_subset", "per_task", "chance_p_at_1", "counts", "settings"}``.
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    if candidate_set not in ("pairs", "subset"):
        raise ValueError(f"candidate_set must be 'pairs' or 'subset', not {candidate_set!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    ks = sorted({int(k) for k in ks})
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, not {ks}")
    retrieval_tasks = set(retrieval_tasks)
    only = None if subsets is None else {subset_key(s) for s in subsets}
    if truth is not None and not isinstance(truth, Truth):
        truth = read_truth(truth)

    index = build_index(ds, truth)  # pass 1: ids, subsets and labels only (and the truth)
    names = sorted(s for s in index.queries_of if only is None or s in only)
    bar = tqdm(
        total=sum(len(index.queries_of[s][:max_queries_per_subset]) for s in names),
        desc="eval",
        unit="query",
        disable=not progress,
    )
    per_subset: dict[str, dict[str, Any]] = {}
    accs: dict[str, SubsetSums] = {}
    for s in names:  # pass 2: subset by subset
        task = index.tasks[s].most_common(1)[0][0]
        retrieval = task in retrieval_tasks
        acc = accs[s] = evaluate_subset(
            ds,
            index,
            s,
            encode_queries,
            encode_candidates,
            batch_size=batch_size,
            ks=ks,
            retrieval=retrieval,
            candidate_set=candidate_set,
            root=storage.absolute(ds.data_root),
            bar=bar,
            limit=max_queries_per_subset,
        )
        n = acc.queries
        code = index.subset_code.get(s)
        entry: dict[str, Any] = {
            "task": task,
            "p_at_1": acc.hits / n if n else None,
            "queries": n,
            "queries_without_positive": acc.without_positive,
            "positives_per_query": acc.positives / n if n else None,
            "candidates_per_query": acc.candidates / n if n else None,
            "corpus": 0 if code is None else int((index.doc_subset == code).sum()),
        }
        if retrieval:
            for k in ks:
                entry[f"recall@{k}"] = acc.recall.get(k, 0.0) / n if n else None
            entry[f"ndcg@{NDCG_AT}"] = acc.ndcg / n if n else None
        per_subset[s] = entry
    bar.close()

    scored = [s for s in names if accs[s].queries]
    by_task: dict[str, list[float]] = {}
    for s in scored:
        by_task.setdefault(per_subset[s]["task"], []).append(per_subset[s]["p_at_1"])
    total = sum(accs[s].queries for s in names)
    return {
        "overall": {
            "p_at_1": float(np.mean([per_subset[s]["p_at_1"] for s in scored])) if scored else None,
            "p_at_1_micro": sum(accs[s].hits for s in names) / total if total else None,
            "queries": total,
            "queries_without_positive": sum(accs[s].without_positive for s in names),
            "subsets": len(scored),
        },
        "per_subset": per_subset,
        "per_task": {t: {"p_at_1": float(np.mean(v)), "subsets": len(v)} for t, v in sorted(by_task.items())},
        "chance_p_at_1": {s: accs[s].chance / accs[s].queries if accs[s].queries else None for s in names},
        "counts": dict(sorted(index.counts.items())),
        "settings": {
            "dataset": storage.display(ds.root),
            "candidate_set": candidate_set,
            "ks": ks,
            "ndcg_at": NDCG_AT,
            "retrieval_tasks": sorted(retrieval_tasks),
            "subsets": None if only is None else sorted(only),
            "max_queries_per_subset": max_queries_per_subset,
            "ties": "corpus order",
            "truth": None if truth is None else truth.describe(),
        },
    }


def write_metrics(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``metrics`` as JSON, atomically (readers see the old file or the whole new one; on an
    object store, one whole object)."""
    path = storage.path(path)
    atomic_write_json(path, _plain(metrics))
    return path


def _plain(obj: Any) -> Any:
    """numpy scalars to Python numbers, NaN to None: strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
