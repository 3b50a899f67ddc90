"""The mining stage: hard negatives for every query, against the current checkpoint, per subset.

``mine_dataset(source, out, encoder, rules=...)``, for each subset (the paper mines within each
sub-dataset):

1. embed the subset's queries that have a gold positive (through the embedding cache);
2. stream the corpus shard by shard (DATASET's, then those of the ``corpus=`` pools of extra
   documents: ``mining.pools``), embedding the subset's documents of each shard (cached), and
   search them with ``mining.knn.search``: consecutive shards are searched together in blocks of at
   most ``SEARCH_BLOCK_ROWS`` rows / ``SEARCH_BLOCK_BYTES`` of vectors (a larger shard is a block of
   its own), and the running top-``depth`` per query is merged block by block, so memory holds a
   block of vectors, not the corpus. The result is kept in the search cache
   (``<cache_dir>/search``, ``mining.search_cache``: keyed on the vectors themselves), so mining
   again with the same checkpoint and data (other rules, a resumed loop) searches nothing
   (``search_cache=False`` turns it off; the returned stats say ``search_cached`` per subset);
3. drop every query's gold positives and every candidate whose content equals a positive's
   (``curation.content_key``: normalised text and image bytes), then apply the selection rules
   (``mining.select_rules``: rank window, top-k, margins, percent of positive, sampling) to all
   queries at once with ``select_batch`` (``mining.select_batch``), which picks exactly what
   ``select_negatives`` picks query by query (a rule of the user's own, which the batch path cannot
   run, goes query by query);
4. write the negatives as pairs: label ``hard_negative``, ``score`` (cosine), ``rank`` (1 = the
   nearest candidate, positives included in the count, as the search returned them) and ``origin``
   ``mined:<encoder model_id>:<rules>``; and give each gold positive pair of a mined query its
   ``score``: the encoder's cosine between query and positive (the score the margin rules compare
   against), so positive and negative scores can be compared from the pairs alone.

The output is a new dataset: queries and corpus linked unchanged (plus the pool documents its new
pairs name, copied), every input pair kept except the negatives of an earlier mining round
(``origin`` starting with ``mined:``), which the new round replaces. Each subset's result is saved
under ``_progress/`` as it completes, so a killed run resumes at the subset it reached, and the
embedding cache makes the rerun encode nothing it had encoded. The manifest's ``extra.mine`` holds
per-subset statistics of positive and negative scores (and ``extra.corpus`` what each pool gave).

DATASET, OUT, the pools and ``cache_dir`` may each be a URI (``s3://...``: ``curation.storage``);
images referenced by path are read under DATASET's data root wherever it is, and a cache on object
storage is kept as Parquet segments (``mining.embed_cache``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assay.curation import storage
from assay.curation.content_key import content_key, normalize_texts
from assay.curation.dataset import (
    AlreadyComplete,
    Dataset,
    DatasetWriter,
    Manifest,
    atomic_write_json,
    atomic_write_parquet,
    shard_name,
)
from assay.curation.schema import CORPUS, PAIRS, QUERIES, ROW_COLUMNS, SCHEMAS, resolve_image_cell
from assay.mining.embed_cache import EmbeddingCache
from assay.mining.encoders import Encoder
from assay.mining.knn import KnnResult, estimate_recall
from assay.mining.pools import MiningCorpus
from assay.mining.search_cache import SearchCache, cached_search
from assay.mining.select import select_negatives
from assay.mining.select_batch import batch_supported, select_batch
from assay.mining.select_rules import (
    AbsoluteMargin,
    Candidate,
    MaxScore,
    MinScore,
    PercentOfPositive,
    RankWindow,
    TopK,
)
from assay.mining.select_spec import PAPER_STAGE2, describe, parse_rules

MINED_PREFIX = "mined:"
FILTERS = (AbsoluteMargin, PercentOfPositive, MinScore, MaxScore)
SELECT_CHUNK = 4096  # queries selected at once: bounds the (queries, depth) temporaries
# The corpus is searched in blocks of whole dataset shards, up to these bounds (a larger shard is a
# block alone): one kNN call per block, not per small shard, for the same result.
SEARCH_BLOCK_ROWS = 65_536
SEARCH_BLOCK_BYTES = 64 * 2**20
SEARCH_CACHE_DIR = "search"  # the search cache's folder under the embedding cache's root


class MiningError(ValueError):
    """A mining run that cannot go as asked."""


@dataclass
class SubsetStats:
    queries: int = 0
    negatives: int = 0
    positive_scores: list[float] = field(default_factory=list)
    negative_scores: list[float] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    index: str = ""
    recall: float | None = None  # recall@depth of an approximate index against exact search
    search_cached: bool = False  # the kNN result came from the search cache (not in the manifest)
    pool_negatives: int | None = None  # negatives from corpus pools (None: no pools given)

    def summary(self) -> dict[str, Any]:
        def stats(xs: list[float]) -> dict[str, float]:
            if not xs:
                return {}
            a = np.asarray(xs, dtype=np.float64)
            return {
                "n": int(a.size),
                "mean": round(float(a.mean()), 4),
                "p10": round(float(np.percentile(a, 10)), 4),
                "p50": round(float(np.percentile(a, 50)), 4),
                "p90": round(float(np.percentile(a, 90)), 4),
            }

        pools = {} if self.pool_negatives is None else {"pool_negatives": self.pool_negatives}
        return {
            "queries": self.queries,
            "negatives": self.negatives,
            "positive_score": stats(self.positive_scores),
            "negative_score": stats(self.negative_scores),
            "dropped": dict(sorted(self.dropped.items())),
            "index": self.index,
            "recall_at_depth": None if self.recall is None else round(self.recall, 4),
            **pools,
        }


def default_depth(rules: Sequence[Any], max_positives: int) -> int:
    """How deep to search, as sentence-transformers' ``mine_hard_negatives`` (6.x) does: the deepest
    rank a rule reaches (x10 when score filters may remove candidates first), plus room for the
    query's positives twice over (they are searched, then excluded) and for one document that is the
    query itself. A rank window's end is a search rank and needs no room."""
    windows = [r.end for r in rules if isinstance(r, RankWindow)]
    tops = [r.k for r in rules if isinstance(r, TopK)]
    if windows:
        return max(windows) + max_positives
    base = max(tops) if tops else 100
    if any(isinstance(r, FILTERS) for r in rules):
        base *= 10
    return base + 2 * max_positives + 1


def _subset_rows(ds: Dataset, table: str, name: str, subset: str) -> pa.Table:
    t = ds.read_shard(table, name, columns=ROW_COLUMNS[table])
    return t.filter(pc.equal(pc.fill_null(t["subset"], ""), subset))


def _open(ds: Dataset | str | Path) -> Dataset:
    return ds if isinstance(ds, Dataset) else Dataset(ds)


def _subset_file(progress: Path, subset: str) -> Path:
    return progress / "mined" / f"{hashlib.sha1(subset.encode()).hexdigest()[:16]}.parquet"


def mine_dataset(
    source: Dataset | str | Path,
    out: str | Path,
    encoder: Encoder,
    *,
    cache_dir: str | Path,
    rules: str | Sequence[Any] = PAPER_STAGE2,
    depth: int | None = None,
    subsets: Sequence[str] | None = None,
    corpus: Sequence[Dataset | str | Path] = (),
    method: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 2048,
    overwrite: bool = False,
    progress: Callable[[str, int], None] | None = None,
    search_cache: bool = True,
) -> tuple[Manifest, dict[str, dict[str, Any]]]:
    """Mine ``source`` into ``out`` (see the module docstring); returns the manifest and per-subset stats.

    ``progress(what, n)`` is told of encoded/cached rows (``"embed"``) and mined queries (``"mine"``).
    ``batch_size`` is the number of rows handed to the encoder at once and committed to the cache
    together (the encoder batches inside it, sorted by length as sentence-transformers does).
    ``corpus``: pools of extra documents (assay datasets; their corpus tables) that join the mining
    pool of their subset (``mining.pools`` says how ids, subsets and the output's corpus go); the
    manifest's ``extra.corpus`` counts, per pool, what was searched, ignored and copied.
    ``search_cache``: keep and reuse kNN results under ``<cache_dir>/search`` (``mining.search_cache``);
    the returned stats (not the manifest's) say per subset whether this run's search was a hit
    (``search_cached``).
    """
    ds = _open(source)
    as_spec = isinstance(rules, str) or (isinstance(rules, list) and rules and isinstance(rules[0], dict))
    rule_list = parse_rules(rules) if as_spec else list(rules)
    spec = describe(rule_list)
    root = ds.data_root

    gold = _gold_pairs(ds)
    per_query = gold.group_by("query_id").aggregate([("doc_id", "count", pc.CountOptions(mode="all"))])
    max_pos = max(pc.max(per_query["doc_id_count"]).as_py() or 1, 1) if per_query.num_rows else 1
    depth = depth or default_depth(rule_list, max_pos)
    if depth < 1:
        raise MiningError("depth must be at least 1")
    all_subsets = sorted(
        {
            (r or "")
            for n in ds.shards(QUERIES)
            for r in pc.unique(ds.read_shard(QUERIES, n, columns=["subset"]).column(0)).to_pylist()
        }
    )
    chosen = sorted(subsets) if subsets else all_subsets
    unknown = sorted(set(chosen) - set(all_subsets))
    if unknown:
        raise MiningError(
            f"{storage.display(ds.root)}: no subset {unknown[0]!r}; it has {', '.join(all_subsets)}"
        )
    docs = MiningCorpus(ds, [_open(p) for p in corpus], subsets=all_subsets, chosen=chosen)
    origin = f"{MINED_PREFIX}{encoder.model_id}:{spec}"
    config = {
        "encoder": encoder.model_id,
        "template": encoder.template_id,
        "rules": spec,
        "depth": depth,
        "subsets": chosen,
        "method": method,
        "seed": seed,
    }
    if docs.pools:  # another pool (path or content), another run: never resumed into this one
        config["corpus"] = docs.refs()
    try:
        writer = DatasetWriter(
            out,
            stage="mine",
            config=config,
            parents=[ds],
            data_root=storage.absolute(root),
            overwrite=overwrite,
        )
    except AlreadyComplete as done:
        return done.manifest, done.manifest.extra.get("mine", {})

    stats: dict[str, dict[str, Any]] = {}
    from_cache: dict[str, bool] = {}  # this run's searches that the search cache answered
    searches = SearchCache(storage.join(cache_dir, SEARCH_CACHE_DIR)) if search_cache else None
    with EmbeddingCache(cache_dir, encoder) as cache:
        for subset in chosen:
            saved = _subset_file(writer.progress_dir, subset)
            stats_file = saved.with_suffix(".json")
            if saved.exists() and stats_file.exists():
                stats[subset] = json.loads(stats_file.read_text())
                continue
            table, sub_stats = _mine_subset(
                ds,
                subset,
                encoder,
                cache,
                gold,
                rule_list,
                depth,
                method,
                device,
                seed,
                batch_size,
                origin,
                progress,
                docs=docs,
                search_cache=searches,
            )
            atomic_write_parquet(saved, table)
            atomic_write_json(stats_file, sub_stats.summary())
            stats[subset] = sub_stats.summary()
            from_cache[subset] = sub_stats.search_cached

    mined = [storage.read_table(_subset_file(writer.progress_dir, s)) for s in chosen]
    mined_table = pa.concat_tables(mined) if mined else SCHEMAS[PAIRS].empty_table()
    is_gold = pc.equal(mined_table["label"], "positive")
    gold = mined_table.filter(is_gold)
    mined_table = mined_table.filter(pc.invert(is_gold))
    names = ds.shards(PAIRS)
    for name in names:
        if not writer.is_done(PAIRS, name):
            t = ds.read_shard(PAIRS, name)
            t = t.filter(pc.invert(pc.starts_with(pc.fill_null(t["origin"], ""), MINED_PREFIX)))
            writer.sink.write_shard(PAIRS, name, _score_positives(t, gold))
    extra_name = shard_name(len(names))
    if not writer.is_done(PAIRS, extra_name):
        writer.sink.write_shard(PAIRS, extra_name, mined_table)
    for table in (QUERIES, CORPUS):
        for name in ds.shards(table):
            if not writer.is_done(table, name):
                writer.sink.link_shard(table, name, ds.shard_path(table, name))
    extra: dict[str, Any] = {"mine": stats, "origin": origin}
    if docs.pools:
        # the pool documents the new pairs name (negatives, positives DATASET lacks): the output is whole
        new_ids = pa.concat_arrays([mined_table["doc_id"].combine_chunks(), gold["doc_id"].combine_chunks()])
        negative_ids = mined_table["doc_id"].combine_chunks()
        docs.add_referenced(writer.sink, new_ids, negative_ids, root, set(ds.shards(CORPUS)))
        extra["corpus"] = [p.summary() for p in docs.pools]
    manifest = writer.finish(extra=extra)
    # the manifest holds what was mined; where this run's search came from is not part of it
    return manifest, {name: {**v, "search_cached": from_cache.get(name, False)} for name, v in stats.items()}


def _score_positives(pairs: pa.Table, gold: pa.Table) -> pa.Table:
    """``pairs`` with the ``score`` of each gold positive found in ``gold`` set to its cosine there."""
    if not gold.num_rows or not pairs.num_rows:
        return pairs
    key = lambda t: pc.binary_join_element_wise(t["query_id"], t["doc_id"], "\x1f")  # noqa: E731
    at = pc.index_in(key(pairs), value_set=key(gold).combine_chunks())
    found = pc.and_(pc.equal(pc.fill_null(pairs["label"], ""), "positive"), pc.is_valid(at))
    score = pc.if_else(found, pc.take(gold["score"], pc.fill_null(at, 0)), pairs["score"])
    return pairs.set_column(pairs.schema.get_field_index("score"), "score", score)


def _mine_subset(
    ds: Dataset,
    subset: str,
    encoder: Encoder,
    cache: EmbeddingCache,
    gold: pa.Table,
    rules: Sequence[Any],
    depth: int,
    method: str,
    device: str,
    seed: int,
    batch_size: int,
    origin: str,
    progress: Callable[[str, int], None] | None,
    docs: MiningCorpus | None = None,
    search_cache: SearchCache | None = None,
) -> tuple[pa.Table, SubsetStats]:
    """One subset's mined negatives and its gold positives' cosines (as pairs), and its stats."""
    docs = docs or MiningCorpus(ds, [], subsets=[subset], chosen=[subset])
    stats = SubsetStats(pool_negatives=0 if docs.pools else None)
    queries = _gold_queries(ds, subset, gold)
    if not queries.num_rows:
        return SCHEMAS[PAIRS].empty_table(), stats

    def tick(what: str) -> Callable[[int], None] | None:
        return (lambda n: progress(what, n)) if progress else None

    encoded = cache.encoded
    q_vecs = cache.embed_table(
        queries, "query", data_root=ds.data_root, batch_size=batch_size, progress=tick("embed")
    )
    new_queries = cache.encoded > encoded  # no search kept in the cache was over these vectors
    qid_col = queries["query_id"].combine_chunks()
    # (query row, doc_id) of every gold positive of the subset's queries
    gold_rows = pa.table({"qi": pa.array(np.arange(len(qid_col))), "query_id": qid_col}).join(
        gold, "query_id", join_type="inner"
    )
    corpus = _SubsetCorpus(docs, subset, cache, batch_size, pc.unique(gold_rows["doc_id"]), tick)
    result, stats.search_cached = cached_search(
        search_cache,
        q_vecs,
        lambda first: corpus.blocks(record=first),
        depth,
        lookup=not new_queries,
        method=method,
        device=device,
    )
    stats.index = result.method
    if not set(result.method.split("+")) <= {"exact", "torch"}:
        # An approximate index: measure what it missed, against exact search on a sample of queries
        # (the vectors come from the cache, so this costs searches, not encoding).
        stats.recall = estimate_recall(
            q_vecs,
            lambda: corpus.blocks(record=False),
            depth,
            method,
            sample=min(256, len(q_vecs)),
            device=device,
        )
    doc_col = corpus.doc_ids()
    positives = _score_gold(q_vecs, gold_rows, doc_col, corpus)
    stats.positive_scores = positives.scores.astype(np.float64).tolist()
    content_id = np.append(
        _content_ids(corpus.key_parts), -1
    )  # id -1 (no result) reads the last: -1, no content
    keep = _select(result, positives, content_id, rules, seed, qid_col.to_pylist(), stats, progress)
    return _mined_pairs(result, keep, positives, qid_col, doc_col, corpus, origin, stats), stats


def _gold_queries(ds: Dataset, subset: str, gold: pa.Table) -> pa.Table:
    """The subset's queries that have a gold positive, in dataset order."""
    query_parts = [_subset_rows(ds, QUERIES, n, subset) for n in ds.shards(QUERIES)]
    queries = pa.concat_tables(query_parts) if query_parts else SCHEMAS[QUERIES].empty_table()
    return queries.filter(pc.is_in(queries["query_id"], value_set=pc.unique(gold["query_id"])))


class _SubsetCorpus:
    """The subset's corpus vectors (DATASET's, then the pools') as the search reads them, and what the
    first read records: each doc's id, content key and source, and the gold positives' vectors."""

    def __init__(
        self,
        docs: MiningCorpus,
        subset: str,
        cache: EmbeddingCache,
        batch_size: int,
        wanted_pos: pa.Array,
        tick: Callable[[str], Callable[[int], None] | None],
    ):
        self.docs, self.subset, self.cache, self.batch_size = docs, subset, cache, batch_size
        self.wanted_pos, self.tick = wanted_pos, tick
        self.doc_parts: list[pa.Array] = []
        self.key_parts: list[Any] = []  # per shard: content keys (see _content_keys)
        self.pos_parts: list[
            tuple[np.ndarray, np.ndarray]
        ] = []  # (doc indices, vectors) of the gold positives
        self.src_parts: list[
            np.ndarray
        ] = []  # per shard: the index of the source (0: DATASET, i: the i-th pool)
        self.n_docs = 0

    def blocks(self, record: bool) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, vectors) in search blocks of whole dataset shards (see SEARCH_BLOCK_*)."""
        offset, block, rows = 0, [], 0
        for s, src, t in self.docs.subset_shards(self.subset):
            at = src.dataset.data_root
            tock = self.tick("embed") if record else None
            vecs = self.cache.embed_table(
                t, "candidate", data_root=at, batch_size=self.batch_size, progress=tock
            )
            if record:
                self._record(s, t, at, vecs)
            if block and (
                rows + len(vecs) > SEARCH_BLOCK_ROWS
                or (rows + len(vecs)) * vecs.shape[1] * 4 > SEARCH_BLOCK_BYTES
            ):
                yield offset, np.concatenate(block) if len(block) > 1 else block[0]
                offset, block, rows = offset + rows, [], 0
            block.append(vecs)
            rows += len(vecs)
        if block:
            yield offset, np.concatenate(block) if len(block) > 1 else block[0]

    def _record(self, source: int, t: pa.Table, data_root: Path, vecs: np.ndarray) -> None:
        wanted = pc.indices_nonzero(pc.is_in(t["doc_id"], value_set=self.wanted_pos)).to_numpy()
        self.pos_parts.append((self.n_docs + wanted.astype(np.int64), vecs[wanted]))
        self.doc_parts.append(t["doc_id"].combine_chunks())
        self.key_parts.append(_content_keys(t, data_root))
        self.src_parts.append(np.full(t.num_rows, source, np.int16))
        self.n_docs += t.num_rows

    def doc_ids(self) -> pa.Array:
        """Every doc's id, by doc index (the search's result ids)."""
        return pa.concat_arrays(self.doc_parts) if self.doc_parts else pa.array([], pa.string())


class _Positives(NamedTuple):
    """The gold positives found in the corpus: (query row, doc index) of each, sorted by query row,
    its cosine, and each query's best (NaN when none was scored)."""

    q: np.ndarray
    d: np.ndarray
    scores: np.ndarray
    best: np.ndarray


def _score_gold(
    q_vecs: np.ndarray, gold_rows: pa.Table, doc_col: pa.Array, corpus: _SubsetCorpus
) -> _Positives:
    pair_q, pair_d = _positive_pairs(gold_rows, doc_col)
    if pair_d.size:
        pos_idx = np.concatenate([i for i, _ in corpus.pos_parts])
        pos_mat = np.concatenate([v for _, v in corpus.pos_parts])
        pair_scores = np.einsum("ij,ij->i", q_vecs[pair_q], pos_mat[np.searchsorted(pos_idx, pair_d)])
    else:
        pair_scores = np.zeros(0, np.float32)
    best = np.full(len(q_vecs), -np.inf)
    np.maximum.at(best, pair_q, pair_scores.astype(np.float64))
    best[np.isneginf(best)] = np.nan  # no scored positive: the positive-relative rules keep nothing
    return _Positives(pair_q, pair_d, pair_scores, best)


def _select(
    result: KnnResult,
    positives: _Positives,
    content_id: np.ndarray,
    rules: Sequence[Any],
    seed: int,
    qids: list[str],
    stats: SubsetStats,
    progress: Callable[[str, int], None] | None,
) -> np.ndarray:
    """Which candidates of the search become negatives ((queries, depth) bool), SELECT_CHUNK queries
    at a time: the batch path for the built-in rules, else query by query."""
    ids, scores = result.ids, result.scores
    pair_q, pair_d, best = positives.q, positives.d, positives.best
    present = (ids >= 0) & np.isfinite(scores)
    keep = np.zeros(ids.shape, dtype=bool)
    for lo in range(0, len(qids), SELECT_CHUNK):
        hi = min(lo + SELECT_CHUNK, len(qids))
        in_chunk = (pair_q >= lo) & (pair_q < hi)
        chunk_q, chunk_d = pair_q[in_chunk] - lo, pair_d[in_chunk]
        c_ids = ids[lo:hi]
        cand_content = content_id[c_ids]
        if batch_supported(rules):
            sel = select_batch(
                c_ids,
                scores[lo:hi],
                positive_scores=best[lo:hi],
                is_positive=_rows_match(c_ids, chunk_q, chunk_d),
                same_content=_rows_match(cand_content, chunk_q, content_id[chunk_d]),
                rules=rules,
                seed=seed,
                query_ids=qids[lo:hi],
                present=present[lo:hi],
            )
            keep[lo:hi] = sel.keep
            for k, v in sel.dropped.items():
                stats.dropped[k] = stats.dropped.get(k, 0) + int(v.sum())
        else:
            for qi in range(lo, hi):
                keep[qi] = _select_one(
                    qi, ids, scores, present, pair_q, pair_d, best, content_id, rules, seed, qids, stats
                )
        stats.queries += hi - lo
        if progress:
            progress("mine", hi - lo)
    return keep


def _mined_pairs(
    result: KnnResult,
    keep: np.ndarray,
    positives: _Positives,
    qid_col: pa.Array,
    doc_col: pa.Array,
    corpus: _SubsetCorpus,
    origin: str,
    stats: SubsetStats,
) -> pa.Table:
    """The negatives as hard_negative pairs (their cosine and search rank), then the gold positives
    with their cosine (for mine_dataset to write on the positive pairs); counts them in ``stats``."""
    ids, scores = result.ids, result.scores
    rows, cols = np.nonzero(keep)
    neg_scores = scores[rows, cols]
    stats.negatives = int(rows.size)
    if corpus.docs.pools and rows.size:
        stats.pool_negatives = int((np.concatenate(corpus.src_parts)[ids[rows, cols]] > 0).sum())
    stats.negative_scores = neg_scores.astype(np.float64).tolist()
    negatives = _pairs_table(
        qid_col.take(rows), doc_col.take(ids[rows, cols]), "hard_negative", neg_scores, cols + 1, origin
    )
    gold_scored = _pairs_table(
        qid_col.take(positives.q), doc_col.take(positives.d), "positive", positives.scores, None, None
    )
    return pa.concat_tables([negatives, gold_scored])


def _gold_pairs(ds: Dataset) -> pa.Table:
    """The distinct (query_id, doc_id) pairs labelled positive."""
    parts = []
    for name in ds.shards(PAIRS):
        t = ds.read_shard(PAIRS, name, columns=["query_id", "doc_id", "label"])
        parts.append(t.filter(pc.equal(t["label"], "positive")).select(["query_id", "doc_id"]))
    if not parts:
        return pa.table({"query_id": pa.array([], pa.string()), "doc_id": pa.array([], pa.string())})
    return pa.concat_tables(parts).group_by(["query_id", "doc_id"]).aggregate([])


def _positive_pairs(gold_rows: pa.Table, doc_ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(query row, doc index) of every gold positive found in the subset's corpus, sorted by query row.
    A doc id listed twice in the corpus is the last of its copies."""
    docs = pa.table({"doc_id": doc_ids, "di": pa.array(np.arange(len(doc_ids)))})
    last = docs.group_by("doc_id").aggregate([("di", "max")])
    pairs = gold_rows.join(last, "doc_id", join_type="inner")
    pairs = pairs.sort_by([("qi", "ascending"), ("di_max", "ascending")])
    return pairs["qi"].to_numpy().astype(np.int64), pairs["di_max"].to_numpy().astype(np.int64)


def _content_keys(rows: pa.Table, root: Path) -> pa.Array | list[Any]:
    """Keys equal for two rows exactly when their ``curation.content_key`` digests are: the normalised
    text (``normalize_texts``; "" for no text, which normalize_text never returns) as an Arrow array
    when no row has an image, else a list holding each image row's digest (bytes: never equal to a
    text)."""
    norms = pc.fill_null(normalize_texts(rows["text"]), "")
    if rows["image"].null_count == rows.num_rows:
        return norms
    keys: list[Any] = norms.to_pylist()
    texts = rows["text"].to_pylist()
    for i in pc.indices_nonzero(pc.is_valid(rows["image"])).to_pylist():
        cell = rows["image"][i].as_py()
        resolve_image_cell(cell, root)  # refuses a path that leaves the data root
        keys[i] = content_key(texts[i], cell, root).digest  # resolves the path (a URI too) itself
    return keys


def _content_ids(parts: Sequence[pa.Array | list[Any]]) -> np.ndarray:
    """A small int per row, equal for equal content keys, from _content_keys' per-shard parts."""
    if not parts:
        return np.zeros(0, np.int64)
    if all(isinstance(p, pa.Array) for p in parts):
        codes = pc.dictionary_encode(pa.concat_arrays(parts)).indices
        return codes.to_numpy(zero_copy_only=False).astype(np.int64)
    first: dict[Any, int] = {}
    keys = [k for p in parts for k in (p.to_pylist() if isinstance(p, pa.Array) else p)]
    return np.fromiter((first.setdefault(k, len(first)) for k in keys), dtype=np.int64, count=len(keys))


def _rows_match(values: np.ndarray, pair_q: np.ndarray, pair_v: np.ndarray) -> np.ndarray:
    """(rows, depth) bool: ``values[q, j]`` equals one of the ``pair_v`` listed for row ``q``.

    Pairs come grouped by row; the i-th pair of every row is matched in one step (a row has few)."""
    out = np.zeros(values.shape, dtype=bool)
    if pair_q.size == 0:
        return out
    starts = np.flatnonzero(np.r_[True, pair_q[1:] != pair_q[:-1]])
    slot = np.arange(pair_q.size) - np.repeat(starts, np.diff(np.r_[starts, pair_q.size]))
    for s in range(int(slot.max()) + 1):
        at = slot == s
        q = pair_q[at]
        out[q] |= values[q] == pair_v[at][:, None]
    return out


def _select_one(
    qi, ids, scores, present, pair_q, pair_d, best, content_id, rules, seed, qids, stats
) -> np.ndarray:
    """One query through the per-query reference path (rules the batch path cannot run)."""
    cols = np.flatnonzero(present[qi])
    cands = [Candidate(doc=int(ids[qi, j]), score=float(scores[qi, j]), rank=int(j) + 1) for j in cols]
    pos = set(pair_d[np.searchsorted(pair_q, qi) : np.searchsorted(pair_q, qi, "right")].tolist())
    sel = select_negatives(
        cands,
        positives=pos,
        positive_score=None if math.isnan(best[qi]) else float(best[qi]),
        content_of=lambda i: int(content_id[i]),
        positive_contents={int(content_id[i]) for i in pos},
        rules=rules,
        seed=seed,
        query_id=qids[qi],
    )
    for k, v in sel.dropped.items():
        stats.dropped[k] = stats.dropped.get(k, 0) + v
    row = np.zeros(ids.shape[1], dtype=bool)
    row[[c.rank - 1 for c in sel.negatives]] = True
    return row


def _pairs_table(
    qids: np.ndarray,
    dids: np.ndarray,
    label: str,
    scores: np.ndarray,
    ranks: np.ndarray | None,
    origin: str | None,
) -> pa.Table:
    n = len(qids)
    schema = SCHEMAS[PAIRS]
    cols = {
        "query_id": pa.array(qids, type=pa.string()),
        "doc_id": pa.array(dids, type=pa.string()),
        "label": pa.array(np.full(n, label, dtype=object), type=pa.string()),
        "score": pa.array(np.asarray(scores, dtype=np.float32)),
        "rank": pa.nulls(n, schema.field("rank").type)
        if ranks is None
        else pa.array(ranks, schema.field("rank").type),
        "origin": pa.nulls(n, pa.string())
        if origin is None
        else pa.array(np.full(n, origin, dtype=object), pa.string()),
    }
    return pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)
