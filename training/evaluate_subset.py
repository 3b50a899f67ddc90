"""Pass 2 of evaluation (``training.evaluate``): one subset's queries scored against their candidates.

:func:`evaluate_subset` plans the subset's queries from the index of pass 1 (their positives, pair
candidates and false negatives, by doc number), encodes the docs they need once, in corpus order
(only the Parquet row groups holding them are read), then streams the queries in batches and adds
each one's P@1, chance level and, for a retrieval subset, Recall@k and nDCG@10 to the subset's
:class:`SubsetSums`. The protocol is told in ``training.evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from assay.curation import storage
from assay.curation.dataset import Dataset
from assay.curation.schema import CORPUS, QUERIES, SCHEMAS, resolve_image_cell
from assay.training.evaluate_index import FN, NEG, NULL_KEY, POS, Index

__all__ = ["NDCG_AT", "Encoder", "SubsetSums", "evaluate_subset"]

NDCG_AT = 10
#: Query-by-doc score blocks are cut so that one holds at most this many floats.
_SCORE_BLOCK = 1 << 24
#: Discounts of ranks 1..NDCG_AT (binary relevance: the gain of a relevant doc at rank r is 1/log2(r+1)).
_GAINS = 1.0 / np.log2(np.arange(2, NDCG_AT + 2))

Encoder = Callable[[list[dict[str, Any]]], Any]


def _subset_mask(col: pa.Array, subset: str) -> pa.Array:
    if subset == NULL_KEY:
        return pc.is_null(col)
    return pc.fill_null(pc.equal(col, pa.scalar(subset, pa.string())), False)


def _rows(batch: pa.RecordBatch, root: str) -> list[dict[str, Any]]:
    rows = batch.to_pylist()
    for r in rows:
        if "image" in r:
            r["image"] = resolve_image_cell(r["image"], root)
    return rows


def _embeddings(out: Any, n: int, who: str) -> np.ndarray:
    if hasattr(out, "detach"):  # a torch tensor; torch is not imported here (it is an optional extra)
        out = out.detach().float().cpu().numpy()
    arr = np.asarray(out, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"{who} returned an array of shape {arr.shape} for {n} rows; expected ({n}, dim)")
    if not np.isfinite(arr).all():
        raise ValueError(f"{who} returned non-finite values (NaN or inf)")
    return arr


def _read_units(
    ds: Dataset, table: str, units: list[tuple[str, int]], batch_size: int
) -> Iterator[pa.RecordBatch]:
    by_shard: dict[str, list[int]] = {}
    for name, rg in units:
        by_shard.setdefault(name, []).append(rg)
    columns = SCHEMAS[table].names
    for name, rgs in by_shard.items():
        pf = storage.parquet_file(ds.shard_path(table, name))
        have = [c for c in columns if c in pf.schema_arrow.names]
        yield from pf.iter_batches(batch_size=batch_size, row_groups=rgs, columns=have)


def _rebatch(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` items (the last may be shorter)."""
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest finite scores, highest first, ties by lower index (= doc order)."""
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < n:
        thr = np.partition(scores, n - k)[n - k]
        sel = np.flatnonzero(scores >= thr)
    else:
        sel = np.arange(n)
    top = sel[np.lexsort((sel, -scores[sel]))][:k]
    return top[np.isfinite(scores[top])]


@dataclass
class SubsetSums:
    """Running sums for one subset."""

    queries: int = 0
    hits: int = 0
    candidates: int = 0
    chance: float = 0.0
    recall: dict[int, float] = field(default_factory=dict)
    ndcg: float = 0.0
    without_positive: int = 0
    positives: int = 0  # relevant docs of the scored queries (labelled, or from the truth)

    def add_query(self, top1: np.ndarray, pcols: np.ndarray, n_cands: int) -> None:
        """One scored query: its top candidate (a column), its positives' columns, its candidates."""
        self.queries += 1
        self.positives += len(pcols)
        self.hits += int(len(top1) > 0 and bool(np.isin(top1[0], pcols)))
        self.candidates += n_cands
        self.chance += len(pcols) / n_cands

    def add_ranking(self, ranked: np.ndarray, pcols: np.ndarray, ks: list[int]) -> None:
        """Recall@k and nDCG@10 of one query's ranking against the whole subset."""
        rel = np.isin(ranked, pcols)
        for k in ks:
            self.recall[k] = self.recall.get(k, 0.0) + float(rel[:k].sum()) / len(pcols)
        dcg = float(_GAINS[: len(rel)][rel[:NDCG_AT]].sum())
        idcg = float(_GAINS[: min(len(pcols), NDCG_AT)].sum())
        self.ndcg += dcg / idcg


def evaluate_subset(
    ds: Dataset,
    index: Index,
    subset: str,
    encode_queries: Encoder,
    encode_candidates: Encoder,
    *,
    batch_size: int,
    ks: list[int],
    retrieval: bool,
    candidate_set: str,
    root: str,
    bar: tqdm,
    limit: int | None = None,
) -> SubsetSums:
    """One subset's running sums: plan its queries, encode the docs they need, then score its
    queries batch by batch."""
    acc = SubsetSums()
    qids = index.queries_of[subset][:limit]
    plan, needed, ranks_subset = _plan_queries(index, qids, candidate_set, acc)
    if not plan:
        bar.update(len(qids))
        return acc
    code = index.subset_code.get(subset, -1)
    if retrieval or ranks_subset:
        needed |= index.doc_subset == code
    docs = _encode_docs(ds, index, needed, code, encode_candidates, batch_size=batch_size, root=root)
    depth = max([*ks, NDCG_AT])
    for rows in _rebatch(_planned_query_rows(ds, index, subset, plan, batch_size, root), batch_size):
        qemb = _embeddings(encode_queries(rows), len(rows), "encode_queries")
        if qemb.shape[1] != docs.emb.shape[1]:
            raise ValueError(
                f"query embeddings have dim {qemb.shape[1]} but candidate embeddings {docs.emb.shape[1]}"
            )
        _score_queries(acc, rows, qemb, plan, docs, retrieval=retrieval, ks=ks, depth=depth)
        bar.update(len(rows))
    bar.update(acc.without_positive)
    if acc.queries != len(plan):  # pragma: no cover - a query id read in pass 1 is read again here
        raise RuntimeError(f"{subset}: {len(plan) - acc.queries} queries were not found on the second read")
    return acc


class _QueryPlan(NamedTuple):
    """How one scorable query is scored, by doc numbers."""

    pos: np.ndarray  # its positives
    cands: np.ndarray  # its pair candidates: positives and negatives, less false negatives
    fn: np.ndarray  # its false negatives: never ranked
    use_pairs: bool  # P@1 over the pair candidates; else over the whole subset


def _plan_queries(
    index: Index, qids: list[str], candidate_set: str, acc: SubsetSums
) -> tuple[dict[str, _QueryPlan], np.ndarray, bool]:
    """The plan of each scorable query, the docs their candidates need (a mask over doc numbers), and
    whether one of them ranks the whole subset. A query without a positive is counted in ``acc``."""
    plan: dict[str, _QueryPlan] = {}
    needed = np.zeros(len(index.doc_subset), dtype=bool)
    ranks_subset = False
    for qid in qids:
        qn = index.query_number[qid]
        a, b = index.pair_offsets[qn], index.pair_offsets[qn + 1]
        docs, labels = index.pair_doc[a:b], index.pair_label[a:b]
        pos = np.unique(docs[labels == POS])
        if not len(pos):
            acc.without_positive += 1
            continue
        fn = np.setdiff1d(docs[labels == FN], pos)  # positive wins over false_negative
        cands = np.setdiff1d(np.union1d(pos, docs[labels == NEG]), fn)
        # the pairs make a candidate set only if they name a negative: all-positive pairs would
        # make P@1 trivially 1 (a retrieval query with many gold images)
        use_pairs = candidate_set == "pairs" and len(cands) > len(pos)
        ranks_subset = ranks_subset or not use_pairs
        plan[qid] = _QueryPlan(pos, cands, fn, use_pairs)
        needed[cands] = True
    return plan, needed, ranks_subset


@dataclass
class _SubsetDocs:
    """The encoded docs of one subset's evaluation, one column each, in corpus order (the tie-break)."""

    emb: np.ndarray  # (columns, dim)
    colmap: np.ndarray  # doc number -> column of ``emb``; -1 for a doc not encoded
    in_subset: np.ndarray  # per column: the doc belongs to the subset (not only a positive of a query)
    n_subset: int
    all_in_subset: bool
    queries_per_block: int  # whole-subset scores are a block of queries at a time (<= _SCORE_BLOCK floats)


def _encode_docs(
    ds: Dataset,
    index: Index,
    needed: np.ndarray,
    code: int,
    encode_candidates: Encoder,
    *,
    batch_size: int,
    root: str,
) -> _SubsetDocs:
    """Encode the ``needed`` docs, once, in corpus order; only the row groups of the subsets those docs
    belong to are read."""
    colmap = np.full(len(index.doc_subset), -1, dtype=np.int64)
    col_doc: list[int] = []
    blocks: list[np.ndarray] = []
    for chunk in _rebatch(_needed_doc_rows(ds, index, needed, batch_size, root), batch_size):
        rows = [r for _, r in chunk]
        blocks.append(_embeddings(encode_candidates(rows), len(rows), "encode_candidates"))
        for dn, _ in chunk:
            colmap[dn] = len(col_doc)
            col_doc.append(dn)
    emb = np.concatenate(blocks)
    in_subset = index.doc_subset[np.array(col_doc, dtype=np.int64)] == code
    n_subset = int(in_subset.sum())
    return _SubsetDocs(
        emb=emb,
        colmap=colmap,
        in_subset=in_subset,
        n_subset=n_subset,
        all_in_subset=n_subset == len(col_doc),
        queries_per_block=max(1, _SCORE_BLOCK // len(col_doc)),
    )


def _needed_doc_rows(
    ds: Dataset, index: Index, needed: np.ndarray, batch_size: int, root: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(doc number, row) of each needed doc, in corpus order; a doc id's first row wins."""
    names = {c: n for n, c in index.subset_code.items()}
    units = index.corpus.of(names[int(c)] for c in np.unique(index.doc_subset[needed]))
    claimed = np.zeros(len(index.doc_subset), dtype=bool)  # later duplicates of a doc id are skipped
    for batch in _read_units(ds, CORPUS, units, batch_size):
        keep, nums = [], []
        for did in batch.column(batch.schema.get_field_index("doc_id")).to_pylist():
            dn = index.doc_number.get(did, -1)
            ok = dn >= 0 and needed[dn] and not claimed[dn]
            if ok:
                claimed[dn] = True
                nums.append(dn)
            keep.append(ok)
        yield from zip(nums, _rows(batch.filter(pa.array(keep, pa.bool_())), root), strict=True)


def _planned_query_rows(
    ds: Dataset, index: Index, subset: str, plan: dict[str, _QueryPlan], batch_size: int, root: str
) -> Iterator[dict[str, Any]]:
    """The rows of the subset's planned queries, in dataset order; a duplicated query id keeps its first row."""
    seen: set[str] = set()
    for batch in _read_units(ds, QUERIES, index.queries.of([subset]), batch_size):
        batch = batch.filter(_subset_mask(batch.column(batch.schema.get_field_index("subset")), subset))
        for r in _rows(batch, root):
            if r["query_id"] in plan and r["query_id"] not in seen:
                seen.add(r["query_id"])
                yield r


def _score_queries(
    acc: SubsetSums,
    rows: list[dict[str, Any]],
    qemb: np.ndarray,
    plan: dict[str, _QueryPlan],
    docs: _SubsetDocs,
    *,
    retrieval: bool,
    ks: list[int],
    depth: int,
) -> None:
    """Score a batch of queries (embedded as ``qemb``) and add them to ``acc``."""
    step = docs.queries_per_block
    for start in range(0, len(rows), step):
        chunk = range(start, min(start + step, len(rows)))
        full_idx = [i for i in chunk if retrieval or not plan[rows[i]["query_id"]].use_pairs]
        block = qemb[full_idx] @ docs.emb.T if full_idx else None
        full = {i: block[j] for j, i in enumerate(full_idx)}
        for i in chunk:
            q = plan[rows[i]["query_id"]]
            pcols = docs.colmap[q.pos]
            ranked: np.ndarray | None = None
            if i in full:
                ranked, n_cands = _rank_subset(full[i], pcols, docs.colmap[q.fn], docs, depth)
            if q.use_pairs:
                ccols = np.sort(docs.colmap[q.cands])
                top1 = ccols[_top(docs.emb[ccols] @ qemb[i], 1)]
                n_cands = len(ccols)
            else:
                top1 = ranked[:1]
            acc.add_query(top1, pcols, n_cands)
            if retrieval:
                acc.add_ranking(ranked, pcols, ks)


def _rank_subset(
    scores: np.ndarray, pcols: np.ndarray, fcols: np.ndarray, docs: _SubsetDocs, depth: int
) -> tuple[np.ndarray, int]:
    """The top ``depth`` columns of a query's ``scores`` against the whole subset (plus its positives,
    less its false negatives), and how many candidates that ranking has."""
    fcols = fcols[fcols >= 0]  # a false negative outside the subset is not ranked anyway
    v = scores
    if not docs.all_in_subset:
        v = np.where(docs.in_subset, v, -np.inf)
        v[pcols] = scores[pcols]
    v[fcols] = -np.inf  # the block is dropped after this chunk: writing into it is fine
    n_cands = docs.n_subset + int((~docs.in_subset[pcols]).sum()) - int(docs.in_subset[fcols].sum())
    return _top(v, depth), n_cands
