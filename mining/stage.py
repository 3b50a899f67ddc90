"""The mining stage: hard negatives for every query, against the current checkpoint, per subset.

``mine_dataset(source, out, encoder, rules=...)``, for each subset (the paper mines within each
sub-dataset):

1. embed the subset's queries that have a gold positive (through the embedding cache);
2. stream the corpus shard by shard, embedding the subset's documents of each shard (cached), and
   search them with ``mining.knn.search``: the running top-``depth`` per query is merged shard by
   shard, so memory holds one shard of vectors, not the corpus;
3. per query, drop its gold positives and every candidate whose content equals a positive's
   (``curation.content_key``: normalised text and image bytes), then apply the selection rules
   (``mining.select``: rank window, top-k, margins, percent of positive, sampling);
4. write the negatives as pairs: label ``hard_negative``, ``score`` (cosine), ``rank`` (1 = the
   nearest candidate, positives included in the count, as the search returned them) and ``origin``
   ``mined:<encoder model_id>:<rules>``.

The output is a new dataset: queries and corpus linked unchanged, every input pair kept except the
negatives of an earlier mining round (``origin`` starting with ``mined:``), which the new round
replaces. Each subset's result is saved under ``_progress/`` as it completes, so a killed run
resumes at the subset it reached, and the embedding cache makes the rerun encode nothing it had
encoded. The manifest's ``extra.mine`` holds per-subset statistics of positive and negative scores.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.content_key import content_key
from curation.dataset import (
    AlreadyComplete,
    Dataset,
    DatasetWriter,
    Manifest,
    atomic_write_json,
    atomic_write_parquet,
    shard_name,
)
from curation.schema import CORPUS, PAIRS, QUERIES, ROW_COLUMNS, SCHEMAS, resolve_image_cell
from mining.embed_cache import EmbeddingCache
from mining.encoders import Encoder
from mining.knn import estimate_recall, search
from mining.select import (
    AbsoluteMargin,
    Candidate,
    MaxScore,
    MinScore,
    PercentOfPositive,
    RankWindow,
    TopK,
    describe,
    parse_rules,
    select_negatives,
)

MINED_PREFIX = "mined:"
FILTERS = (AbsoluteMargin, PercentOfPositive, MinScore, MaxScore)


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

        return {
            "queries": self.queries,
            "negatives": self.negatives,
            "positive_score": stats(self.positive_scores),
            "negative_score": stats(self.negative_scores),
            "dropped": dict(sorted(self.dropped.items())),
            "index": self.index,
            "recall_at_depth": None if self.recall is None else round(self.recall, 4),
        }


def default_depth(rules: Sequence[Any], max_positives: int) -> int:
    """How deep to search, as sentence-transformers' ``mine_hard_negatives`` does: the deepest rank a
    rule reaches (x10 when score filters may remove candidates first), plus room for the query's
    positives twice over (they are searched, then excluded). A rank window's end is a search rank
    and needs no room."""
    windows = [r.end for r in rules if isinstance(r, RankWindow)]
    tops = [r.k for r in rules if isinstance(r, TopK)]
    if windows:
        return max(windows) + max_positives
    base = max(tops) if tops else 100
    if any(isinstance(r, FILTERS) for r in rules):
        base *= 10
    return base + 2 * max_positives


def _read(ds: Dataset, table: str, name: str, subset: str) -> list[dict[str, Any]]:
    t = ds.read_shard(table, name, columns=ROW_COLUMNS[table])
    return [r for r in t.to_pylist() if (r["subset"] or "") == subset]


def _subset_file(progress: Path, subset: str) -> Path:
    return progress / "mined" / f"{hashlib.sha1(subset.encode()).hexdigest()[:16]}.parquet"


def mine_dataset(
    source: Dataset | str | Path,
    out: str | Path,
    encoder: Encoder,
    *,
    cache_dir: str | Path,
    rules: str | Sequence[Any] = "ranks:50-100,sample:random:2",
    depth: int | None = None,
    subsets: Sequence[str] | None = None,
    method: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 2048,
    overwrite: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[Manifest, dict[str, dict[str, Any]]]:
    """Mine ``source`` into ``out`` (see the module docstring); returns the manifest and per-subset stats.

    ``progress(what, n)`` is told of encoded/cached rows (``"embed"``) and mined queries (``"mine"``).
    ``batch_size`` is the number of rows handed to the encoder at once and committed to the cache
    together (the encoder batches inside it, sorted by length as sentence-transformers does).
    """
    ds = source if isinstance(source, Dataset) else Dataset(source)
    as_spec = isinstance(rules, str) or (isinstance(rules, list) and rules and isinstance(rules[0], dict))
    rule_list = parse_rules(rules) if as_spec else list(rules)
    spec = describe(rule_list)
    root = ds.data_root

    positives: dict[str, set[str]] = defaultdict(set)
    for name in ds.shards(PAIRS):
        t = ds.read_shard(PAIRS, name, columns=["query_id", "doc_id", "label"])
        for q, d, label in zip(
            *(t.column(c).to_pylist() for c in ("query_id", "doc_id", "label")), strict=True
        ):
            if label == "positive":
                positives[q].add(d)
    max_pos = max((len(v) for v in positives.values()), default=1)
    depth = depth or default_depth(rule_list, max_pos)
    if depth < 1:
        raise MiningError("depth must be at least 1")
    all_subsets = sorted(
        {
            (r or "")
            for n in ds.shards(QUERIES)
            for r in ds.read_shard(QUERIES, n, columns=["subset"]).column(0).to_pylist()
        }
    )
    chosen = sorted(subsets) if subsets else all_subsets
    unknown = sorted(set(chosen) - set(all_subsets))
    if unknown:
        raise MiningError(f"{ds.root}: no subset {unknown[0]!r}; it has {', '.join(all_subsets)}")
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
    try:
        writer = DatasetWriter(
            out, stage="mine", config=config, parents=[ds], data_root=str(root.resolve()), overwrite=overwrite
        )
    except AlreadyComplete as done:
        return done.manifest, done.manifest.extra.get("mine", {})

    stats: dict[str, dict[str, Any]] = {}
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
                positives,
                rule_list,
                depth,
                method,
                device,
                seed,
                batch_size,
                origin,
                progress,
            )
            atomic_write_parquet(saved, table)
            atomic_write_json(stats_file, sub_stats.summary())
            stats[subset] = sub_stats.summary()

    mined = [pq.read_table(_subset_file(writer.progress_dir, s)) for s in chosen]
    mined_table = pa.concat_tables(mined) if mined else SCHEMAS[PAIRS].empty_table()
    names = ds.shards(PAIRS)
    for name in names:
        if not writer.is_done(PAIRS, name):
            t = ds.read_shard(PAIRS, name)
            origins = t.column("origin").to_pylist()
            keep = [not (o or "").startswith(MINED_PREFIX) for o in origins]
            writer.sink.write_shard(PAIRS, name, t.filter(pa.array(keep)))
    extra_name = shard_name(len(names))
    if not writer.is_done(PAIRS, extra_name):
        writer.sink.write_shard(PAIRS, extra_name, mined_table)
    for table in (QUERIES, CORPUS):
        for name in ds.shards(table):
            if not writer.is_done(table, name):
                writer.sink.link_shard(table, name, ds.shard_path(table, name))
    manifest = writer.finish(extra={"mine": stats, "origin": origin})
    return manifest, stats


def _mine_subset(
    ds: Dataset,
    subset: str,
    encoder: Encoder,
    cache: EmbeddingCache,
    positives: dict[str, set[str]],
    rules: Sequence[Any],
    depth: int,
    method: str,
    device: str,
    seed: int,
    batch_size: int,
    origin: str,
    progress: Callable[[str, int], None] | None,
) -> tuple[pa.Table, SubsetStats]:
    root = ds.data_root
    stats = SubsetStats()
    queries = [
        r for n in ds.shards(QUERIES) for r in _read(ds, QUERIES, n, subset) if r["query_id"] in positives
    ]
    empty = SCHEMAS[PAIRS].empty_table()
    if not queries:
        return empty, stats
    for r in queries:
        r["image"] = resolve_image_cell(r.get("image"), root)

    def tick(what: str) -> Callable[[int], None] | None:
        return (lambda n: progress(what, n)) if progress else None

    q_vecs = cache.embed(queries, "query", data_root=root, batch_size=batch_size, progress=tick("embed"))
    wanted_pos = {d for r in queries for d in positives[r["query_id"]]}
    doc_ids: list[str] = []
    doc_keys: list[bytes] = []
    pos_vec: dict[str, np.ndarray] = {}

    def corpus(record: bool) -> Iterator[tuple[int, np.ndarray]]:
        offset = 0
        for name in ds.shards(CORPUS):
            rows = _read(ds, CORPUS, name, subset)
            if not rows:
                continue
            for r in rows:
                r["image"] = resolve_image_cell(r.get("image"), root)
            tock = tick("embed") if record else None
            vecs = cache.embed(rows, "candidate", data_root=root, batch_size=batch_size, progress=tock)
            if record:
                for j, r in enumerate(rows):
                    doc_ids.append(r["doc_id"])
                    doc_keys.append(content_key(r.get("text"), r.get("image"), root).digest)
                    if r["doc_id"] in wanted_pos:
                        pos_vec[r["doc_id"]] = vecs[j]
            yield offset, vecs
            offset += len(rows)

    result = search(q_vecs, corpus(record=True), depth, method=method, device=device)
    stats.index = result.method
    if not set(result.method.split("+")) <= {"exact", "torch"}:
        # An approximate index: measure what it missed, against exact search on a sample of queries
        # (the vectors come from the cache, so this costs searches, not encoding).
        stats.recall = estimate_recall(
            q_vecs, lambda: corpus(record=False), depth, method, sample=min(256, len(q_vecs)), device=device
        )
    index_of = {d: i for i, d in enumerate(doc_ids)}
    all_ids, all_scores = result.ids.tolist(), result.scores.tolist()
    rows_out: dict[str, list[Any]] = defaultdict(list)
    for qi, q in enumerate(queries):
        qid = q["query_id"]
        pos = {index_of[d] for d in positives[qid] if d in index_of}
        pos_scores = [float(q_vecs[qi] @ pos_vec[d]) for d in positives[qid] if d in pos_vec]
        stats.positive_scores.extend(pos_scores)
        cands = [
            Candidate(doc=int(i), score=float(s), rank=r + 1)
            for r, (i, s) in enumerate(zip(all_ids[qi], all_scores[qi], strict=True))
            if i >= 0 and math.isfinite(s)
        ]
        sel = select_negatives(
            cands,
            positives=pos,
            positive_score=max(pos_scores) if pos_scores else None,
            content_of=lambda i: doc_keys[i],
            positive_contents={doc_keys[i] for i in pos},
            rules=rules,
            seed=seed,
            query_id=qid,
        )
        for k, v in sel.dropped.items():
            stats.dropped[k] = stats.dropped.get(k, 0) + v
        stats.queries += 1
        for c in sel.negatives:
            rows_out["query_id"].append(qid)
            rows_out["doc_id"].append(doc_ids[c.doc])
            rows_out["label"].append("hard_negative")
            rows_out["score"].append(c.score)
            rows_out["rank"].append(c.rank)
            rows_out["origin"].append(origin)
            stats.negative_scores.append(c.score)
            stats.negatives += 1
        if progress:
            progress("mine", 1)
    if not rows_out:
        return empty, stats
    n = len(rows_out["query_id"])
    cols = {f.name: rows_out.get(f.name, [None] * n) for f in SCHEMAS[PAIRS]}
    return pa.table(cols, schema=SCHEMAS[PAIRS]), stats
